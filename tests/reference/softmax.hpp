// Float64 reference of exact softmax attention (DESIGN.md, "Softmax").
#pragma once
#include "common.hpp"

namespace ref {

template <class T>
Result softmax(const Tensor<const T>& q, const Tensor<const T>& k, const Tensor<const T>& v, const Masks& masks,
               float scale, bool causal) {
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

}  // namespace ref
