// Proxy-token attention on the CPU (Proxyformer): caller-given proxies through the shared
// landmark core, with decomposed column dropout on K2.
#pragma once
#include "effattn/core.hpp"
#include "effattn/cpu/landmark.hpp"

namespace effattn {

template <class T>
struct Operator<Cpu, Proxy<T>> {
  static cpu::LandmarkSpec<T> spec(const Proxy<T>& m, T scale) {
    cpu::LandmarkSpec<T> s;
    s.M = m.proxy_q.shape[2];
    s.proxy_q = m.proxy_q;
    s.proxy_k = m.proxy_k;
    s.iterations = m.pinv_iterations;
    s.invert = m.pinv_iterations > 0;  // 0: out = K1·(K3·V)
    s.column_dropout = m.column_dropout;
    s.dropout_seed = m.dropout_seed;
    s.scale = scale;
    return s;
  }

  template <class U>
  static size_t workspace_bytes(const Proxy<T>& m, Tensor<const U> q, Tensor<const U> k, Tensor<const U> v,
                                const Exec<Cpu>& exec) {
    static_assert(std::is_same_v<T, U>, "effattn: Proxy<T> needs q, k and v of element type T");
    cpu::require_cpu_type<T>();
    detail::check_proxy("effattn::workspace_bytes<Cpu>(Proxy)", m, q);
    const detail::Dims d = detail::dims_of(q, k, v);
    return cpu::landmark_workspace_bytes(spec(m, T(1)), d, cpu::thread_count(exec));
  }

  template <class U>
  static void run(const Proxy<T>& m, Tensor<const U> q, Tensor<const U> k, Tensor<const U> v, Tensor<U> out,
                  const Masks& masks, const Exec<Cpu>& exec) {
    static_assert(std::is_same_v<T, U>, "effattn: Proxy<T> needs q, k, v and out of element type T");
    forward("effattn::attention<Cpu>(Proxy)", m, q, k, v, out, nullptr, masks, exec);
  }

  static constexpr bool kHasBackward = true;

  template <class U>
  static size_t backward_workspace_bytes(const Proxy<T>& m, Tensor<const U> q, Tensor<const U> k, Tensor<const U> v,
                                         const Exec<Cpu>& exec) {
    static_assert(std::is_same_v<T, U>, "effattn: Proxy<T> needs q, k and v of element type T");
    cpu::require_cpu_type<T>();
    detail::check_proxy("effattn::backward_workspace_bytes<Cpu>(Proxy)", m, q);
    return cpu::landmark_backward_workspace_bytes(spec(m, T(1)), detail::dims_of(q, k, v), cpu::thread_count(exec));
  }

  /// Also writes grads.dproxy_q and grads.dproxy_k (required; shaped like the proxies; batch
  /// extent 1: summed over the batch).
  template <class U>
  static void backward(const Proxy<T>& m, Tensor<const U> q, Tensor<const U> k, Tensor<const U> v, Tensor<const U> out,
                       Tensor<const U> dout, const Grads<U>& grads, const Masks& masks, const Exec<Cpu>& exec) {
    static_assert(std::is_same_v<T, U>, "effattn: Proxy<T> needs q, k, v and the gradients of element type T");
    backward_impl("effattn::attention_backward<Cpu>(Proxy)", m, q, k, v, out, dout, nullptr, grads, masks, exec);
  }

  // ---- Training: the saved block is the landmark core's SavedState.
  static constexpr bool kHasSaved = true;

  template <class U>
  static size_t saved_bytes(const Proxy<T>& m, Tensor<const U> q, Tensor<const U> k, Tensor<const U> v) {
    static_assert(std::is_same_v<T, U>, "effattn: Proxy<T> needs q, k and v of element type T");
    cpu::require_cpu_type<T>();
    detail::check_proxy("effattn::saved_bytes<Cpu>(Proxy)", m, q);
    return cpu::landmark::SavedState<T>::bytes(spec(m, T(1)), detail::dims_of(q, k, v));
  }

  template <class U>
  static void run_saving(const Proxy<T>& m, Tensor<const U> q, Tensor<const U> k, Tensor<const U> v, Tensor<U> out,
                         const Saved& saved, const Masks& masks, const Exec<Cpu>& exec) {
    static_assert(std::is_same_v<T, U>, "effattn: Proxy<T> needs q, k, v and out of element type T");
    forward("effattn::attention_with_saved<Cpu>(Proxy)", m, q, k, v, out, &saved, masks, exec);
  }

  template <class U>
  static void backward_saved(const Proxy<T>& m, Tensor<const U> q, Tensor<const U> k, Tensor<const U> v,
                             Tensor<const U> out, Tensor<const U> dout, const Saved& saved, const Grads<U>& grads,
                             const Masks& masks, const Exec<Cpu>& exec) {
    static_assert(std::is_same_v<T, U>, "effattn: Proxy<T> needs q, k, v and the gradients of element type T");
    backward_impl("effattn::attention_backward_with_saved<Cpu>(Proxy)", m, q, k, v, out, dout, &saved, grads, masks,
                  exec);
  }

 private:
  static void forward(const char* where, const Proxy<T>& m, Tensor<const T> q, Tensor<const T> k, Tensor<const T> v,
                      Tensor<T> out, const Saved* saved, const Masks& masks, const Exec<Cpu>& exec) {
    cpu::require_cpu_type<T>();
    const detail::Dims d = detail::check_attention(where, q, k, v, out, masks);
    detail::check_proxy(where, m, q);
    const T scale = static_cast<T>(detail::resolve_scale(where, m.scale, d.D));
    detail::require(!detail::overlaps(m.proxy_q, out) && !detail::overlaps(m.proxy_k, out), where,
                    ": out overlaps proxy_q or proxy_k in memory");
    const cpu::LandmarkSpec<T> s = spec(m, scale);
    if (saved == nullptr) return cpu::landmark_attention(s, d, q, k, v, out, masks, exec);
    const auto state = cpu::saved_for_forward(where, m, s, d, q, k, v, out, masks, exec, *saved);
    cpu::landmark_attention(s, d, q, k, v, out, masks, exec, &state);
    detail::finish_saved(*saved);
  }

  static void backward_impl(const char* where, const Proxy<T>& m, Tensor<const T> q, Tensor<const T> k,
                            Tensor<const T> v, Tensor<const T> out, Tensor<const T> dout, const Saved* saved,
                            const Grads<T>& grads, const Masks& masks, const Exec<Cpu>& exec) {
    cpu::require_cpu_type<T>();
    detail::check_proxy(where, m, q);
    const detail::Dims d = detail::check_backward(where, q, k, v, out, dout, grads, masks,
                                                  {detail::named("proxy_q", m.proxy_q), detail::named("proxy_k", m.proxy_k)});
    const Tensor<T>* proxy_grads[2] = {&grads.dproxy_q, &grads.dproxy_k};
    const Tensor<const T>* proxies[2] = {&m.proxy_q, &m.proxy_k};
    const char* names[2] = {"grads.dproxy_q", "grads.dproxy_k"};
    for (int i = 0; i < 2; ++i) {
      detail::require(proxy_grads[i]->data != nullptr, where, ": ", names[i],
                      " is empty; Proxy writes the proxy gradients there (shape ", detail::shape_str(*proxies[i]), ")");
      detail::check_shape(where, names[i], *proxy_grads[i], proxies[i]->shape, i == 0 ? "proxy_q's shape" : "proxy_k's shape");
      detail::check_writable(where, *proxy_grads[i], names[i]);
    }
    const T scale = static_cast<T>(detail::resolve_scale(where, m.scale, d.D));
    const cpu::LandmarkSpec<T> s = spec(m, scale);
    if (saved == nullptr) return cpu::landmark_backward(s, d, q, k, v, out, dout, grads, masks, exec);
    const auto state = cpu::saved_for_backward(where, m, s, d, q, k, v, out, dout, grads, masks, exec, *saved);
    cpu::landmark_backward(s, d, q, k, v, out, dout, grads, masks, exec, &state);
  }
};

}  // namespace effattn
