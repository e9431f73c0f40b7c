// What the FAVOR suites share: map names, a projection tensor over favor_projection, the input
// scale each map is tested at, and the tolerance for a normalizer's condition number.
#pragma once
#include <effattn/effattn.hpp>

#include <cmath>
#include <vector>

#include "test_util.hpp"

namespace favor_cases {

using effattn::FeatureMap;

inline const char* map_name(FeatureMap m) {
  return m == FeatureMap::positive ? "positive" : m == FeatureMap::relu ? "relu" : "trig";
}

constexpr FeatureMap kMaps[] = {FeatureMap::positive, FeatureMap::relu, FeatureMap::trig};

/// A projection tensor [1, heads, M, D] over an owned favor_projection.
struct Projection {
  std::vector<float> w;
  effattn::Tensor<const float> view;
  Projection(int64_t heads, int64_t M, int64_t D, uint64_t seed,
             effattn::Orthogonality o = effattn::Orthogonality::orthogonal)
      : w(effattn::favor_projection(seed, int(heads), int(M), int(D), o)),
        view(w.data(), {1, heads, M, D}, {heads * M * D, M * D, D, 1}) {}
};

/// The standard deviation of q and k: `requested` if positive, else 1, or for trig the scale
/// |x'|² = s D std² ~ 0.64 where its normalizer estimate stays away from zero (condition numbers
/// mostly 1-10, rarely ~50; at std 1 rows reach 1e5..1e7).
inline double input_std(FeatureMap map, int64_t D, double requested = 0) {
  if (requested > 0) return requested;
  return map == FeatureMap::trig ? 0.8 / std::pow(double(D), 0.25) : 1.0;
}

/// DESIGN.md's CPU tolerance times the condition number of the normalizer sums phi(q_i)ᵀz
/// (ref::favor): exactly the DESIGN tolerance for positive and relu features, whose sums have no
/// cancellation (condition 1); for the signed trig features, the factor by which any evaluation
/// of the same formulas amplifies rounding (the naive double loops show it as much as this code).
template <class T>
double tolerance(double condition) {
  return testing_util::cpu_tolerance<T>() * condition;
}

}  // namespace favor_cases
