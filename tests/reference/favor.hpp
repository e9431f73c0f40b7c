// Float64 reference of FAVOR+ attention (DESIGN.md, "FAVOR+"), literally: phi with its M^-1/2
// factor and per-(b, h) stabilizers, then out_i = phi(q_i)ᵀ S / phi(q_i)ᵀ z with S and z summed
// over the valid keys query i may see (prefix sums in key order for causal).
#pragma once
#include <algorithm>

#include "common.hpp"

namespace ref {

using effattn::FeatureMap;

/// Row-major [rows, cols] in the arithmetic type R.
template <class R>
struct MatR {
  int64_t rows = 0, cols = 0;
  std::vector<R> a;
  MatR(int64_t r, int64_t c) : rows(r), cols(c), a(static_cast<size_t>(r * c), R(0)) {}
  R& operator()(int64_t r, int64_t c) { return a[static_cast<size_t>(r * cols + c)]; }
  R operator()(int64_t r, int64_t c) const { return a[static_cast<size_t>(r * cols + c)]; }
};

template <class R, class T>
MatR<R> head_r(const Tensor<T>& t, int64_t b, int64_t h, R factor = R(1)) {
  MatR<R> m(t.shape[2], t.shape[3]);
  for (int64_t i = 0; i < m.rows; ++i)
    for (int64_t c = 0; c < m.cols; ++c) m(i, c) = static_cast<R>(at(t, b, h, i, c)) * factor;
  return m;
}

/// phi of the rows of X (already multiplied by sqrt(s)) under projection W [M, D]. `valid(i)`
/// says which rows enter the per-(b, h) maxima. Returns [N, M] (or [N, 2M] for trig).
template <class R, class Valid>
MatR<R> favor_features(const MatR<R>& X, const MatR<R>& W, FeatureMap map, R eps, bool keys, Valid valid) {
  using std::cos, std::exp, std::sin, std::sqrt;
  const int64_t N = X.rows, M = W.rows;
  MatR<R> U(N, M);
  for (int64_t i = 0; i < N; ++i)
    for (int64_t f = 0; f < M; ++f)
      for (int64_t c = 0; c < X.cols; ++c) U(i, f) += X(i, c) * W(f, c);
  std::vector<R> half_sq(static_cast<size_t>(N), R(0));
  for (int64_t i = 0; i < N; ++i) {
    for (int64_t c = 0; c < X.cols; ++c) half_sq[i] += X(i, c) * X(i, c);
    half_sq[i] /= 2;
  }
  const R norm = R(1) / sqrt(R(M));
  const R neg_inf = -std::numeric_limits<R>::infinity();
  MatR<R> phi(N, map == FeatureMap::trig ? 2 * M : M);
  if (map == FeatureMap::positive) {
    R key_max = neg_inf;  // over valid keys and features, per (b, h)
    for (int64_t i = 0; i < N; ++i)
      for (int64_t f = 0; f < M; ++f)
        if (valid(i)) key_max = std::max(key_max, U(i, f));
    for (int64_t i = 0; i < N; ++i) {
      R row_max = neg_inf;
      for (int64_t f = 0; f < M; ++f) row_max = std::max(row_max, U(i, f));
      const R mx = keys ? key_max : row_max;
      for (int64_t f = 0; f < M; ++f) phi(i, f) = norm * (exp(U(i, f) - half_sq[i] - mx) + eps);
    }
  } else if (map == FeatureMap::relu) {
    for (int64_t i = 0; i < N; ++i)
      for (int64_t f = 0; f < M; ++f) phi(i, f) = std::max(U(i, f), R(0)) + eps;
  } else {
    R c = neg_inf;  // per (b, h): max of |x'|²/2 over valid rows
    for (int64_t i = 0; i < N; ++i)
      if (valid(i)) c = std::max(c, half_sq[i]);
    for (int64_t i = 0; i < N; ++i)
      for (int64_t f = 0; f < M; ++f) {
        const R a = norm * exp(half_sq[i] - c);
        phi(i, f) = a * cos(U(i, f));
        phi(i, M + f) = a * sin(U(i, f));
      }
  }
  return phi;
}

inline double favor_default_eps(FeatureMap map, double eps) {
  if (map == FeatureMap::trig) return 0;
  if (eps != 0) return eps;
  return map == FeatureMap::positive ? 1e-6 : 1e-3;
}

/// FAVOR attention computed in R (double by default; long double to judge double results).
/// `condition`, when given, receives the condition number of the normalizer sums,
/// max over output rows of sum_f |phi(q_i)_f| sum_j |phi(k_j)_f| / |phi(q_i)ᵀ z|: exactly 1 for
/// the positive and relu maps (all terms positive), and how much the signed trig features
/// cancel, i.e. how much any evaluation's rounding error is amplified.
template <class R = double, class T>
Result favor(const Tensor<const T>& q, const Tensor<const T>& k, const Tensor<const T>& v, const Masks& masks,
             const Tensor<const float>& projection, FeatureMap map, bool causal, double scale, double eps,
             double* condition = nullptr) {
  const int64_t B = q.shape[0], H = q.shape[1], Hk = k.shape[1], Nq = q.shape[2], Nk = k.shape[2];
  const int64_t Dv = v.shape[3];
  const R root_s = std::sqrt(static_cast<R>(default_scale(scale, q.shape[3])));
  const R e = static_cast<R>(favor_default_eps(map, eps));
  Result out(B, H, Nq, Dv);
  double worst = 1;
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < H; ++h) {
      const int64_t hk = h / (H / Hk);
      const MatR<R> W = head_r<R>(projection, 0, projection.shape[1] == 1 ? 0 : h);
      const MatR<R> Q = head_r<R>(q, b, h, root_s), K = head_r<R>(k, b, hk, root_s), V = head_r<R>(v, b, hk);
      const auto key_ok = [&](int64_t j) { return valid(masks.key_valid, masks.key_batch_stride, b, j); };
      const auto query_ok = [&](int64_t i) { return valid(masks.query_valid, masks.query_batch_stride, b, i); };
      const MatR<R> pq = favor_features(Q, W, map, e, false, query_ok);
      const MatR<R> pk = favor_features(K, W, map, e, true, key_ok);
      const int64_t F = pq.cols;
      MatR<R> S(F, Dv);
      std::vector<R> z(static_cast<size_t>(F), R(0)), z_abs(z);
      int64_t summed = 0;  // keys [0, summed) are in S, z
      const auto add_keys_until = [&](int64_t end) {
        for (; summed < end; ++summed) {
          if (!key_ok(summed)) continue;
          for (int64_t f = 0; f < F; ++f) {
            z[f] += pk(summed, f);
            z_abs[f] += std::abs(pk(summed, f));
            for (int64_t c = 0; c < Dv; ++c) S(f, c) += pk(summed, f) * V(summed, c);
          }
        }
      };
      if (!causal) add_keys_until(Nk);
      for (int64_t i = 0; i < Nq; ++i) {
        if (causal) add_keys_until(std::min(Nk, std::max<int64_t>(0, i + (Nk - Nq) + 1)));
        R den = 0, den_abs = 0;
        for (int64_t f = 0; f < F; ++f) {
          den += pq(i, f) * z[f];
          den_abs += std::abs(pq(i, f)) * z_abs[f];
        }
        if (!query_ok(i) || den == 0) continue;  // zero row
        worst = std::max(worst, static_cast<double>(den_abs / std::abs(den)));
        for (int64_t c = 0; c < Dv; ++c) {
          R num = 0;
          for (int64_t f = 0; f < F; ++f) num += pq(i, f) * S(f, c);
          out(b, h, i, c) = static_cast<double>(num / den);
        }
      }
    }
  if (condition != nullptr) *condition = worst;
  return out;
}

}  // namespace ref
