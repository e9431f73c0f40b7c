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

/// Exact softmax attention. scale 0 means 1/sqrt(D).
struct Softmax {
  float scale = 0;
  bool causal = false;
};

/// Nyströmformer: segment-mean landmarks and a Newton–Schulz pseudo-inverse.
struct Nystrom {
  int landmarks = 64;
  int pinv_iterations = 6;
  float scale = 0;
};

enum class FeatureMap { positive, relu, trig };

/// Performer FAVOR+. projection is [1, H or 1, M, D] from favor_projection.
struct Favor {
  Tensor<const float> projection;
  FeatureMap map = FeatureMap::positive;
  bool causal = false;
  float scale = 0;
  float eps = 0;  // 0 -> the map's default (1e-6 positive, 1e-3 relu)
};

/// Proxyformer: caller-given proxy tokens, [1 or B, H, M, D].
template <class T>
struct Proxy {
  Tensor<const T> proxy_q, proxy_k;
  int pinv_iterations = 6;  // 0: no inverse, out = K1 (K3 V)
  float column_dropout = 0;
  uint64_t dropout_seed = 0;
  float scale = 0;
};

}  // namespace effattn
