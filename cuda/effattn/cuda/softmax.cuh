// Exact softmax attention on CUDA: the public views become one raw tile problem for the fused
// kernel of softmax_tiles.cuh. No workspace: the tiles live in shared memory and registers.
#pragma once
#include "effattn/cuda/common.cuh"
#include "effattn/cuda/softmax_tiles.cuh"

namespace effattn {
namespace cuda {

/// Checks what the CUDA kernels add to detail::check_attention: contiguous rows, Dv = D, and a
/// dispatched head dim.
template <class T>
void check_cuda_views(const char* where, const Tensor<const T>& q, const Tensor<const T>& k,
                      const Tensor<const T>& v, const Tensor<T>& out) {
  const char* names[4] = {"q", "k", "v", "out"};
  const int64_t dim_strides[4] = {q.stride[3], k.stride[3], v.stride[3], out.stride[3]};
  for (int i = 0; i < 4; ++i)
    detail::require(dim_strides[i] == 1, where, ": ", names[i], ".stride[3] = ", dim_strides[i],
                    " but the CUDA backend needs contiguous rows (stride[3] = 1)");
  detail::require(v.shape[3] == q.shape[3], where, ": v.shape[3] (Dv) = ", v.shape[3],
                  " must equal the head dim D = ", q.shape[3], " on Cuda");
  detail::require(softmax_head_dim_supported(q.shape[3]), where, ": head dim D = ", q.shape[3],
                  " is not supported on Cuda (supported: 32, 64, 96, 128, 256)");
}

}  // namespace cuda

template <>
struct Operator<Cuda, Softmax> {
  template <class T>
  static size_t workspace_bytes(const Softmax&, Tensor<const T>, Tensor<const T>, Tensor<const T>,
                                const Exec<Cuda>&) {
    cuda::require_cuda_type<T>();
    return 0;
  }

  /// Masks point to device memory. Runs asynchronously on exec.stream.
  template <class T>
  static void run(const Softmax& m, Tensor<const T> q, Tensor<const T> k, Tensor<const T> v, Tensor<T> out,
                  const Masks& masks, const Exec<Cuda>& exec) {
    cuda::require_cuda_type<T>();
    constexpr const char* where = "effattn::attention<Cuda>(Softmax)";
    const detail::Dims d = detail::check_attention(where, q, k, v, out, masks);
    cuda::check_cuda_views(where, q, k, v, out);
    cuda::SoftmaxTiles<T> p;
    p.q = q.data;
    p.k = k.data;
    p.v = v.data;
    p.out = out.data;
    p.q_stride = cuda::row_strides(q);
    p.k_stride = cuda::row_strides(k);
    p.v_stride = cuda::row_strides(v);
    p.out_stride = cuda::row_strides(out);
    p.batch = d.B;
    p.heads = d.H;
    p.group = d.group();
    p.nq = d.Nq;
    p.nk = d.Nk;
    p.head_dim = d.D;
    p.query_valid = masks.query_valid;
    p.query_batch_stride = masks.query_batch_stride;
    p.key_valid = masks.key_valid;
    p.key_batch_stride = masks.key_batch_stride;
    p.scale = static_cast<float>(detail::resolve_scale(where, m.scale, d.D));
    p.causal = m.causal;
    p.causal_offset = d.Nk - d.Nq;  // bottom-right aligned, as FlashAttention
    cuda::run_softmax_tiles(p, exec.stream);
  }
};

}  // namespace effattn
