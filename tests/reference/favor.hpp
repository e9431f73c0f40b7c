// Float64 reference of FAVOR+ attention (DESIGN.md, "FAVOR+"), literally: phi with its M^-1/2
// factor and per-(b, h) stabilizers, then out_i = phi(q_i)ᵀ S / phi(q_i)ᵀ z with S and z summed
// over the valid keys query i may see (prefix sums in key order for causal).
#pragma once
#include <algorithm>
#include <vector>

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

/// DESIGN.md's stabilizers held fixed (stop-gradient): a tape that favor() records on a call with
/// an empty tape and replays on every later call, so that finite differences of the forward see
/// the stabilizers of the unperturbed inputs.
struct FavorStabilizers {
  std::vector<double> tape;
  size_t next = 0;
  bool replay = false;
  void start() {
    replay = !tape.empty();
    next = 0;
  }
  template <class R>
  R operator()(R computed) {
    if (!replay) {
      tape.push_back(static_cast<double>(computed));
      return computed;
    }
    return static_cast<R>(tape.at(next++));
  }
};

/// phi of the rows of X (already multiplied by sqrt(s)) under projection W [M, D]. `valid(i)`
/// says which rows enter the per-(b, h) maxima. Returns [N, M] (or [N, 2M] for trig). With
/// `d_du`, also d phi_f / d u_f (positive: the exp term with M^-1/2; relu: 1 for u > 0; trig:
/// unused, it is read off phi). `stab` (optional) records or replays every stabilizer.
template <class R, class Valid>
MatR<R> favor_features(const MatR<R>& X, const MatR<R>& W, FeatureMap map, R eps, bool keys, Valid valid,
                       FavorStabilizers* stab = nullptr, MatR<R>* d_du = nullptr) {
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
  const auto held = [&](R computed) { return stab != nullptr ? (*stab)(computed) : computed; };
  const R norm = R(1) / sqrt(R(M));
  const R neg_inf = -std::numeric_limits<R>::infinity();
  MatR<R> phi(N, map == FeatureMap::trig ? 2 * M : M);
  if (d_du != nullptr) *d_du = MatR<R>(N, M);
  if (map == FeatureMap::positive) {
    R key_max = neg_inf;  // over valid keys and features, per (b, h)
    for (int64_t i = 0; i < N; ++i)
      for (int64_t f = 0; f < M; ++f)
        if (valid(i)) key_max = std::max(key_max, U(i, f));
    if (keys) key_max = held(key_max);
    for (int64_t i = 0; i < N; ++i) {
      R row_max = neg_inf;
      for (int64_t f = 0; f < M; ++f) row_max = std::max(row_max, U(i, f));
      const R mx = keys ? key_max : held(row_max);
      for (int64_t f = 0; f < M; ++f) {
        const R e = norm * exp(U(i, f) - half_sq[i] - mx);
        phi(i, f) = e + norm * eps;
        if (d_du != nullptr) (*d_du)(i, f) = e;
      }
    }
  } else if (map == FeatureMap::relu) {
    for (int64_t i = 0; i < N; ++i)
      for (int64_t f = 0; f < M; ++f) {
        phi(i, f) = std::max(U(i, f), R(0)) + eps;
        if (d_du != nullptr) (*d_du)(i, f) = U(i, f) > 0 ? R(1) : R(0);
      }
  } else {
    R c = neg_inf;  // per (b, h): max of |x'|²/2 over valid rows
    for (int64_t i = 0; i < N; ++i)
      if (valid(i)) c = std::max(c, half_sq[i]);
    c = held(c);
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
             double* condition = nullptr, FavorStabilizers* stab = nullptr) {
  const int64_t B = q.shape[0], H = q.shape[1], Hk = k.shape[1], Nq = q.shape[2], Nk = k.shape[2];
  const int64_t Dv = v.shape[3];
  const R root_s = std::sqrt(static_cast<R>(default_scale(scale, q.shape[3])));
  const R e = static_cast<R>(favor_default_eps(map, eps));
  Result out(B, H, Nq, Dv);
  double worst = 1;
  if (stab != nullptr) stab->start();
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < H; ++h) {
      const int64_t hk = h / (H / Hk);
      const MatR<R> W = head_r<R>(projection, 0, projection.shape[1] == 1 ? 0 : h);
      const MatR<R> Q = head_r<R>(q, b, h, root_s), K = head_r<R>(k, b, hk, root_s), V = head_r<R>(v, b, hk);
      const auto key_ok = [&](int64_t j) { return valid(masks.key_valid, masks.key_batch_stride, b, j); };
      const auto query_ok = [&](int64_t i) { return valid(masks.query_valid, masks.query_batch_stride, b, i); };
      const MatR<R> pq = favor_features(Q, W, map, e, false, query_ok, stab);
      const MatR<R> pk = favor_features(K, W, map, e, true, key_ok, stab);
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

/// Every u = x' Wᵀ of the valid rows of q and of k (under each query head's W), where relu has
/// its kink: the forward's discrete choices, which finite differences must not straddle. The
/// other maps have none that matter (their maxima are held, FavorStabilizers).
template <class T>
std::vector<double> favor_relu_inputs(const Tensor<const T>& q, const Tensor<const T>& k, const Masks& masks,
                                      const Tensor<const float>& projection, double scale) {
  std::vector<double> us;
  const int64_t B = q.shape[0], H = q.shape[1], Hk = k.shape[1];
  const double root_s = std::sqrt(default_scale(scale, q.shape[3]));
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < H; ++h) {
      const MatR<double> W = head_r<double>(projection, 0, projection.shape[1] == 1 ? 0 : h);
      for (const bool keys : {false, true}) {
        const MatR<double> X = keys ? head_r<double>(k, b, h / (H / Hk), root_s) : head_r<double>(q, b, h, root_s);
        for (int64_t i = 0; i < X.rows; ++i) {
          if (!(keys ? valid(masks.key_valid, masks.key_batch_stride, b, i)
                     : valid(masks.query_valid, masks.query_batch_stride, b, i)))
            continue;
          for (int64_t f = 0; f < W.rows; ++f) {
            double u = 0;
            for (int64_t c = 0; c < X.cols; ++c) u += X(i, c) * W(f, c);
            us.push_back(u);
          }
        }
      }
    }
  return us;
}

/// Gradients of FAVOR attention (DESIGN.md, "Backward"), with the stabilizers as constants. Over
/// the live rows (valid, den_i != 0): g_i = dO_i / den_i, t_i = dO_i · out_i / den_i,
/// dphi(q_i) = S_i g_i − z_i t_i with S_i, z_i over the keys row i sees; per valid key j, with the
/// sums over the rows that see it, dS_j = Σ phi(q_i) g_iᵀ and dz_j = −Σ phi(q_i) t_i,
/// dphi(k_j) = dS_j v_j + dz_j, dv_j = dS_jᵀ phi(k_j); then through the map to u = x' Wᵀ and
/// |x'|²/2, and x' = sqrt(s) x. dk, dv summed over the query heads of a group. `size` repeats it
/// on absolute values (ref::Grads), dividing by |den_i|.
template <class R = double, class T>
Grads favor_backward(const Tensor<const T>& q, const Tensor<const T>& k, const Tensor<const T>& v,
                     const Tensor<const T>& dout, const Masks& masks, const Tensor<const float>& projection,
                     FeatureMap map, bool causal, double scale, double eps) {
  const int64_t B = q.shape[0], H = q.shape[1], Hk = k.shape[1], Nq = q.shape[2], Nk = k.shape[2];
  const int64_t D = q.shape[3], Dv = v.shape[3], off = Nk - Nq;
  const R root_s = std::sqrt(static_cast<R>(default_scale(scale, D)));
  const R e = static_cast<R>(favor_default_eps(map, eps));
  Grads g(q, k, v);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < H; ++h) {
      const int64_t hk = h / (H / Hk);
      const MatR<R> W0 = head_r<R>(projection, 0, projection.shape[1] == 1 ? 0 : h);
      const MatR<R> Q0 = head_r<R>(q, b, h, root_s), K0 = head_r<R>(k, b, hk, root_s);
      const MatR<R> V0 = head_r<R>(v, b, hk), dO0 = head_r<R>(dout, b, h);
      const auto key_ok = [&](int64_t j) { return valid(masks.key_valid, masks.key_batch_stride, b, j); };
      const auto query_ok = [&](int64_t i) { return valid(masks.query_valid, masks.query_batch_stride, b, i); };
      MatR<R> eq0(0, 0), ek0(0, 0);
      const MatR<R> pq0 = favor_features(Q0, W0, map, e, false, query_ok, nullptr, &eq0);
      const MatR<R> pk0 = favor_features(K0, W0, map, e, true, key_ok, nullptr, &ek0);
      const int64_t F = pq0.cols, M = W0.rows;
      std::vector<R> den(static_cast<size_t>(Nq), R(0));  // signed, from the first pass
      for (const bool magnitude : {false, true}) {
        const auto A = [&](MatR<R> m) {
          if (magnitude)
            for (R& x : m.a) x = std::abs(x);
          return m;
        };
        const R sign = magnitude ? R(1) : R(-1);  // the sign of every subtraction
        const MatR<R> W = A(W0), Q = A(Q0), K = A(K0), V = A(V0), dO = A(dO0);
        const MatR<R> pq = A(pq0), pk = A(pk0), eq = A(eq0), ek = A(ek0);
        // Query side, rows in order with S, z over the keys each sees.
        MatR<R> S(F, Dv), G(Nq, Dv), dpq(Nq, F), dpk(Nk, F), dV(Nk, Dv);
        std::vector<R> z(static_cast<size_t>(F), R(0)), t(static_cast<size_t>(Nq), R(0));
        std::vector<bool> live(static_cast<size_t>(Nq), false);
        int64_t summed = 0;
        for (int64_t i = 0; i < Nq; ++i) {
          for (const int64_t end = causal ? std::clamp<int64_t>(i + off + 1, 0, Nk) : Nk; summed < end; ++summed) {
            if (!key_ok(summed)) continue;
            for (int64_t f = 0; f < F; ++f) {
              z[f] += pk(summed, f);
              for (int64_t c = 0; c < Dv; ++c) S(f, c) += pk(summed, f) * V(summed, c);
            }
          }
          if (!magnitude)
            for (int64_t f = 0; f < F; ++f) den[i] += pq(i, f) * z[f];
          live[i] = query_ok(i) && den[i] != 0;
          if (!live[i]) continue;
          const R d = magnitude ? std::abs(den[i]) : den[i];
          for (int64_t c = 0; c < Dv; ++c) {
            R num = 0;
            for (int64_t f = 0; f < F; ++f) num += pq(i, f) * S(f, c);
            G(i, c) = dO(i, c) / d;
            t[i] += dO(i, c) * (num / d) / d;
          }
          for (int64_t f = 0; f < F; ++f) {
            R acc = sign * z[f] * t[i];
            for (int64_t c = 0; c < Dv; ++c) acc += S(f, c) * G(i, c);
            dpq(i, f) = acc;
          }
        }
        // Key side, keys from the last with dS, dz over the rows that see each.
        MatR<R> dS(F, Dv);
        std::vector<R> dz(static_cast<size_t>(F), R(0));
        int64_t added = Nq;  // rows [added, Nq) are in dS, dz
        for (int64_t j = Nk - 1; j >= 0; --j) {
          for (const int64_t first = causal ? std::clamp<int64_t>(j - off, 0, Nq) : 0; added > first;) {
            if (!live[--added]) continue;
            for (int64_t f = 0; f < F; ++f) {
              dz[f] += sign * pq(added, f) * t[added];
              for (int64_t c = 0; c < Dv; ++c) dS(f, c) += pq(added, f) * G(added, c);
            }
          }
          if (!key_ok(j)) continue;
          for (int64_t f = 0; f < F; ++f) {
            dpk(j, f) = dz[f];
            for (int64_t c = 0; c < Dv; ++c) dpk(j, f) += dS(f, c) * V(j, c);
          }
          for (int64_t c = 0; c < Dv; ++c)
            for (int64_t f = 0; f < F; ++f) dV(j, c) += dS(f, c) * pk(j, f);
        }
        // Through the feature map, |x'|²/2 and x' = sqrt(s) x.
        const auto to_x = [&](const MatR<R>& dphi, const MatR<R>& phi, const MatR<R>& de, const MatR<R>& X,
                              auto active) {
          MatR<R> dx(X.rows, X.cols);
          for (int64_t i = 0; i < X.rows; ++i) {
            if (!active(i)) continue;  // its features may be inf (no valid row for the maxima)
            std::vector<R> du(static_cast<size_t>(M), R(0));
            R dsq = 0;
            for (int64_t f = 0; f < M; ++f) {
              if (map == FeatureMap::trig) {  // d phi_cos / du = -phi_sin, d phi_sin / du = phi_cos, d phi / d(|x'|²/2) = phi
                du[f] = sign * phi(i, M + f) * dphi(i, f) + phi(i, f) * dphi(i, M + f);
                dsq += dphi(i, f) * phi(i, f) + dphi(i, M + f) * phi(i, M + f);
              } else {
                du[f] = dphi(i, f) * de(i, f);
                if (map == FeatureMap::positive) dsq += sign * du[f];  // d phi / d(|x'|²/2) = -d phi / du
              }
            }
            for (int64_t c = 0; c < X.cols; ++c) {
              R acc = dsq * X(i, c);
              for (int64_t f = 0; f < M; ++f) acc += du[f] * W(f, c);
              dx(i, c) = acc * root_s;
            }
          }
          return dx;
        };
        GradSet& set = magnitude ? g.size : g;
        set.dq.add_head(b, h, to_x(dpq, pq, eq, Q, [&](int64_t i) { return live[i]; }));
        set.dk.add_head(b, hk, to_x(dpk, pk, ek, K, key_ok));
        set.dv.add_head(b, hk, dV);
      }
    }
  return g;
}

}  // namespace ref
