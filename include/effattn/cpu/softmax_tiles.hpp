// The CPU building block: softmax attention of one head on raw strided rows, streamed over key
// tiles with an online softmax, so memory is O(tile) and never Nq x Nk. The Softmax operator
// runs it per (batch, head, query tile); the landmark operators run it for Lq over (K, V) and
// for Q over (Lk, W), and for K2 itself (values = identity).
#pragma once
#include <Eigen/Core>
#include <algorithm>
#include <cstdint>
#include <limits>

#include "effattn/core/workspace.hpp"

namespace effattn {
namespace cpu {

/// A strided host matrix: element (r, c) is data[r * row_stride + c * col_stride].
template <class T>
struct MatrixView {
  T* data = nullptr;
  int64_t rows = 0, cols = 0, row_stride = 0, col_stride = 1;
  T& operator()(int64_t r, int64_t c) const { return data[r * row_stride + c * col_stride]; }
};

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
  }
}

/// All rows of one head, one query tile after another, on the calling thread.
template <class T>
void attend_head(const HeadAttention<T>& p, detail::Arena scratch) {
  for (int64_t i0 = 0; i0 < p.q.rows; i0 += Tiles::kQuery)
    attend_rows(p, i0, std::min(p.q.rows, i0 + Tiles::kQuery), scratch);
}

}  // namespace cpu
}  // namespace effattn
