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

/// Where Z0 = K2ᵀ / (c r) takes c (largest column sum) and r (largest row sum): the first on ties.
struct Z0Scale {
  double c = -1e300, r = -1e300;
  int64_t column = 0, row = 0;
};
inline Z0Scale z0_scale(const Mat& K2) {
  Z0Scale z;
  for (int64_t j = 0; j < K2.rows; ++j) {
    double col = 0, row = 0;
    for (int64_t i = 0; i < K2.rows; ++i) col += K2(i, j), row += K2(j, i);
    if (col > z.c) z.c = col, z.column = j;
    if (row > z.r) z.r = row, z.row = j;
  }
  return z;
}

/// c I − X
inline Mat shifted(double c, const Mat& X) {
  Mat R(X.rows, X.cols);
  for (int64_t i = 0; i < X.rows; ++i)
    for (int64_t j = 0; j < X.cols; ++j) R(i, j) = (i == j ? c : 0.0) - X(i, j);
  return R;
}

inline double frobenius(const Mat& X) {
  double s = 0;
  for (double x : X.a) s += x * x;
  return std::sqrt(s);
}

/// Nyströmformer's Newton–Schulz pseudo-inverse, every iterate: Z0 = K2ᵀ / (max column sum · max
/// row sum), then Z <- 0.25 Z (13I − K2 Z (15I − K2 Z (7I − K2 Z))) up to `iterations` times,
/// stopping before an iterate whose probe residual ‖(K2 Z − I) K2 P‖_F (P: the library's fixed
/// guard probes) exceeds twice the smallest so far (DESIGN of the library: in exact arithmetic it
/// never grows). K2 = 0 gives Z = 0.
inline std::vector<Mat> newton_schulz_iterates(const Mat& K2, int iterations) {
  const int64_t M = K2.rows;
  const Z0Scale z0 = z0_scale(K2);
  Mat Z(M, M);
  const double denom = z0.c * z0.r;
  if (!(denom > 0)) return {Z};
  for (int64_t i = 0; i < M; ++i)
    for (int64_t j = 0; j < M; ++j) Z(i, j) = K2(j, i) / denom;
  std::vector<Mat> zs{Z};
  Mat P(M, effattn::detail::kGuardProbes);
  for (int64_t i = 0; i < M; ++i)
    for (int64_t c = 0; c < P.cols; ++c) P(i, c) = effattn::detail::guard_probe(i, static_cast<int>(c));
  const Mat KP = matmul(K2, P);
  const auto residual = [&](const Mat& z) {
    Mat r = matmul(matmul(K2, z), KP);
    for (size_t e = 0; e < r.a.size(); ++e) r.a[e] -= KP.a[e];
    return frobenius(r);
  };
  double best = residual(Z);
  for (int it = 0; it < iterations; ++it) {
    const Mat KZ = matmul(K2, Z);
    const Mat inner = shifted(15, matmul(KZ, shifted(7, KZ)));
    Mat next = matmul(Z, shifted(13, matmul(KZ, inner)));
    for (double& x : next.a) x *= 0.25;
    const double r = residual(next);
    if (!(r <= 2 * best)) break;
    best = std::min(best, r);
    Z = next;
    zs.push_back(Z);
  }
  return zs;
}

inline Mat newton_schulz(const Mat& K2, int iterations) { return newton_schulz_iterates(K2, iterations).back(); }

/// The discrete choices of one Newton–Schulz (see landmark_head's `branches`).
inline void record_branches(const Mat& K2, const std::vector<Mat>& zs, std::vector<int64_t>& out) {
  const Z0Scale z0 = z0_scale(K2);
  double second = -1e300;
  for (int64_t j = 0; j < K2.rows; ++j) {
    double row = 0;
    for (int64_t i = 0; i < K2.rows; ++i) row += K2(j, i);
    if (j != z0.row) second = std::max(second, row);
  }
  out.push_back(z0.column);
  out.push_back(z0.r - second > 1e-9 * std::abs(z0.r) ? z0.row : -1);
  // Once the residual is at rounding level the guard's stopping step is decided by rounding and
  // cannot matter (the iterates agree to rounding): only a stop before that is a branch.
  double last = 0;
  {
    Mat r = matmul(matmul(K2, zs.back()), K2);
    for (size_t e = 0; e < r.a.size(); ++e) r.a[e] -= K2.a[e];
    last = frobenius(r);
  }
  out.push_back(last > 1e-12 * frobenius(K2) ? static_cast<int64_t>(zs.size()) : -1);
}

/// The gradient with respect to K2 of Z = newton_schulz(K2) for dZ = ∂L/∂Z, written from the
/// expanded step Z' = ¼ Z p(X), p(X) = 13I − 15X + 7X² − X³, X = K2 Z:
///   ∂Z += G' p(X)ᵀ, H = Zᵀ G', ∂X = −15H + 7(H Xᵀ + Xᵀ H) − (H X²ᵀ + Xᵀ H Xᵀ + X²ᵀ H),
///   ∂K2 += ∂X Zᵀ, ∂Z += K2ᵀ ∂X   with G' = ¼ ∂L/∂Z',
/// then Z0 = K2ᵀ / (c r) through c and r (the arg-max column and row sums).
inline Mat newton_schulz_backward(const Mat& K2, const std::vector<Mat>& zs, Mat G) {
  const int64_t M = K2.rows;
  Mat dK2(M, M);
  const Z0Scale z0 = z0_scale(K2);
  const double denom = z0.c * z0.r;
  if (!(denom > 0)) return dK2;
  const auto add = [](Mat& a, const Mat& b, double f) {
    for (size_t e = 0; e < a.a.size(); ++e) a.a[e] += f * b.a[e];
  };
  for (size_t t = zs.size() - 1; t-- > 0;) {
    const Mat& Z = zs[t];
    const Mat X = matmul(K2, Z), X2 = matmul(X, X), X3 = matmul(X2, X);
    Mat p = shifted(13, Mat(M, M));
    add(p, X, -15);
    add(p, X2, 7);
    add(p, X3, -1);
    for (double& x : G.a) x *= 0.25;
    Mat dZ = matmul(G, transpose(p));
    const Mat H = matmul(transpose(Z), G), Xt = transpose(X), X2t = transpose(X2);
    Mat dX(M, M);
    add(dX, H, -15);
    add(dX, matmul(H, Xt), 7);
    add(dX, matmul(Xt, H), 7);
    add(dX, matmul(H, X2t), -1);
    add(dX, matmul(matmul(Xt, H), Xt), -1);
    add(dX, matmul(X2t, H), -1);
    add(dK2, matmul(dX, transpose(Z)), 1);
    add(dZ, matmul(transpose(K2), dX), 1);
    G = dZ;
  }
  double sigma = 0;
  for (int64_t i = 0; i < M; ++i)
    for (int64_t j = 0; j < M; ++j) {
      dK2(j, i) += G(i, j) / denom;
      sigma += G(i, j) * K2(j, i);
    }
  for (int64_t i = 0; i < M; ++i) {
    dK2(i, z0.column) -= sigma / (z0.c * denom);
    dK2(z0.row, i) -= sigma / (z0.r * denom);
  }
  return dK2;
}

/// One (batch, head): out = K1 · Z · (K3 · V), with
/// K1 = softmax_row(s Q Lkᵀ) over kept key landmarks, K2 = softmax_row(s Lq Lkᵀ) (rows of dropped
/// query landmarks zero, dropped key landmarks excluded), K3 = softmax_row(s Lq Kᵀ) over valid keys
/// (rows of dropped query landmarks zero). K2's column c is multiplied by column_scale[c] (dropout)
/// before the inverse. iterations < 0: no inverse (Z = I).
/// `branches`, when given, receives the discrete choices the function makes (Z0's arg-max column,
/// its arg-max row unless the top row sums tie to rounding — then the choice cannot matter —, and
/// the Newton–Schulz steps): finite differences are valid only where they stay the same.
inline Mat landmark_head(const Mat& Q, const Mat& K, const Mat& V, const Landmarks& lq, const Landmarks& lk,
                         const std::function<bool(int64_t)>& key_valid, double s, int iterations,
                         const std::vector<double>& column_scale, std::vector<int64_t>* branches = nullptr) {
  const auto kept = [](const Landmarks& l, int64_t i) { return bool(l.kept[static_cast<size_t>(i)]); };
  const Mat K1 = softmax_rows(Q, lk.L, s, [&](int64_t, int64_t j) { return kept(lk, j); });
  const Mat K3 = softmax_rows(lq.L, K, s, [&](int64_t i, int64_t j) { return kept(lq, i) && key_valid(j); });
  const Mat KV = matmul(K3, V);
  if (iterations < 0) return matmul(K1, KV);
  Mat K2 = softmax_rows(lq.L, lk.L, s, [&](int64_t i, int64_t j) { return kept(lq, i) && kept(lk, j); });
  for (int64_t i = 0; i < K2.rows; ++i)
    for (int64_t j = 0; j < K2.cols; ++j) K2(i, j) *= column_scale.empty() ? 1.0 : column_scale[size_t(j)];
  const std::vector<Mat> zs = newton_schulz_iterates(K2, iterations);
  if (branches != nullptr) record_branches(K2, zs, *branches);
  return matmul(K1, matmul(zs.back(), KV));
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
               int64_t landmarks, int iterations, double scale, std::vector<int64_t>* branches = nullptr) {
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
      store_head(out, landmark_head(Q, K, V, lq, lk, key_ok, s, iterations, {}, branches), masks, b, h);
    }
  return out;
}

/// Proxy attention. Proxies [1 or B, H, M, D]; pinv_iterations = 0: out = K1 · (K3 · V).
/// Dropout: column c of K2 kept iff column_keep(seed, b2, h, c, p), scaled by 1/(1 − p), where b2
/// is K2's batch index: 0 when both proxy tensors are shared (batch extent 1), else b.
template <class T>
Result proxy(const Tensor<const T>& q, const Tensor<const T>& k, const Tensor<const T>& v, const Masks& masks,
             const Tensor<const T>& proxy_q, const Tensor<const T>& proxy_k, int iterations, float dropout,
             uint64_t seed, double scale, std::vector<int64_t>* branches = nullptr) {
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
      store_head(out,
                 landmark_head(Q, K, V, lq, lk, key_ok, s, iterations == 0 ? -1 : iterations, column_scale, branches),
                 masks, b, h);
    }
  return out;
}

// ---- Backward (DESIGN.md, "Backward", landmark), from full matrices ----------------------------

/// Gradients of landmark_head for an upstream dO (rows of invalid queries already zero):
/// dQ (the direct part through K1), dK, dV (through K3), dLq, dLk (through K1, K3 and K2).
struct LandmarkHeadGrad {
  Mat dQ, dK, dV, dLq, dLk;
};

/// `magnitude`: the same pass over absolute values (see ref::Grads::size). Through Newton–Schulz,
/// whose terms cancel by design, the magnitude of the K2 gradient is taken as |∂K2| itself
/// (`true_dK2`, from the plain pass), not as a sum of absolute terms that would grow ~9× a step.
inline LandmarkHeadGrad landmark_head_backward(const Mat& Q, const Mat& K, const Mat& V, const Landmarks& lq,
                                               const Landmarks& lk, const std::function<bool(int64_t)>& key_valid,
                                               double s, int iterations, const std::vector<double>& column_scale,
                                               const Mat& dO, bool magnitude = false, Mat* true_dK2 = nullptr) {
  const auto kept = [](const Landmarks& l, int64_t i) { return bool(l.kept[static_cast<size_t>(i)]); };
  const auto abs_if = [&](const Mat& m) { return magnitude ? absolute(m) : m; };
  const int64_t M = lq.L.rows;
  const Mat K1 = softmax_rows(Q, lk.L, s, [&](int64_t, int64_t j) { return kept(lk, j); });
  const Mat K3 = softmax_rows(lq.L, K, s, [&](int64_t i, int64_t j) { return kept(lq, i) && key_valid(j); });
  const Mat W3 = matmul(K3, V);
  Mat K2, A, Z, W = W3;
  std::vector<Mat> zs;
  if (iterations >= 0) {
    K2 = softmax_rows(lq.L, lk.L, s, [&](int64_t i, int64_t j) { return kept(lq, i) && kept(lk, j); });
    A = K2;
    for (int64_t i = 0; i < M; ++i)
      for (int64_t j = 0; j < M; ++j) A(i, j) *= column_scale.empty() ? 1.0 : column_scale[size_t(j)];
    zs = newton_schulz_iterates(A, iterations);
    Z = zs.back();
    W = matmul(Z, W3);
  }
  LandmarkHeadGrad g;
  // out = K1 W: the softmax backward of Q over (Lk, W).
  const SoftmaxGrad g1 = softmax_rows_backward(K1, Q, lk.L, W, dO, s, magnitude);
  g.dQ = g1.dA;
  g.dLk = g1.dB;
  Mat dW3 = g1.dV;
  if (iterations >= 0) {
    const Mat dZ = matmul(abs_if(g1.dV), transpose(abs_if(W3)));
    dW3 = matmul(transpose(abs_if(Z)), abs_if(g1.dV));
    Mat dA;
    if (magnitude) {
      dA = absolute(*true_dK2);
    } else {
      dA = newton_schulz_backward(A, zs, dZ);
      for (int64_t i = 0; i < M; ++i)
        for (int64_t j = 0; j < M; ++j) dA(i, j) *= column_scale.empty() ? 1.0 : column_scale[size_t(j)];
      if (true_dK2 != nullptr) *true_dK2 = dA;
    }
    // K2 = softmax_row(s Lq Lkᵀ): the softmax backward with values = I (so O = K2, dO = dK2).
    Mat I(M, M);
    for (int64_t i = 0; i < M; ++i) I(i, i) = 1;
    const SoftmaxGrad g2 = softmax_rows_backward(K2, lq.L, lk.L, I, dA, s, magnitude);
    g.dLq = g2.dA;
    for (size_t e = 0; e < g.dLk.a.size(); ++e) g.dLk.a[e] += g2.dB.a[e];
  } else {
    g.dLq = Mat(M, Q.cols);
  }
  // W3 = K3 V: the softmax backward of Lq over (K, V).
  const SoftmaxGrad g3 = softmax_rows_backward(K3, lq.L, K, V, dW3, s, magnitude);
  for (size_t e = 0; e < g.dLq.a.size(); ++e) g.dLq.a[e] += g3.dA.a[e];
  g.dK = g3.dB;
  g.dV = g3.dV;
  return g;
}

/// Both passes of one head (plain, then magnitude): `use(set, grad)` gets each.
template <class Use>
void landmark_head_grads(const Mat& Q, const Mat& K, const Mat& V, const Landmarks& lq, const Landmarks& lk,
                         const std::function<bool(int64_t)>& key_valid, double s, int iterations,
                         const std::vector<double>& column_scale, const Mat& dO, Grads& g, Use use) {
  Mat dK2;
  use(static_cast<GradSet&>(g), landmark_head_backward(Q, K, V, lq, lk, key_valid, s, iterations, column_scale, dO,
                                                       false, &dK2),
      false);
  use(g.size, landmark_head_backward(Q, K, V, lq, lk, key_valid, s, iterations, column_scale, dO, true, &dK2), true);
}

/// dO of head (b, h) with the rows of invalid queries zero (they contribute nothing).
template <class T>
Mat upstream(const Tensor<const T>& dout, const Masks& masks, int64_t b, int64_t h) {
  Mat dO = head(dout, b, h);
  for (int64_t i = 0; i < dO.rows; ++i)
    if (!valid(masks.query_valid, masks.query_batch_stride, b, i))
      for (int64_t c = 0; c < dO.cols; ++c) dO(i, c) = 0;
  return dO;
}

/// Segment-mean backward: landmark i's gradient goes to each valid row of its segment, / count_i.
inline void spread(const Mat& dL, const std::function<bool(int64_t)>& valid_row, int64_t N, Result& dx, int64_t b,
                   int64_t h, bool magnitude) {
  const int64_t M = dL.rows;
  for (int64_t i = 0; i < M; ++i) {
    int64_t count = 0;
    for (int64_t r = i * N / M; r < (i + 1) * N / M; ++r) count += valid_row(r);
    for (int64_t r = i * N / M; r < (i + 1) * N / M && count > 0; ++r)
      if (valid_row(r))
        for (int64_t c = 0; c < dL.cols; ++c)
          dx(b, h, r, c) += (magnitude ? std::abs(dL(i, c)) : dL(i, c)) / double(count);
  }
}

/// Gradients of Nyström attention; the softmax backward when min(Nq, Nk) <= landmarks.
template <class T>
Grads nystrom_backward(const Tensor<const T>& q, const Tensor<const T>& k, const Tensor<const T>& v,
                       const Tensor<const T>& dout, const Masks& masks, int64_t landmarks, int iterations,
                       double scale) {
  const int64_t B = q.shape[0], H = q.shape[1], Hk = k.shape[1], Nq = q.shape[2], Nk = k.shape[2];
  if (std::min(Nq, Nk) <= landmarks) return softmax_backward(q, k, v, dout, masks, scale, false);
  const double s = default_scale(scale, q.shape[3]);
  Grads g(q, k, v);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < H; ++h) {
      const int64_t hk = h / (H / Hk);
      const Mat Q = head(q, b, h), K = head(k, b, hk), V = head(v, b, hk);
      const auto query_ok = [&](int64_t i) { return valid(masks.query_valid, masks.query_batch_stride, b, i); };
      const auto key_ok = [&](int64_t j) { return valid(masks.key_valid, masks.key_batch_stride, b, j); };
      const Landmarks lq = segment_means(Q, query_ok, landmarks), lk = segment_means(K, key_ok, landmarks);
      landmark_head_grads(Q, K, V, lq, lk, key_ok, s, iterations, {}, upstream(dout, masks, b, h), g,
                          [&](GradSet& set, const LandmarkHeadGrad& r, bool magnitude) {
                            set.dq.add_head(b, h, r.dQ);
                            set.dk.add_head(b, hk, r.dK);
                            set.dv.add_head(b, hk, r.dV);
                            spread(r.dLq, query_ok, Nq, set.dq, b, h, magnitude);
                            spread(r.dLk, key_ok, Nk, set.dk, b, hk, magnitude);
                          });
    }
  return g;
}

/// Gradients of Proxy attention, with dproxy_q / dproxy_k (summed over the batch where the
/// proxies have batch extent 1). Dropout as in ref::proxy.
template <class T>
Grads proxy_backward(const Tensor<const T>& q, const Tensor<const T>& k, const Tensor<const T>& v,
                     const Tensor<const T>& dout, const Masks& masks, const Tensor<const T>& proxy_q,
                     const Tensor<const T>& proxy_k, int iterations, float dropout, uint64_t seed, double scale) {
  const int64_t B = q.shape[0], H = q.shape[1], Hk = k.shape[1], M = proxy_q.shape[2];
  const double s = default_scale(scale, q.shape[3]);
  const bool shared = proxy_q.shape[0] == 1 && proxy_k.shape[0] == 1;
  Grads g(q, k, v);
  for (GradSet* set : {static_cast<GradSet*>(&g), &g.size}) {
    set->dproxy_q = shaped_like(proxy_q);
    set->dproxy_k = shaped_like(proxy_k);
  }
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < H; ++h) {
      const int64_t hk = h / (H / Hk), bq = proxy_q.shape[0] == 1 ? 0 : b, bk = proxy_k.shape[0] == 1 ? 0 : b;
      const Mat Q = head(q, b, h), K = head(k, b, hk), V = head(v, b, hk);
      const Landmarks lq = given(head(proxy_q, bq, h)), lk = given(head(proxy_k, bk, h));
      std::vector<double> column_scale(static_cast<size_t>(M), 1.0);
      for (int64_t c = 0; c < M && dropout > 0; ++c)
        column_scale[size_t(c)] =
            effattn::column_keep(seed, shared ? 0 : b, h, c, dropout) ? 1.0 / (1.0 - dropout) : 0.0;
      const auto key_ok = [&](int64_t j) { return valid(masks.key_valid, masks.key_batch_stride, b, j); };
      landmark_head_grads(Q, K, V, lq, lk, key_ok, s, iterations == 0 ? -1 : iterations, column_scale,
                          upstream(dout, masks, b, h), g, [&](GradSet& set, const LandmarkHeadGrad& r, bool) {
                            set.dq.add_head(b, h, r.dQ);
                            set.dk.add_head(b, hk, r.dK);
                            set.dv.add_head(b, hk, r.dV);
                            set.dproxy_q.add_head(bq, h, r.dLq);
                            set.dproxy_k.add_head(bk, h, r.dLk);
                          });
    }
  return g;
}

}  // namespace ref
