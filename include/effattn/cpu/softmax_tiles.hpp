// The CPU building block: softmax attention of one head on raw strided rows, streamed over key
// tiles with an online softmax, so memory is O(tile) and never Nq x Nk. The Softmax operator
// runs it per (batch, head, query tile); the landmark operators run it for Lq over (K, V) and
// for Q over (Lk, W), and for K2 itself (values = identity).
#pragma once
#include <Eigen/Core>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

#include "effattn/core/workspace.hpp"
#include "effattn/cpu/common.hpp"

namespace effattn {
namespace cpu {

/// One head of softmax attention: out_i = sum_j softmax_j(scale q_i . k_j) v_j over allowed j.
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
  T* lse = nullptr;           // optional [nq] log-sum-exp of the scaled logits (-inf: the row attends nothing)
  int64_t lse_stride = 1;
};

/// Tile sizes: a query tile stays resident while key tiles stream past it.
struct Tiles {
  static constexpr int64_t kQuery = 64;
  static constexpr int64_t kKey = 256;
};

/// Scratch bytes one thread needs for attend_rows with head dims d, dv.
template <class T>
constexpr size_t tile_scratch_bytes(int64_t d, int64_t dv) {
  const size_t q = Tiles::kQuery, k = Tiles::kKey;
  return detail::bytes_of<T>(q * d) + detail::bytes_of<T>(k * d) + detail::bytes_of<T>(k * dv) +
         detail::bytes_of<T>(q * k) + detail::bytes_of<T>(q * dv) + 3 * detail::bytes_of<T>(q) +
         detail::bytes_of<T>(k);
}

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
}  // namespace detail_tiles

/// Computes output rows [i0, i1) of `p` (at most Tiles::kQuery of them) with one thread.
template <class T>
void attend_rows(const HeadAttention<T>& p, int64_t i0, int64_t i1, detail::Arena scratch) {
  using namespace detail_tiles;
  constexpr T kNegInf = -std::numeric_limits<T>::infinity();
  const int64_t bq = i1 - i0, d = p.q.cols, dv = p.v.cols, nk = p.k.rows;
  T* q_buf = scratch.take<T>(Tiles::kQuery * d);
  T* k_buf = scratch.take<T>(Tiles::kKey * d);
  T* v_buf = scratch.take<T>(Tiles::kKey * dv);
  RowMap<T> s(scratch.take<T>(Tiles::kQuery * Tiles::kKey), bq, Tiles::kKey, Eigen::OuterStride<>(Tiles::kKey));
  RowMap<T> o(scratch.take<T>(Tiles::kQuery * dv), bq, dv, Eigen::OuterStride<>(dv));
  Column<T> row_max(scratch.take<T>(Tiles::kQuery), bq);  // running max of the scaled logits
  Column<T> row_sum(scratch.take<T>(Tiles::kQuery), bq);  // running softmax denominator
  Column<T> rescale(scratch.take<T>(Tiles::kQuery), bq);
  T* key_ok = scratch.take<T>(Tiles::kKey);

  // The query tile, packed and pre-scaled, stays resident.
  RowMap<T> q(q_buf, bq, d, Eigen::OuterStride<>(d));
  for (int64_t r = 0; r < bq; ++r)
    for (int64_t c = 0; c < d; ++c) q(r, c) = p.q(i0 + r, c) * p.scale;
  row_max.setConstant(kNegInf);
  row_sum.setZero();
  o.setZero();

  // With causal, query i sees keys j <= i + offset: the last row of the tile bounds the key range.
  const int64_t key_end = p.causal ? std::min(nk, i1 - 1 + p.causal_offset + 1) : nk;
  for (int64_t j0 = 0; j0 < key_end; j0 += Tiles::kKey) {
    const int64_t bk = std::min(Tiles::kKey, key_end - j0);
    int64_t valid = bk;
    if (p.key_valid != nullptr) {
      valid = 0;
      for (int64_t c = 0; c < bk; ++c) valid += (key_ok[c] = p.key_valid[j0 + c] ? 1 : 0) != 0;
      if (valid == 0) continue;  // a fully masked tile adds nothing
    }
    const bool diagonal = p.causal && j0 + bk - 1 > i0 + p.causal_offset;  // some (i, j) disallowed

    auto k = rows_of(p.k, j0, bk, k_buf);
    auto sb = s.leftCols(bk);
    sb.noalias() = q * k.transpose();
    // Disallowed (masked or future) logits are set to `value`: -inf before the max, then 0
    // after exp (Eigen's vectorized exp(-inf) is a denormal, not 0).
    const auto hide = [&](T value) {
      if (valid < bk)
        for (int64_t c = 0; c < bk; ++c)
          if (key_ok[c] == 0) sb.col(c).setConstant(value);
      if (diagonal)
        for (int64_t r = 0; r < bq; ++r) {
          const int64_t first_hidden = std::max<int64_t>(0, i0 + r + p.causal_offset + 1 - j0);
          if (first_hidden < bk) sb.row(r).tail(bk - first_hidden).setConstant(value);
        }
    };
    hide(kNegInf);

    // Online softmax: new max, rescale what was accumulated, add this tile's weights.
    for (int64_t r = 0; r < bq; ++r) {
      const T tile_max = sb.row(r).maxCoeff();
      const T new_max = std::max(row_max(r), tile_max);
      if (new_max == kNegInf) {  // nothing allowed in this row yet
        sb.row(r).setZero();
        rescale(r) = 1;
        continue;
      }
      rescale(r) = std::exp(row_max(r) - new_max);  // 0 when the row was empty so far
      row_max(r) = new_max;
      sb.row(r).array() = (sb.row(r).array() - new_max).exp();
    }
    hide(T(0));
    row_sum = row_sum * rescale + sb.rowwise().sum().array();
    o.array().colwise() *= rescale;
    auto v = rows_of(p.v, j0, bk, v_buf);
    o.noalias() += sb * v;
  }

  for (int64_t r = 0; r < bq; ++r) {
    const bool live = row_sum(r) > T(0) && (p.query_valid == nullptr || p.query_valid[i0 + r] != 0);
    const T inv = live ? T(1) / row_sum(r) : T(0);
    for (int64_t c = 0; c < dv; ++c) p.out(i0 + r, c) = live ? o(r, c) * inv : T(0);
    if (p.lse != nullptr) p.lse[(i0 + r) * p.lse_stride] = live ? row_max(r) + std::log(row_sum(r)) : kNegInf;
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

/// Scratch bytes one thread needs for backward_rows with head dims d, dv.
template <class T>
constexpr size_t backward_scratch_bytes(int64_t d, int64_t dv) {
  using detail::bytes_of;
  const size_t q = Tiles::kQuery, k = Tiles::kKey;
  return 2 * bytes_of<T>(q * d) + bytes_of<T>(q * dv) + 2 * bytes_of<T>(k * d) + 2 * bytes_of<T>(k * dv) +
         2 * bytes_of<T>(q * k) + 3 * bytes_of<T>(q) + bytes_of<T>(k);
}

namespace detail_tiles {
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

/// Rows [r0, r0 + n) of m packed into buf with the rows where keep[r] == 0 zeroed, so a masked
/// key's values (even NaN) cannot reach a product through 0 · x.
template <class T>
ConstRowMap<T> rows_masked(const MatrixView<const T>& m, int64_t r0, int64_t n, const T* keep, T* buf) {
  for (int64_t r = 0; r < n; ++r)
    for (int64_t c = 0; c < m.cols; ++c) buf[r * m.cols + c] = keep[r] != T(0) ? m(r0 + r, c) : T(0);
  return ConstRowMap<T>(buf, n, m.cols, Eigen::OuterStride<>(m.cols));
}
}  // namespace detail_tiles

/// Gradients of output rows [i0, i1) (at most Tiles::kQuery) of `g`, on one thread: writes dq for
/// those rows and adds their share to dk and dv. Invalid queries and rows with no allowed key
/// contribute nothing and get dq = 0.
template <class T>
void backward_rows(const HeadAttentionGrad<T>& g, int64_t i0, int64_t i1, detail::Arena scratch) {
  using namespace detail_tiles;
  constexpr T kNegInf = -std::numeric_limits<T>::infinity();
  const HeadAttention<T>& p = g.fwd;
  const int64_t bq = i1 - i0, d = p.q.cols, dv = p.v.cols, nk = p.k.rows;
  RowMap<T> q(scratch.take<T>(Tiles::kQuery * d), bq, d, Eigen::OuterStride<>(d));  // s · q rows
  RowMap<T> dq(scratch.take<T>(Tiles::kQuery * d), bq, d, Eigen::OuterStride<>(d));
  RowMap<T> dout(scratch.take<T>(Tiles::kQuery * dv), bq, dv, Eigen::OuterStride<>(dv));
  T* k_buf = scratch.take<T>(Tiles::kKey * d);
  T* v_buf = scratch.take<T>(Tiles::kKey * dv);
  RowMap<T> dk_tile(scratch.take<T>(Tiles::kKey * d), Tiles::kKey, d, Eigen::OuterStride<>(d));
  RowMap<T> dv_tile(scratch.take<T>(Tiles::kKey * dv), Tiles::kKey, dv, Eigen::OuterStride<>(dv));
  RowMap<T> s(scratch.take<T>(Tiles::kQuery * Tiles::kKey), bq, Tiles::kKey, Eigen::OuterStride<>(Tiles::kKey));
  RowMap<T> dp(scratch.take<T>(Tiles::kQuery * Tiles::kKey), bq, Tiles::kKey, Eigen::OuterStride<>(Tiles::kKey));
  Column<T> lse(scratch.take<T>(Tiles::kQuery), bq);
  Column<T> row_sum(scratch.take<T>(Tiles::kQuery), bq);  // the stats pass's running sum
  Column<T> delta(scratch.take<T>(Tiles::kQuery), bq);    // D_i = dO_i · O_i
  T* key_ok = scratch.take<T>(Tiles::kKey);

  const auto query_ok = [&](int64_t r) { return p.query_valid == nullptr || p.query_valid[i0 + r] != 0; };
  for (int64_t r = 0; r < bq; ++r) {
    const bool live = query_ok(r);  // an invalid query's values (even NaN) must not reach dk, dv
    for (int64_t c = 0; c < d; ++c) q(r, c) = live ? p.q(i0 + r, c) * p.scale : T(0);
    T dot = 0;
    for (int64_t c = 0; c < dv; ++c) {
      dout(r, c) = live ? g.dout(i0 + r, c) : T(0);
      dot += dout(r, c) * g.out(i0 + r, c);
    }
    delta(r) = live ? dot : T(0);
  }
  dq.setZero();

  const int64_t key_end = p.causal ? std::min(nk, i1 - 1 + p.causal_offset + 1) : nk;
  // Visits every key tile that holds an allowed key of this query tile; `body(j0, bk, k, sb)` gets
  // the tile's logits sb (disallowed ones -inf) and a way to hide them again (`hide(value)`).
  const auto for_each_tile = [&](auto&& body) {
    for (int64_t j0 = 0; j0 < key_end; j0 += Tiles::kKey) {
      const int64_t bk = std::min(Tiles::kKey, key_end - j0);
      int64_t valid = bk;
      if (p.key_valid != nullptr) {
        valid = 0;
        for (int64_t c = 0; c < bk; ++c) valid += (key_ok[c] = p.key_valid[j0 + c] ? T(1) : T(0)) != T(0);
        if (valid == 0) continue;
      }
      const bool diagonal = p.causal && j0 + bk - 1 > i0 + p.causal_offset;
      const auto k = valid < bk ? rows_masked(p.k, j0, bk, key_ok, k_buf) : rows_of(p.k, j0, bk, k_buf);
      auto sb = s.leftCols(bk);
      sb.noalias() = q * k.transpose();
      const auto hide = [&](auto& m, T value) {
        if (valid < bk)
          for (int64_t c = 0; c < bk; ++c)
            if (key_ok[c] == T(0)) m.col(c).setConstant(value);
        if (diagonal)
          for (int64_t r = 0; r < bq; ++r) {
            const int64_t first_hidden = std::max<int64_t>(0, i0 + r + p.causal_offset + 1 - j0);
            if (first_hidden < bk) m.row(r).tail(bk - first_hidden).setConstant(value);
          }
      };
      hide(sb, kNegInf);
      body(j0, bk, valid, k, sb, hide);
    }
  };

  // Row statistics: the forward's lse, or one online pass over the keys.
  if (g.lse != nullptr) {
    for (int64_t r = 0; r < bq; ++r) lse(r) = g.lse[(i0 + r) * g.lse_stride];
  } else {
    lse.setConstant(kNegInf);  // the running max until the end of the pass
    row_sum.setZero();
    for_each_tile([&](int64_t, int64_t, int64_t, const auto&, auto& sb, const auto& hide) {
      for (int64_t r = 0; r < bq; ++r) {
        const T new_max = std::max(lse(r), sb.row(r).maxCoeff());
        if (new_max == kNegInf) continue;  // nothing allowed in this row yet
        row_sum(r) *= std::exp(lse(r) - new_max);
        lse(r) = new_max;
        sb.row(r).array() = (sb.row(r).array() - new_max).exp();
      }
      hide(sb, T(0));
      row_sum += sb.rowwise().sum().array();
    });
    for (int64_t r = 0; r < bq; ++r) lse(r) = row_sum(r) > T(0) ? lse(r) + std::log(row_sum(r)) : kNegInf;
  }
  // A row that attends nothing (invalid query, no allowed key) takes no part: P = 0 there.
  bool any_live = false;
  for (int64_t r = 0; r < bq; ++r) {
    if (!query_ok(r) || lse(r) == kNegInf) {
      lse(r) = std::numeric_limits<T>::infinity();  // exp(s − inf) = 0
      dout.row(r).setZero();
      delta(r) = 0;
    } else {
      any_live = true;
    }
  }

  if (any_live)
    for_each_tile([&](int64_t j0, int64_t bk, int64_t valid, const auto& k, auto& sb, const auto& hide) {
      for (int64_t r = 0; r < bq; ++r) sb.row(r).array() = (sb.row(r).array() - lse(r)).exp();
      hide(sb, T(0));  // P; Eigen's vectorized exp(-inf) is a denormal, not 0
      const auto v = valid < bk ? rows_masked(p.v, j0, bk, key_ok, v_buf) : rows_of(p.v, j0, bk, v_buf);
      auto dv_t = dv_tile.topRows(bk);
      dv_t.noalias() = sb.transpose() * dout;
      add_rows(g.dv, j0, dv_t);
      auto dpb = dp.leftCols(bk);
      dpb.noalias() = dout * v.transpose();
      sb.array() *= (dpb.array().colwise() - delta);  // dS = P ∘ (dP − D)
      hide(sb, T(0));
      auto dk_t = dk_tile.topRows(bk);
      dk_t.noalias() = sb.transpose() * q;  // q holds s · q: s dSᵀ Q
      add_rows(g.dk, j0, dk_t);
      dq.noalias() += sb * k;
    });

  for (int64_t r = 0; r < bq; ++r) {
    const bool live = lse(r) != std::numeric_limits<T>::infinity();
    for (int64_t c = 0; c < d; ++c) g.dq(i0 + r, c) = live ? dq(r, c) * p.scale : T(0);
  }
}

/// The backward of all rows of one head, query tile after query tile, on the calling thread.
template <class T>
void backward_head(const HeadAttentionGrad<T>& g, detail::Arena scratch) {
  for (int64_t i0 = 0; i0 < g.fwd.q.rows; i0 += Tiles::kQuery)
    backward_rows(g, i0, std::min(g.fwd.q.rows, i0 + Tiles::kQuery), scratch);
}

}  // namespace cpu
}  // namespace effattn
