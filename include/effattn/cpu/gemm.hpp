// Small dense products for the landmark core (M x M with M in the hundreds: Newton–Schulz and its
// backward), where a general GEMM spends a fifth of its time packing both operands. Here only a
// panel of B, 4 packets wide (2 with 16 vector registers), is copied (contiguous, zero-padded,
// resident in L1 while every row of A passes); A's elements are broadcast straight from memory with any strides, so a transposed A
// costs nothing. Every product is computed (no skipped zeros): a NaN anywhere in a row of A or a
// column of B reaches the output as it would through Eigen.
#pragma once
#include <Eigen/Core>
#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "effattn/core/workspace.hpp"
#include "effattn/cpu/common.hpp"

namespace effattn {
namespace cpu {
namespace gemm_detail {

/// Micro-tiles: kRows rows of C by kPackets packets, 24 accumulators with 32 vector registers
/// (12 with 16); a last panel of at most half the width takes the narrow tile (twice the rows).
template <class T>
struct Shape {
  using P = typename Eigen::internal::packet_traits<T>::type;
  static constexpr int L = Eigen::internal::unpacket_traits<P>::size;
#ifdef EIGEN_ARCH_DEFAULT_NUMBER_OF_REGISTERS
  static constexpr bool kWide = EIGEN_ARCH_DEFAULT_NUMBER_OF_REGISTERS >= 32;
#else
  static constexpr bool kWide = false;
#endif
  static constexpr int kPackets = kWide ? 4 : 2, kRows = 6;
  static constexpr int kNarrowPackets = kPackets / 2, kNarrowRows = 2 * kRows;
  static constexpr int kCols = kPackets * L;  // columns of C per panel
};

/// C rows [0, RR) x panel columns [0, ncols) = alpha · A rows · panel (+ C when accumulate),
/// NP packets wide. a points at A(row 0, col 0) of the micro-tile; panel is [k][kCols].
template <class T, int RR, int NP>
EIGEN_ALWAYS_INLINE void micro(const T* a, int64_t ars, int64_t acs, int64_t k, const T* panel, T alpha,
                               bool accumulate, T* c, int64_t crs, int64_t ncols) {
  using namespace Eigen::internal;
  using S = Shape<T>;
  using P = typename S::P;
  constexpr int L = S::L;
  P acc[RR][NP];
  EFFATTN_UNROLL
  for (int r = 0; r < RR; ++r)
    EFFATTN_UNROLL
    for (int n = 0; n < NP; ++n) acc[r][n] = pset1<P>(T(0));
  const T* ar[RR];
  EFFATTN_UNROLL
  for (int r = 0; r < RR; ++r) ar[r] = a + r * ars;
  for (int64_t kk = 0; kk < k; ++kk) {
    P b[NP];
    EFFATTN_UNROLL
    for (int n = 0; n < NP; ++n) b[n] = ploadu<P>(panel + kk * S::kCols + n * L);
    EFFATTN_UNROLL
    for (int r = 0; r < RR; ++r) {
      const P av = pset1<P>(ar[r][kk * acs]);
      EFFATTN_UNROLL
      for (int n = 0; n < NP; ++n) acc[r][n] = pmadd(av, b[n], acc[r][n]);
    }
  }
  const P al = pset1<P>(alpha);
  for (int r = 0; r < RR; ++r) {
    T* cr = c + r * crs;
    if (ncols == NP * L) {
      for (int n = 0; n < NP; ++n) {
        const P x = pmul(al, acc[r][n]);
        pstoreu(cr + n * L, accumulate ? padd(ploadu<P>(cr + n * L), x) : x);
      }
    } else {
      T tmp[NP * L];
      for (int n = 0; n < NP; ++n) pstoreu(tmp + n * L, pmul(al, acc[r][n]));
      for (int64_t j = 0; j < ncols; ++j) cr[j] = accumulate ? cr[j] + tmp[j] : tmp[j];
    }
  }
}

}  // namespace gemm_detail

/// Scratch bytes of gemm for inner dimension k.
template <class T>
constexpr size_t gemm_scratch_bytes(int64_t k) {
  return detail::bytes_of<T>(k * gemm_detail::Shape<T>::kCols);
}

/// C = alpha · A · B, or C += alpha · A · B when accumulate (C is not read otherwise, so it may
/// hold anything). A is [m, k] and B [k, n] with any strides; C [m, n] has unit column stride and
/// must not overlap A or B. Scratch: gemm_scratch_bytes<T>(k).
template <class T>
void gemm(const MatrixView<const T>& A, const MatrixView<const T>& B, T alpha, bool accumulate,
          const MatrixView<T>& C, detail::Arena scratch) {
  using S = gemm_detail::Shape<T>;
  const int64_t m = A.rows, k = A.cols, n = B.cols;
  T* panel = scratch.take<T>(k * S::kCols);
  for (int64_t j0 = 0; j0 < n; j0 += S::kCols) {
    const int64_t nc = std::min<int64_t>(S::kCols, n - j0);
    for (int64_t kk = 0; kk < k; ++kk) {  // B[:, j0 : j0 + nc], zero-padded to whole packets
      T* p = panel + kk * S::kCols;
      const T* b = B.data + kk * B.row_stride + j0 * B.col_stride;
      if (B.col_stride == 1)
        std::copy(b, b + nc, p);
      else
        for (int64_t j = 0; j < nc; ++j) p[j] = b[j * B.col_stride];
      std::fill(p + nc, p + S::kCols, T(0));
    }
    T* c = C.data + j0;
    int64_t i = 0;
    const auto rows_of = [&](auto rows, auto packets) {  // micro-tiles down the panel
      constexpr int RR = decltype(rows)::value, NP = decltype(packets)::value;
      gemm_detail::micro<T, RR, NP>(A.data + i * A.row_stride, A.row_stride, A.col_stride, k, panel, alpha,
                                    accumulate, c + i * C.row_stride, C.row_stride, nc);
      i += RR;
    };
    const auto column = [&](auto rows, auto packets) {  // the panel, whole tiles then the rest by powers of two
      constexpr int RR = decltype(rows)::value;
      for (; i + RR <= m;) rows_of(rows, packets);
      const int64_t rest = m - i;
      if constexpr (RR > 8)
        if (rest & 8) rows_of(std::integral_constant<int, 8>{}, packets);
      if constexpr (RR > 4)
        if (rest & 4) rows_of(std::integral_constant<int, 4>{}, packets);
      if (rest & 2) rows_of(std::integral_constant<int, 2>{}, packets);
      if (rest & 1) rows_of(std::integral_constant<int, 1>{}, packets);
    };
    if (nc > S::kNarrowPackets * S::L)
      column(std::integral_constant<int, S::kRows>{}, std::integral_constant<int, S::kPackets>{});
    else
      column(std::integral_constant<int, S::kNarrowRows>{}, std::integral_constant<int, S::kNarrowPackets>{});
  }
}

}  // namespace cpu
}  // namespace effattn
