// FAVOR+ (Performer) attention on the CPU: linear attention through random features,
// out_i = phi(q_i)ᵀ S / phi(q_i)ᵀ z with S = sum_j phi(k_j) v_jᵀ, z = sum_j phi(k_j).
// Every (batch, head) streams its tokens in tiles, so scratch is O(tile · M + M · Dv) and never
// grows with N; features are Eigen GEMMs on token tiles.
//   bidirectional: pass 1 finds the key stabilizer c (positive, trig), pass 2 accumulates S, z,
//     pass 3 maps query tiles through S, z.
//   causal: the same pass 1 (c is over all valid keys, DESIGN.md), then query chunks in order:
//     prefix state (S, z) for the keys every row of the chunk sees, plus the chunk's own
//     triangle done quadratically (phi(Q_c) phi(K_c)ᵀ masked), then the chunk's keys join the state.
// The M^-1/2 factor of DESIGN.md's phi multiplies numerator and denominator alike and is left out,
// as is, for trig queries, the per-(b, h) constant: a trig query row uses its own |q'|²/2 as c
// (any positive factor per query row cancels in the ratio; a shared one could underflow rows).
#pragma once
#include <Eigen/Core>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

#include "effattn/core.hpp"
#include "effattn/cpu/common.hpp"
#include "effattn/cpu/parallel.hpp"
#include "effattn/cpu/softmax_tiles.hpp"

namespace effattn {
namespace cpu {
namespace favor {

constexpr int64_t kTile = 256;  // token rows per streamed tile
constexpr int64_t kChunk = 64;  // causal chunk; the intra-chunk part costs kChunk² (Mf + Dv) per chunk

inline int64_t feature_count(FeatureMap map, int64_t m) { return map == FeatureMap::trig ? 2 * m : m; }

struct Sizes {
  int64_t M, Mf, D, Dv;  // projection rows, features (2M for trig), head dims
  bool causal;
};

/// Per-thread scratch. carve() is the only layout: with a counting `take` it sizes the workspace,
/// with an arena it hands out the pieces, so workspace_bytes is exact by construction.
template <class T>
struct Scratch {
  T* w;       // [M, D] the head's projection times sqrt(scale)
  T* x;       // [kTile, D] token rows packed from strided views
  T* v;       // [kTile, Dv] value rows packed from strided views
  T* feat;    // [kTile, Mf] features of a key or query tile
  T* qfeat;   // [kChunk, Mf] causal: the chunk's query features (its keys' are in feat)
  T* sq;      // [kTile] s |x|² / 2 per row
  T* S;       // [Mf, Dv] sum phi(k_j) v_jᵀ
  T* z;       // [Mf] sum phi(k_j)
  T* num;     // [kTile, Dv] numerators of a query tile
  T* den;     // [kTile] denominators of a query tile
  T* scores;  // [kChunk, kChunk] causal: phi(Q_c) phi(K_c)ᵀ

  template <class Take>
  static Scratch carve(const Sizes& s, Take take) {
    Scratch r;
    r.w = take(s.M * s.D);
    r.x = take(kTile * s.D);
    r.v = take(kTile * s.Dv);
    r.feat = take(kTile * s.Mf);
    r.qfeat = take(s.causal ? kChunk * s.Mf : 0);
    r.sq = take(kTile);
    r.S = take(s.Mf * s.Dv);
    r.z = take(s.Mf);
    r.num = take(kTile * s.Dv);
    r.den = take(kTile);
    r.scores = take(s.causal ? kChunk * kChunk : 0);
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
  MatrixView<T> out;
  const uint8_t* key_valid = nullptr;    // null = all valid
  const uint8_t* query_valid = nullptr;  // invalid queries get zero rows
  FeatureMap map = FeatureMap::positive;
  T half_scale = 0;                      // s / 2: |x'|²/2 = s |x|² / 2
  T eps = 0;
  bool causal = false;
  int64_t causal_offset = 0;             // key j is allowed for query i iff j <= i + offset
};

template <class T>
class Runner {
  using RowMap = detail_tiles::RowMap<T>;
  using Column = detail_tiles::Column<T>;

 public:
  Runner(const Head<T>& p, const Sizes& s, const Scratch<T>& sc) : p_(p), s_(s), sc_(sc) {}

  /// Loads W (one head of the float projection, [M, D] strided) times sqrt(scale) into scratch.
  void load_projection(const Tensor<const float>& proj, int64_t head, double sqrt_scale) {
    for (int64_t f = 0; f < s_.M; ++f)
      for (int64_t c = 0; c < s_.D; ++c)
        sc_.w[f * s_.D + c] = static_cast<T>(static_cast<double>(proj(0, head, f, c)) * sqrt_scale);
  }

  void run() {
    key_shift_ = key_shift();
    if (p_.causal)
      run_causal();
    else
      run_bidirectional();
  }

 private:
  bool key_ok(int64_t j) const { return p_.key_valid == nullptr || p_.key_valid[j] != 0; }
  bool query_ok(int64_t i) const { return p_.query_valid == nullptr || p_.query_valid[i] != 0; }
  RowMap W() const { return RowMap(sc_.w, s_.M, s_.D, Eigen::OuterStride<>(s_.D)); }
  RowMap S() const { return RowMap(sc_.S, s_.Mf, s_.Dv, Eigen::OuterStride<>(s_.Dv)); }
  Column z() const { return Column(sc_.z, s_.Mf); }

  /// u = x' Wᵀ for rows [r0, r0 + n) of `x` into the first M columns of `f` ([n, Mf]), and
  /// s |x|² / 2 into sq.
  void project(const MatrixView<const T>& x, int64_t r0, int64_t n, RowMap& f) {
    const auto rows = detail_tiles::rows_of(x, r0, n, sc_.x);
    f.leftCols(s_.M).noalias() = rows * W().transpose();
    Column(sc_.sq, n) = rows.rowwise().squaredNorm().array() * p_.half_scale;
  }

  /// DESIGN.md's per-(b, h) key stabilizer: positive, max of u over valid keys and features;
  /// trig, max of |k'|²/2 over valid keys. Streams the keys once (a GEMM per tile for positive).
  T key_shift() {
    if (p_.map == FeatureMap::relu) return 0;
    T c = -std::numeric_limits<T>::infinity();
    const int64_t nk = p_.k.rows;
    for (int64_t j0 = 0; j0 < nk; j0 += kTile) {
      const int64_t n = std::min(kTile, nk - j0);
      RowMap f(sc_.feat, n, s_.Mf, Eigen::OuterStride<>(s_.Mf));
      if (p_.map == FeatureMap::positive) {
        project(p_.k, j0, n, f);
        for (int64_t r = 0; r < n; ++r)
          if (key_ok(j0 + r)) c = std::max(c, f.row(r).head(s_.M).maxCoeff());
      } else {
        const auto rows = detail_tiles::rows_of(p_.k, j0, n, sc_.x);
        for (int64_t r = 0; r < n; ++r)
          if (key_ok(j0 + r)) c = std::max(c, rows.row(r).squaredNorm() * p_.half_scale);
      }
    }
    return std::isfinite(c) ? c : T(0);  // no valid key: nothing will use it
  }

  /// Features (without the M^-1/2 factor) of rows [r0, r0 + n) of q (keys = false) or k into
  /// `f`; for keys, rows of invalid keys are zero. Returns the number of valid keys.
  int64_t features(bool keys, int64_t r0, int64_t n, RowMap& f) {
    project(keys ? p_.k : p_.q, r0, n, f);
    auto u = f.leftCols(s_.M);
    const Column sq(sc_.sq, n);
    switch (p_.map) {
      case FeatureMap::positive:
        // exp(u - |x'|²/2 - max) + eps, max = the row's (queries) or the (b, h) key max.
        // Row by row: contiguous, so Eigen vectorizes the exp.
        for (int64_t r = 0; r < n; ++r) {
          auto row = f.row(r).head(s_.M).array();
          const T mx = keys ? key_shift_ : row.maxCoeff();
          row = (row - (sq(r) + mx)).exp() + p_.eps;
        }
        break;
      case FeatureMap::relu:
        u.array() = u.array().max(T(0)) + p_.eps;
        break;
      case FeatureMap::trig:
        // exp(|x'|²/2 - c) [cos u, sin u]; queries use c = |q'|²/2 (the factor cancels).
        // Scalar std::sin/cos: Eigen's AVX-512 sin/cos trips a GCC 12 -Wuninitialized false
        // positive in every translation unit that includes this header (trig is for studies).
        f.rightCols(s_.M) = u.unaryExpr([](T x) { return std::sin(x); });
        u = u.unaryExpr([](T x) { return std::cos(x); });
        if (keys)
          for (int64_t r = 0; r < n; ++r) f.row(r) *= std::exp(sq(r) - key_shift_);
        break;
    }
    if (!keys) return n;
    int64_t valid = n;
    if (p_.key_valid != nullptr)
      for (int64_t r = 0; r < n; ++r)
        if (!key_ok(r0 + r)) {
          f.row(r).setZero();
          --valid;
        }
    return valid;
  }

  /// S += phi(K)ᵀ V, z += phi(K)ᵀ 1 over keys [j0, j1), a tile at a time.
  void accumulate(int64_t j0, int64_t j1) {
    for (int64_t t0 = j0; t0 < j1; t0 += kTile) {
      const int64_t n = std::min(kTile, j1 - t0);
      RowMap f(sc_.feat, n, s_.Mf, Eigen::OuterStride<>(s_.Mf));
      if (features(true, t0, n, f) == 0) continue;
      S().noalias() += f.transpose() * detail_tiles::rows_of(p_.v, t0, n, sc_.v);
      z() += f.colwise().sum().transpose().array();
    }
  }

  /// out rows [i0, i0 + n) = num / den; zero for invalid queries and rows that see no key.
  void write_rows(int64_t i0, int64_t n) {
    const RowMap num(sc_.num, n, s_.Dv, Eigen::OuterStride<>(s_.Dv));
    for (int64_t r = 0; r < n; ++r) {
      // den > 0 for positive and relu whenever a key is visible (eps); a trig normalizer can
      // cancel to (near) zero, and 1/den must stay finite.
      const T d = sc_.den[r];
      const T inv = d != T(0) ? T(1) / d : T(0);
      const bool live = query_ok(i0 + r) && d != T(0) && std::isfinite(inv);
      for (int64_t c = 0; c < s_.Dv; ++c) p_.out(i0 + r, c) = live ? num(r, c) * inv : T(0);
    }
  }

  void run_bidirectional() {
    S().setZero();
    z().setZero();
    accumulate(0, p_.k.rows);
    for (int64_t i0 = 0; i0 < p_.q.rows; i0 += kTile) {
      const int64_t n = std::min(kTile, p_.q.rows - i0);
      RowMap f(sc_.feat, n, s_.Mf, Eigen::OuterStride<>(s_.Mf));
      features(false, i0, n, f);
      RowMap(sc_.num, n, s_.Dv, Eigen::OuterStride<>(s_.Dv)).noalias() = f * S();
      Column(sc_.den, n).matrix().noalias() = f * z().matrix();
      write_rows(i0, n);
    }
  }

  void run_causal() {
    S().setZero();
    z().setZero();
    const int64_t nq = p_.q.rows, nk = p_.k.rows, off = p_.causal_offset;
    const auto clamp_key = [&](int64_t j) { return std::min(nk, std::max<int64_t>(0, j)); };
    int64_t in_state = 0;  // keys [0, in_state) are summed into S, z
    for (int64_t i0 = 0; i0 < nq; i0 += kChunk) {
      const int64_t n = std::min(kChunk, nq - i0);
      // Every row of the chunk sees keys [0, p0); row r also sees [p0, i0 + r + off].
      const int64_t p0 = clamp_key(i0 + off), p1 = clamp_key(i0 + n + off);
      accumulate(in_state, p0);
      in_state = std::max(in_state, p0);

      RowMap fq(sc_.qfeat, n, s_.Mf, Eigen::OuterStride<>(s_.Mf));
      features(false, i0, n, fq);
      RowMap num(sc_.num, n, s_.Dv, Eigen::OuterStride<>(s_.Dv));
      Column den(sc_.den, n);
      num.noalias() = fq * S();
      den.matrix().noalias() = fq * z().matrix();
      const int64_t m = p1 - p0;  // <= kChunk
      if (m > 0) {
        RowMap fk(sc_.feat, m, s_.Mf, Eigen::OuterStride<>(s_.Mf));
        if (features(true, p0, m, fk) > 0) {
          RowMap a(sc_.scores, n, m, Eigen::OuterStride<>(m));
          a.noalias() = fq * fk.transpose();
          for (int64_t r = 0; r < n; ++r) {
            const int64_t first_hidden = std::max<int64_t>(0, i0 + r + off + 1 - p0);
            if (first_hidden < m) a.row(r).tail(m - first_hidden).setZero();
          }
          const auto vc = detail_tiles::rows_of(p_.v, p0, m, sc_.v);
          num.noalias() += a * vc;
          den += a.rowwise().sum().array();
          S().noalias() += fk.transpose() * vc;
          z() += fk.colwise().sum().transpose().array();
        }
        in_state = p1;
      }
      write_rows(i0, n);
    }
  }

  const Head<T>& p_;
  Sizes s_;
  Scratch<T> sc_;
  T key_shift_ = 0;
};

}  // namespace favor
}  // namespace cpu

template <>
struct Operator<Cpu, Favor> {
  static cpu::favor::Sizes sizes(const Favor& m, int64_t D, int64_t Dv) {
    const int64_t M = std::max<int64_t>(0, m.projection.shape[2]);
    return {M, cpu::favor::feature_count(m.map, M), D, Dv, m.causal};
  }

  template <class T>
  static size_t workspace_bytes(const Favor& m, Tensor<const T> q, Tensor<const T>, Tensor<const T> v,
                                const Exec<Cpu>& exec) {
    cpu::require_cpu_type<T>();
    const size_t per_thread = cpu::favor::Scratch<T>::bytes(sizes(m, q.shape[3], v.shape[3]));
    return cpu::parallel_bytes(cpu::thread_count(exec), q.shape[0] * q.shape[1], per_thread);
  }

  template <class T>
  static void run(const Favor& m, Tensor<const T> q, Tensor<const T> k, Tensor<const T> v, Tensor<T> out,
                  const Masks& masks, const Exec<Cpu>& exec) {
    cpu::require_cpu_type<T>();
    constexpr const char* where = "effattn::attention<Cpu>(Favor)";
    const detail::Dims d = detail::check_attention(where, q, k, v, out, masks);
    const double scale = detail::check_favor(where, m, d);
    const Tensor<const float>& proj = m.projection;
    detail::require(!detail::overlaps(proj, out), where, ": out overlaps projection in memory");

    const cpu::favor::Sizes s = sizes(m, d.D, d.Dv);
    const int threads = cpu::thread_count(exec);
    const int64_t items = d.B * d.H;
    const size_t per_thread = cpu::favor::Scratch<T>::bytes(s);
    detail::HostWorkspace ws(exec.workspace, exec.workspace_size, cpu::parallel_bytes(threads, items, per_thread));
    detail::Arena arena = ws.arena();
    const double sqrt_scale = std::sqrt(scale);
    const T eps = static_cast<T>(detail::favor_eps(m.map, m.eps));
    cpu::parallel_for(threads, items, arena, per_thread, [&](int64_t item, detail::Arena scratch) {
      const int64_t b = item / d.H, h = item % d.H, hk = h / d.group();
      cpu::favor::Head<T> p;
      p.q = cpu::head_rows(q, b, h);
      p.k = cpu::head_rows(k, b, hk);
      p.v = cpu::head_rows(v, b, hk);
      p.out = cpu::head_rows(out, b, h);
      p.key_valid = cpu::mask_row(masks.key_valid, masks.key_batch_stride, b);
      p.query_valid = cpu::mask_row(masks.query_valid, masks.query_batch_stride, b);
      p.map = m.map;
      p.half_scale = static_cast<T>(scale / 2);
      p.eps = eps;
      p.causal = m.causal;
      p.causal_offset = d.Nk - d.Nq;  // bottom-right aligned, as Softmax
      const auto sc = cpu::favor::Scratch<T>::carve(s, [&](int64_t count) { return scratch.take<T>(count); });
      cpu::favor::Runner<T> runner(p, s, sc);
      runner.load_projection(proj, proj.shape[1] == 1 ? 0 : h, sqrt_scale);
      runner.run();
    });
  }

};

}  // namespace effattn
