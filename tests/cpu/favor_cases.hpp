// What the FAVOR suites share: map names, a projection tensor over favor_projection, the input
// scale each map is tested at, the tolerance for a normalizer's condition number, and the owned
// data of one problem.
#pragma once
#include <effattn/effattn.hpp>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <string>
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

struct Case {
  int64_t B, H, Hk, Nq, Nk, D, Dv, M;
  FeatureMap map = FeatureMap::positive;
  bool causal = false;
  bool masks = false;
  testing_util::Layout layout = testing_util::Layout::bhsd;
  bool shared_projection = false;  // projection heads 1 instead of H
  double scale = 0, eps = 0;
  double input_std = 0;  // see input_std()
};

inline std::string short_number(double x) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%g", x);
  return buf;
}

inline std::string describe(const Case& c) {
  return "B=" + std::to_string(c.B) + " H=" + std::to_string(c.H) + " Hk=" + std::to_string(c.Hk) +
         " Nq=" + std::to_string(c.Nq) + " Nk=" + std::to_string(c.Nk) + " D=" + std::to_string(c.D) +
         " Dv=" + std::to_string(c.Dv) + " M=" + std::to_string(c.M) + " " + map_name(c.map) +
         (c.causal ? " causal" : "") + (c.masks ? " masks" : "") + " " + testing_util::layout_name(c.layout) +
         (c.shared_projection ? " shared-projection" : "") + " scale=" + short_number(c.scale) +
         " eps=" + short_number(c.eps) + " std=" + short_number(c.input_std);
}

/// The owned data of one problem: q, k at input_std, v, out poisoned, a fresh projection, and
/// with c.masks the masks: the last sequence has no valid key, the first of 3+ no valid query.
template <class T>
struct FavorData {
  Case c;
  testing_util::HostTensor<T> q, k, v, out;
  Projection proj;
  std::vector<uint8_t> qm, km;
  effattn::Masks masks;
  explicit FavorData(const Case& cs)
      : c(cs),
        q(c.B, c.H, c.Nq, c.D, c.layout),
        k(c.B, c.Hk, c.Nk, c.D, c.layout),
        v(c.B, c.Hk, c.Nk, c.Dv, c.layout),
        out(c.B, c.H, c.Nq, c.Dv, c.layout),
        proj(c.shared_projection ? 1 : c.H, c.M, c.D, testing_util::rng()()) {
    const double stddev = input_std(c.map, c.D, c.input_std);
    q.fill_normal(stddev);
    k.fill_normal(stddev);
    v.fill_normal();
    out.poison();
    if (c.masks) {
      km = testing_util::random_mask(c.B, c.Nk, 0.7, c.B > 1 ? c.B - 1 : -1);
      qm = testing_util::random_mask(c.B, c.Nq, 0.8, c.B > 2 ? 0 : -1);
      masks = {qm.data(), c.Nq, km.data(), c.Nk};
    }
  }
  effattn::Favor method() const { return effattn::Favor{proj.view, c.map, c.causal, c.scale, c.eps}; }
  void forward(int threads = 0) {
    effattn::attention<effattn::Cpu>(method(), q.cview(), k.cview(), v.cview(), out.view, masks,
                                     effattn::Exec<effattn::Cpu>{threads});
  }
};

/// For the bidirectional positive key pass, which rescales its sums whenever a key tile (256 keys)
/// raises the running key max. The random keys are scaled by 1/4, then the first key of each tile
/// t becomes beta_t w / sqrt(scale), w the longest projection row, whose max_f u − |k'|²/2 =
/// |w|² (beta − beta²/2) is 0.2, 0.3, 0.4, 0.5 times |w|² (growing) or the reverse: growing, each
/// tile raises the max by 0.1 |w|², a factor e^3 to e^4 for |w|² of 32 to 40. Batch 0, every key
/// head, default scale 1/sqrt(D), c.Nk > 768. Returns whether the tile maxima (computed here in
/// double over every key) came out as intended: strictly rising, or falling.
template <class T>
bool plant_key_maxima(FavorData<T>& d, bool growing) {
  const int64_t D = d.c.D, M = d.c.M;
  const double root_scale = std::pow(static_cast<double>(D), -0.25);
  bool as_intended = true;
  for (int64_t h = 0; h < d.c.Hk; ++h) {
    const int64_t ph = d.c.shared_projection ? 0 : h;
    const float* w = d.proj.w.data() + ph * M * D;
    int64_t longest = 0;
    double longest_sq = 0;
    for (int64_t f = 0; f < M; ++f) {
      double sq = 0;
      for (int64_t c = 0; c < D; ++c) sq += static_cast<double>(w[f * D + c]) * w[f * D + c];
      if (sq > longest_sq) longest_sq = sq, longest = f;
    }
    for (int64_t j = 0; j < d.c.Nk; ++j)
      for (int64_t c = 0; c < D; ++c) d.k.view(0, h, j, c) *= T(0.25);
    for (int64_t t = 0; t < 4; ++t) {
      const double frac = 0.1 * static_cast<double>(growing ? t + 2 : 5 - t);  // beta − beta²/2
      const double beta = 1 - std::sqrt(1 - 2 * frac);
      for (int64_t c = 0; c < D; ++c)
        d.k.view(0, h, 256 * t, c) = static_cast<T>(beta / root_scale * w[longest * D + c]);
    }
    double previous = growing ? -INFINITY : INFINITY;
    for (int64_t t0 = 0; t0 < d.c.Nk; t0 += 256) {
      double tile_max = -INFINITY;
      for (int64_t j = t0; j < std::min<int64_t>(d.c.Nk, t0 + 256); ++j) {
        double sq = 0, top = -INFINITY;
        for (int64_t c = 0; c < D; ++c) sq += std::pow(root_scale * static_cast<double>(d.k.view(0, h, j, c)), 2);
        for (int64_t f = 0; f < M; ++f) {
          double u = 0;
          for (int64_t c = 0; c < D; ++c) u += root_scale * static_cast<double>(d.k.view(0, h, j, c)) * w[f * D + c];
          top = std::max(top, u);
        }
        tile_max = std::max(tile_max, top - sq / 2);
      }
      if (t0 / 256 < 4) as_intended = as_intended && (growing ? tile_max > previous : tile_max < previous);
      previous = tile_max;
    }
  }
  return as_intended;
}

}  // namespace favor_cases
