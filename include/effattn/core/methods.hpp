// The method structs: each names one operator and carries its parameters.
#pragma once
#include <cstdint>

#include "effattn/core/tensor.hpp"

namespace effattn {

/// Optional validity masks, [B, N] bytes, 1 = valid; nullptr = all valid.
struct Masks {
  const uint8_t* query_valid = nullptr;
  int64_t query_batch_stride = 0;
  const uint8_t* key_valid = nullptr;
  int64_t key_batch_stride = 0;
};

// Every `scale` is the softmax (or FAVOR) scale s, 0 meaning 1/sqrt(D). Scales and eps are double
// so a double operator gets its parameters unrounded; a float operator rounds them once.

/// Exact softmax attention.
struct Softmax {
  double scale = 0;
  bool causal = false;
};

/// Nyströmformer: segment-mean landmarks and a Newton–Schulz pseudo-inverse.
struct Nystrom {
  int landmarks = 64;
  int pinv_iterations = 6;
  double scale = 0;
};

enum class FeatureMap { positive, relu, trig };

/// Performer FAVOR+. projection is [1, H or 1, M, D] from favor_projection.
struct Favor {
  Tensor<const float> projection;
  FeatureMap map = FeatureMap::positive;
  bool causal = false;
  double scale = 0;
  double eps = 0;  // 0 -> the map's default (1e-6 positive, 1e-3 relu)
};

/// Proxyformer: caller-given proxy tokens, [1 or B, H, M, D].
template <class T>
struct Proxy {
  Tensor<const T> proxy_q, proxy_k;
  int pinv_iterations = 6;  // 0: no inverse, out = K1 (K3 V)
  float column_dropout = 0;
  uint64_t dropout_seed = 0;
  double scale = 0;
};

}  // namespace effattn
