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
    cpu::require_cpu_type<T>();
    constexpr const char* where = "effattn::attention<Cpu>(Proxy)";
    const detail::Dims d = detail::check_attention(where, q, k, v, out, masks);
    detail::check_proxy(where, m, q);
    const T scale = static_cast<T>(detail::resolve_scale(where, m.scale, d.D));
    detail::require(!detail::overlaps(m.proxy_q, out) && !detail::overlaps(m.proxy_k, out), where,
                    ": out overlaps proxy_q or proxy_k in memory");
    cpu::landmark_attention(spec(m, scale), d, q, k, v, out, masks, exec);
  }
};

}  // namespace effattn
