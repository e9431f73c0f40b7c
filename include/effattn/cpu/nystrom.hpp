// Nyström attention on the CPU (Nyströmformer): segment-mean landmarks through the shared
// landmark core, or exact softmax attention when min(Nq, Nk) <= landmarks.
#pragma once
#include "effattn/core.hpp"
#include "effattn/cpu/landmark.hpp"
#include "effattn/cpu/softmax.hpp"

namespace effattn {

template <>
struct Operator<Cpu, Nystrom> {
  // Nystrom has no causal field: causal Nyström is not expressible (DESIGN.md forbids it).
  static bool exact(const Nystrom& m, int64_t nq, int64_t nk) { return detail::nystrom_is_exact(m, nq, nk); }

  template <class T>
  static cpu::LandmarkSpec<T> spec(const Nystrom& m, T scale) {
    cpu::LandmarkSpec<T> s;
    s.M = m.landmarks;
    s.iterations = m.pinv_iterations;  // 0: Z = Z0, the iteration run zero times
    s.scale = scale;
    return s;
  }

  template <class T>
  static size_t workspace_bytes(const Nystrom& m, Tensor<const T> q, Tensor<const T> k, Tensor<const T> v,
                                const Exec<Cpu>& exec) {
    cpu::require_cpu_type<T>();
    detail::check_nystrom("effattn::workspace_bytes<Cpu>(Nystrom)", m);
    if (exact(m, q.shape[2], k.shape[2]))
      return Operator<Cpu, Softmax>::workspace_bytes<T>(Softmax{m.scale, false}, q, k, v, exec);
    const detail::Dims d = detail::dims_of(q, k, v);
    return cpu::landmark_workspace_bytes(spec<T>(m, T(1)), d, cpu::thread_count(exec));
  }

  template <class T>
  static void run(const Nystrom& m, Tensor<const T> q, Tensor<const T> k, Tensor<const T> v, Tensor<T> out,
                  const Masks& masks, const Exec<Cpu>& exec) {
    forward<T>("effattn::attention<Cpu>(Nystrom)", m, q, k, v, out, nullptr, masks, exec);
  }

  static constexpr bool kHasBackward = true;

  template <class T>
  static size_t backward_workspace_bytes(const Nystrom& m, Tensor<const T> q, Tensor<const T> k, Tensor<const T> v,
                                         const Exec<Cpu>& exec) {
    cpu::require_cpu_type<T>();
    detail::check_nystrom("effattn::backward_workspace_bytes<Cpu>(Nystrom)", m);
    if (exact(m, q.shape[2], k.shape[2]))
      return Operator<Cpu, Softmax>::backward_workspace_bytes<T>(Softmax{m.scale, false}, q, k, v, exec);
    return cpu::landmark_backward_workspace_bytes(spec<T>(m, T(1)), detail::dims_of(q, k, v), cpu::thread_count(exec));
  }

  template <class T>
  static void backward(const Nystrom& m, Tensor<const T> q, Tensor<const T> k, Tensor<const T> v, Tensor<const T> out,
                       Tensor<const T> dout, const Grads<T>& grads, const Masks& masks, const Exec<Cpu>& exec) {
    backward_impl<T>("effattn::attention_backward<Cpu>(Nystrom)", m, q, k, v, out, dout, nullptr, grads, masks, exec);
  }

  // ---- Training: the saved block is the landmark core's SavedState (Softmax's where exact).
  static constexpr bool kHasSaved = true;

  template <class T>
  static size_t saved_bytes(const Nystrom& m, Tensor<const T> q, Tensor<const T> k, Tensor<const T> v) {
    cpu::require_cpu_type<T>();
    detail::check_nystrom("effattn::saved_bytes<Cpu>(Nystrom)", m);
    if (exact(m, q.shape[2], k.shape[2])) return Operator<Cpu, Softmax>::saved_bytes<T>(Softmax{m.scale, false}, q, k, v);
    return cpu::landmark::SavedState<T>::bytes(spec<T>(m, T(1)), detail::dims_of(q, k, v));
  }

  template <class T>
  static void run_saving(const Nystrom& m, Tensor<const T> q, Tensor<const T> k, Tensor<const T> v, Tensor<T> out,
                         const Saved& saved, const Masks& masks, const Exec<Cpu>& exec) {
    forward<T>("effattn::attention_with_saved<Cpu>(Nystrom)", m, q, k, v, out, &saved, masks, exec);
  }

  template <class T>
  static void backward_saved(const Nystrom& m, Tensor<const T> q, Tensor<const T> k, Tensor<const T> v,
                             Tensor<const T> out, Tensor<const T> dout, const Saved& saved, const Grads<T>& grads,
                             const Masks& masks, const Exec<Cpu>& exec) {
    backward_impl<T>("effattn::attention_backward_with_saved<Cpu>(Nystrom)", m, q, k, v, out, dout, &saved, grads,
                     masks, exec);
  }

 private:
  template <class T>
  static void forward(const char* where, const Nystrom& m, Tensor<const T> q, Tensor<const T> k, Tensor<const T> v,
                      Tensor<T> out, const Saved* saved, const Masks& masks, const Exec<Cpu>& exec) {
    cpu::require_cpu_type<T>();
    detail::check_nystrom(where, m);
    const detail::Dims d = detail::check_attention(where, q, k, v, out, masks);
    const T scale = static_cast<T>(detail::resolve_scale(where, m.scale, d.D));
    const Softmax exact_softmax{m.scale, false};
    if (exact(m, d.Nq, d.Nk))
      return saved != nullptr ? Operator<Cpu, Softmax>::run_saving<T>(exact_softmax, q, k, v, out, *saved, masks, exec)
                              : Operator<Cpu, Softmax>::run<T>(exact_softmax, q, k, v, out, masks, exec);
    const cpu::LandmarkSpec<T> s = spec<T>(m, scale);
    if (saved == nullptr) return cpu::landmark_attention(s, d, q, k, v, out, masks, exec);
    const auto state = cpu::saved_for_forward(where, m, s, d, q, k, v, out, masks, exec, *saved);
    cpu::landmark_attention(s, d, q, k, v, out, masks, exec, &state);
    detail::finish_saved(*saved);
  }

  template <class T>
  static void backward_impl(const char* where, const Nystrom& m, Tensor<const T> q, Tensor<const T> k,
                            Tensor<const T> v, Tensor<const T> out, Tensor<const T> dout, const Saved* saved,
                            const Grads<T>& grads, const Masks& masks, const Exec<Cpu>& exec) {
    cpu::require_cpu_type<T>();
    detail::check_nystrom(where, m);
    detail::require_no_proxy_grads(where, grads);
    const detail::Dims d = detail::check_backward(where, q, k, v, out, dout, grads, masks);
    const T scale = static_cast<T>(detail::resolve_scale(where, m.scale, d.D));
    const Softmax exact_softmax{m.scale, false};
    if (exact(m, d.Nq, d.Nk))
      return saved != nullptr ? Operator<Cpu, Softmax>::backward_saved<T>(exact_softmax, q, k, v, out, dout, *saved,
                                                                          grads, masks, exec)
                              : Operator<Cpu, Softmax>::backward<T>(exact_softmax, q, k, v, out, dout, grads, masks, exec);
    const cpu::LandmarkSpec<T> s = spec<T>(m, scale);
    if (saved == nullptr) return cpu::landmark_backward(s, d, q, k, v, out, dout, grads, masks, exec);
    const auto state = cpu::saved_for_backward(where, m, s, d, q, k, v, out, dout, grads, masks, exec, *saved);
    cpu::landmark_backward(s, d, q, k, v, out, dout, grads, masks, exec, &state);
  }
};

}  // namespace effattn
