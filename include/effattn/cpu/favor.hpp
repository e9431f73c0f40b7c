// FAVOR+ (Performer) attention on the CPU, forward and backward: linear attention through random
// features, out_i = phi(q_i)ᵀ S / phi(q_i)ᵀ z with S = sum_j phi(k_j) v_jᵀ, z = sum_j phi(k_j).
// Every (batch, head) streams its tokens in tiles, so scratch is O(tile · M + M · Dv) and never
// grows with N; features are Eigen GEMMs on token tiles.
//   bidirectional: pass 1 finds the key stabilizers, pass 2 accumulates S, z, pass 3 maps query
//     tiles through S, z; for positive, passes 1 and 2 are one, rescaled online
//     (accumulate_positive_online).
//   causal: the same pass 1 (over all valid keys, DESIGN.md), then query chunks in order: prefix
//     state (S, z) for the keys every row of the chunk sees, plus the chunk's own triangle done
//     quadratically (phi(Q_c) phi(K_c)ᵀ masked), then the chunk's keys join the state.
//
// Range rule. Any positive factor common to one query row's features cancels in num_i / den_i, and
// so does any positive factor common to all key features of a (batch, head). The code computes
// phî = phi / factor with factors that keep every feature in [0, 2] and the largest of each query
// row and of each (b, h)'s keys >= 1, so that nothing overflows and den_i >= min(1, eps) per
// visible key cannot underflow:
//   positive: exp(u - |x'|²/2 - max) + eps, divided by the larger of eps and its largest exp term
//     exp(top), in the log domain: phî = exp(u - |x'|²/2 - max - top - max(0, λ)) + exp(min(0, λ)),
//     λ = log eps - top (queries: top = -|q'|²/2; keys: top = max_j (max_f u_jf - |k'_j|²/2) - c).
//     eps = 1e-30 with |x| ~ 10 (every exp part underflows) gives 1 + tiny, not 0; eps = 1e38
//     gives 1 + tiny, not inf. An exp term below T's normal range is 0.
//   relu: (relu(u) + eps) / max(relu(max_f u), eps) per query row, / max(1, eps) for keys.
//   trig: keys exp(|k'|²/2 - c) [cos u, sin u] (<= 1 already); queries use c = |q'|²/2 (amplitude 1).
//   DESIGN.md's M^-1/2 is one more common factor and is left out.
// So a zero row means only "invalid query" or "no visible valid key" (and, for trig, a normalizer
// that cancels to 0: the ratio is then undefined). eps must be a normal number of the element type
// (Error otherwise: a subnormal or overflowing eps cannot be carried). Non-finite inputs propagate:
// a NaN or Inf in q_i, or in a valid k_j / v_j, makes NaN exactly the rows that see it (the key
// stabilizers skip non-finite values, and products inside a causal chunk fall back to row-wise
// sums when an operand holds one, since 0 · NaN = NaN would reach hidden pairs); an invalid key or
// query reaches nothing.
//
// Backward (DESIGN.md "Backward"): with g_i = dO_i / den_i and t_i = dO_i · out_i / den_i,
// dphi(q_i) = S g_i - z t_i, dS = sum_i phi(q_i) g_iᵀ, dz = -sum_i phi(q_i) t_i,
// dphi(k_j) = dS v_j + dz, dv_j = dSᵀ phi(k_j), then through the map and x' = sqrt(s) x. All
// stabilizers and range factors are constants: that is DESIGN.md's stop-gradient for the
// stabilizers, and exact for the factors, because out_i is invariant under scaling phi(q_i) (or all
// phi(k_j)) by a positive a, so d out / d a = 0. Equivalently dphi(q_i) ⟂ phi(q_i):
// dphi(q_i) · phi(q_i) = (num_i · dO_i - den_i (dO_i · out_i)) / den_i = 0. That is also why the
// dropped M^-1/2 and trig's per-row query c leave the gradient unchanged. One work item per
// (batch, key head) sums dk, dv over its group. Bidirectional: S, z; then query tiles give dq and
// dS, dz; then key tiles give dk, dv. Causal: two passes, see backward_causal.
#pragma once
#include <Eigen/Core>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <utility>

#include "effattn/core.hpp"
#include "effattn/cpu/common.hpp"
#include "effattn/cpu/parallel.hpp"
#include "effattn/cpu/softmax_tiles.hpp"

namespace effattn {
namespace cpu {
namespace favor {

constexpr int64_t kTile = 256;  // token rows per streamed tile
constexpr int64_t kChunk = 64;  // causal chunk; the intra-chunk part costs kChunk² (Mf + Dv) per chunk
// The backward's chunk: it has three intra-chunk products of that size where the forward has one.
constexpr int64_t kBackwardChunk = 32;
static_assert(kBackwardChunk <= kChunk, "scratch is sized for kChunk");

inline int64_t feature_count(FeatureMap map, int64_t m) { return map == FeatureMap::trig ? 2 * m : m; }

/// e = exp(u - shift) for u = row[0, M), 0 below T's normal range (Eigen's exp returns ~4e-39 for
/// float there, which would stand in d phî / d u for a true 1e-90 when eps dominates); de = e
/// when de is non-null, then row = e + floor. In one pass with the softmax tiles' exp2 (the
/// argument times log2 e) instead of Eigen's exp and four passes over the row. exp2_neg wants
/// arguments <= 0, which the stabilizer guarantees but for a masked key (zeroed afterwards) or a
/// row holding a NaN or Inf: such a lane takes std::exp.
template <class T>
void positive_feature_row(T* row, int64_t M, T shift, T floor, T* de) {
  using namespace Eigen::internal;
  using P = typename detail_tiles::Simd<T>::P;
  constexpr int L = detail_tiles::Simd<T>::L;
  constexpr T kLog2e = T(1.442695040888963407359924681001892137L);
  constexpr T kTiny = std::numeric_limits<T>::min();
  const auto scalar = [&](T u) {
    const T e = std::exp(u - shift);
    return e < kTiny ? T(0) : e;
  };
  int64_t m = 0;
  if constexpr (L > 1) {
    const P ps = pset1<P>(shift), l2e = pset1<P>(kLog2e), pf = pset1<P>(floor), zero = pset1<P>(T(0));
    for (; m + L <= M; m += L) {
      const P u = ploadu<P>(row + m);
      const P x = psub(u, ps);
      P e = detail_tiles::exp2_neg(pmul(x, l2e));
      if (predux_any(pcmp_lt(zero, x))) {
        alignas(64) T ue[L], ee[L];
        pstore(ue, u);
        pstore(ee, e);
        for (int l = 0; l < L; ++l)
          if (ue[l] - shift > T(0)) ee[l] = scalar(ue[l]);
        e = pload<P>(ee);
      }
      if (de != nullptr) pstoreu(de + m, e);
      pstoreu(row + m, padd(e, pf));
    }
  }
  for (; m < M; ++m) {
    const T e = scalar(row[m]);
    if (de != nullptr) de[m] = e;
    row[m] = e + floor;
  }
}

struct Sizes {
  int64_t M, Mf, D, Dv;  // projection rows, features (2M for trig), head dims
  bool causal;
  bool backward;
  bool trig;
};

/// Per-thread scratch. carve() is the only layout: with a counting `take` it sizes the workspace,
/// with an arena it hands out the pieces, so (backward_)workspace_bytes is exact by construction.
template <class T>
struct Scratch {
  T* w;       // [M, D] the head's projection times sqrt(scale)
  T* x;       // [kTile, D] token rows packed from strided views
  T* v;       // [kTile, Dv] value rows packed from strided views (masked keys zeroed)
  T* keep;    // [kTile] 1 for a valid key of the tile, else 0
  T* feat;    // [kTile, Mf] features of a key or query tile
  T* qfeat;   // [kChunk, Mf] causal: the chunk's query features (its keys' are in feat)
  T* sq;      // [kTile] s |x|² / 2 per row; in the backward, then d/d(s |x|² / 2)
  T* S;       // [Mf, Dv] sum phi(k_j) v_jᵀ
  T* z;       // [Mf] sum phi(k_j)
  T* den;     // [kTile] denominators of a query tile; in the backward, then 1/den (0: dead row)
  T* scores;  // [kChunk, kChunk] causal: phi(Q_c) phi(K_c)ᵀ
  T* num;     // forward: [kTile, Dv] numerators of a query tile
  // Backward only.
  T* e;        // [kTile, M] d phî / d u of the tile in feat (positive, relu)
  T* qe;       // [kChunk, M] causal: the same for qfeat
  T* cum;      // [kChunk, Mf] causal: prefix sums of a chunk's key features
  T* dfeat;    // [kTile, Mf] d phî, then d u in its first M columns
  T* dS;       // [Mf, Dv]
  T* dz;       // [Mf]
  T* g;        // [kTile, Dv] dO_i / den_i
  T* t;        // [kTile] dO_i · out_i / den_i
  T* dx;       // [kTile, D] dq or dk rows
  T* dv;       // [kTile, Dv] dv rows
  T* scores2;  // [kChunk, kChunk] causal: g_i · v_j - t_i
  double* ztotal;  // [3, Mf] causal: CompensatedSum of the key features

  template <class Take>
  static Scratch carve(const Sizes& s, Take take) {
    const bool fwd = !s.backward, bwd = s.backward;
    const int64_t m_e = s.trig ? 0 : s.M;  // trig reads its derivative off the features
    Scratch r;
    r.w = take(s.M * s.D);
    r.x = take(kTile * s.D);
    r.v = take(kTile * s.Dv);
    r.keep = take(kTile);
    r.feat = take(kTile * s.Mf);
    r.qfeat = take(s.causal ? kChunk * s.Mf : 0);
    r.sq = take(kTile);
    r.S = take(s.Mf * s.Dv);
    r.z = take(s.Mf);
    r.den = take(kTile);
    r.scores = take(s.causal ? kChunk * kChunk : 0);
    r.num = take(fwd ? kTile * s.Dv : 0);
    r.e = take(bwd ? kTile * m_e : 0);
    r.qe = take(bwd && s.causal ? kChunk * m_e : 0);
    r.cum = take(bwd && s.causal ? kChunk * s.Mf : 0);
    r.dfeat = take(bwd ? kTile * s.Mf : 0);
    r.dS = take(bwd ? s.Mf * s.Dv : 0);
    r.dz = take(bwd ? s.Mf : 0);
    r.g = take(bwd ? kTile * s.Dv : 0);
    r.t = take(bwd ? kTile : 0);
    r.dx = take(bwd ? kTile * s.D : 0);
    r.dv = take(bwd ? kTile * s.Dv : 0);
    r.scores2 = take(bwd && s.causal ? kChunk * kChunk : 0);
    constexpr int64_t per_double = sizeof(double) / sizeof(T);
    r.ztotal = reinterpret_cast<double*>(take(bwd && s.causal ? 3 * s.Mf * per_double : 0));
    return r;
  }

  static size_t bytes(const Sizes& s) {
    size_t n = 0;
    carve(s, [&](int64_t count) {
      n += detail::bytes_of<T>(static_cast<size_t>(count));
      return static_cast<T*>(nullptr);
    });
    return n;
  }
};

/// One (batch, head) of FAVOR attention.
template <class T>
struct Head {
  MatrixView<const T> q, k, v;
  MatrixView<T> out;                     // forward only
  const uint8_t* key_valid = nullptr;    // null = all valid
  const uint8_t* query_valid = nullptr;  // invalid queries get zero rows
  FeatureMap map = FeatureMap::positive;
  double root_scale = 1;                 // sqrt(s): x' = sqrt(s) x
  T half_scale = 0;                      // s / 2: |x'|²/2 = s |x|² / 2
  T eps = 0, log_eps = 0;                // eps a normal number of T (trig: unused)
  bool causal = false;
  int64_t causal_offset = 0;             // key j is allowed for query i iff j <= i + offset
};

/// The backward's views of one (batch, head): dq rows are written, dk and dv accumulated (+=), so a
/// group of query heads sums into one key head.
template <class T>
struct HeadGrad {
  MatrixView<const T> out, dout;  // [nq, dv]
  MatrixView<T> dq, dk, dv;
};

/// Queries [i0, i0 + n) and the keys [p0, p0 + m) that only some of them see (causal): query row r
/// sees the chunk's keys [0, seen(r)); key c is seen by the chunk's rows [first_row(c), n).
struct Chunk {
  int64_t i0, n, p0, m, offset;
  int64_t seen(int64_t r) const { return std::clamp<int64_t>(i0 + r + offset + 1 - p0, 0, m); }
  int64_t first_row(int64_t c) const { return std::clamp<int64_t>(c + p0 - i0 - offset, 0, n); }
};

/// Sums of T values from which the same terms can be taken out again, to rebuild prefix sums
/// backwards (the causal backward's reverse pass) without cancellation: double hi + lo by TwoSum
/// (what remains is off by ~1e-32 of the total per term), and a count of the non-finite terms,
/// which cannot be subtracted: a sum is NaN while one is in it.
struct CompensatedSum {
  double* hi;
  double* lo;
  double* bad;
  int64_t n;
  CompensatedSum(double* p, int64_t count) : hi(p), lo(p + count), bad(p + 2 * count), n(count) {
    std::fill(p, p + 3 * count, 0.0);
  }
  template <class Column>
  void add(const Column& x, double sign) {
    const bool finite = x.allFinite();
    for (int64_t f = 0; f < n; ++f) {
      const double v = sign * static_cast<double>(x(f));
      if (!finite && !std::isfinite(v)) {
        bad[f] += sign;
        continue;
      }
      const double sum = hi[f] + v, b = sum - hi[f];  // TwoSum: lo gets the rounding error
      lo[f] += (hi[f] - (sum - b)) + (v - b);
      hi[f] = sum;
    }
  }
  template <class T>
  T value(int64_t f) const {
    return bad[f] > 0 ? std::numeric_limits<T>::quiet_NaN() : static_cast<T>(hi[f] + lo[f]);
  }
};

template <class T>
class Runner {
  using RowMap = detail_tiles::RowMap<T>;
  using ConstRowMap = detail_tiles::ConstRowMap<T>;
  using Column = detail_tiles::Column<T>;

 public:
  Runner(const Head<T>& p, const Sizes& s, const Scratch<T>& sc) : p_(p), s_(s), sc_(sc) {
    first_key_ = 0;
    while (first_key_ < p_.k.rows && !key_ok(first_key_)) ++first_key_;
  }

  /// Loads W (one head of the float projection, [M, D] strided) times sqrt(scale) into scratch.
  void load_projection(const Tensor<const float>& proj, int64_t head) {
    for (int64_t f = 0; f < s_.M; ++f)
      for (int64_t c = 0; c < s_.D; ++c)
        sc_.w[f * s_.D + c] = static_cast<T>(static_cast<double>(proj(0, head, f, c)) * p_.root_scale);
  }

  void run() {
    if (!online_keys()) key_scale();
    if (p_.causal)
      causal_sweep([&](const Chunk& ch, const RowMap* fk, const ConstRowMap* vk) {
        RowMap fq = features(false, ch.i0, ch.n, sc_.qfeat);
        RowMap num = rows(sc_.num, ch.n, s_.Dv);
        num.noalias() = fq * S();
        if (chunk_den(ch, fq, fk)) {
          const RowMap a = rows(sc_.scores, ch.n, ch.m);
          add_visible(num, a, *vk, [&](int64_t r) { return std::pair<int64_t, int64_t>(0, ch.seen(r)); });
        }
        write_rows(ch.i0, ch.n);
      });
    else
      run_bidirectional();
  }

  /// The gradients of this head: writes g.dq, adds to g.dk and g.dv.
  void backward(const HeadGrad<T>& g) {
    if (!online_keys()) key_scale();
    if (p_.causal)
      backward_causal(g);
    else
      backward_bidirectional(g);
  }

 private:
  /// Bidirectional positive: the key constants come with S, z (accumulate_positive_online).
  bool online_keys() const { return !p_.causal && p_.map == FeatureMap::positive; }
  bool key_ok(int64_t j) const { return p_.key_valid == nullptr || p_.key_valid[j] != 0; }
  bool query_ok(int64_t i) const { return p_.query_valid == nullptr || p_.query_valid[i] != 0; }
  bool sees_a_key(int64_t i) const {
    return first_key_ < (p_.causal ? std::min(p_.k.rows, i + p_.causal_offset + 1) : p_.k.rows);
  }
  static RowMap rows(T* data, int64_t n, int64_t cols) { return RowMap(data, n, cols, Eigen::OuterStride<>(cols)); }
  RowMap W() const { return rows(sc_.w, s_.M, s_.D); }
  RowMap S() const { return rows(sc_.S, s_.Mf, s_.Dv); }
  Column z() const { return Column(sc_.z, s_.Mf); }
  RowMap dS() const { return rows(sc_.dS, s_.Mf, s_.Dv); }
  Column dz() const { return Column(sc_.dz, s_.Mf); }

  /// u = x' Wᵀ for rows [r0, r0 + n) of `x` into the first M columns of `f` ([n, Mf]), and
  /// s |x|² / 2 into sq.
  void project(const MatrixView<const T>& x, int64_t r0, int64_t n, RowMap& f) {
    const auto xr = detail_tiles::rows_of(x, r0, n, sc_.x);
    f.leftCols(s_.M).noalias() = xr * W().transpose();
    Column(sc_.sq, n) = xr.rowwise().squaredNorm().array() * p_.half_scale;
  }

  /// keep[r] = 1 for the valid keys of [j0, j0 + n); returns their number.
  int64_t mark_keys(int64_t j0, int64_t n) {
    int64_t valid = 0;
    for (int64_t r = 0; r < n; ++r) valid += (sc_.keep[r] = key_ok(j0 + r) ? T(1) : T(0)) != T(0);
    return valid;
  }

  /// Value rows [j0, j0 + n), those of invalid keys zero (a masked NaN must not reach S).
  ConstRowMap values(int64_t j0, int64_t n) {
    if (mark_keys(j0, n) == n) return detail_tiles::rows_of(p_.v, j0, n, sc_.v);
    return detail_tiles::rows_masked(p_.v, j0, n, sc_.keep, sc_.v);
  }

  /// The per-(b, h) key constants (see the top comment), from one pass over the keys (a GEMM per
  /// tile for positive). Non-finite values are skipped, so that a NaN key reaches only the rows
  /// that see it.
  void key_scale() {
    ks_ = KeyScale{};
    if (p_.map == FeatureMap::relu) {
      ks_.div = std::max(T(1), p_.eps);
      return;
    }
    constexpr T kNegInf = -std::numeric_limits<T>::infinity();
    T c = kNegInf, peak = kNegInf;  // peak = max_j (max_f u_jf - |k'_j|²/2) = top + c
    const int64_t nk = p_.k.rows;
    for (int64_t j0 = 0; j0 < nk; j0 += kTile) {
      const int64_t n = std::min(kTile, nk - j0);
      RowMap f = rows(sc_.feat, n, s_.Mf);
      if (p_.map == FeatureMap::positive) {
        project(p_.k, j0, n, f);
        fold_key_maxima(f, j0, n, c, peak);
      } else {
        const auto xr = detail_tiles::rows_of(p_.k, j0, n, sc_.x);
        for (int64_t r = 0; r < n; ++r) {
          const T a = xr.row(r).squaredNorm() * p_.half_scale;
          if (key_ok(j0 + r) && std::isfinite(a)) c = std::max(c, a);
        }
      }
    }
    set_key_constants(c, peak);
  }

  /// Positive: folds the valid keys of a projected tile (rows [j0, j0 + n), u in f, s|k|²/2 in
  /// sq) into c = max u and peak = max (max_f u − |k'|²/2), skipping non-finite values.
  void fold_key_maxima(const RowMap& f, int64_t j0, int64_t n, T& c, T& peak) const {
    for (int64_t r = 0; r < n; ++r) {
      if (!key_ok(j0 + r)) continue;
      const T mx = f.row(r).head(s_.M).maxCoeff(), a = mx - sc_.sq[r];
      if (std::isfinite(mx)) c = std::max(c, mx);
      if (std::isfinite(a)) peak = std::max(peak, a);
    }
  }

  /// ks_ from the key maxima: c (max u, or trig's max |k'|²/2) and peak (positive only).
  void set_key_constants(T c, T peak) {
    if (!std::isfinite(c)) return;  // no valid finite key: nothing will use the constants
    if (p_.map == FeatureMap::trig) {
      ks_.shift = c;
    } else if (std::isfinite(peak)) {  // else every key's exp part is 0 (|k'|² overflows): phî = 1
      const T lambda = p_.log_eps - (peak - c);
      ks_.shift = peak + std::max(T(0), lambda);
      ks_.floor = std::exp(std::min(T(0), lambda));
    }
  }

  /// Bidirectional, positive map: key_scale's constants and S, z in one pass over the keys (a
  /// projection fewer than key_scale then accumulate). Against the running peak p of
  /// max_f u − |k'|²/2, per tile: E = exp(u − |k'|²/2 − p) (positive_feature_row, floor 0),
  /// A += Eᵀ V, a += Eᵀ 1, b += Σ v, n += 1 over the valid keys, A and a rescaled by exp(p_old − p)
  /// when p grows, as an online softmax does. Then, with the final shift and floor,
  /// phî = exp(p − shift) E + floor gives S = exp(p − shift) A + floor 1 bᵀ and
  /// z = exp(p − shift) a + floor n: the same sums, in other order. A row whose max_f u − |k'|²/2
  /// is not finite has E = 0 or NaN whatever the finite reference, so it takes p or 0.
  void accumulate_positive_online() {
    constexpr T kNegInf = -std::numeric_limits<T>::infinity();
    ks_ = KeyScale{};
    S().setZero();
    z().setZero();
    Column b(s_.backward ? sc_.g : sc_.num, s_.Dv);  // b = Σ v (that scratch is free until the query pass)
    b.setZero();
    T c = kNegInf, peak = kNegInf, count = 0;
    const int64_t nk = p_.k.rows, M = s_.M;
    for (int64_t t0 = 0; t0 < nk; t0 += kTile) {
      const int64_t n = std::min(kTile, nk - t0);
      if (mark_keys(t0, n) == 0) continue;
      RowMap f = rows(sc_.feat, n, s_.Mf);
      project(p_.k, t0, n, f);
      T tile_peak = kNegInf;
      fold_key_maxima(f, t0, n, c, tile_peak);
      if (tile_peak > peak) {
        if (std::isfinite(peak)) {
          const T alpha = std::exp(peak - tile_peak);
          S() *= alpha;
          z() *= alpha;
        }
        peak = tile_peak;
      }
      const T ref = std::isfinite(peak) ? peak : T(0);
      for (int64_t r = 0; r < n; ++r) {
        if (sc_.keep[r] == T(0)) {
          f.row(r).setZero();
          continue;
        }
        positive_feature_row(&f(r, 0), M, sc_.sq[r] + ref, T(0), static_cast<T*>(nullptr));
        count += 1;
      }
      const ConstRowMap vt = values(t0, n);
      S().noalias() += f.transpose() * vt;
      z() += f.colwise().sum().transpose().array();
      b += vt.colwise().sum().transpose().array();
    }
    set_key_constants(c, peak);
    const T factor = std::exp((std::isfinite(peak) ? peak : T(0)) - ks_.shift);
    S() *= factor;
    S().rowwise() += (ks_.floor * b).matrix().transpose();
    z() = factor * z() + ks_.floor * count;
  }

  /// phî (see the top comment) of rows [r0, r0 + n) of q (keys = false) or k into `out` [n, Mf]
  /// and, with `de`, d phî / d u into de [n, M] (positive, relu: trig reads it off phî). Rows of
  /// invalid keys are zero (in de too).
  RowMap features(bool keys, int64_t r0, int64_t n, T* out, T* de = nullptr) {
    constexpr T kTiny = std::numeric_limits<T>::min();
    RowMap f = rows(out, n, s_.Mf);
    project(keys ? p_.k : p_.q, r0, n, f);
    if (p_.map == FeatureMap::trig) de = nullptr;
    const int64_t M = s_.M;
    const Column sq(sc_.sq, n);
    switch (p_.map) {
      case FeatureMap::positive:
        // Row by row: contiguous, so Eigen vectorizes the exp.
        for (int64_t r = 0; r < n; ++r) {
          auto row = f.row(r).head(M).array();
          T shift = sq(r) + ks_.shift, floor = ks_.floor;
          if (!keys) {  // the row's own max and top = -|q'|²/2: the |q'|²/2 cancels
            const T lambda = p_.log_eps + sq(r);
            shift = row.maxCoeff() + std::max(T(0), lambda);
            floor = std::exp(std::min(T(0), lambda));
          }
          positive_feature_row(&f(r, 0), M, shift, floor, de != nullptr ? de + r * M : nullptr);
        }
        break;
      case FeatureMap::relu:
        for (int64_t r = 0; r < n; ++r) {
          auto row = f.row(r).head(M).array();
          const T div = keys ? ks_.div : std::max(std::max(row.maxCoeff(), T(0)), p_.eps);
          // d phî / du = [u > 0] / div, as relu(u) / |u| (vectorized, unlike a cast of the comparison).
          if (de != nullptr) rows(de, n, M).row(r) = (row.max(T(0)) / (row.abs().max(kTiny) * div)).matrix();
          row = row.max(T(0)) / div + p_.eps / div;  // two quotients: relu(u) + eps may overflow
        }
        break;
      case FeatureMap::trig: {
        // exp(|x'|²/2 - c) [cos u, sin u]; queries use c = |q'|²/2. Scalar std::sin/cos: Eigen's
        // AVX-512 sin/cos trips a GCC 12 -Wuninitialized false positive in every translation unit
        // that includes this header (trig is for studies).
        auto u = f.leftCols(M);
        f.rightCols(M) = u.unaryExpr([](T x) { return std::sin(x); });
        u = u.unaryExpr([](T x) { return std::cos(x); });
        if (keys)
          for (int64_t r = 0; r < n; ++r) f.row(r) *= std::exp(sq(r) - ks_.shift);
        break;
      }
    }
    if (keys && p_.key_valid != nullptr)
      for (int64_t r = 0; r < n; ++r)
        if (!key_ok(r0 + r)) {
          f.row(r).setZero();
          if (de != nullptr) rows(de, n, M).row(r).setZero();
        }
    return f;
  }

  /// d phî -> d u (in the first M columns of df) and d(s|x|²/2), then dx = du W + s x d(s|x|²/2)
  /// for rows [r0, r0 + n) of q or k, whose features are f and de.
  RowMap chain(bool keys, int64_t r0, int64_t n, const RowMap& f, const T* de, RowMap& df) {
    const int64_t M = s_.M;
    auto du = df.leftCols(M);
    Column dsq(sc_.sq, n);
    bool through_norm = true;
    switch (p_.map) {
      case FeatureMap::positive:  // phî = exp(u - |x'|²/2 - shift) + floor
        du.array() *= ConstRowMap(de, n, M, Eigen::OuterStride<>(M)).array();
        dsq = -du.rowwise().sum().array();
        break;
      case FeatureMap::relu:
        du.array() *= ConstRowMap(de, n, M, Eigen::OuterStride<>(M)).array();
        through_norm = false;
        break;
      case FeatureMap::trig:  // keys: phî = exp(|k'|²/2 - c) [cos u, sin u]; queries: amplitude 1
        if (keys) dsq = (df.array() * f.array()).rowwise().sum();
        du = f.leftCols(M).cwiseProduct(df.rightCols(M)) - f.rightCols(M).cwiseProduct(du);
        through_norm = keys;
        break;
    }
    const auto xr = detail_tiles::rows_of(keys ? p_.k : p_.q, r0, n, sc_.x);
    RowMap dx = rows(sc_.dx, n, s_.D);
    dx.noalias() = du * W();
    if (through_norm) dx.noalias() += (dsq * (2 * p_.half_scale)).matrix().asDiagonal() * xr;
    return dx;
  }

  /// S, z over all keys for the bidirectional forward and backward.
  void bidirectional_state() {
    if (online_keys()) return accumulate_positive_online();
    S().setZero();
    z().setZero();
    accumulate(0, p_.k.rows);
  }

  /// S += phî(K)ᵀ V, z += phî(K)ᵀ 1 over keys [j0, j1), a tile at a time.
  void accumulate(int64_t j0, int64_t j1) {
    for (int64_t t0 = j0; t0 < j1; t0 += kTile) {
      const int64_t n = std::min(kTile, j1 - t0);
      if (mark_keys(t0, n) == 0) continue;
      const RowMap f = features(true, t0, n, sc_.feat);
      S().noalias() += f.transpose() * values(t0, n);
      z() += f.colwise().sum().transpose().array();
    }
  }

  /// 1/den for query i, or 0 where the forward writes a zero row: an invalid query, den = 0 (no
  /// visible valid key), a trig normalizer that cancels below 1/max. A non-finite den gives NaN.
  T inverse(int64_t i, T den) const {
    if (!query_ok(i) || !sees_a_key(i)) return 0;  // whatever q_i holds: it reaches nothing
    if (!std::isfinite(den)) return std::numeric_limits<T>::quiet_NaN();
    const T inv = T(1) / den;
    return std::isfinite(inv) ? inv : T(0);
  }

  /// out rows [i0, i0 + n) = num / den.
  void write_rows(int64_t i0, int64_t n) {
    const RowMap num = rows(sc_.num, n, s_.Dv);
    for (int64_t r = 0; r < n; ++r) {
      const T inv = inverse(i0 + r, sc_.den[r]);
      for (int64_t c = 0; c < s_.Dv; ++c) p_.out(i0 + r, c) = inv == T(0) ? T(0) : num(r, c) * inv;
    }
  }

  void run_bidirectional() {
    bidirectional_state();
    for (int64_t i0 = 0; i0 < p_.q.rows; i0 += kTile) {
      const int64_t n = std::min(kTile, p_.q.rows - i0);
      const RowMap f = features(false, i0, n, sc_.feat);
      rows(sc_.num, n, s_.Dv).noalias() = f * S();
      Column(sc_.den, n).matrix().noalias() = f * z().matrix();
      write_rows(i0, n);
    }
  }

  // ---- causal ----

  int64_t chunk_len() const { return s_.backward ? kBackwardChunk : kChunk; }

  Chunk chunk(int64_t i0) const {
    const int64_t nq = p_.q.rows, nk = p_.k.rows, off = p_.causal_offset;
    const auto clamp_key = [&](int64_t j) { return std::clamp<int64_t>(j, 0, nk); };
    const int64_t n = std::min(chunk_len(), nq - i0), p0 = clamp_key(i0 + off);
    return {i0, n, p0, clamp_key(i0 + n + off) - p0, off};
  }

  /// Zeroes the entries of a [n, m] chunk matrix whose query does not see the key.
  static void hide(RowMap& a, const Chunk& ch) {
    for (int64_t r = 0; r < ch.n; ++r) a.row(r).tail(ch.m - ch.seen(r)).setZero();
  }

  /// out += a b, where row r of `a` is zero outside its visible range [lo, hi) = range(r) of b's
  /// rows. One product when b is finite; else row by row over the visible range, since a NaN row
  /// of b times a hidden 0 would reach rows that do not see it.
  template <class Out, class A, class B, class Range>
  static void add_visible(Out& out, const A& a, const B& b, Range range) {
    if (b.allFinite()) {
      out.noalias() += a * b;
      return;
    }
    for (int64_t r = 0; r < out.rows(); ++r) {
      const auto [lo, hi] = range(r);
      if (hi > lo) out.row(r).noalias() += a.row(r).segment(lo, hi - lo) * b.middleRows(lo, hi - lo);
    }
  }

  /// den of the chunk's queries (features fq) from the state z plus its own triangle; leaves
  /// phî(Q_c) phî(K_c)ᵀ, masked, in scores. Returns whether the chunk has valid keys of its own.
  bool chunk_den(const Chunk& ch, const RowMap& fq, const RowMap* fk) {
    Column den(sc_.den, ch.n);
    den.matrix().noalias() = fq * z().matrix();
    if (fk == nullptr) return false;
    RowMap a = rows(sc_.scores, ch.n, ch.m);
    a.noalias() = fq * fk->transpose();
    hide(a, ch);
    den += a.rowwise().sum().array();
    return true;
  }

  /// The causal sweep in query order: body(chunk, fk, vk) runs with S, z over the keys every row
  /// of the chunk sees, and the features fk (values vk) of the chunk's own keys, null when it has
  /// no valid one; then those keys join the state (and `total`, when given: the keys before the
  /// first chunk as one term, then each chunk's rows).
  template <class Body>
  void causal_sweep(Body body, CompensatedSum* total = nullptr) {
    S().setZero();
    z().setZero();
    int64_t in_state = 0;  // keys [0, in_state) are summed into S, z
    for (int64_t i0 = 0; i0 < p_.q.rows; i0 += chunk_len()) {
      const Chunk ch = chunk(i0);
      accumulate(in_state, ch.p0);
      if (total != nullptr && i0 == 0) total->add(z(), 1);
      in_state = std::max(in_state, ch.p0 + ch.m);
      const bool own = ch.m > 0 && mark_keys(ch.p0, ch.m) > 0;
      const RowMap fk = features(true, ch.p0, own ? ch.m : 0, sc_.feat);
      const ConstRowMap vk = own ? values(ch.p0, ch.m) : ConstRowMap(sc_.v, 0, s_.Dv, Eigen::OuterStride<>(s_.Dv));
      body(ch, own ? &fk : nullptr, own ? &vk : nullptr);
      if (!own) continue;
      S().noalias() += fk.transpose() * vk;
      z() += fk.colwise().sum().transpose().array();
      if (total != nullptr)
        for (int64_t r = 0; r < ch.m; ++r) total->add(fk.row(r).transpose(), 1);
    }
  }

  /// den of the chunk's rows from the state z plus the chunk's own keys each row sees, by prefix
  /// sums of their features (den alone needs no [n, m] product).
  void prefix_den(const Chunk& ch, const RowMap& fq, const RowMap* fk) {
    Column den(sc_.den, ch.n);
    den.matrix().noalias() = fq * z().matrix();
    if (fk == nullptr) return;
    RowMap cum = rows(sc_.cum, ch.m, s_.Mf);  // row c: the features of keys [0, c]
    cum.row(0) = fk->row(0);
    for (int64_t c = 1; c < ch.m; ++c) cum.row(c) = cum.row(c - 1) + fk->row(c);
    for (int64_t r = 0; r < ch.n; ++r)
      if (const int64_t seen = ch.seen(r); seen > 0) den(r) += fq.row(r).dot(cum.row(seen - 1));
  }

  // ---- backward ----

  /// g = dO_i / den_i and t_i = dO_i · out_i / den_i for query rows [i0, i0 + n), den in sc_.den
  /// (replaced by 1/den). Rows the forward zeroes get g = t = 0 and zero features: they contribute
  /// nothing, even when their inputs are NaN.
  void upstream(const HeadGrad<T>& hg, int64_t i0, int64_t n, RowMap& fq) {
    RowMap g = rows(sc_.g, n, s_.Dv);
    for (int64_t r = 0; r < n; ++r) {
      const T inv = sc_.den[r] = inverse(i0 + r, sc_.den[r]);
      T dot = 0;
      for (int64_t c = 0; c < s_.Dv; ++c) {
        const T d = hg.dout(i0 + r, c);
        g(r, c) = d * inv;
        dot += d * hg.out(i0 + r, c);
      }
      sc_.t[r] = dot * inv;
      if (inv == T(0)) {
        g.row(r).setZero();
        sc_.t[r] = 0;
        fq.row(r).setZero();
      }
    }
  }

  /// dq rows [i0, i0 + n) from d phî(q) in df (features fq, fq_de), zero for dead rows.
  void write_dq(const HeadGrad<T>& hg, int64_t i0, int64_t n, const RowMap& fq, const T* fq_de, RowMap& df) {
    const RowMap dx = chain(false, i0, n, fq, fq_de, df);
    for (int64_t r = 0; r < n; ++r)
      for (int64_t c = 0; c < s_.D; ++c) hg.dq(i0 + r, c) = sc_.den[r] == T(0) ? T(0) : dx(r, c);
  }

  /// dk, dv of keys [j0, j0 + n), whose features fk (d phî / d u in sc_.e) are given, from the
  /// state dS, dz of the queries that see all of them, plus what extra(vk, dphi_k, dv) adds (a
  /// causal chunk's triangle).
  template <class Extra>
  void key_tile_grads(const HeadGrad<T>& hg, int64_t j0, int64_t n, const RowMap& fk, Extra extra) {
    const ConstRowMap vk = values(j0, n);
    RowMap df = rows(sc_.dfeat, n, s_.Mf), dv = rows(sc_.dv, n, s_.Dv);
    df.noalias() = vk * dS().transpose();
    df.rowwise() += dz().matrix().transpose();
    dv.noalias() = fk * dS();
    extra(vk, df, dv);
    RowMap dx = chain(true, j0, n, fk, sc_.e, df);
    for (int64_t r = 0; r < n; ++r)
      if (sc_.keep[r] == T(0)) {  // an invalid key gets zeros, whatever reached it
        dx.row(r).setZero();
        dv.row(r).setZero();
      }
    detail_tiles::add_rows(hg.dk, j0, dx);
    detail_tiles::add_rows(hg.dv, j0, dv);
  }

  void key_grads(const HeadGrad<T>& hg, int64_t j0, int64_t j1) {
    for (int64_t t0 = j0; t0 < j1; t0 += kTile) {
      const int64_t n = std::min(kTile, j1 - t0);
      if (mark_keys(t0, n) == 0) continue;
      key_tile_grads(hg, t0, n, features(true, t0, n, sc_.feat, sc_.e), [](const auto&...) {});
    }
  }

  void backward_bidirectional(const HeadGrad<T>& hg) {
    bidirectional_state();
    dS().setZero();
    dz().setZero();
    for (int64_t i0 = 0; i0 < p_.q.rows; i0 += kTile) {
      const int64_t n = std::min(kTile, p_.q.rows - i0);
      RowMap fq = features(false, i0, n, sc_.feat, sc_.e);
      Column(sc_.den, n).matrix().noalias() = fq * z().matrix();
      upstream(hg, i0, n, fq);
      const RowMap g = rows(sc_.g, n, s_.Dv);
      const Column t(sc_.t, n);
      RowMap df = rows(sc_.dfeat, n, s_.Mf);
      df.noalias() = g * S().transpose();
      df.noalias() -= t.matrix() * z().matrix().transpose();
      dS().noalias() += fq.transpose() * g;
      dz().matrix().noalias() -= fq.transpose() * t.matrix();
      write_dq(hg, i0, n, fq, sc_.e, df);
    }
    key_grads(hg, 0, p_.k.rows);
  }

  /// Causal, in two passes with O(M Dv) state. (1) Query order, as the forward: dq from the prefix
  /// S, z; the chunks' key features also go into a CompensatedSum. (2) Reverse chunk order: dk, dv
  /// from dS, dz summed over the queries after the chunk, and the chunk's triangle; den_i needs
  /// the prefix z again, rebuilt by taking each chunk's (bitwise identical) key features back out
  /// of the total, which plain sums could not do without cancellation.
  void backward_causal(const HeadGrad<T>& hg) {
    CompensatedSum total(sc_.ztotal, s_.Mf);
    causal_sweep(
        [&](const Chunk& ch, const RowMap* fk, const ConstRowMap* vk) {
          RowMap fq = features(false, ch.i0, ch.n, sc_.qfeat, sc_.qe);
          prefix_den(ch, fq, fk);
          upstream(hg, ch.i0, ch.n, fq);
          const RowMap g = rows(sc_.g, ch.n, s_.Dv);
          const Column t(sc_.t, ch.n);
          RowMap df = rows(sc_.dfeat, ch.n, s_.Mf);
          df.noalias() = g * S().transpose();
          df.noalias() -= t.matrix() * z().matrix().transpose();
          if (fk != nullptr) {
            RowMap a2 = rows(sc_.scores2, ch.n, ch.m);
            a2.noalias() = g * vk->transpose();
            a2.array().colwise() -= t;
            hide(a2, ch);
            add_visible(df, a2, *fk, [&](int64_t r) { return std::pair<int64_t, int64_t>(0, ch.seen(r)); });
          }
          write_dq(hg, ch.i0, ch.n, fq, sc_.qe, df);
        },
        &total);

    dS().setZero();
    dz().setZero();
    for (int64_t i0 = (p_.q.rows - 1) / chunk_len() * chunk_len(); i0 >= 0; i0 -= chunk_len()) {
      const Chunk ch = chunk(i0);
      const bool own = ch.m > 0 && mark_keys(ch.p0, ch.m) > 0;
      const RowMap fk = features(true, ch.p0, own ? ch.m : 0, sc_.feat, sc_.e);
      for (int64_t r = 0; r < fk.rows(); ++r) total.add(fk.row(r).transpose(), -1);
      for (int64_t f = 0; f < s_.Mf; ++f) sc_.z[f] = total.value<T>(f);  // the keys all rows see
      RowMap fq = features(false, i0, ch.n, sc_.qfeat);
      chunk_den(ch, fq, own ? &fk : nullptr);  // leaves phî(Q_c) phî(K_c)ᵀ in scores
      upstream(hg, i0, ch.n, fq);
      const RowMap g = rows(sc_.g, ch.n, s_.Dv);
      const Column t(sc_.t, ch.n);
      if (own)
        key_tile_grads(hg, ch.p0, ch.m, fk, [&](const ConstRowMap& vk, RowMap& df, RowMap& dv) {
          RowMap a = rows(sc_.scores, ch.n, ch.m), a2 = rows(sc_.scores2, ch.n, ch.m);
          for (int64_t r = 0; r < ch.n; ++r)
            if (sc_.den[r] == T(0)) a.row(r).setZero();  // a dead row (its NaN too) reaches nothing
          a2.noalias() = g * vk.transpose();
          a2.array().colwise() -= t;
          hide(a2, ch);
          const auto seen_by = [&](int64_t c) { return std::pair<int64_t, int64_t>(ch.first_row(c), ch.n); };
          add_visible(df, a2.transpose(), fq, seen_by);
          add_visible(dv, a.transpose(), g, seen_by);
        });
      dS().noalias() += fq.transpose() * g;
      dz().matrix().noalias() -= fq.transpose() * t.matrix();
    }
    key_grads(hg, 0, chunk(0).p0);  // seen by every query
  }

  /// The per-(b, h) key constants: positive phî = exp(u - |k'|²/2 - shift) + floor; relu
  /// phî = (relu(u) + eps) / div; trig phî = exp(|k'|²/2 - shift) [cos u, sin u].
  struct KeyScale {
    T shift = 0, floor = 1, div = 1;
  };

  const Head<T>& p_;
  Sizes s_;
  Scratch<T> sc_;
  KeyScale ks_;
  int64_t first_key_ = 0;  // the first valid key (k.rows if none): row i has a key iff it sees it
};

}  // namespace favor
}  // namespace cpu

template <>
struct Operator<Cpu, Favor> {
  static cpu::favor::Sizes sizes(const Favor& m, int64_t D, int64_t Dv, bool backward) {
    const int64_t M = std::max<int64_t>(0, m.projection.shape[2]);
    return {M, cpu::favor::feature_count(m.map, M), D, Dv, m.causal, backward, m.map == FeatureMap::trig};
  }

  template <class T>
  static size_t workspace_bytes(const Favor& m, Tensor<const T> q, Tensor<const T>, Tensor<const T> v,
                                const Exec<Cpu>& exec) {
    cpu::require_cpu_type<T>();
    return workspace<T>(sizes(m, q.shape[3], v.shape[3], false), exec, q.shape[0] * q.shape[1]);
  }

  template <class T>
  static void run(const Favor& m, Tensor<const T> q, Tensor<const T> k, Tensor<const T> v, Tensor<T> out,
                  const Masks& masks, const Exec<Cpu>& exec) {
    cpu::require_cpu_type<T>();
    constexpr const char* where = "effattn::attention<Cpu>(Favor)";
    const detail::Dims d = detail::check_attention(where, q, k, v, out, masks);
    const Tensor<const float>& proj = m.projection;
    const cpu::favor::Head<T> base = parameters<T>(where, m, d);
    detail::require(!detail::overlaps(proj, out), where, ": out overlaps projection in memory");

    const cpu::favor::Sizes s = sizes(m, d.D, d.Dv, false);
    parallel<T>(s, exec, d.B * d.H, [&](int64_t item, const cpu::favor::Scratch<T>& sc) {
      const int64_t b = item / d.H, h = item % d.H;
      cpu::favor::Head<T> p = head(base, q, k, v, masks, d, b, h);
      p.out = cpu::head_rows(out, b, h);
      cpu::favor::Runner<T> runner(p, s, sc);
      runner.load_projection(proj, proj.shape[1] == 1 ? 0 : h);
      runner.run();
    });
  }

  // ---- Backward: one work item per (batch, key head), so that dk and dv, summed over the
  // group's query heads, have one writer; the group's heads run in order on one thread.
  static constexpr bool kHasBackward = true;

  template <class T>
  static size_t backward_workspace_bytes(const Favor& m, Tensor<const T> q, Tensor<const T> k, Tensor<const T> v,
                                         const Exec<Cpu>& exec) {
    cpu::require_cpu_type<T>();
    return workspace<T>(sizes(m, q.shape[3], v.shape[3], true), exec, q.shape[0] * k.shape[1]);
  }

  template <class T>
  static void backward(const Favor& m, Tensor<const T> q, Tensor<const T> k, Tensor<const T> v, Tensor<const T> out,
                       Tensor<const T> dout, const Grads<T>& grads, const Masks& masks, const Exec<Cpu>& exec) {
    cpu::require_cpu_type<T>();
    constexpr const char* where = "effattn::attention_backward<Cpu>(Favor)";
    detail::require_no_proxy_grads(where, grads);
    const Tensor<const float>& proj = m.projection;
    const detail::Dims d =
        detail::check_backward(where, q, k, v, out, dout, grads, masks, {detail::named("projection", proj)});
    const cpu::favor::Head<T> base = parameters<T>(where, m, d);

    const cpu::favor::Sizes s = sizes(m, d.D, d.Dv, true);
    parallel<T>(s, exec, d.B * d.Hk, [&](int64_t item, const cpu::favor::Scratch<T>& sc) {
      const int64_t b = item / d.Hk, hk = item % d.Hk;
      cpu::favor::HeadGrad<T> g;
      g.dk = cpu::head_rows(grads.dk, b, hk);
      g.dv = cpu::head_rows(grads.dv, b, hk);
      cpu::fill(g.dk, T(0));
      cpu::fill(g.dv, T(0));
      for (int64_t h = hk * d.group(); h < (hk + 1) * d.group(); ++h) {
        const cpu::favor::Head<T> p = head(base, q, k, v, masks, d, b, h);
        g.out = cpu::head_rows(out, b, h);
        g.dout = cpu::head_rows(dout, b, h);
        g.dq = cpu::head_rows(grads.dq, b, h);
        cpu::favor::Runner<T> runner(p, s, sc);
        runner.load_projection(proj, proj.shape[1] == 1 ? 0 : h);
        runner.backward(g);
      }
    });
  }

 private:
  /// Workspace bytes for `items` work items, each thread with one Scratch.
  template <class T>
  static size_t workspace(const cpu::favor::Sizes& s, const Exec<Cpu>& exec, int64_t items) {
    return cpu::parallel_bytes(cpu::thread_count(exec), items, cpu::favor::Scratch<T>::bytes(s));
  }

  /// body(item, scratch) for every work item, on exec's threads, in exec's workspace or an owned one.
  template <class T, class Body>
  static void parallel(const cpu::favor::Sizes& s, const Exec<Cpu>& exec, int64_t items, Body body) {
    const int threads = cpu::thread_count(exec);
    const size_t per_thread = cpu::favor::Scratch<T>::bytes(s);
    detail::HostWorkspace ws(exec.workspace, exec.workspace_size, cpu::parallel_bytes(threads, items, per_thread));
    detail::Arena arena = ws.arena();
    cpu::parallel_for(threads, items, arena, per_thread, [&](int64_t item, detail::Arena scratch) {
      body(item, cpu::favor::Scratch<T>::carve(s, [&](int64_t count) { return scratch.take<T>(count); }));
    });
  }

  /// The call's checked parameters (scale, eps) in a Head without views.
  template <class T>
  static cpu::favor::Head<T> parameters(const char* where, const Favor& m, const detail::Dims& d) {
    const double scale = detail::check_favor(where, m, d);
    const double eps = detail::favor_eps(m.map, m.eps);
    // The range rule (top of cpu/favor.hpp) needs eps as a normal number of T: a subnormal one
    // loses the den >= min(1, eps) bound (and is 0 under flush-to-zero), a larger one is inf.
    constexpr double lo = std::numeric_limits<T>::min(), hi = std::numeric_limits<T>::max();
    detail::require(m.map == FeatureMap::trig || (eps >= lo && eps <= hi), where, ": eps = ", eps,
                    " is outside the normal range of ", sizeof(T) == 4 ? "float" : "double", ", [", lo, ", ", hi,
                    "], that FAVOR needs to keep its features in range");
    cpu::favor::Head<T> p;
    p.map = m.map;
    p.root_scale = std::sqrt(scale);
    p.half_scale = static_cast<T>(scale / 2);
    p.eps = static_cast<T>(eps);
    p.log_eps = m.map == FeatureMap::trig ? T(0) : static_cast<T>(std::log(eps));
    p.causal = m.causal;
    p.causal_offset = d.Nk - d.Nq;  // bottom-right aligned, as Softmax
    return p;
  }

  /// `base` with the views of (batch b, query head h).
  template <class T>
  static cpu::favor::Head<T> head(cpu::favor::Head<T> p, Tensor<const T> q, Tensor<const T> k, Tensor<const T> v,
                                  const Masks& masks, const detail::Dims& d, int64_t b, int64_t h) {
    const int64_t hk = h / d.group();
    p.q = cpu::head_rows(q, b, h);
    p.k = cpu::head_rows(k, b, hk);
    p.v = cpu::head_rows(v, b, hk);
    p.key_valid = cpu::mask_row(masks.key_valid, masks.key_batch_stride, b);
    p.query_valid = cpu::mask_row(masks.query_valid, masks.query_batch_stride, b);
    return p;
  }
};

}  // namespace effattn
