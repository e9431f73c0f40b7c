// The effattn method struct for one encoder layer, built from the command line's choice and the
// layer's weights. Backend-independent: `tensor(name)` returns the weight's data in the memory
// the backend reads (host for Cpu, device for Cuda).
#pragma once
#include <effattn/core.hpp>
#include <string>

#include "lra/options.hpp"
#include "lra/weights.hpp"

namespace lra {

/// Calls f(method) with the layer's Softmax, Nystrom, Favor or Proxy<float>.
template <class TensorFn, class F>
void with_method(Attention a, int m, const Config& c, int layer, TensorFn&& tensor, F&& f) {
  const std::string p = "layer" + std::to_string(layer) + ".attn.";
  const auto per_head = [&](const std::string& name) {  // stored [H, M, Dh], viewed as [1, H, M, Dh]
    return effattn::bhsd<const float>(tensor(p + name), 1, c.heads, m, c.head_dim());
  };
  switch (a) {
    case Attention::softmax:
      return f(effattn::Softmax{});
    case Attention::nystrom: {
      effattn::Nystrom n;
      n.landmarks = m;
      return f(n);
    }
    case Attention::favor: {
      effattn::Favor fv;
      fv.projection = per_head("favor_projection");
      return f(fv);
    }
    case Attention::proxy: {
      effattn::Proxy<float> px;
      px.proxy_q = per_head("proxy_q");
      px.proxy_k = per_head("proxy_k");
      return f(px);
    }
  }
}

}  // namespace lra
