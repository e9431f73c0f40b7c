// Helpers for the CUDA tests: skip without a device, device copies of HostTensors with the same
// layout, NaN poisoning and sentinels for 16-bit types (compared by bits), the tolerance rule of
// DESIGN.md for CUDA (2x the naive error in the input type, floored at its epsilon), and
// DeviceProblem: one attention problem on host and device (the CUDA AttentionData), optionally
// with leading key tiles masked or with q, k, v at element offsets past 2^31.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <effattn/cuda.cuh>

#include <algorithm>
#include <array>
#include <cstring>
#include <limits>
#include <string>
#include <type_traits>
#include <vector>

#include "test_util.hpp"

namespace cuda_test {

using testing_util::HostTensor;
using testing_util::Layout;

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
  explicit DeviceBuffer(size_t n) { reset(n); }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  ~DeviceBuffer() { cudaFree(data); }
  /// Frees what it held and allocates n elements (ok() is false when that fails).
  void reset(size_t n) {
    cudaFree(data);
    data = nullptr;
    size = n;
    if (n > 0 && cudaMalloc(&data, n * sizeof(T)) != cudaSuccess) {
      (void)cudaGetLastError();  // an allocation failure is not sticky: leave no error behind
      data = nullptr;
      size = 0;
      failed = true;
    }
  }
  bool ok() const { return !failed; }

 private:
  bool failed = false;
};

/// A device copy of a HostTensor: same storage size and strides, so views map one to one.
template <class T>
struct DeviceTensor {
  DeviceBuffer<T> buf;
  effattn::Tensor<T> view;
  explicit DeviceTensor(const HostTensor<T>& h) : buf(h.storage.size()) {
    view = effattn::Tensor<T>(buf.data, h.view.shape, h.view.stride);
    if (buf.ok())
      EXPECT_EQ(cudaMemcpy(buf.data, h.storage.data(), h.storage.size() * sizeof(T), cudaMemcpyHostToDevice),
                cudaSuccess);
  }
  effattn::Tensor<const T> cview() const { return view; }
  void download(HostTensor<T>& h) const {
    EXPECT_EQ(cudaMemcpy(h.storage.data(), buf.data, h.storage.size() * sizeof(T), cudaMemcpyDeviceToHost),
              cudaSuccess);
  }
};

/// Device copy of a byte mask; null when the mask is empty (all valid).
struct DeviceMask {
  DeviceBuffer<uint8_t> buf;
  explicit DeviceMask(const std::vector<uint8_t>& m) : buf(m.size()) {
    if (!m.empty() && buf.ok()) EXPECT_EQ(cudaMemcpy(buf.data, m.data(), m.size(), cudaMemcpyHostToDevice), cudaSuccess);
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

/// Typed suites over every CUDA element type skip as a whole without a device.
template <class T>
class DeviceTest : public ::testing::Test {
 protected:
  void SetUp() override { EFFATTN_REQUIRE_DEVICE(); }
};
using ElementTypes = ::testing::Types<float, __half, __nv_bfloat16>;

/// How DeviceProblem runs a case, beyond its sizes.
struct RunOptions {
  bool caller_workspace = false;           // exec carries workspace_bytes<Cuda>(...) of the test's own
  std::vector<int64_t> masked_key_prefix;  // batch b: keys [0, n[b % size]) invalid, the rest as the case says
  bool far_offsets = false;                // q, k, v at element offsets past 2^31 (see DeviceInputs)
  cudaStream_t stream = nullptr;           // null: a stream of the run's own
};
inline RunOptions with_caller_workspace() {
  RunOptions o;
  o.caller_workspace = true;
  return o;
}
inline RunOptions with_masked_key_prefix(std::vector<int64_t> n) {
  RunOptions o;
  o.masked_key_prefix = std::move(n);
  return o;
}
inline RunOptions with_far_offsets() {
  RunOptions o;
  o.far_offsets = true;
  return o;
}
inline RunOptions on_stream(cudaStream_t s) {
  RunOptions o;
  o.stream = s;
  return o;
}

/// q, k and v of one problem on the device. Compact: each a copy of its host storage (same
/// strides) in an allocation of its own, so that memcheck sees an overrun of any of them. Far: one
/// allocation with element offsets past 2^31 (see FarPlacement), so that 32-bit index arithmetic
/// anywhere in a kernel reads the wrong rows; only the view rows are written.
template <class T>
struct DeviceInputs {
  /// Row r of batch b starts at b·batch + r·row and holds the heads side by side, [K heads | V
  /// heads | Q heads], with (min(Nq, Nk) − 1)·row ≥ 2^31 (row offsets) and batch = max(Nq, Nk)·row
  /// > 2^31 (a batch stride no int holds).
  struct FarPlacement {
    size_t elements = 0;
    int64_t at[3] = {};                 // q, k, v: offset of element (0, 0, 0, 0)
    std::array<int64_t, 4> stride{};  // the same for q, k and v
  };
  DeviceBuffer<T> buf[3];  // compact: q, k, v; far: buf[0] holds all three
  effattn::Tensor<const T> q, k, v;
  std::string unavailable;  // why the far placement does not fit this device (empty: it does)
  bool ok = false;          // every allocation and copy succeeded

  DeviceInputs(const HostTensor<T>& hq, const HostTensor<T>& hk, const HostTensor<T>& hv, bool far) {
    const HostTensor<T>* host[3] = {&hq, &hk, &hv};
    effattn::Tensor<const T>* views[3] = {&q, &k, &v};
    if (!far) {
      for (int i = 0; i < 3; ++i) {
        const auto& h = *host[i];
        buf[i].reset(h.storage.size());
        if (!buf[i].ok()) return;
        *views[i] = effattn::Tensor<const T>(buf[i].data, h.view.shape, h.view.stride);
        if (cudaMemcpy(buf[i].data, h.storage.data(), h.storage.size() * sizeof(T), cudaMemcpyHostToDevice) !=
            cudaSuccess)
          return;
      }
      ok = true;
      return;
    }
    const FarPlacement p = far_placement(hq, hk);
    unavailable = room_for(p.elements * sizeof(T));
    if (!unavailable.empty()) return;
    buf[0].reset(p.elements);
    if (!buf[0].ok()) return;
    for (int i = 0; i < 3; ++i) {
      const effattn::Tensor<T>& h = host[i]->view;
      *views[i] = effattn::Tensor<const T>(buf[0].data + p.at[i], h.shape, p.stride);
      for (int64_t b = 0; b < h.shape[0]; ++b)  // one 2-D copy per head: its rows, p.stride[2] apart
        for (int64_t hd = 0; hd < h.shape[1]; ++hd)
          if (cudaMemcpy2D(buf[0].data + p.at[i] + b * p.stride[0] + hd * p.stride[1], p.stride[2] * sizeof(T),
                           &h(b, hd, 0, 0), h.stride[2] * sizeof(T), h.shape[3] * sizeof(T), h.shape[2],
                           cudaMemcpyHostToDevice) != cudaSuccess)
            return;
    }
    ok = true;
  }

  static FarPlacement far_placement(const HostTensor<T>& hq, const HostTensor<T>& hk) {
    const auto& qs = hq.view.shape;
    const auto& ks = hk.view.shape;
    const int64_t B = qs[0], H = qs[1], Hk = ks[1], D = qs[3];
    const int64_t n_min = std::max<int64_t>(2, std::min(qs[2], ks[2])), n_max = std::max(qs[2], ks[2]);
    const int64_t width = (2 * Hk + H) * D, two31 = int64_t(1) << 31;
    const int64_t row = (std::max(width, (two31 + n_min - 2) / (n_min - 1)) + 63) / 64 * 64;  // 16-byte rows
    FarPlacement p;
    p.stride = {n_max * row, D, row, 1};
    p.elements = static_cast<size_t>((B - 1) * p.stride[0] + (n_max - 1) * row + width);
    p.at[0] = 2 * Hk * D;  // q heads after the K and V heads
    p.at[1] = 0;
    p.at[2] = Hk * D;
    return p;
  }

  /// Empty when `bytes` fit in free device memory with 1 GiB to spare, else why not.
  static std::string room_for(size_t bytes) {
    size_t free_bytes = 0, total_bytes = 0;
    const cudaError_t e = cudaMemGetInfo(&free_bytes, &total_bytes);
    if (e != cudaSuccess) return std::string("cudaMemGetInfo: ") + cudaGetErrorString(e);
    if (free_bytes >= bytes + (size_t(1) << 30)) return {};
    return "offsets past 2^31 need " + std::to_string(bytes >> 20) + " MiB of device memory (+1 GiB), " +
           std::to_string(free_bytes >> 20) + " MiB free";
  }
};

/// One attention problem: host q, k, v (q, k from N(0, input_std²), v from N(0, 1)), masks, and
/// out poisoned with NaN inside its view and a sentinel outside. run() uploads, calls the
/// operator, synchronizes and downloads out; the checks then read the host tensors.
template <class T>
struct DeviceProblem {
  HostTensor<T> q, k, v, out;
  std::vector<uint8_t> qm, km;  // empty: all valid
  effattn::Masks host_masks;
  RunOptions options;
  T sentinel = effattn::cuda::from_float<T>(12345.0f);
  bool ran = false;  // run() got through: not skipped, no fatal failure

  DeviceProblem(int64_t B, int64_t H, int64_t Hk, int64_t Nq, int64_t Nk, int64_t D, Layout layout, bool masks,
                RunOptions opts = {}, double input_std = 1.5)
      : q(B, H, Nq, D, layout), k(B, Hk, Nk, D, layout), v(B, Hk, Nk, D, layout), out(B, H, Nq, D, layout),
        options(std::move(opts)) {
    q.fill_normal(input_std);
    k.fill_normal(input_std);
    v.fill_normal();
    poison_view(out, sentinel);
    if (masks) {
      // The last batch has no valid key, the first no valid query (B > 2), and runs of invalid
      // tokens empty whole landmark segments elsewhere.
      km = testing_util::random_mask(B, Nk, 0.7, B > 1 ? B - 1 : -1);
      qm = testing_util::random_mask(B, Nq, 0.8, B > 2 ? 0 : -1);
      for (int64_t b = 0; b < B; ++b) {
        for (int64_t j = Nk / 3; j < Nk / 2; ++j) km[b * Nk + j] = 0;
        for (int64_t i = Nq / 2; i < 2 * Nq / 3; ++i) qm[b * Nq + i] = 0;
      }
    }
    const auto& prefix = options.masked_key_prefix;
    if (!prefix.empty() && km.empty()) km.assign(static_cast<size_t>(B * Nk), 1);
    for (int64_t b = 0; b < B && !prefix.empty(); ++b)
      std::fill_n(km.begin() + b * Nk, std::min(Nk, prefix[b % prefix.size()]), uint8_t(0));
    host_masks = {qm.empty() ? nullptr : qm.data(), Nq, km.empty() ? nullptr : km.data(), Nk};
  }
  DeviceProblem(const DeviceProblem&) = delete;  // host_masks points into qm, km
  DeviceProblem& operator=(const DeviceProblem&) = delete;

  /// attention<Cuda>(m, ...) on the device copies; GTEST_SKIPs when far offsets do not fit.
  template <class Method>
  void run(const Method& m) {
    DeviceInputs<T> in(q, k, v, options.far_offsets);
    if (!in.unavailable.empty()) GTEST_SKIP() << in.unavailable;
    DeviceTensor<T> dout(out);
    DeviceMask dqm(qm), dkm(km);
    ASSERT_TRUE(in.ok && dout.buf.ok() && dqm.buf.ok() && dkm.buf.ok()) << "cudaMalloc or cudaMemcpy failed";
    const effattn::Masks device_masks{qm.empty() ? nullptr : dqm.buf.data, host_masks.query_batch_stride,
                                      km.empty() ? nullptr : dkm.buf.data, host_masks.key_batch_stride};
    DeviceBuffer<unsigned char> ws(options.caller_workspace ? effattn::workspace_bytes<effattn::Cuda>(m, in.q, in.k, in.v)
                                                            : 0);
    ASSERT_TRUE(ws.ok()) << "cudaMalloc of the caller workspace failed";
    effattn::Exec<effattn::Cuda> exec{options.stream, ws.data, ws.size};
    if (options.stream == nullptr) EFFATTN_TEST_CUDA(cudaStreamCreate(&exec.stream));
    effattn::attention<effattn::Cuda>(m, in.q, in.k, in.v, dout.view, device_masks, exec);
    EFFATTN_TEST_CUDA(cudaStreamSynchronize(exec.stream));  // before ws and the inputs go
    if (options.stream == nullptr) EFFATTN_TEST_CUDA(cudaStreamDestroy(exec.stream));
    dout.download(out);
    ran = true;
  }

  /// float: within 1e-5 of the float64 reference (DESIGN's float rule); 16-bit: DESIGN's CUDA
  /// rule, 2x the error of `naive` (the same math in T), floored at T's epsilon. Every element
  /// written (poison is NaN), nothing outside the view.
  void expect_close(const ref::Result& r, const HostTensor<T>& naive) const {
    const double error = testing_util::relative_error(out.view, r);
    if constexpr (std::is_same_v<T, float>) {
      EXPECT_LE(error, 1e-5);
    } else {
      const double naive_error = testing_util::relative_error(naive.view, r);
      EXPECT_LE(error, tolerance<T>(naive_error)) << "naive " << type_name<T>() << " error " << naive_error;
    }
    EXPECT_TRUE(outside_unchanged(out, sentinel)) << "wrote outside the out view";
  }
};

}  // namespace cuda_test
