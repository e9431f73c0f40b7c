// Float64 reference of exact softmax attention (DESIGN.md, "Softmax").
#pragma once
#include "common.hpp"

namespace ref {

template <class T>
Result softmax(const Tensor<const T>& q, const Tensor<const T>& k, const Tensor<const T>& v, const Masks& masks,
               double scale, bool causal) {
  const int64_t B = q.shape[0], H = q.shape[1], Hk = k.shape[1], Nq = q.shape[2], Nk = k.shape[2];
  const int64_t Dv = v.shape[3];
  const double s = default_scale(scale, q.shape[3]);
  Result out(B, H, Nq, Dv);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < H; ++h) {
      const int64_t hk = h / (H / Hk);
      const Mat Q = head(q, b, h), K = head(k, b, hk), V = head(v, b, hk);
      const Mat P = softmax_rows(Q, K, s, [&](int64_t i, int64_t j) {
        return valid(masks.key_valid, masks.key_batch_stride, b, j) && (!causal || j <= i + (Nk - Nq));
      });
      const Mat O = matmul(P, V);
      for (int64_t i = 0; i < Nq; ++i)
        for (int64_t c = 0; c < Dv; ++c)
          out(b, h, i, c) = valid(masks.query_valid, masks.query_batch_stride, b, i) ? O(i, c) : 0.0;
    }
  return out;
}

/// Gradients of softmax attention (DESIGN.md, "Backward"), from full matrices: with P the forward's
/// weights and O = P V, dV = Pᵀ dO, dP = dO Vᵀ, D_i = dO_i · O_i, dS = P ∘ (dP − D),
/// dQ = s dS K, dK = s dSᵀ Q; dK, dV summed over the query heads of a group. Invalid queries
/// contribute nothing (their dO counts as zero).
template <class T>
Grads softmax_backward(const Tensor<const T>& q, const Tensor<const T>& k, const Tensor<const T>& v,
                       const Tensor<const T>& dout, const Masks& masks, double scale, bool causal) {
  const int64_t B = q.shape[0], H = q.shape[1], Hk = k.shape[1], Nq = q.shape[2], Nk = k.shape[2];
  const int64_t D = q.shape[3], Dv = v.shape[3];
  const double s = default_scale(scale, D);
  Grads g(q, k, v);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < H; ++h) {
      const int64_t hk = h / (H / Hk);
      const Mat Q = head(q, b, h), K = head(k, b, hk), V = head(v, b, hk);
      Mat dO = head(dout, b, h);
      for (int64_t i = 0; i < Nq; ++i)
        if (!valid(masks.query_valid, masks.query_batch_stride, b, i))
          for (int64_t c = 0; c < Dv; ++c) dO(i, c) = 0;
      const Mat P = softmax_rows(Q, K, s, [&](int64_t i, int64_t j) {
        return valid(masks.key_valid, masks.key_batch_stride, b, j) && (!causal || j <= i + (Nk - Nq));
      });
      for (GradSet* set : {static_cast<GradSet*>(&g), &g.size}) {
        const SoftmaxGrad r = softmax_rows_backward(P, Q, K, V, dO, s, set == &g.size);
        set->dq.add_head(b, h, r.dA);
        set->dk.add_head(b, hk, r.dB);
        set->dv.add_head(b, hk, r.dV);
      }
    }
  return g;
}

}  // namespace ref
