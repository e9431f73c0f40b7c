// Float64 references of the landmark operators (DESIGN.md, "Landmark attention", "Nyström",
// "Proxy"), written from the formulas with plain loops: K1, K2, K3 as full matrices, the
// Newton–Schulz iteration as stated, out = K1 · Z · (K3 · V).
#pragma once
#include <algorithm>
#include <functional>
#include <vector>

#include "common.hpp"
#include "softmax.hpp"

namespace ref {

/// Landmarks [M, D] and which of them are kept (a dropped landmark has no valid token).
struct Landmarks {
  Mat L;
  std::vector<bool> kept;
};

/// Nyström landmarks: segment i of X [N, D] is [floor(i N / M), floor((i+1) N / M)); its landmark
/// is the mean of its valid rows, dropped when it has none.
inline Landmarks segment_means(const Mat& X, const std::function<bool(int64_t)>& valid, int64_t M) {
  Landmarks l{Mat(M, X.cols), std::vector<bool>(static_cast<size_t>(M), false)};
  const int64_t N = X.rows;
  for (int64_t i = 0; i < M; ++i) {
    int64_t count = 0;
    for (int64_t r = i * N / M; r < (i + 1) * N / M; ++r) {
      if (!valid(r)) continue;
      ++count;
      for (int64_t c = 0; c < X.cols; ++c) l.L(i, c) += X(r, c);
    }
    for (int64_t c = 0; c < X.cols && count > 0; ++c) l.L(i, c) /= double(count);
    l.kept[static_cast<size_t>(i)] = count > 0;
  }
  return l;
}

/// Proxies: every one kept.
inline Landmarks given(Mat L) {
  const auto n = static_cast<size_t>(L.rows);
  return {std::move(L), std::vector<bool>(n, true)};
}

/// Nyströmformer's Newton–Schulz pseudo-inverse: Z0 = K2ᵀ / (max column sum · max row sum), then
/// Z <- 0.25 Z (13I − K2 Z (15I − K2 Z (7I − K2 Z))) `iterations` times. K2 = 0 gives Z = 0.
inline Mat newton_schulz(const Mat& K2, int iterations) {
  const int64_t M = K2.rows;
  double max_col = -1e300, max_row = -1e300;
  for (int64_t j = 0; j < M; ++j) {
    double col = 0, row = 0;
    for (int64_t i = 0; i < M; ++i) col += K2(i, j), row += K2(j, i);
    max_col = std::max(max_col, col);
    max_row = std::max(max_row, row);
  }
  Mat Z(M, M);
  const double denom = max_col * max_row;
  if (!(denom > 0)) return Z;
  for (int64_t i = 0; i < M; ++i)
    for (int64_t j = 0; j < M; ++j) Z(i, j) = K2(j, i) / denom;
  // c I − X
  const auto shifted = [M](double c, const Mat& X) {
    Mat R(M, M);
    for (int64_t i = 0; i < M; ++i)
      for (int64_t j = 0; j < M; ++j) R(i, j) = (i == j ? c : 0.0) - X(i, j);
    return R;
  };
  for (int it = 0; it < iterations; ++it) {
    const Mat KZ = matmul(K2, Z);
    const Mat inner = shifted(15, matmul(KZ, shifted(7, KZ)));
    Z = matmul(Z, shifted(13, matmul(KZ, inner)));
    for (double& x : Z.a) x *= 0.25;
  }
  return Z;
}

/// One (batch, head): out = K1 · Z · (K3 · V), with
/// K1 = softmax_row(s Q Lkᵀ) over kept key landmarks, K2 = softmax_row(s Lq Lkᵀ) (rows of dropped
/// query landmarks zero, dropped key landmarks excluded), K3 = softmax_row(s Lq Kᵀ) over valid keys
/// (rows of dropped query landmarks zero). K2's column c is multiplied by column_scale[c] (dropout)
/// before the inverse. iterations < 0: no inverse (Z = I).
inline Mat landmark_head(const Mat& Q, const Mat& K, const Mat& V, const Landmarks& lq, const Landmarks& lk,
                         const std::function<bool(int64_t)>& key_valid, double s, int iterations,
                         const std::vector<double>& column_scale) {
  const auto kept = [](const Landmarks& l, int64_t i) { return bool(l.kept[static_cast<size_t>(i)]); };
  const Mat K1 = softmax_rows(Q, lk.L, s, [&](int64_t, int64_t j) { return kept(lk, j); });
  const Mat K3 = softmax_rows(lq.L, K, s, [&](int64_t i, int64_t j) { return kept(lq, i) && key_valid(j); });
  const Mat KV = matmul(K3, V);
  if (iterations < 0) return matmul(K1, KV);
  Mat K2 = softmax_rows(lq.L, lk.L, s, [&](int64_t i, int64_t j) { return kept(lq, i) && kept(lk, j); });
  for (int64_t i = 0; i < K2.rows; ++i)
    for (int64_t j = 0; j < K2.cols; ++j) K2(i, j) *= column_scale.empty() ? 1.0 : column_scale[size_t(j)];
  return matmul(K1, matmul(newton_schulz(K2, iterations), KV));
}

/// Writes head (b, h) of `out`, zeroing invalid queries.
inline void store_head(Result& out, const Mat& O, const Masks& masks, int64_t b, int64_t h) {
  for (int64_t i = 0; i < O.rows; ++i)
    for (int64_t c = 0; c < O.cols; ++c)
      out(b, h, i, c) = valid(masks.query_valid, masks.query_batch_stride, b, i) ? O(i, c) : 0.0;
}

/// Nyström attention; exact softmax when min(Nq, Nk) <= landmarks.
template <class T>
Result nystrom(const Tensor<const T>& q, const Tensor<const T>& k, const Tensor<const T>& v, const Masks& masks,
               int64_t landmarks, int iterations, double scale) {
  const int64_t B = q.shape[0], H = q.shape[1], Hk = k.shape[1], Nq = q.shape[2], Nk = k.shape[2];
  if (std::min(Nq, Nk) <= landmarks) return softmax(q, k, v, masks, scale, false);
  const double s = default_scale(scale, q.shape[3]);
  Result out(B, H, Nq, v.shape[3]);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < H; ++h) {
      const int64_t hk = h / (H / Hk);
      const Mat Q = head(q, b, h), K = head(k, b, hk), V = head(v, b, hk);
      const auto query_ok = [&](int64_t i) { return valid(masks.query_valid, masks.query_batch_stride, b, i); };
      const auto key_ok = [&](int64_t j) { return valid(masks.key_valid, masks.key_batch_stride, b, j); };
      const Landmarks lq = segment_means(Q, query_ok, landmarks), lk = segment_means(K, key_ok, landmarks);
      store_head(out, landmark_head(Q, K, V, lq, lk, key_ok, s, iterations, {}), masks, b, h);
    }
  return out;
}

/// Proxy attention. Proxies [1 or B, H, M, D]; pinv_iterations = 0: out = K1 · (K3 · V).
/// Dropout: column c of K2 kept iff column_keep(seed, b2, h, c, p), scaled by 1/(1 − p), where b2
/// is K2's batch index: 0 when both proxy tensors are shared (batch extent 1), else b.
template <class T>
Result proxy(const Tensor<const T>& q, const Tensor<const T>& k, const Tensor<const T>& v, const Masks& masks,
             const Tensor<const T>& proxy_q, const Tensor<const T>& proxy_k, int iterations, float dropout,
             uint64_t seed, double scale) {
  const int64_t B = q.shape[0], H = q.shape[1], Hk = k.shape[1], M = proxy_q.shape[2];
  const double s = default_scale(scale, q.shape[3]);
  const bool shared = proxy_q.shape[0] == 1 && proxy_k.shape[0] == 1;
  Result out(B, H, q.shape[2], v.shape[3]);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < H; ++h) {
      const int64_t hk = h / (H / Hk);
      const Mat Q = head(q, b, h), K = head(k, b, hk), V = head(v, b, hk);
      const Landmarks lq = given(head(proxy_q, proxy_q.shape[0] == 1 ? 0 : b, h));
      const Landmarks lk = given(head(proxy_k, proxy_k.shape[0] == 1 ? 0 : b, h));
      std::vector<double> column_scale(static_cast<size_t>(M), 1.0);
      for (int64_t c = 0; c < M && dropout > 0; ++c)
        column_scale[size_t(c)] =
            effattn::column_keep(seed, shared ? 0 : b, h, c, dropout) ? 1.0 / (1.0 - dropout) : 0.0;
      const auto key_ok = [&](int64_t j) { return valid(masks.key_valid, masks.key_batch_stride, b, j); };
      store_head(out, landmark_head(Q, K, V, lq, lk, key_ok, s, iterations == 0 ? -1 : iterations, column_scale), masks,
                 b, h);
    }
  return out;
}

}  // namespace ref
