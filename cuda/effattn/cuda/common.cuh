// Shared pieces of the CUDA backend: error checking, element-type traits and the
// stream-ordered workspace. Included through <effattn/cuda.cuh> (nvcc only).
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <initializer_list>
#include <type_traits>

#include "effattn/core.hpp"

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
#error "effattn's CUDA backend needs sm_80 or newer (cp.async, mma.sync m16n8k16 with bf16)"
#endif

/// Throws effattn::CudaError naming CUDA's error text, the call and where it was made.
#define EFFATTN_CUDA_CHECK(expr)                                                                          \
  do {                                                                                                    \
    const cudaError_t effattn_status_ = (expr);                                                           \
    if (effattn_status_ != cudaSuccess)                                                                   \
      throw ::effattn::CudaError(::effattn::detail::concat("effattn: CUDA error ",                        \
                                                           cudaGetErrorName(effattn_status_), " (",       \
                                                           cudaGetErrorString(effattn_status_), ") at ",  \
                                                           __FILE__, ":", __LINE__, " in " #expr));       \
  } while (0)

namespace effattn {

/// CUDA execution: the stream every kernel and stream-ordered allocation goes to, and an
/// optional caller-owned device workspace of workspace_bytes<Cuda>(...) bytes.
template <>
struct Exec<Cuda> {
  cudaStream_t stream = nullptr;
  void* workspace = nullptr;
  size_t workspace_size = 0;
};

namespace cuda {

/// The element types the CUDA backend computes on (float accumulation for all).
template <class T>
inline constexpr bool is_element_v =
    std::is_same_v<T, float> || std::is_same_v<T, __half> || std::is_same_v<T, __nv_bfloat16>;

template <class T>
constexpr void require_cuda_type() {
  static_assert(is_element_v<T>, "effattn: the CUDA backend computes in float, __half or __nv_bfloat16");
}

/// Conversions through float, usable on host and device.
template <class T>
__host__ __device__ __forceinline__ float to_float(T x) {
  if constexpr (std::is_same_v<T, float>) {
    return x;
  } else if constexpr (std::is_same_v<T, __half>) {
    return __half2float(x);
  } else {
    static_assert(std::is_same_v<T, __nv_bfloat16>, "effattn: unsupported CUDA element type");
    return __bfloat162float(x);
  }
}

template <class T>
__host__ __device__ __forceinline__ T from_float(float x) {
  if constexpr (std::is_same_v<T, float>) {
    return x;
  } else if constexpr (std::is_same_v<T, __half>) {
    return __float2half_rn(x);
  } else {
    static_assert(std::is_same_v<T, __nv_bfloat16>, "effattn: unsupported CUDA element type");
    return __float2bfloat16_rn(x);
  }
}

template <class To, class From>
__host__ __device__ __forceinline__ To convert(From x) {
  if constexpr (std::is_same_v<To, From>)
    return x;
  else
    return from_float<To>(to_float(x));
}

/// True when p is aligned to `bytes` and every stride (in elements of T) keeps that alignment.
template <class T>
bool vector_aligned(const void* p, size_t bytes, std::initializer_list<int64_t> strides) {
  if (reinterpret_cast<uintptr_t>(p) % bytes != 0) return false;
  for (int64_t s : strides)
    if ((s * static_cast<int64_t>(sizeof(T))) % static_cast<int64_t>(bytes) != 0) return false;
  return true;
}

/// Scratch on the device: the caller's block from Exec when given (checked against `needed`),
/// else a stream-ordered cudaMallocAsync block on exec.stream, counted in allocation_stats and
/// freed stream-ordered, so the host never waits for the device. Call release() on the normal
/// path (it reports a failing free); the destructor frees quietly when an exception unwinds.
class DeviceWorkspace {
 public:
  DeviceWorkspace(const Exec<Cuda>& exec, size_t needed) : stream_(exec.stream) {
    if (exec.workspace != nullptr) {
      detail::require(exec.workspace_size >= needed, "effattn: exec.workspace_size = ", exec.workspace_size,
                      " bytes but this call needs ", needed, " (workspace_bytes<Cuda>)");
      detail::require(reinterpret_cast<uintptr_t>(exec.workspace) % detail::kAlign == 0,
                      "effattn: exec.workspace must be ", detail::kAlign, "-byte aligned");
      base_ = exec.workspace;
      size_ = exec.workspace_size;
    } else if (needed > 0) {
      size_ = detail::align_up(needed);
      EFFATTN_CUDA_CHECK(cudaMallocAsync(&owned_, size_, stream_));
      detail::note_alloc(size_);
      base_ = owned_;
    }
  }
  ~DeviceWorkspace() {
    if (owned_ != nullptr) {
      cudaFreeAsync(owned_, stream_);  // unwinding already: a second error cannot be reported
      detail::note_free(size_);
    }
  }
  DeviceWorkspace(const DeviceWorkspace&) = delete;
  DeviceWorkspace& operator=(const DeviceWorkspace&) = delete;

  detail::Arena arena() const { return detail::Arena(base_, size_); }
  void release() {
    if (owned_ == nullptr) return;
    void* p = owned_;
    owned_ = nullptr;
    detail::note_free(size_);
    EFFATTN_CUDA_CHECK(cudaFreeAsync(p, stream_));
  }

 private:
  cudaStream_t stream_ = nullptr;
  void* base_ = nullptr;
  void* owned_ = nullptr;
  size_t size_ = 0;
};

/// Dynamic shared memory one block of `kernel` may use on the current device (the opt-in limit).
inline int max_dynamic_shared_bytes() {
  int device = 0, bytes = 0;
  EFFATTN_CUDA_CHECK(cudaGetDevice(&device));
  EFFATTN_CUDA_CHECK(cudaDeviceGetAttribute(&bytes, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  return bytes;
}

}  // namespace cuda
}  // namespace effattn
