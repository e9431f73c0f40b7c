// Proxy-token attention on the CPU (Proxyformer): caller-given proxies through the shared
// landmark core, with decomposed column dropout on K2.
#pragma once
#include "effattn/core.hpp"
#include "effattn/cpu/landmark.hpp"

namespace effattn {

template <class T>
struct Operator<Cpu, Proxy<T>> {
  /// Checks the method against q (and v), and the proxies against each other.
  static void check(const char* where, const Proxy<T>& m, const Tensor<const T>& q) {
    detail::check_view(where, "proxy_q", m.proxy_q);
    detail::check_view(where, "proxy_k", m.proxy_k);
    const int64_t B = q.shape[0], H = q.shape[1], D = q.shape[3];
    const char* names[2] = {"proxy_q", "proxy_k"};
    const Tensor<const T>* proxies[2] = {&m.proxy_q, &m.proxy_k};
    for (int i = 0; i < 2; ++i) {
      const Tensor<const T>& p = *proxies[i];
      detail::require(p.shape[0] == 1 || p.shape[0] == B, where, ": ", names[i], ".shape[0] (batch) = ", p.shape[0],
                      " must be 1 (shared) or q's batch ", B, "; ", names[i], " shape is ", detail::shape_str(p));
      detail::require(p.shape[1] == H, where, ": ", names[i], ".shape[1] (heads) = ", p.shape[1],
                      " must equal q's heads ", H, "; ", names[i], " shape is ", detail::shape_str(p));
      detail::require(p.shape[3] == D, where, ": ", names[i], ".shape[3] (dim) = ", p.shape[3],
                      " must equal q's head dim ", D, "; ", names[i], " shape is ", detail::shape_str(p));
    }
    detail::require(m.proxy_q.shape[2] == m.proxy_k.shape[2], where, ": proxy_q has ", m.proxy_q.shape[2],
                    " proxies (seq) but proxy_k has ", m.proxy_k.shape[2]);
    detail::require(m.pinv_iterations >= 0, where, ": pinv_iterations = ", m.pinv_iterations,
                    " must be >= 0 (0: no inverse)");
    detail::require(m.column_dropout >= 0.0f && m.column_dropout < 1.0f, where, ": column_dropout = ", m.column_dropout,
                    " must be in [0, 1)");
  }

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
    check("effattn::workspace_bytes<Cpu>(Proxy)", m, q);
    const detail::Dims d{q.shape[0], q.shape[1], k.shape[1], q.shape[2], k.shape[2], q.shape[3], v.shape[3]};
    return cpu::landmark_workspace_bytes(spec(m, T(1)), d, cpu::thread_count(exec));
  }

  template <class U>
  static void run(const Proxy<T>& m, Tensor<const U> q, Tensor<const U> k, Tensor<const U> v, Tensor<U> out,
                  const Masks& masks, const Exec<Cpu>& exec) {
    static_assert(std::is_same_v<T, U>, "effattn: Proxy<T> needs q, k, v and out of element type T");
    cpu::require_cpu_type<T>();
    constexpr const char* where = "effattn::attention<Cpu>(Proxy)";
    const detail::Dims d = detail::check_attention(where, q, k, v, out, masks);
    check(where, m, q);
    const T scale = static_cast<T>(detail::resolve_scale(where, m.scale, d.D));
    detail::require(!detail::overlaps(m.proxy_q, out) && !detail::overlaps(m.proxy_k, out), where,
                    ": out overlaps proxy_q or proxy_k in memory");
    cpu::landmark_attention(spec(m, scale), d, q, k, v, out, masks, exec);
  }
};

}  // namespace effattn
