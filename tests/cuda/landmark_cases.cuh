// Shared pieces of the CUDA Nyström and Proxy tests: "the same naive math done in the input
// type" for DESIGN.md's CUDA tolerance, the landmark pipeline of tests/reference/landmark.hpp
// with every intermediate (landmark, logit, softmax weight, product, Newton–Schulz step)
// rounded to T, as a framework computes it.
#pragma once
#include <effattn/cuda.cuh>

#include <cmath>
#include <functional>
#include <string>
#include <type_traits>
#include <vector>

#include "cuda_test_util.cuh"
#include "reference/landmark.hpp"

namespace cuda_test {

using testing_util::expect_error;

/// x rounded to T (through float).
template <class T>
double round_to(double x) {
  return effattn::cuda::to_float(effattn::cuda::from_float<T>(static_cast<float>(x)));
}
template <class T>
ref::Mat round_to(ref::Mat m) {
  for (double& x : m.a) x = round_to<T>(x);
  return m;
}

/// ref::softmax_rows with the logits, the scaled logits and the weights rounded to T.
template <class T, class Allowed>
ref::Mat softmax_rows_in(const ref::Mat& A, const ref::Mat& Bm, double s, Allowed allowed) {
  ref::Mat P(A.rows, Bm.rows);
  for (int64_t i = 0; i < A.rows; ++i) {
    double mx = -INFINITY, sum = 0;
    for (int64_t j = 0; j < Bm.rows; ++j) {
      if (!allowed(i, j)) continue;
      double dot = 0;
      for (int64_t c = 0; c < A.cols; ++c) dot += A(i, c) * Bm(j, c);
      P(i, j) = round_to<T>(round_to<T>(dot) * s);
      mx = std::max(mx, P(i, j));
    }
    for (int64_t j = 0; j < Bm.rows; ++j) sum += P(i, j) = allowed(i, j) ? std::exp(P(i, j) - mx) : 0.0;
    for (int64_t j = 0; j < Bm.rows; ++j) P(i, j) = sum > 0 ? round_to<T>(P(i, j) / sum) : 0.0;
  }
  return P;
}

template <class T>
ref::Mat matmul_in(const ref::Mat& A, const ref::Mat& Bm) {
  return round_to<T>(ref::matmul(A, Bm));
}

/// ref::newton_schulz with every step rounded to T.
template <class T>
ref::Mat newton_schulz_in(const ref::Mat& K2, int iterations) {
  const int64_t M = K2.rows;
  double max_col = -1e300, max_row = -1e300;
  for (int64_t j = 0; j < M; ++j) {
    double col = 0, row = 0;
    for (int64_t i = 0; i < M; ++i) col += K2(i, j), row += K2(j, i);
    max_col = std::max(max_col, col);
    max_row = std::max(max_row, row);
  }
  ref::Mat Z(M, M);
  const double denom = max_col * max_row;
  if (!(denom > 0)) return Z;
  for (int64_t i = 0; i < M; ++i)
    for (int64_t j = 0; j < M; ++j) Z(i, j) = round_to<T>(K2(j, i) / denom);
  const auto shifted = [M](double c, ref::Mat X) {
    for (int64_t i = 0; i < M; ++i)
      for (int64_t j = 0; j < M; ++j) X(i, j) = round_to<T>((i == j ? c : 0.0) - X(i, j));
    return X;
  };
  for (int it = 0; it < iterations; ++it) {
    const ref::Mat KZ = matmul_in<T>(K2, Z);
    const ref::Mat inner = shifted(15, matmul_in<T>(KZ, shifted(7, KZ)));
    Z = matmul_in<T>(Z, shifted(13, matmul_in<T>(KZ, inner)));
    for (double& x : Z.a) x = round_to<T>(x * 0.25);
  }
  return Z;
}

/// ref::landmark_head computed in T.
template <class T>
ref::Mat landmark_head_in(const ref::Mat& Q, const ref::Mat& K, const ref::Mat& V, ref::Landmarks lq,
                          ref::Landmarks lk, const std::function<bool(int64_t)>& key_valid, double s, int iterations,
                          const std::vector<double>& column_scale) {
  lq.L = round_to<T>(lq.L);
  lk.L = round_to<T>(lk.L);
  const auto kept = [](const ref::Landmarks& l, int64_t i) { return bool(l.kept[static_cast<size_t>(i)]); };
  const ref::Mat K1 = softmax_rows_in<T>(Q, lk.L, s, [&](int64_t, int64_t j) { return kept(lk, j); });
  const ref::Mat K3 =
      softmax_rows_in<T>(lq.L, K, s, [&](int64_t i, int64_t j) { return kept(lq, i) && key_valid(j); });
  const ref::Mat KV = matmul_in<T>(K3, V);
  if (iterations < 0) return matmul_in<T>(K1, KV);
  ref::Mat K2 = softmax_rows_in<T>(lq.L, lk.L, s, [&](int64_t i, int64_t j) { return kept(lq, i) && kept(lk, j); });
  for (int64_t i = 0; i < K2.rows; ++i)
    for (int64_t j = 0; j < K2.cols; ++j)
      K2(i, j) = round_to<T>(K2(i, j) * (column_scale.empty() ? 1.0 : column_scale[size_t(j)]));
  return matmul_in<T>(K1, matmul_in<T>(newton_schulz_in<T>(K2, iterations), KV));
}

/// Stores a [Nq, Dv] head result computed in T into `out` (zero rows for invalid queries).
template <class T>
void store_head_in(HostTensor<T>& out, const ref::Mat& O, const effattn::Masks& masks, int64_t b, int64_t h) {
  for (int64_t i = 0; i < O.rows; ++i)
    for (int64_t c = 0; c < O.cols; ++c)
      out.view(b, h, i, c) = effattn::cuda::from_float<T>(
          ref::valid(masks.query_valid, masks.query_batch_stride, b, i) ? static_cast<float>(O(i, c)) : 0.0f);
}

}  // namespace cuda_test
