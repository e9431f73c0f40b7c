// Small pieces shared by the landmark and FAVOR kernels: checked launches, exact workspace
// sizing, CTA reductions.
#pragma once
#include <cstdint>
#include <limits>

#include "effattn/cuda/common.cuh"

namespace effattn {
namespace cuda {

/// Launches kernel<<<blocks, threads, smem, stream>>>(args...) through cudaLaunchKernel, which
/// reports this launch's own failure (not an earlier error of the caller's). Never synchronizes.
template <class... P>
void launch(void (*kernel)(P...), int64_t blocks, int threads, size_t smem, cudaStream_t stream,
            detail::identity_t<P>... args) {
  static_assert(sizeof...(P) > 0, "effattn: kernels launched here take parameters");
  detail::require(blocks > 0 && blocks <= std::numeric_limits<int32_t>::max(), "effattn::cuda::launch: ", blocks,
                  " blocks (must be in [1, 2^31 - 1])");
  void* ptrs[] = {static_cast<void*>(&args)...};
  EFFATTN_CUDA_CHECK(cudaLaunchKernel(reinterpret_cast<const void*>(kernel), dim3(static_cast<unsigned>(blocks)),
                                      dim3(static_cast<unsigned>(threads)), ptrs, smem, stream));
}

/// Counts the bytes a sequence of Arena::take calls would use, so that one carve function sizes
/// the workspace (workspace_bytes) and lays it out (run) identically.
struct ByteCounter {
  size_t bytes = 0;
  template <class U>
  U* take(size_t count) {
    bytes += detail::bytes_of<U>(count);
    return nullptr;
  }
};

/// min / max of 64-bit indices in device code (std::min needs --expt-relaxed-constexpr there).
__host__ __device__ __forceinline__ int64_t imin(int64_t a, int64_t b) { return a < b ? a : b; }
__host__ __device__ __forceinline__ int64_t imax(int64_t a, int64_t b) { return a > b ? a : b; }

/// Max over a CTA of kThreads threads (a multiple of 32); every thread gets the result. `red`
/// is kThreads / 32 floats of shared memory; the call ends with a barrier, so it may be reused.
template <int kThreads>
__device__ __forceinline__ float block_max(float x, float* red) {
  for (int o = 16; o > 0; o /= 2) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, o));
  if (threadIdx.x % 32 == 0) red[threadIdx.x / 32] = x;
  __syncthreads();
  float r = red[0];
  for (int w = 1; w < kThreads / 32; ++w) r = fmaxf(r, red[w]);
  __syncthreads();
  return r;
}

/// Sum of x over the block, the same value in every thread (same shape as block_max).
template <int kThreads>
__device__ __forceinline__ float block_sum(float x, float* red) {
  for (int o = 16; o > 0; o /= 2) x += __shfl_xor_sync(0xffffffffu, x, o);
  if (threadIdx.x % 32 == 0) red[threadIdx.x / 32] = x;
  __syncthreads();
  float r = red[0];
  for (int w = 1; w < kThreads / 32; ++w) r += red[w];
  __syncthreads();
  return r;
}

}  // namespace cuda
}  // namespace effattn
