// The CPU building block: softmax attention of one head on raw strided rows, streamed over key
// tiles with an online softmax, so memory is O(tile) and never Nq x Nk. The Softmax operator
// runs it per (batch, head, query tile); the landmark operators run it for Lq over (K, V) and
// for Q over (Lk, W), and for K2 itself (values = identity).
//
// How a query tile is computed (attend_rows). Queries sit in the SIMD lanes throughout, so the
// row max, the exp and the row sum are plain vertical operations, and K and V are never packed:
// their elements are broadcast straight from the caller's rows (any strides, negative too).
//   - Qᵀ [D, kQuery] is packed once per query tile, times scale·log2(e) (logits in log2 units),
//     zero-padded to whole blocks.
//   - Per key tile (kKey keys, masked keys dropped from the list), per block of W query rows:
//       Sᵀ [keys, W] = K·Qᵀ   register-blocked micro-kernel, keeping the tile's max (and min)
//       Pᵀ = 2^(Sᵀ − m)       one pass, vectorized exp2 (exp2_neg below), row sums on the way
//       Oᵀ = α·Oᵀ + Vᵀ·Pᵀ     register-blocked micro-kernel, α = 2^(m_old − m_new) on load
//     With causal, a block only visits the keys its last row may see, and the partly visible
//     keys on the diagonal are masked lane by lane in both products.
//   - Out = Oᵀ / l, transposed back, and optionally lse = m ln2 + log(l).
// Exceptional rows (non-finite query, a non-finite visible key or value, or finite inputs whose
// logits overflow T) are detected on the way for free and recomputed by slow_row in a wider type.
#pragma once
#include <Eigen/Core>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>

#include "effattn/core/workspace.hpp"
#include "effattn/cpu/common.hpp"

namespace effattn {
namespace cpu {

/// One head of softmax attention: out_i = sum_j softmax_j(scale q_i . k_j) v_j over allowed j.
///
/// Non-finite values: a valid query row with a NaN/Inf gets a NaN output row; so does a row that
/// may see (valid and causally visible) a key whose k or v has a NaN/Inf. Masked and causally
/// hidden keys never affect anything. Finite inputs whose scaled logits overflow T are computed
/// exactly (in double for float, long double for double). A zero row means an invalid query or
/// no allowed key.
template <class T>
struct HeadAttention {
  MatrixView<const T> q;                 // [nq, d]
  MatrixView<const T> k;                 // [nk, d]
  MatrixView<const T> v;                 // [nk, dv]
  MatrixView<T> out;                     // [nq, dv]
  const uint8_t* key_valid = nullptr;    // [nk], 1 = valid; null = all valid
  const uint8_t* query_valid = nullptr;  // [nq]; an invalid query gets a zero row
  T scale = 1;
  bool causal = false;
  int64_t causal_offset = 0;  // with causal, key j is allowed for query i iff j <= i + causal_offset
  // [nq], optional: lse[i · lse_stride] = log sum_j exp(scale q_i . k_j) over allowed j (the row
  // max plus the log of the row sum, in scaled-logit units); -inf for an invalid query or a row with
  // no allowed key, NaN for a NaN output row. Written when non-null.
  T* lse = nullptr;
  int64_t lse_stride = 1;
};

/// Tile sizes: a query tile stays resident while key tiles stream past it. 64 keys keep a block's
/// Sᵀ/Pᵀ (64 keys × 64 lanes) in L1 while every value column group of pv_block re-reads it
/// (forward 1.02–1.09× over 256 keys in the bench, A/B interleaved).
struct Tiles {
  static constexpr int64_t kQuery = 64;
  static constexpr int64_t kKey = 64;
};

namespace detail_tiles {
template <class T>
using RowMatrix = Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
template <class T>
using RowMap = Eigen::Map<RowMatrix<T>, Eigen::Unaligned, Eigen::OuterStride<>>;
template <class T>
using ConstRowMap = Eigen::Map<const RowMatrix<T>, Eigen::Unaligned, Eigen::OuterStride<>>;
template <class T>
using Column = Eigen::Map<Eigen::Array<T, Eigen::Dynamic, 1>>;

/// Rows [r0, r0 + n) of `m` as an Eigen map: in place when rows are unit-stride, else packed into `buf`.
template <class T>
ConstRowMap<T> rows_of(const MatrixView<const T>& m, int64_t r0, int64_t n, T* buf) {
  if (m.col_stride == 1) return ConstRowMap<T>(m.data + r0 * m.row_stride, n, m.cols, Eigen::OuterStride<>(m.row_stride));
  for (int64_t r = 0; r < n; ++r)
    for (int64_t c = 0; c < m.cols; ++c) buf[r * m.cols + c] = m(r0 + r, c);
  return ConstRowMap<T>(buf, n, m.cols, Eigen::OuterStride<>(m.cols));
}

/// Rows [r0, r0 + n) of m packed into buf with the rows where keep[r] == 0 zeroed, so a masked
/// key's values (even NaN) cannot reach a product through 0 · x.
template <class T>
ConstRowMap<T> rows_masked(const MatrixView<const T>& m, int64_t r0, int64_t n, const T* keep, T* buf) {
  for (int64_t r = 0; r < n; ++r)
    for (int64_t c = 0; c < m.cols; ++c) buf[r * m.cols + c] = keep[r] != T(0) ? m(r0 + r, c) : T(0);
  return ConstRowMap<T>(buf, n, m.cols, Eigen::OuterStride<>(m.cols));
}

/// rows [r0, r0 + n) of m += a, through a map when rows are unit-stride, else element by element.
template <class T, class Expr>
void add_rows(const MatrixView<T>& m, int64_t r0, const Expr& a) {
  if (m.col_stride == 1) {
    RowMap<T>(m.data + r0 * m.row_stride, a.rows(), a.cols(), Eigen::OuterStride<>(m.row_stride)) += a;
    return;
  }
  for (int64_t r = 0; r < a.rows(); ++r)
    for (int64_t c = 0; c < a.cols(); ++c) m(r0 + r, c) += a(r, c);
}

/// The wider type exceptional rows are recomputed in.
template <class T>
using Wide = std::conditional_t<std::is_same_v<T, float>, double, long double>;

/// The SIMD shape of the kernel for T: Eigen's packet for T (a scalar where Eigen does not
/// vectorize), blocks of W = IB packets of query rows (2 with 16 vector registers, 4 with 32),
/// KJ = 6 keys per QK micro-tile and CB = 6 value columns per PV micro-tile: 12 accumulators
/// with 16 registers, 24 with 32. Four packets rather than 2 × 12 keys with 32 registers: each
/// broadcast K or V element then feeds 4 FMAs, and a block streams K and V once per 64 queries
/// (forward 1.03–1.05× at D = 64 in the bench, A/B interleaved). The backward's key_rows sums
/// KR keys at a time (12 with 32 registers, 6 with 16).
template <class T>
struct Simd {
  using P = typename Eigen::internal::packet_traits<T>::type;
  static constexpr int L = Eigen::internal::unpacket_traits<P>::size;
#ifdef EIGEN_ARCH_DEFAULT_NUMBER_OF_REGISTERS
  static constexpr int kRegs = EIGEN_ARCH_DEFAULT_NUMBER_OF_REGISTERS;
#else
  static constexpr int kRegs = 16;
#endif
  static constexpr int IB = kRegs >= 32 ? 4 : 2;
  static constexpr int W = IB * L;
  static constexpr int KJ = 6;
  static constexpr int CB = 6;
  static constexpr int KR = kRegs >= 32 ? 12 : 6;
  static_assert(Tiles::kQuery % W == 0, "a query tile is a whole number of blocks");
};

/// True when x is NaN or ±inf, by its bits (so -ffast-math cannot fold the test away).
template <class T>
inline bool non_finite(T x) {
  if constexpr (sizeof(T) == 4) {
    uint32_t b;
    std::memcpy(&b, &x, 4);
    return (b & 0x7f800000u) == 0x7f800000u;
  } else {
    uint64_t b;
    std::memcpy(&b, &x, 8);
    return (b & 0x7ff0000000000000ull) == 0x7ff0000000000000ull;
  }
}

/// Whether Eigen has an integer packet of P's width (for the exponent bits of exp2_neg).
template <class P>
auto has_integer_packet_test(int) -> decltype(typename Eigen::internal::unpacket_traits<P>::integer_packet{}, std::true_type{});
template <class P>
std::false_type has_integer_packet_test(...);
template <class P>
using has_integer_packet = decltype(has_integer_packet_test<P>(0));

/// 2^n for the integer n = t - 1.5·2^52 held in t's low mantissa bits, -1022 <= n <= 1023:
/// (bits(t) << 52) + bits(1.0) = (n + 1023) << 52, with 64-bit lane shifts where the ISA has them
/// (Eigen 3.4 has no 64-bit integer packets for AVX), else Eigen's pldexp.
template <class P>
EIGEN_ALWAYS_INLINE P pow2_of_magic(const P&, const P& n) {
  return Eigen::internal::pldexp(Eigen::internal::pset1<P>(1.0), n);
}
#if defined(EIGEN_VECTORIZE_AVX512)
EIGEN_ALWAYS_INLINE __m512d pow2_of_magic(const __m512d& t, const __m512d&) {
  return _mm512_castsi512_pd(_mm512_add_epi64(_mm512_slli_epi64(_mm512_castpd_si512(t), 52),
                                              _mm512_set1_epi64(0x3ff0000000000000ll)));
}
#endif
#if defined(EIGEN_VECTORIZE_AVX2)
EIGEN_ALWAYS_INLINE __m256d pow2_of_magic(const __m256d& t, const __m256d&) {
  return _mm256_castsi256_pd(_mm256_add_epi64(_mm256_slli_epi64(_mm256_castpd_si256(t), 52),
                                              _mm256_set1_epi64x(0x3ff0000000000000ll)));
}
#endif
#if defined(EIGEN_VECTORIZE_SSE2)
EIGEN_ALWAYS_INLINE __m128d pow2_of_magic(const __m128d& t, const __m128d&) {
  return _mm_castsi128_pd(_mm_add_epi64(_mm_slli_epi64(_mm_castpd_si128(t), 52), _mm_set1_epi64x(0x3ff0000000000000ll)));
}
#endif

#if defined(EIGEN_VECTORIZE_AVX2) && defined(EIGEN_VECTORIZE_FMA)
/// 2^(j/8) · 2^n for t = (1.5·2^20 + x rounded to a multiple of 1/8), x = n + j/8, -125 <= n <= 0:
/// t's mantissa ends in the bits of 8n + j, so t << 20 is n·2^23 + j·2^20 (mod 2^32), and the
/// table holds bits(2^(j/8)) − j·2^20: one integer add leaves bits(2^(j/8)) + n·2^23, without
/// masking j off first. vpermps reads j = t & 7.
EIGEN_ALWAYS_INLINE __m256 pow2_of_eighths_avx2(const __m256 t) {
  const __m256i table = _mm256_setr_epi32(0x3f800000, 0x3f8b95c2 - (1 << 20), 0x3f9837f0 - (2 << 20), 0x3fa5fed7 - (3 << 20),
                                          0x3fb504f3 - (4 << 20), 0x3fc5672a - (5 << 20), 0x3fd744fd - (6 << 20),
                                          0x3feac0c7 - (7 << 20));  // bits of 2^(j/8), rounded to nearest, less j·2^20
  const __m256i k = _mm256_castps_si256(t);
  return _mm256_castsi256_ps(_mm256_add_epi32(_mm256_castps_si256(_mm256_permutevar8x32_ps(_mm256_castsi256_ps(table), k)),
                                              _mm256_slli_epi32(k, 20)));
}

/// 2^(x - (c - 1.5·2^20)) for c = 1.5·2^20 − m: t = x + c rounds x − m to a multiple of 1/8,
/// f = x − (t − c) is the rest, 2^f by the polynomial and 2^(j/8) · 2^n from t. A product with
/// the polynomial, so a NaN x stays NaN whatever its bits do to the table's index.
EIGEN_ALWAYS_INLINE __m256 exp2_rounded_avx2(const __m256 x, const __m256 c) {
  const __m256 t = _mm256_add_ps(x, c);
  const __m256 f = _mm256_sub_ps(x, _mm256_sub_ps(t, c));
  __m256 y = _mm256_fmadd_ps(_mm256_set1_ps(0.05550931728962304f), f, _mm256_set1_ps(0.24026407983257964f));
  y = _mm256_fmadd_ps(y, f, _mm256_set1_ps(0.6931471780166573f));
  y = _mm256_fmadd_ps(y, f, _mm256_set1_ps(0.9999999816537269f));
  return _mm256_mul_ps(y, pow2_of_eighths_avx2(t));
}

/// exp2_neg for 8 floats with AVX2: x = n + j/8 + f, |f| <= 1/16, 2^(j/8) from an 8-entry table
/// in a register (vpermps) and a degree-3 minimax polynomial for 2^f (1.9e-8 before rounding;
/// measured max relative error 1.6e-7 over [-125, 0], against 7.9e-8 for the portable version):
/// three fewer multiply-adds, about 20% of the exp and 4% of a D = 32 softmax on the 2-core test
/// machine. Below 2^-125 the result is 0.
EIGEN_ALWAYS_INLINE __m256 exp2_neg_avx2(const __m256 x) {
  const __m256 y = exp2_rounded_avx2(x, _mm256_set1_ps(1572864.0f));  // m = 0
  return _mm256_andnot_ps(_mm256_cmp_ps(x, _mm256_set1_ps(-125.0f), _CMP_LT_OQ), y);
}

/// 2^(s - m) for a block without hidden lanes, m on the 1/8 grid and |m| <= 2^19, from c1 = 1.5·2^20 - m
/// and lo = m - 125: the subtraction folded into the rounding constant, and a clamp at 2^-125 instead
/// of the mask (2^-125 in place of a smaller weight is far below float's resolution of the sum,
/// which holds a weight 1). Two fewer operations than exp2_neg(s - m). NaN stays NaN. Clamp =
/// false when the caller knows s >= lo (the block's tile minimum): one operation fewer again.
template <bool Clamp>
EIGEN_ALWAYS_INLINE __m256 exp2_shifted_avx2(const __m256 s, const __m256 c1, const __m256 lo) {
  return exp2_rounded_avx2(Clamp ? _mm256_max_ps(lo, s) : s, c1);  // max's second operand when NaN: s
}
#endif

#if defined(EIGEN_VECTORIZE_AVX512)
/// The AVX2 scheme above on 16 floats with a finer grid: t = 1.5·2^19 + x rounded to a multiple
/// of 1/16, x = n + j/16, so t << 19 is n·2^23 + j·2^19 (mod 2^32) and the 16-entry table (one
/// register, vpermd on t's low 4 bits) holds bits(2^(j/16)) − j·2^19.
EIGEN_ALWAYS_INLINE __m512 pow2_of_sixteenths_avx512(const __m512 t) {
  const __m512i table = _mm512_setr_epi32(
      0x3f800000, 0x3f85aac3 - (1 << 19), 0x3f8b95c2 - (2 << 19), 0x3f91c3d3 - (3 << 19), 0x3f9837f0 - (4 << 19),
      0x3f9ef532 - (5 << 19), 0x3fa5fed7 - (6 << 19), 0x3fad583f - (7 << 19), 0x3fb504f3 - (8 << 19),
      0x3fbd08a4 - (9 << 19), 0x3fc5672a - (10 << 19), 0x3fce248c - (11 << 19), 0x3fd744fd - (12 << 19),
      0x3fe0ccdf - (13 << 19), 0x3feac0c7 - (14 << 19), 0x3ff5257d - (15 << 19));  // bits of 2^(j/16), less j·2^19
  const __m512i k = _mm512_castps_si512(t);
  return _mm512_castsi512_ps(_mm512_add_epi32(_mm512_permutexvar_epi32(k, table), _mm512_slli_epi32(k, 19)));
}

/// 2^f for |f| <= 1/32: degree-3 minimax, relative error 2.3e-9 with these float coefficients.
EIGEN_ALWAYS_INLINE __m512 exp2_small_avx512(const __m512 f) {
  __m512 y = _mm512_fmadd_ps(_mm512_set1_ps(0.05550280585885048f), f, _mm512_set1_ps(0.24023589491844177f));
  y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(0.6931471824645996f));
  return _mm512_fmadd_ps(y, f, _mm512_set1_ps(1.0f));
}

/// exp2_rounded_avx2 on 16 floats: c = 1.5·2^19 − m, x − m rounded to a multiple of 1/16.
EIGEN_ALWAYS_INLINE __m512 exp2_rounded_avx512(const __m512 x, const __m512 c) {
  const __m512 t = _mm512_add_ps(x, c);
  return _mm512_mul_ps(exp2_small_avx512(_mm512_sub_ps(x, _mm512_sub_ps(t, c))), pow2_of_sixteenths_avx512(t));
}

/// exp2_neg for 16 floats with AVX-512: x = n + j/16 + f, 2^(j/16) from the table, 2^f by
/// exp2_small_avx512; 0 below 2^-125 (a mask register, no compare-and-and), NaN stays NaN.
EIGEN_ALWAYS_INLINE __m512 exp2_neg_avx512(const __m512 x) {
  const __m512 y = exp2_rounded_avx512(x, _mm512_set1_ps(786432.0f));  // m = 0
  return _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(x, _mm512_set1_ps(-125.0f), _CMP_NLT_UQ), y);
}

/// exp2_shifted_avx2 on 16 floats: c1 = 1.5·2^19 − m (exact for |m| <= 2^18 on the 1/8 grid).
template <bool Clamp>
EIGEN_ALWAYS_INLINE __m512 exp2_shifted_avx512(const __m512 s, const __m512 c1, const __m512 lo) {
  return exp2_rounded_avx512(Clamp ? _mm512_max_ps(lo, s) : s, c1);  // max's second operand when NaN: s
}
#endif

/// The folded exp of attend_rows, per ISA: 2^(s − m) with the shift folded into the rounding
/// constant (FoldedExp::kMagic − m, exact for |m| <= kMaxReference), clamped at m − 125 or not.
#if defined(EIGEN_VECTORIZE_AVX512)
#define EFFATTN_FOLDED_EXP 1
struct FoldedExp {
  using P = __m512;
  static constexpr int kLanes = 16;
  static constexpr float kMagic = 786432.0f, kMaxReference = 1 << 18;
  template <bool Clamp>
  static EIGEN_ALWAYS_INLINE P weights(P s, P c1, P lo) { return exp2_shifted_avx512<Clamp>(s, c1, lo); }
  /// Whether some lane of tmin is below lo (or NaN): then the clamp is needed.
  static bool any_below(P tmin, P lo) { return _mm512_cmp_ps_mask(tmin, lo, _CMP_NGE_UQ) != 0; }
};
#elif defined(EIGEN_VECTORIZE_AVX2) && defined(EIGEN_VECTORIZE_FMA)
#define EFFATTN_FOLDED_EXP 1
struct FoldedExp {
  using P = __m256;
  static constexpr int kLanes = 8;
  static constexpr float kMagic = 1572864.0f, kMaxReference = 1 << 19;
  template <bool Clamp>
  static EIGEN_ALWAYS_INLINE P weights(P s, P c1, P lo) { return exp2_shifted_avx2<Clamp>(s, c1, lo); }
  static bool any_below(P tmin, P lo) { return _mm256_movemask_ps(_mm256_cmp_ps(tmin, lo, _CMP_NGE_UQ)) != 0; }
};
#endif

/// 2^x for x <= 0 (and -inf, NaN), elementwise: 0 below the smallest normal result (so never a
/// denormal, and 2^-inf = 0 exactly), NaN for NaN. x = n + f with n = rint(x), |f| <= 1/2, and a
/// minimax polynomial for 2^f: relative error 2.5e-9 (float, degree 6) and 4e-18 (double, degree
/// 11) before rounding, so about 1 ulp in all. The logits are kept in log2 units (Qᵀ carries
/// log2(e)), which saves the Cody–Waite steps of a natural exp.
template <class P>
EIGEN_ALWAYS_INLINE P exp2_neg(const P& x) {
  using namespace Eigen::internal;
  using S = typename unpacket_traits<P>::type;
  if constexpr (unpacket_traits<P>::size == 1) {
    return std::exp2(x);
  } else if constexpr (std::is_same_v<S, float>) {
#if defined(EIGEN_VECTORIZE_AVX512)
    if constexpr (unpacket_traits<P>::size == 16) return exp2_neg_avx512(x);
#elif defined(EIGEN_VECTORIZE_AVX2) && defined(EIGEN_VECTORIZE_FMA)
    if constexpr (unpacket_traits<P>::size == 8) return exp2_neg_avx2(x);
#endif
    const P magic = pset1<P>(12582912.0f);  // 1.5 * 2^23: x + magic rounds x to an integer
    const P t = padd(x, magic);
    const P n = psub(t, magic);
    const P f = psub(x, n);
    P y = pset1<P>(0.0001546144469856913f);
    y = pmadd(y, f, pset1<P>(0.0013400428177615838f));
    y = pmadd(y, f, pset1<P>(0.009618056678524637f));
    y = pmadd(y, f, pset1<P>(0.05550327226670302f));
    y = pmadd(y, f, pset1<P>(0.24022650922288757f));
    y = pmadd(y, f, pset1<P>(0.6931472067028326f));
    y = pmadd(y, f, pset1<P>(1.0f));
    if constexpr (has_integer_packet<P>::value) {
      // 2^n from t's low mantissa bits: (bits(t) << 23) + bits(1.0f) = (n + 127) << 23.
      using PI = typename unpacket_traits<P>::integer_packet;
      const PI e = plogical_shift_left<23>(preinterpret<PI>(t));
      y = pmul(y, preinterpret<P>(padd(e, pset1<PI>(0x3f800000))));
    } else {
      y = pldexp(y, n);
    }
    return pandnot(y, pcmp_lt(x, pset1<P>(-126.0f)));
  } else {
    const P magic = pset1<P>(6755399441055744.0);  // 1.5 * 2^52
    const P t = padd(x, magic);
    const P n = psub(t, magic);
    const P f = psub(x, n);
    P y = pset1<P>(4.4558179083360645e-10);
    y = pmadd(y, f, pset1<P>(7.074194297288521e-09));
    y = pmadd(y, f, pset1<P>(1.0178057087733941e-07));
    y = pmadd(y, f, pset1<P>(1.3215432535912375e-06));
    y = pmadd(y, f, pset1<P>(1.5252733841556773e-05));
    y = pmadd(y, f, pset1<P>(0.00015403530463724353));
    y = pmadd(y, f, pset1<P>(0.001333355814640647));
    y = pmadd(y, f, pset1<P>(0.009618129107587256));
    y = pmadd(y, f, pset1<P>(0.055504108664821625));
    y = pmadd(y, f, pset1<P>(0.24022650695910158));
    y = pmadd(y, f, pset1<P>(0.6931471805599453));
    y = pmadd(y, f, pset1<P>(1.0));
    return pandnot(pmul(y, pow2_of_magic(t, n)), pcmp_lt(x, pset1<P>(-1022.0)));
  }
}

/// Lanes r of a block (r = 0..L-1 within packet `ib`) that may see key `thr` lanes ahead:
/// lane index >= thr.
template <class P>
EIGEN_ALWAYS_INLINE P visible_lanes(int64_t thr) {
  using namespace Eigen::internal;
  using S = typename unpacket_traits<P>::type;
  return pcmp_le(pset1<P>(static_cast<S>(thr)), plset<P>(S(0)));
}

/// Sᵀ rows [jj, jj + KK) of one block: st[(jj + kk) W + lane] = sum_c k_{jj+kk}[c] qt[c][lane].
/// Keeps the running tile max / min per lane. Diag: lanes before thr[kk] are hidden (stored as
/// -inf, kept out of max and min).
template <class T, int KK, bool Diag>
EIGEN_ALWAYS_INLINE void qk_micro(const T* qt, int64_t d, const T* const* krow, int64_t kcs, T* st,
                                  typename Simd<T>::P* tmax, typename Simd<T>::P* tmin, const int64_t* thr) {
  using namespace Eigen::internal;
  using S = Simd<T>;
  using P = typename S::P;
  constexpr int IB = S::IB, L = S::L, W = S::W;
  P acc[KK][IB];
  EFFATTN_UNROLL
  for (int kk = 0; kk < KK; ++kk)
    EFFATTN_UNROLL
    for (int ib = 0; ib < IB; ++ib) acc[kk][ib] = pset1<P>(T(0));
  const T* kp[KK];
  EFFATTN_UNROLL
  for (int kk = 0; kk < KK; ++kk) kp[kk] = krow[kk];
  if (kcs == 1) {
    for (int64_t c = 0; c < d; ++c) {
      P qv[IB];
      EFFATTN_UNROLL
      for (int ib = 0; ib < IB; ++ib) qv[ib] = ploadu<P>(qt + c * Tiles::kQuery + ib * L);
      EFFATTN_UNROLL
      for (int kk = 0; kk < KK; ++kk) {
        const P kv = pset1<P>(kp[kk][c]);
        EFFATTN_UNROLL
        for (int ib = 0; ib < IB; ++ib) acc[kk][ib] = pmadd(kv, qv[ib], acc[kk][ib]);
      }
    }
  } else {
    for (int64_t c = 0; c < d; ++c) {
      P qv[IB];
      EFFATTN_UNROLL
      for (int ib = 0; ib < IB; ++ib) qv[ib] = ploadu<P>(qt + c * Tiles::kQuery + ib * L);
      EFFATTN_UNROLL
      for (int kk = 0; kk < KK; ++kk) {
        const P kv = pset1<P>(kp[kk][c * kcs]);
        EFFATTN_UNROLL
        for (int ib = 0; ib < IB; ++ib) acc[kk][ib] = pmadd(kv, qv[ib], acc[kk][ib]);
      }
    }
  }
  const P ninf = pset1<P>(-std::numeric_limits<T>::infinity());
  const P pinf = pset1<P>(std::numeric_limits<T>::infinity());
  P mx[IB], mn[IB];  // in registers: tmax and tmin are read and written once
  EFFATTN_UNROLL
  for (int ib = 0; ib < IB; ++ib) {
    mx[ib] = tmax[ib];
    mn[ib] = tmin[ib];
  }
  EFFATTN_UNROLL
  for (int kk = 0; kk < KK; ++kk)
    EFFATTN_UNROLL
    for (int ib = 0; ib < IB; ++ib) {
      P s = acc[kk][ib], smin = s;
      if constexpr (Diag) {
        const P vis = visible_lanes<P>(thr[kk] - ib * L);
        s = pselect(vis, s, ninf);
        smin = pselect(vis, smin, pinf);
      }
      pstoreu(st + kk * W + ib * L, s);
      mx[ib] = pmax(mx[ib], s);
      mn[ib] = pmin(mn[ib], smin);
    }
  EFFATTN_UNROLL
  for (int ib = 0; ib < IB; ++ib) {
    tmax[ib] = mx[ib];
    tmin[ib] = mn[ib];
  }
}

/// Oᵀ columns [c0, c0 + CC) of one block: ot = alpha ot + sum_{jj < je} v_jj[c] pt[jj][lane]; keys
/// jj >= jf are partly visible (lanes before thr[jj] hidden: their product is dropped, so a
/// non-finite hidden value cannot leak through 0·NaN).
template <class T, int CC>
EIGEN_ALWAYS_INLINE void pv_micro(const T* pt, const T* const* vrow, int64_t vcs, int64_t c0, int64_t jf, int64_t je,
                                  const int64_t* thr, const typename Simd<T>::P* alpha, T* ot) {
  using namespace Eigen::internal;
  using S = Simd<T>;
  using P = typename S::P;
  constexpr int IB = S::IB, L = S::L, W = S::W;
  P acc[CC][IB];
  EFFATTN_UNROLL
  for (int cc = 0; cc < CC; ++cc)
    EFFATTN_UNROLL
    for (int ib = 0; ib < IB; ++ib) acc[cc][ib] = pmul(ploadu<P>(ot + cc * Tiles::kQuery + ib * L), alpha[ib]);
  const int64_t off = c0 * vcs;
  if (vcs == 1) {
    for (int64_t jj = 0; jj < jf; ++jj) {
      const T* vr = vrow[jj] + off;
      P pv[IB];
      EFFATTN_UNROLL
      for (int ib = 0; ib < IB; ++ib) pv[ib] = ploadu<P>(pt + jj * W + ib * L);
      EFFATTN_UNROLL
      for (int cc = 0; cc < CC; ++cc) {
        const P vv = pset1<P>(vr[cc]);
        EFFATTN_UNROLL
        for (int ib = 0; ib < IB; ++ib) acc[cc][ib] = pmadd(vv, pv[ib], acc[cc][ib]);
      }
    }
  } else {
    for (int64_t jj = 0; jj < jf; ++jj) {
      const T* vr = vrow[jj] + off;
      P pv[IB];
      EFFATTN_UNROLL
      for (int ib = 0; ib < IB; ++ib) pv[ib] = ploadu<P>(pt + jj * W + ib * L);
      EFFATTN_UNROLL
      for (int cc = 0; cc < CC; ++cc) {
        const P vv = pset1<P>(vr[cc * vcs]);
        EFFATTN_UNROLL
        for (int ib = 0; ib < IB; ++ib) acc[cc][ib] = pmadd(vv, pv[ib], acc[cc][ib]);
      }
    }
  }
  for (int64_t jj = jf; jj < je; ++jj) {
    const T* vr = vrow[jj] + off;
    P pv[IB], vis[IB];
    EFFATTN_UNROLL
    for (int ib = 0; ib < IB; ++ib) {
      pv[ib] = ploadu<P>(pt + jj * W + ib * L);
      vis[ib] = visible_lanes<P>(thr[jj] - ib * L);
    }
    EFFATTN_UNROLL
    for (int cc = 0; cc < CC; ++cc) {
      const P vv = pset1<P>(vr[cc * vcs]);
      EFFATTN_UNROLL
      for (int ib = 0; ib < IB; ++ib) acc[cc][ib] = padd(acc[cc][ib], pand(pmul(vv, pv[ib]), vis[ib]));
    }
  }
  EFFATTN_UNROLL
  for (int cc = 0; cc < CC; ++cc)
    EFFATTN_UNROLL
    for (int ib = 0; ib < IB; ++ib) pstoreu(ot + cc * Tiles::kQuery + ib * L, acc[cc][ib]);
}

template <class T, int KK>
EIGEN_ALWAYS_INLINE void qk_group(bool diag, const T* qt, int64_t d, const T* const* krow, int64_t kcs, T* st,
                                  typename Simd<T>::P* tmax, typename Simd<T>::P* tmin, const int64_t* thr) {
  if (diag)
    qk_micro<T, KK, true>(qt, d, krow, kcs, st, tmax, tmin, thr);
  else
    qk_micro<T, KK, false>(qt, d, krow, kcs, st, tmax, tmin, thr);
}

/// Sᵀ for keys [0, je) of one block; keys >= jf are partly visible (thr).
template <class T>
void qk_block(const T* qt, int64_t d, const T* const* krow, int64_t kcs, int64_t jf, int64_t je, const int64_t* thr,
              T* st, typename Simd<T>::P* tmax, typename Simd<T>::P* tmin) {
  constexpr int KJ = Simd<T>::KJ, W = Simd<T>::W;
  int64_t jj = 0;
  for (; jj + KJ <= je; jj += KJ)
    qk_group<T, KJ>(jj + KJ > jf, qt, d, krow + jj, kcs, st + jj * W, tmax, tmin, thr + jj);
  const int64_t rest = je - jj;
  const bool diag = je > jf;
  // The remainder, by powers of two (at most three calls).
  if constexpr (KJ > 8)
    if (rest & 8) {
      qk_group<T, 8>(diag, qt, d, krow + jj, kcs, st + jj * W, tmax, tmin, thr + jj);
      jj += 8;
    }
  if (rest & 4) {
    qk_group<T, 4>(diag, qt, d, krow + jj, kcs, st + jj * W, tmax, tmin, thr + jj);
    jj += 4;
  }
  if (rest & 2) {
    qk_group<T, 2>(diag, qt, d, krow + jj, kcs, st + jj * W, tmax, tmin, thr + jj);
    jj += 2;
  }
  if (rest & 1) qk_group<T, 1>(diag, qt, d, krow + jj, kcs, st + jj * W, tmax, tmin, thr + jj);
}

/// Oᵀ of one block over keys [0, je) (keys >= jf partly visible), all dv columns.
template <class T>
void pv_block(const T* pt, const T* const* vrow, int64_t vcs, int64_t dv, int64_t jf, int64_t je, const int64_t* thr,
              const typename Simd<T>::P* alpha, T* ot) {
  constexpr int CB = Simd<T>::CB;
  int64_t c = 0;
  for (; c + CB <= dv; c += CB) pv_micro<T, CB>(pt, vrow, vcs, c, jf, je, thr, alpha, ot + c * Tiles::kQuery);
  const int64_t rest = dv - c;
  if constexpr (CB > 8)
    if (rest & 8) {
      pv_micro<T, 8>(pt, vrow, vcs, c, jf, je, thr, alpha, ot + c * Tiles::kQuery);
      c += 8;
    }
  if (rest & 4) {
    pv_micro<T, 4>(pt, vrow, vcs, c, jf, je, thr, alpha, ot + c * Tiles::kQuery);
    c += 4;
  }
  if (rest & 2) {
    pv_micro<T, 2>(pt, vrow, vcs, c, jf, je, thr, alpha, ot + c * Tiles::kQuery);
    c += 2;
  }
  if (rest & 1) pv_micro<T, 1>(pt, vrow, vcs, c, jf, je, thr, alpha, ot + c * Tiles::kQuery);
}

#if defined(__GNUC__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wignored-attributes"  // PacketBlock<__m256, 8>, as in Eigen's own GEMM
#endif
/// dst[c * dst_stride + r * dst_col] = f · src[r * src_stride + c * src_col] for r < rows,
/// c < cols: a transposing copy, by L×L register transposes where both sides are contiguous.
template <class T>
void transpose_scaled(const T* src, int64_t src_stride, int64_t src_col, int64_t rows, int64_t cols, T f, T* dst,
                      int64_t dst_stride, int64_t dst_col) {
  using namespace Eigen::internal;
  using P = typename Simd<T>::P;
  constexpr int L = Simd<T>::L;
  int64_t r0 = 0, c0 = 0;
  if constexpr (L > 1) {
    if (src_col == 1 && dst_col == 1) {
      const P pf = pset1<P>(f);
      for (; r0 + L <= rows; r0 += L)
        for (c0 = 0; c0 + L <= cols; c0 += L) {
          PacketBlock<P, L> b;
          for (int l = 0; l < L; ++l) b.packet[l] = ploadu<P>(src + (r0 + l) * src_stride + c0);
          ptranspose(b);
          for (int l = 0; l < L; ++l) pstoreu(dst + (c0 + l) * dst_stride + r0, pmul(b.packet[l], pf));
        }
      // The columns past the last whole block, for the rows done above.
      for (int64_t r = 0; r < r0; ++r)
        for (int64_t c = c0; c < cols; ++c) dst[c * dst_stride + r] = f * src[r * src_stride + c];
    } else {
      r0 = 0;
    }
  }
  for (int64_t r = r0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c) dst[c * dst_stride + r * dst_col] = f * src[r * src_stride + c * src_col];
}
#if defined(__GNUC__)
#pragma GCC diagnostic pop
#endif

/// Row i of p, exactly, in the wider type: for rows the fast path flags (a non-finite query, key
/// or value it may see, or logits beyond T's range). `acc` holds dv wide values.
template <class T>
void slow_row(const HeadAttention<T>& p, int64_t i, Wide<T>* acc) {
  using Wd = Wide<T>;
  const int64_t d = p.q.cols, dv = p.v.cols;
  const auto write = [&](T value, T lse) {
    for (int64_t c = 0; c < dv; ++c) p.out(i, c) = value;
    if (p.lse != nullptr) p.lse[i * p.lse_stride] = lse;
  };
  const T nan = std::numeric_limits<T>::quiet_NaN();
  const int64_t key_end = p.causal ? std::min(p.k.rows, std::max<int64_t>(0, i + p.causal_offset + 1)) : p.k.rows;
  const auto allowed = [&](int64_t j) { return p.key_valid == nullptr || p.key_valid[j] != 0; };
  // A row with no allowed key is zero whatever its query holds: its q reaches nothing.
  bool keyless = true;
  for (int64_t j = 0; j < key_end && keyless; ++j) keyless = !allowed(j);
  if (keyless) return write(T(0), -std::numeric_limits<T>::infinity());
  for (int64_t c = 0; c < d; ++c)
    if (non_finite(p.q(i, c))) return write(nan, nan);
  const auto logit = [&](int64_t j) {
    Wd dot = 0;
    for (int64_t c = 0; c < d; ++c) dot += static_cast<Wd>(p.q(i, c)) * static_cast<Wd>(p.k(j, c));
    return static_cast<Wd>(p.scale) * dot;
  };
  // One pass, online: each logit is computed once (two evaluations could round differently,
  // and at these magnitudes a difference of one rounding is a factor of e^(1e24)).
  Wd m = -std::numeric_limits<Wd>::infinity(), l = 0;
  bool any = false;
  std::fill(acc, acc + dv, Wd(0));
  for (int64_t j = 0; j < key_end; ++j) {
    if (!allowed(j)) continue;
    for (int64_t c = 0; c < d; ++c)
      if (non_finite(p.k(j, c))) return write(nan, nan);
    for (int64_t c = 0; c < dv; ++c)
      if (non_finite(p.v(j, c))) return write(nan, nan);
    const Wd x = logit(j);
    Wd w = 1;
    if (!any || x > m) {
      const Wd f = any ? std::exp(m - x) : Wd(0);
      l *= f;
      for (int64_t c = 0; c < dv; ++c) acc[c] *= f;
      m = x;
    } else {
      w = std::exp(x - m);
    }
    any = true;
    l += w;
    for (int64_t c = 0; c < dv; ++c) acc[c] += w * static_cast<Wd>(p.v(j, c));
  }
  if (!any) return write(T(0), -std::numeric_limits<T>::infinity());
  for (int64_t c = 0; c < dv; ++c) p.out(i, c) = static_cast<T>(acc[c] / l);
  if (p.lse != nullptr) p.lse[i * p.lse_stride] = static_cast<T>(m + std::log(l));
}

/// The allowed keys of [j0, j0 + bk) in order, masked keys dropped (never read): their K and V
/// rows and indices. Returns how many.
template <class T>
int64_t gather_keys(const HeadAttention<T>& p, int64_t j0, int64_t bk, const T** krow, const T** vrow,
                    int64_t* kidx) {
  int64_t n = 0;
  for (int64_t c = 0; c < bk; ++c) {
    const int64_t j = j0 + c;
    if (p.key_valid != nullptr && p.key_valid[j] == 0) continue;
    krow[n] = p.k.data + j * p.k.row_stride;
    vrow[n] = p.v.data + j * p.v.row_stride;
    kidx[n++] = j;
  }
  return n;
}

/// For a block of W query rows whose first row sees keys j <= first (with causal), of a key list
/// kidx[0, n): keys [0, jf) are visible to every row, [jf, je) to some, the rest to none; thr[jj]
/// is the first lane that sees key jj (<= 0 before jf: a micro-tile may straddle jf).
inline void causal_block(const int64_t* kidx, int64_t n, int64_t first, int64_t W, int64_t& jf, int64_t& je,
                         int64_t* thr) {
  jf = std::upper_bound(kidx, kidx + n, first) - kidx;
  je = std::upper_bound(kidx + jf, kidx + n, first + W - 1) - kidx;
  for (int64_t jj = 0; jj < je; ++jj) thr[jj] = kidx[jj] - first;
}
}  // namespace detail_tiles

/// Scratch bytes one thread needs for attend_rows with head dims d, dv (any alignment will do).
template <class T>
constexpr size_t tile_scratch_bytes(int64_t d, int64_t dv) {
  using detail::bytes_of;
  const size_t q = Tiles::kQuery, k = Tiles::kKey, w = detail_tiles::Simd<T>::W;
  return bytes_of<T>(q * d) +                       // Qᵀ
         bytes_of<T>(k * w) +                       // Sᵀ / Pᵀ of one block
         bytes_of<T>(q * dv) +                      // Oᵀ
         3 * bytes_of<T>(q) +                       // row max, row sum, row min
         2 * bytes_of<const T*>(k) +                // key and value row pointers of a key tile
         bytes_of<int64_t>(k) + bytes_of<int64_t>(k) +  // key indices, diagonal thresholds
         bytes_of<uint8_t>(q) +                     // rows flagged for the exact path
         bytes_of<detail_tiles::Wide<T>>(dv);       // the exact path's accumulator
}

/// Computes output rows [i0, i1) of `p` (at most Tiles::kQuery of them) with one thread.
template <class T>
void attend_rows(const HeadAttention<T>& p, int64_t i0, int64_t i1, detail::Arena scratch) {
  using namespace detail_tiles;
  using namespace Eigen::internal;
  using S = Simd<T>;
  using P = typename S::P;
  constexpr int IB = S::IB, L = S::L, W = S::W;
  constexpr int64_t kQ = Tiles::kQuery, kK = Tiles::kKey;
  constexpr T kInf = std::numeric_limits<T>::infinity();
  const int64_t bq = i1 - i0, d = p.q.cols, dv = p.v.cols, nk = p.k.rows;
  const int64_t blocks = (bq + W - 1) / W, bqp = blocks * W;
  T* qt = scratch.take<T>(kQ * d);
  T* st = scratch.take<T>(kK * W);
  T* ot = scratch.take<T>(kQ * dv);
  T* row_max = scratch.take<T>(kQ);
  T* row_sum = scratch.take<T>(kQ);
  T* row_min = scratch.take<T>(kQ);
  const T** krow = scratch.take<const T*>(kK);
  const T** vrow = scratch.take<const T*>(kK);
  int64_t* kidx = scratch.take<int64_t>(kK);
  int64_t* thr = scratch.take<int64_t>(kK);
  uint8_t* slow = scratch.take<uint8_t>(kQ);
  Wide<T>* wide = scratch.take<Wide<T>>(dv);

  // Qᵀ, zero-padded, times scale·log2(e) (so logits are in log2 units); a non-finite query (or a
  // scaled one beyond T) takes the exact path: z = sum 0·q' is NaN exactly then.
  const T factor = static_cast<T>(static_cast<Wide<T>>(p.scale) * static_cast<Wide<T>>(1.442695040888963407359924681001892137L));
  transpose_scaled(&p.q(i0, 0), p.q.row_stride, p.q.col_stride, bq, d, factor, qt, kQ, 1);
  for (int64_t c = 0; c < d; ++c) std::fill(qt + c * kQ + bq, qt + c * kQ + bqp, T(0));
  for (int64_t k = 0; k < bqp; k += L) {
    P z = pset1<P>(T(0));
    for (int64_t c = 0; c < d; ++c) z = pmadd(ploadu<P>(qt + c * kQ + k), pset1<P>(T(0)), z);
    pstoreu(row_min + k, z);  // scratch for a moment: 0, or NaN for a non-finite row
  }
  for (int64_t r = 0; r < bq; ++r) slow[r] = non_finite(row_min[r]);
  std::fill(row_max, row_max + bqp, -kInf);
  std::fill(row_min, row_min + bqp, kInf);
  std::fill(row_sum, row_sum + bqp, T(0));
  for (int64_t c = 0; c < dv; ++c) std::fill(ot + c * kQ, ot + c * kQ + bqp, T(0));

  // With causal, query i sees keys j <= i + offset: the last row of the tile bounds the key range.
  const int64_t key_end = p.causal ? std::min(nk, std::max<int64_t>(0, i1 - 1 + p.causal_offset + 1)) : nk;
  for (int64_t j0 = 0; j0 < key_end; j0 += kK) {
    const int64_t n = gather_keys(p, j0, std::min(kK, key_end - j0), krow, vrow, kidx);
    if (n == 0) continue;
    for (int64_t b = 0; b < blocks; ++b) {
      const int64_t r0 = b * W;
      int64_t jf = n, je = n;
      if (p.causal) causal_block(kidx, n, i0 + r0 + p.causal_offset, W, jf, je, thr);
      if (je == 0) continue;
      P tmax[IB], tmin[IB];
      for (int ib = 0; ib < IB; ++ib) {
        tmax[ib] = pset1<P>(-kInf);
        tmin[ib] = pset1<P>(kInf);
      }
      qk_block<T>(qt + r0, d, krow, p.k.col_stride, jf, je, thr, st, tmax, tmin);

      // Online softmax: the new max, the factor for what was accumulated, this tile's weights.
      P alpha[IB], msafe[IB], sum[IB];
      for (int ib = 0; ib < IB; ++ib) {
        const P mo = ploadu<P>(row_max + r0 + ib * L);
        // The reference the weights are taken against: the max rounded up to a multiple of 1/8
        // (weights stay <= 1; any reference is exact, lse = m + log2(l) whatever m).
        const P mn = pmul(pceil(pmul(pmax(mo, tmax[ib]), pset1<P>(T(8)))), pset1<P>(T(0.125)));
        const P empty = pcmp_eq(mn, pset1<P>(-kInf));  // nothing allowed in this row yet
        alpha[ib] = pselect(empty, pset1<P>(T(1)), exp2_neg(psub(mo, mn)));
        msafe[ib] = pselect(empty, pset1<P>(T(0)), mn);
        pstoreu(row_max + r0 + ib * L, mn);
        pstoreu(row_min + r0 + ib * L, pmin(ploadu<P>(row_min + r0 + ib * L), tmin[ib]));
        sum[ib] = pset1<P>(T(0));
      }
      bool folded = false;
#if defined(EFFATTN_FOLDED_EXP)
      if constexpr (std::is_same_v<T, float> && L == FoldedExp::kLanes) {
        folded = jf == je;  // no hidden lanes (a diagonal block keeps exact zeros for them)
        for (int ib = 0; ib < IB; ++ib) folded = folded && predux_max(pabs(msafe[ib])) <= T(FoldedExp::kMaxReference);
        if (folded) {
          P c1[IB], lo[IB];
          for (int ib = 0; ib < IB; ++ib) {
            c1[ib] = psub(pset1<P>(T(FoldedExp::kMagic)), msafe[ib]);
            lo[ib] = psub(msafe[ib], pset1<P>(T(125)));
          }
          // No clamp needed when every logit of the block is within 125 of the reference (the
          // common case: the tile min says so; NaN in it keeps the clamp).
          bool clamp = false;
          for (int ib = 0; ib < IB; ++ib) clamp = clamp || FoldedExp::any_below(tmin[ib], lo[ib]);
          const auto weights = [&](auto clamp_tag) {
            for (int64_t jj = 0; jj < je; ++jj)
              EFFATTN_UNROLL
              for (int ib = 0; ib < IB; ++ib) {
                const P e = FoldedExp::weights<decltype(clamp_tag)::value>(ploadu<P>(st + jj * W + ib * L), c1[ib], lo[ib]);
                sum[ib] = padd(sum[ib], e);
                pstoreu(st + jj * W + ib * L, e);
              }
          };
          if (clamp) weights(std::true_type{});
          else weights(std::false_type{});
        }
      }
#endif
      if (!folded)
        for (int64_t jj = 0; jj < je; ++jj)
          EFFATTN_UNROLL
          for (int ib = 0; ib < IB; ++ib) {
            const P e = exp2_neg(psub(ploadu<P>(st + jj * W + ib * L), msafe[ib]));
            sum[ib] = padd(sum[ib], e);
            pstoreu(st + jj * W + ib * L, e);
          }
      for (int ib = 0; ib < IB; ++ib)
        pstoreu(row_sum + r0 + ib * L, pmadd(alpha[ib], ploadu<P>(row_sum + r0 + ib * L), sum[ib]));
      pv_block<T>(st, vrow, p.v.col_stride, dv, jf, je, thr, alpha, ot + r0);
    }
  }

  // Normalize Oᵀ in place (1/l per lane) and note per lane whether any output is non-finite
  // (z = sum 0·o is NaN exactly then); row_sum then holds 1/l.
  for (int64_t k = 0; k < bqp; k += L) {
    const P l = ploadu<P>(row_sum + k);
    const P inv = pselect(pcmp_lt(pset1<P>(T(0)), l), pdiv(pset1<P>(T(1)), l), pset1<P>(T(0)));  // l = 0: no key
    P z = pset1<P>(T(0));
    for (int64_t c = 0; c < dv; ++c) {
      const P o = ploadu<P>(ot + c * kQ + k);
      z = pmadd(o, pset1<P>(T(0)), z);
      pstoreu(ot + c * kQ + k, pmul(o, inv));
    }
    pstoreu(row_min + k, padd(ploadu<P>(row_min + k), z));  // NaN where an output is non-finite
    pstoreu(row_sum + k, pselect(pcmp_lt(l, pset1<P>(kInf)), inv, l));  // a NaN or inf sum stays
  }
  // Out = Oᵀ transposed back, every row; then the rows that are zero or exact instead.
  transpose_scaled<T>(ot, kQ, 1, dv, bq, T(1), &p.out(i0, 0), p.out.row_stride, p.out.col_stride);
  for (int64_t r = 0; r < bq; ++r) {
    const int64_t i = i0 + r;
    if (p.query_valid != nullptr && p.query_valid[i] == 0) {
      for (int64_t c = 0; c < dv; ++c) p.out(i, c) = T(0);
      if (p.lse != nullptr) p.lse[i * p.lse_stride] = -kInf;
      continue;
    }
    // Flagged: a non-finite query; a -inf logit (a non-finite key, or a logit below T's range);
    // a non-finite row sum (a NaN or +inf logit); a non-finite output (a non-finite value seen,
    // or an output sum beyond T's range).
    if (slow[r] || !(row_min[r] > -kInf) || non_finite(row_sum[r])) {
      slow_row(p, i, wide);
      continue;
    }
    if (p.lse != nullptr)
      p.lse[i * p.lse_stride] = row_sum[r] > T(0) ? row_max[r] * T(0.693147180559945309417232121458176568L) - std::log(row_sum[r]) : -kInf;
  }
}

/// All rows of one head, one query tile after another, on the calling thread.
template <class T>
void attend_head(const HeadAttention<T>& p, detail::Arena scratch) {
  for (int64_t i0 = 0; i0 < p.q.rows; i0 += Tiles::kQuery)
    attend_rows(p, i0, std::min(p.q.rows, i0 + Tiles::kQuery), scratch);
}

// ---- Backward ------------------------------------------------------------------------------------
// FlashAttention-2's backward on the CPU, one query tile at a time: with P = exp(S − lse) recomputed
// per (query tile, key tile), dV_j += Pᵀ dO, dP = dO Vᵀ, dS = P ∘ (dP − D) with D_i = dO_i · O_i,
// dK_j += s dSᵀ Q and dQ_i += s dS K. Nothing Nq × Nk is stored: scratch is a few tiles.
//
// The forward's layout and micro-kernels, queries in the SIMD lanes. Per key tile (masked keys
// dropped from the list), per block of W query rows:
//   Sᵀ  = K·Qᵀ (qk_block, Qᵀ carrying s·log2 e)      Pᵀ = 2^(Sᵀ − lse·log2 e)  (exp2_neg)
//   dPᵀ = V·dOᵀ (qk_block)                           dSᵀ = Pᵀ ∘ (dPᵀ − D)
//   dQᵀ += Kᵀ·dSᵀ (pv_block)
// then, over the whole query tile, the sums across lanes: dV_j += Σ_i P_ij dO_i and
// dK_j += Σ_i dS_ij (s q_i) (key_rows below), straight into the caller's rows. A product with a
// hidden (causal) or dead entry is skipped rather than multiplied by 0, so a non-finite value
// reaches exactly the gradients the forward's value reaches.

/// One head of the softmax backward: the forward's problem plus out, dout and the gradients.
/// dq rows are written; dk and dv are accumulated (+=), so a caller sums a group of query heads
/// into one key head by calling it per head after zeroing them.
template <class T>
struct HeadAttentionGrad {
  HeadAttention<T> fwd;                 // q, k, v, masks, scale, causal; fwd.out and fwd.lse unused
  MatrixView<const T> out, dout;        // [nq, dv]
  const T* lse = nullptr;               // [nq] from the forward; null: recomputed per query tile
  int64_t lse_stride = 1;
  MatrixView<T> dq, dk, dv;             // [nq, d] written; [nk, d], [nk, dv] accumulated
};

/// Keys per tile of the backward: Pᵀ and dSᵀ of a whole query tile stay in scratch for key_rows.
/// 64, as the forward (128 ran the same in the bench, A/B interleaved, and needs twice the scratch).
struct BackwardTiles {
  static constexpr int64_t kKey = 64;
};

/// Scratch bytes one thread needs for backward_rows with head dims d, dv.
template <class T>
constexpr size_t backward_scratch_bytes(int64_t d, int64_t dv) {
  using detail::bytes_of;
  const size_t q = Tiles::kQuery, k = BackwardTiles::kKey;
  return 3 * bytes_of<T>(q * d) +              // Qᵀ (log2 units), s·Q rows, dQᵀ
         2 * bytes_of<T>(q * dv) +             // dOᵀ, dO rows
         2 * bytes_of<T>(q * k) +              // Pᵀ, dSᵀ of every block
         5 * bytes_of<T>(q) +                  // lse·log2 e, D, live lanes, running max and sum
         2 * bytes_of<const T*>(k) +           // key and value row pointers of a key tile
         3 * bytes_of<int64_t>(k);             // key indices, diagonal thresholds, first rows
}

namespace detail_tiles {
/// Rows [jj, jj + KK) of dX += Σ_i A_i,jj b_i for columns [c0, c0 + NC·|Pk|): A_i,j is
/// at[(i / W)·kKey·W + j·W + i % W] (the blocks' Pᵀ or dSᵀ), b rows [ldb] apart, and key jj + kk
/// sees rows i >= first[kk] only (i < i_end). Rows before every first are not visited; rows
/// between the smallest and the largest first take the masked path (the product is skipped, so
/// 0 · NaN cannot reach the key). x_row[kk] points at the output row, col_stride apart.
template <class T, class Pk, int KK, int NC>
EIGEN_ALWAYS_INLINE void key_rows_micro(const T* at, const T* b, int64_t ldb, const int64_t* first, int64_t i_end,
                                        T* const* x_row, int64_t col_stride) {
  using namespace Eigen::internal;
  constexpr int W = Simd<T>::W, Lp = unpacket_traits<Pk>::size;
  constexpr int64_t kBlock = BackwardTiles::kKey * W;
  int64_t lo = first[0], hi = first[0];
  EFFATTN_UNROLL
  for (int kk = 1; kk < KK; ++kk) lo = std::min(lo, first[kk]), hi = std::max(hi, first[kk]);
  hi = std::min(hi, i_end);
  Pk acc[KK][NC];
  EFFATTN_UNROLL
  for (int kk = 0; kk < KK; ++kk)
    EFFATTN_UNROLL
    for (int nc = 0; nc < NC; ++nc) acc[kk][nc] = pset1<Pk>(T(0));
  for (int64_t i = lo; i < hi; ++i) {  // keys start at different rows (causal diagonal)
    const T* a = at + (i / W) * kBlock + i % W;
    const T* br = b + i * ldb;
    EFFATTN_UNROLL
    for (int kk = 0; kk < KK; ++kk) {
      if (i < first[kk]) continue;
      const Pk av = pset1<Pk>(a[kk * W]);
      EFFATTN_UNROLL
      for (int nc = 0; nc < NC; ++nc) acc[kk][nc] = pmadd(av, ploadu<Pk>(br + nc * Lp), acc[kk][nc]);
    }
  }
  for (int64_t i = hi; i < i_end;) {  // whole rows, block by block
    const T* a = at + (i / W) * kBlock;
    const int64_t lane_end = std::min<int64_t>(W, i_end - i + i % W);
    for (int64_t lane = i % W; lane < lane_end; ++lane, ++i) {
      const T* br = b + i * ldb;
      Pk bv[NC];
      EFFATTN_UNROLL
      for (int nc = 0; nc < NC; ++nc) bv[nc] = ploadu<Pk>(br + nc * Lp);
      EFFATTN_UNROLL
      for (int kk = 0; kk < KK; ++kk) {
        const Pk av = pset1<Pk>(a[kk * W + lane]);
        EFFATTN_UNROLL
        for (int nc = 0; nc < NC; ++nc) acc[kk][nc] = pmadd(av, bv[nc], acc[kk][nc]);
      }
    }
  }
  EFFATTN_UNROLL
  for (int kk = 0; kk < KK; ++kk)
    EFFATTN_UNROLL
    for (int nc = 0; nc < NC; ++nc) {
      T* x = x_row[kk] + nc * Lp * col_stride;
      if (col_stride == 1) {
        pstoreu(x, padd(ploadu<Pk>(x), acc[kk][nc]));
      } else {
        T lanes[Lp];
        pstoreu(lanes, acc[kk][nc]);
        for (int l = 0; l < Lp; ++l) x[l * col_stride] += lanes[l];
      }
    }
}

/// Keys [jj, jj + KK) of key_rows, every column: 2-packet, 1-packet and scalar column groups.
template <class T, int KK>
EIGEN_ALWAYS_INLINE void key_rows_group(const T* at, int64_t jj, const T* b, int64_t ldb, int64_t cols,
                                        const int64_t* first, int64_t i_end, const MatrixView<T>& x,
                                        const int64_t* kidx) {
  using P = typename Simd<T>::P;
  constexpr int L = Simd<T>::L;
  T* x_row[KK];
  EFFATTN_UNROLL
  for (int kk = 0; kk < KK; ++kk) x_row[kk] = x.data + kidx[jj + kk] * x.row_stride;
  const T* a = at + jj * Simd<T>::W;
  const int64_t cs = x.col_stride;
  const auto shift = [&](int64_t c) {
    EFFATTN_UNROLL
    for (int kk = 0; kk < KK; ++kk) x_row[kk] += c * cs;
  };
  int64_t c = 0;
  for (; c + 2 * L <= cols; c += 2 * L, shift(2 * L)) key_rows_micro<T, P, KK, 2>(a, b + c, ldb, first + jj, i_end, x_row, cs);
  if (c + L <= cols) key_rows_micro<T, P, KK, 1>(a, b + c, ldb, first + jj, i_end, x_row, cs), c += L, shift(L);
  if constexpr (L > 1)
    for (; c < cols; ++c, shift(1)) key_rows_micro<T, T, KK, 1>(a, b + c, ldb, first + jj, i_end, x_row, cs);
}

/// x rows kidx[jj] (jj < n) += Σ_i A_i,jj b_i over rows i in [first[jj], i_end): key_rows_group
/// over groups of keys, the remainder by powers of two.
template <class T>
void key_rows(const T* at, int64_t n, const T* b, int64_t ldb, int64_t cols, const int64_t* first, int64_t i_end,
              const MatrixView<T>& x, const int64_t* kidx) {
  constexpr int KJ = Simd<T>::KR;
  int64_t jj = 0;
  for (; jj + KJ <= n; jj += KJ) key_rows_group<T, KJ>(at, jj, b, ldb, cols, first, i_end, x, kidx);
  const int64_t rest = n - jj;
  if constexpr (KJ > 8)
    if (rest & 8) key_rows_group<T, 8>(at, jj, b, ldb, cols, first, i_end, x, kidx), jj += 8;
  if (rest & 4) key_rows_group<T, 4>(at, jj, b, ldb, cols, first, i_end, x, kidx), jj += 4;
  if (rest & 2) key_rows_group<T, 2>(at, jj, b, ldb, cols, first, i_end, x, kidx), jj += 2;
  if (rest & 1) key_rows_group<T, 1>(at, jj, b, ldb, cols, first, i_end, x, kidx);
}
}  // namespace detail_tiles

/// Gradients of output rows [i0, i1) (at most Tiles::kQuery) of `g`, on one thread: writes dq for
/// those rows and adds their share to dk and dv. Invalid queries and rows with no allowed key
/// contribute nothing and get dq = 0.
template <class T>
void backward_rows(const HeadAttentionGrad<T>& g, int64_t i0, int64_t i1, detail::Arena scratch) {
  using namespace detail_tiles;
  using namespace Eigen::internal;
  using S = Simd<T>;
  using P = typename S::P;
  constexpr int IB = S::IB, L = S::L, W = S::W;
  constexpr int64_t kQ = Tiles::kQuery, kK = BackwardTiles::kKey;
  constexpr T kInf = std::numeric_limits<T>::infinity();
  const HeadAttention<T>& p = g.fwd;
  const int64_t bq = i1 - i0, d = p.q.cols, dv = p.v.cols, nk = p.k.rows;
  const int64_t blocks = (bq + W - 1) / W, bqp = blocks * W;
  T* qt = scratch.take<T>(kQ * d);     // Qᵀ · s·log2 e, zero-padded
  T* qs = scratch.take<T>(kQ * d);     // s·Q rows
  T* dqt = scratch.take<T>(kQ * d);    // dQᵀ / s
  T* dot = scratch.take<T>(kQ * dv);   // dOᵀ, zero-padded
  T* dor = scratch.take<T>(kQ * dv);   // dO rows
  T* pt = scratch.take<T>(kQ * kK);    // Pᵀ of each block, [block][key][lane]
  T* dst = scratch.take<T>(kQ * kK);   // dPᵀ, then dSᵀ
  T* lse2 = scratch.take<T>(kQ);       // lse · log2 e; +inf for a dead row (P = 0)
  T* delta = scratch.take<T>(kQ);      // D_i = dO_i · O_i
  T* live = scratch.take<T>(kQ);       // 1 for a row that attends something
  T* row_max = scratch.take<T>(kQ);    // the statistics pass (no lse given)
  T* row_sum = scratch.take<T>(kQ);
  const T** krow = scratch.take<const T*>(kK);
  const T** vrow = scratch.take<const T*>(kK);
  int64_t* kidx = scratch.take<int64_t>(kK);
  int64_t* thr = scratch.take<int64_t>(kK);
  int64_t* first = scratch.take<int64_t>(kK);

  const T log2e = static_cast<T>(1.442695040888963407359924681001892137L);
  const T factor = static_cast<T>(static_cast<Wide<T>>(p.scale) * static_cast<Wide<T>>(log2e));
  // An invalid query's values (even NaN) must reach nothing: its rows are zeros from the start.
  const auto query_ok = [&](int64_t r) { return p.query_valid == nullptr || p.query_valid[i0 + r] != 0; };
  transpose_scaled(&p.q(i0, 0), p.q.row_stride, p.q.col_stride, bq, d, factor, qt, kQ, 1);
  for (int64_t r = 0; r < bqp; ++r)
    if (r >= bq || !query_ok(r))
      for (int64_t c = 0; c < d; ++c) qt[c * kQ + r] = T(0);

  const int64_t key_end = p.causal ? std::min(nk, std::max<int64_t>(0, i1 - 1 + p.causal_offset + 1)) : nk;
  const auto gather = [&](int64_t j0) { return gather_keys(p, j0, std::min(kK, key_end - j0), krow, vrow, kidx); };
  const auto block_keys = [&](int64_t b, int64_t n, int64_t& jf, int64_t& je) {
    jf = je = n;
    if (p.causal) causal_block(kidx, n, i0 + b * W + p.causal_offset, W, jf, je, thr);
  };

  // Row statistics in log2 units: the forward's lse, or one online pass over the keys. With a
  // single key tile the pass leaves Sᵀ in pt for the gradient pass.
  bool s_ready = false;
  if (g.lse != nullptr) {
    for (int64_t r = 0; r < bq; ++r) lse2[r] = g.lse[(i0 + r) * g.lse_stride] * log2e;
  } else {
    std::fill(row_max, row_max + bqp, -kInf);
    std::fill(row_sum, row_sum + bqp, T(0));
    for (int64_t j0 = 0; j0 < key_end; j0 += kK) {
      const int64_t n = gather(j0);
      if (n == 0) continue;
      for (int64_t b = 0; b < blocks; ++b) {
        int64_t jf, je;
        block_keys(b, n, jf, je);
        if (je == 0) continue;
        T* st = pt + b * kK * W;
        P tmax[IB], tmin[IB];
        for (int ib = 0; ib < IB; ++ib) tmax[ib] = pset1<P>(-kInf), tmin[ib] = pset1<P>(kInf);
        qk_block<T>(qt + b * W, d, krow, p.k.col_stride, jf, je, thr, st, tmax, tmin);
        for (int ib = 0; ib < IB; ++ib) {
          T* mp = row_max + b * W + ib * L;
          T* sp = row_sum + b * W + ib * L;
          const P mo = ploadu<P>(mp), mn = pmax(mo, tmax[ib]);
          const P empty = pcmp_eq(mn, pset1<P>(-kInf));  // nothing allowed in this row yet
          const P msafe = pselect(empty, pset1<P>(T(0)), mn);
          P sum = pset1<P>(T(0));
          for (int64_t jj = 0; jj < je; ++jj) sum = padd(sum, exp2_neg(psub(ploadu<P>(st + jj * W + ib * L), msafe)));
          pstoreu(sp, pmadd(pselect(empty, pset1<P>(T(1)), exp2_neg(psub(mo, msafe))), ploadu<P>(sp), sum));
          pstoreu(mp, mn);
        }
      }
    }
    s_ready = key_end <= kK;  // one key tile (with no allowed key the gradient pass does nothing)
    // A zero sum: no allowed key; a NaN one (a NaN logit) keeps the row alive with NaN weights.
    for (int64_t r = 0; r < bq; ++r)
      lse2[r] = row_sum[r] > T(0) ? row_max[r] + std::log2(row_sum[r]) : row_sum[r] == T(0) ? -kInf : row_sum[r];
  }

  // A row that attends nothing (invalid query, no allowed key) takes no part: P = 0 there, and its
  // q and dO rows (even NaN ones) are zeros.
  bool any_live = false;
  for (int64_t r = 0; r < bqp; ++r) {
    const bool alive = r < bq && query_ok(r) && lse2[r] != -kInf;
    any_live = any_live || alive;
    live[r] = alive ? T(1) : T(0);
    T dsum = 0;
    for (int64_t c = 0; c < dv; ++c) {
      const T o = alive ? g.dout(i0 + r, c) : T(0);
      dor[r * dv + c] = o;
      dot[c * kQ + r] = o;
      if (alive) dsum += o * g.out(i0 + r, c);
    }
    delta[r] = dsum;
    for (int64_t c = 0; c < d; ++c) {
      qs[r * d + c] = alive ? p.q(i0 + r, c) * p.scale : T(0);
      if (!alive) qt[c * kQ + r] = T(0);
      dqt[c * kQ + r] = T(0);
    }
    if (!alive) lse2[r] = kInf;  // 2^(s − inf) = 0
  }

  const P one = pset1<P>(T(1)), zero = pset1<P>(T(0));
  P ones[IB];
  for (int ib = 0; ib < IB; ++ib) ones[ib] = one;
  for (int64_t j0 = 0; any_live && j0 < key_end; j0 += kK) {
    const int64_t n = gather(j0);
    if (n == 0) continue;
    for (int64_t b = 0; b < blocks; ++b) {
      int64_t jf, je;
      block_keys(b, n, jf, je);
      if (je == 0) continue;
      const int64_t r0 = b * W;
      T* pb = pt + b * kK * W;
      T* db = dst + b * kK * W;
      P tmax[IB], tmin[IB];  // not needed here
      for (int ib = 0; ib < IB; ++ib) tmax[ib] = pset1<P>(-kInf), tmin[ib] = pset1<P>(kInf);
      if (!s_ready) qk_block<T>(qt + r0, d, krow, p.k.col_stride, jf, je, thr, pb, tmax, tmin);
      qk_block<T>(dot + r0, dv, vrow, p.v.col_stride, jf, je, thr, db, tmax, tmin);
      P lv[IB], lmask[IB], dl[IB];
      for (int ib = 0; ib < IB; ++ib) {
        lv[ib] = ploadu<P>(lse2 + r0 + ib * L);
        lmask[ib] = pcmp_eq(ploadu<P>(live + r0 + ib * L), one);
        dl[ib] = ploadu<P>(delta + r0 + ib * L);
      }
      for (int64_t jj = 0; jj < je; ++jj)
        EFFATTN_UNROLL
        for (int ib = 0; ib < IB; ++ib) {
          P mask = lmask[ib];
          if (jj >= jf) mask = pand(mask, visible_lanes<P>(thr[jj] - ib * L));
          const P pr = pand(exp2_neg(psub(ploadu<P>(pb + jj * W + ib * L), lv[ib])), mask);
          const P ds = pmul(pr, psub(ploadu<P>(db + jj * W + ib * L), dl[ib]));
          pstoreu(pb + jj * W + ib * L, pr);
          pstoreu(db + jj * W + ib * L, pselect(mask, ds, zero));
        }
      pv_block<T>(db, krow, p.k.col_stride, d, jf, je, thr, ones, dqt + r0);
    }
    // The sums across query rows: key jj is seen by rows >= first[jj].
    for (int64_t jj = 0; jj < n; ++jj) first[jj] = p.causal ? std::max<int64_t>(0, kidx[jj] - i0 - p.causal_offset) : 0;
    key_rows<T>(pt, n, dor, dv, dv, first, bq, g.dv, kidx);
    key_rows<T>(dst, n, qs, d, d, first, bq, g.dk, kidx);
  }

  transpose_scaled<T>(dqt, kQ, 1, d, bq, p.scale, &g.dq(i0, 0), g.dq.row_stride, g.dq.col_stride);
  for (int64_t r = 0; r < bq; ++r)
    if (live[r] == T(0))
      for (int64_t c = 0; c < d; ++c) g.dq(i0 + r, c) = T(0);
}

/// The backward of all rows of one head, query tile after query tile, on the calling thread.
template <class T>
void backward_head(const HeadAttentionGrad<T>& g, detail::Arena scratch) {
  for (int64_t i0 = 0; i0 < g.fwd.q.rows; i0 += Tiles::kQuery)
    backward_rows(g, i0, std::min(g.fwd.q.rows, i0 + Tiles::kQuery), scratch);
}

}  // namespace cpu
}  // namespace effattn
