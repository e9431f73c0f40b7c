// What every CPU operator uses: strided host matrices, one (batch, head) of a view as a matrix,
// a mask row of one sequence, the element types the CPU backend computes in, and the unroll
// pragma of the micro-kernels.
#pragma once
#include <cstdint>
#include <type_traits>

#include "effattn/core/check.hpp"
#include "effattn/core/saved.hpp"
#include "effattn/core/tensor.hpp"

// Fully unrolls the loop after it (register-blocked micro-kernels: constant trip counts).
#if defined(__clang__)
#define EFFATTN_UNROLL _Pragma("unroll")
#elif defined(__GNUC__)
#define EFFATTN_UNROLL _Pragma("GCC unroll 16")
#else
#define EFFATTN_UNROLL
#endif

namespace effattn {
namespace cpu {

/// A strided host matrix: element (r, c) is data[r * row_stride + c * col_stride].
template <class T>
struct MatrixView {
  T* data = nullptr;
  int64_t rows = 0, cols = 0, row_stride = 0, col_stride = 1;
  T& operator()(int64_t r, int64_t c) const { return data[r * row_stride + c * col_stride]; }
};

template <class T>
void fill(const MatrixView<T>& m, T value) {
  for (int64_t r = 0; r < m.rows; ++r)
    for (int64_t c = 0; c < m.cols; ++c) m(r, c) = value;
}

/// Rows of one (batch, head) of a [B, H, S, D] view as a matrix [S, D].
template <class T>
MatrixView<T> head_rows(const Tensor<T>& t, int64_t b, int64_t h) {
  return {t.data + b * t.stride[0] + h * t.stride[1], t.shape[2], t.shape[3], t.stride[2], t.stride[3]};
}

/// The [N] validity row of sequence b (null: all valid).
inline const uint8_t* mask_row(const uint8_t* mask, int64_t batch_stride, int64_t b) {
  return mask == nullptr ? nullptr : mask + b * batch_stride;
}

/// The CPU backend's saved blocks (core/saved.hpp): the header of a call of dims d, and the first
/// byte after it.
enum SavedLayout : int64_t { kSavedSoftmax = 1, kSavedLandmark = 2 };
inline detail::SavedHeader saved_header(SavedLayout layout, const detail::Dims& d, int64_t M = 0,
                                        int64_t iterations = 0) {
  detail::SavedHeader h;
  h.layout = layout, h.B = d.B, h.H = d.H, h.Nq = d.Nq, h.Nk = d.Nk, h.D = d.D, h.Dv = d.Dv, h.M = M;
  h.iterations = iterations;
  return h;
}
inline unsigned char* saved_body(const Saved& s) {
  return static_cast<unsigned char*>(s.data) + detail::saved_header_bytes();
}

template <class T>
constexpr void require_cpu_type() {
  static_assert(std::is_same_v<T, float> || std::is_same_v<T, double>,
                "effattn: the CPU backend computes in float or double");
}

}  // namespace cpu
}  // namespace effattn
