// Helpers for the CUDA tests: skip without a device, device copies of HostTensors with the same
// layout, NaN poisoning and sentinels for 16-bit types (compared by bits), and the tolerance
// rule of DESIGN.md for CUDA (2x the naive error in the input type, floored at its epsilon).
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include "test_util.hpp"

namespace cuda_test {

using testing_util::HostTensor;

/// Empty when a CUDA device can run kernels, else why not (CUDA's own error text).
inline std::string no_device_reason() {
  int count = 0;  // cudaGetDeviceCount leaves it unwritten when it fails
  const cudaError_t e = cudaGetDeviceCount(&count);
  if (e != cudaSuccess) return std::string("no CUDA device: ") + cudaGetErrorString(e);
  if (count == 0) return "no CUDA device: cudaGetDeviceCount reports 0";
  return {};
}

#define EFFATTN_REQUIRE_DEVICE()                                               \
  do {                                                                         \
    const std::string effattn_why_ = ::cuda_test::no_device_reason();          \
    if (!effattn_why_.empty()) GTEST_SKIP() << effattn_why_;                   \
  } while (0)

/// Fails the current test (fatally) on a CUDA error in test code.
#define EFFATTN_TEST_CUDA(expr)                                                              \
  do {                                                                                       \
    const cudaError_t effattn_e_ = (expr);                                                   \
    ASSERT_EQ(effattn_e_, cudaSuccess) << #expr << ": " << cudaGetErrorString(effattn_e_);   \
  } while (0)

/// Owning device array of n elements.
template <class T>
struct DeviceBuffer {
  T* data = nullptr;
  size_t size = 0;
  DeviceBuffer() = default;
  explicit DeviceBuffer(size_t n) : size(n) {
    if (n > 0 && cudaMalloc(&data, n * sizeof(T)) != cudaSuccess) {
      data = nullptr;
      size = 0;
    }
  }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  ~DeviceBuffer() { cudaFree(data); }
  bool ok() const { return data != nullptr || size == 0; }
};

/// A device copy of a HostTensor: same storage size and strides, so views map one to one.
template <class T>
struct DeviceTensor {
  DeviceBuffer<T> buf;
  effattn::Tensor<T> view;
  explicit DeviceTensor(const HostTensor<T>& h) : buf(h.storage.size()) {
    view = effattn::Tensor<T>(buf.data, h.view.shape, h.view.stride);
    cudaMemcpy(buf.data, h.storage.data(), h.storage.size() * sizeof(T), cudaMemcpyHostToDevice);
  }
  effattn::Tensor<const T> cview() const { return view; }
  void download(HostTensor<T>& h) const {
    cudaMemcpy(h.storage.data(), buf.data, h.storage.size() * sizeof(T), cudaMemcpyDeviceToHost);
  }
};

/// Device copy of a byte mask.
struct DeviceMask {
  DeviceBuffer<uint8_t> buf;
  explicit DeviceMask(const std::vector<uint8_t>& m) : buf(m.size()) {
    if (!m.empty()) cudaMemcpy(buf.data, m.data(), m.size(), cudaMemcpyHostToDevice);
  }
};

/// A quiet NaN of T, built from its bits (numeric_limits has no 16-bit CUDA types).
template <class T>
T nan_of() {
  if constexpr (std::is_same_v<T, float>) {
    return std::numeric_limits<float>::quiet_NaN();
  } else if constexpr (std::is_same_v<T, __half>) {
    __half_raw r;
    r.x = 0x7E00;
    return __half(r);
  } else {
    __nv_bfloat16_raw r;
    r.x = 0x7FC0;
    return __nv_bfloat16(r);
  }
}

template <class T>
bool same_bits(const T& a, const T& b) {
  return std::memcmp(&a, &b, sizeof(T)) == 0;
}

/// NaN inside the view (an unwritten element stays NaN), `sentinel` outside it.
template <class T>
void poison_view(HostTensor<T>& t, T sentinel) {
  const auto in = testing_util::covered(t);
  for (size_t i = 0; i < in.size(); ++i) t.storage[i] = in[i] ? nan_of<T>() : sentinel;
}
template <class T>
bool outside_unchanged(const HostTensor<T>& t, T sentinel) {
  const auto in = testing_util::covered(t);
  for (size_t i = 0; i < in.size(); ++i)
    if (!in[i] && !same_bits(t.storage[i], sentinel)) return false;
  return true;
}

/// Machine epsilon of T: the floor of the CUDA tolerance (one ulp at the scale of max |ref|).
template <class T>
constexpr double epsilon_of() {
  return std::is_same_v<T, float> ? 1.1920928955078125e-7 : std::is_same_v<T, __half> ? 9.765625e-4 : 7.8125e-3;
}

/// DESIGN.md's CUDA rule: within 2x the error of the same naive math in the input type,
/// with an absolute floor at that type's rounding.
template <class T>
double tolerance(double naive_error) {
  return std::max(2.0 * naive_error, epsilon_of<T>());
}

template <class T>
const char* type_name() {
  return std::is_same_v<T, float> ? "float" : std::is_same_v<T, __half> ? "__half" : "__nv_bfloat16";
}

}  // namespace cuda_test
