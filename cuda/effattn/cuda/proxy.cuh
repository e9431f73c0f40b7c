// Proxy-token attention on CUDA (Proxyformer): the caller's proxies through the landmark core
// (landmark.cuh), with decomposed column dropout on K2 drawn by effattn::column_keep, so CPU and
// GPU keep the same columns. Proxies shared by the batch get one Z per head.
#pragma once
#include "effattn/cuda/common.cuh"
#include "effattn/cuda/landmark.cuh"
#include "effattn/cuda/softmax.cuh"

namespace effattn {

template <class T>
struct Operator<Cuda, Proxy<T>> {
  static cuda::LandmarkCall<T, T> call(const Proxy<T>& m, float scale) {
    cuda::LandmarkCall<T, T> c;
    c.M = m.proxy_q.shape[2];
    c.proxy_q = m.proxy_q.data;
    c.proxy_k = m.proxy_k.data;
    // A proxy tensor of batch extent 1 is shared by the batch: batch stride 0.
    c.proxy_q_stride = cuda::row_strides(m.proxy_q);
    c.proxy_k_stride = cuda::row_strides(m.proxy_k);
    if (m.proxy_q.shape[0] == 1) c.proxy_q_stride.batch = 0;
    if (m.proxy_k.shape[0] == 1) c.proxy_k_stride.batch = 0;
    c.invert = m.pinv_iterations > 0;  // 0: out = K1·(K3·V)
    c.shared_z = c.invert && m.proxy_q.shape[0] == 1 && m.proxy_k.shape[0] == 1;
    c.iterations = m.pinv_iterations;
    c.dropout = m.column_dropout;
    c.seed = m.dropout_seed;
    c.scale = scale;
    return c;
  }

  template <class U>
  static size_t workspace_bytes(const Proxy<T>& m, Tensor<const U> q, Tensor<const U> k, Tensor<const U> v,
                                const Exec<Cuda>&) {
    static_assert(std::is_same_v<T, U>, "effattn: Proxy<T> needs q, k and v of element type T");
    cuda::require_cuda_type<T>();
    detail::check_proxy("effattn::workspace_bytes<Cuda>(Proxy)", m, q);
    const detail::Dims d = detail::dims_of(q, k, v);
    return cuda::landmark_workspace_bytes(call(m, 1.0f), d);
  }

  /// Masks and proxies point to device memory. Runs asynchronously on exec.stream.
  template <class U>
  static void run(const Proxy<T>& m, Tensor<const U> q, Tensor<const U> k, Tensor<const U> v, Tensor<U> out,
                  const Masks& masks, const Exec<Cuda>& exec) {
    static_assert(std::is_same_v<T, U>, "effattn: Proxy<T> needs q, k, v and out of element type T");
    cuda::require_cuda_type<T>();
    constexpr const char* where = "effattn::attention<Cuda>(Proxy)";
    const detail::Dims d = detail::check_attention(where, q, k, v, out, masks);
    detail::check_proxy(where, m, q);
    cuda::check_cuda_views(where, q, k, v, out);
    detail::require(m.proxy_q.stride[3] == 1 && m.proxy_k.stride[3] == 1, where, ": proxy_q.stride[3] = ",
                    m.proxy_q.stride[3], ", proxy_k.stride[3] = ", m.proxy_k.stride[3],
                    " but the CUDA backend needs contiguous rows (stride[3] = 1)");
    const float scale = static_cast<float>(detail::resolve_scale(where, m.scale, d.D));
    detail::require(!detail::overlaps(m.proxy_q, out) && !detail::overlaps(m.proxy_k, out), where,
                    ": out overlaps proxy_q or proxy_k in memory");
    cuda::landmark_attention(where, call(m, scale), d, q, k, v, out, masks, exec);
  }
};

}  // namespace effattn
