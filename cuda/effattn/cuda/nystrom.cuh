// Nyström attention on CUDA: masked segment-mean landmarks through the landmark core
// (landmark.cuh), or exact softmax attention when min(Nq, Nk) <= landmarks (as on the CPU).
#pragma once
#include <algorithm>

#include "effattn/cuda/common.cuh"
#include "effattn/cuda/landmark.cuh"
#include "effattn/cuda/softmax.cuh"

namespace effattn {

template <>
struct Operator<Cuda, Nystrom> {
  static bool exact(const Nystrom& m, int64_t nq, int64_t nk) { return detail::nystrom_is_exact(m, nq, nk); }

  template <class T>
  static cuda::LandmarkCall<T, float> call(const Nystrom& m, float scale) {
    cuda::LandmarkCall<T, float> c;
    c.M = m.landmarks;
    c.segment_means = true;
    c.iterations = m.pinv_iterations;  // 0: Z = Z0
    c.scale = scale;
    return c;
  }

  template <class T>
  static size_t workspace_bytes(const Nystrom& m, Tensor<const T> q, Tensor<const T> k, Tensor<const T> v,
                                const Exec<Cuda>& exec) {
    cuda::require_cuda_type<T>();
    detail::check_nystrom("effattn::workspace_bytes<Cuda>(Nystrom)", m);
    if (exact(m, q.shape[2], k.shape[2]))
      return Operator<Cuda, Softmax>::workspace_bytes<T>(Softmax{m.scale, false}, q, k, v, exec);
    const detail::Dims d = detail::dims_of(q, k, v);
    return cuda::landmark_workspace_bytes(call<T>(m, 1.0f), d);
  }

  /// Masks point to device memory. Runs asynchronously on exec.stream.
  template <class T>
  static void run(const Nystrom& m, Tensor<const T> q, Tensor<const T> k, Tensor<const T> v, Tensor<T> out,
                  const Masks& masks, const Exec<Cuda>& exec) {
    cuda::require_cuda_type<T>();
    constexpr const char* where = "effattn::attention<Cuda>(Nystrom)";
    detail::check_nystrom(where, m);
    const detail::Dims d = detail::check_attention(where, q, k, v, out, masks);
    cuda::check_cuda_views(where, q, k, v, out);
    const float scale = static_cast<float>(detail::resolve_scale(where, m.scale, d.D));
    if (exact(m, d.Nq, d.Nk))
      return Operator<Cuda, Softmax>::run<T>(Softmax{m.scale, false}, q, k, v, out, masks, exec);
    cuda::landmark_attention(where, call<T>(m, scale), d, q, k, v, out, masks, exec);
  }
};

}  // namespace effattn
