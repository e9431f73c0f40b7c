// favor_projection: the random feature matrices of FAVOR+ (Performer), reproducible bit for bit.
// Free of Eigen and CUDA so that every translation unit (nvcc's included) may use it.
//
// The seed -> matrix mapping is part of the API and must not change (a golden test pins it):
//
//  1. Gaussians. normal(seed, h, stream, i) for i >= 0 is element i%2 of the Box–Muller pair
//     drawn from Philox4x32-10 with key = seed and counter = {lo32(i/2), hi32(i/2), h, stream}.
//     Of the four output words (x, y, z, w): u1 = (((x >> 5) << 26 | y >> 6) + 1) 2^-53 in (0, 1],
//     u2 = ((z >> 5) << 26 | w >> 6) 2^-53 in [0, 1); the pair is r cos(2 pi u2), r sin(2 pi u2)
//     with r = sqrt(-2 ln u1).
//  2. Directions. Row r of head h starts as g_r = (normal(seed, h, 0, r D + c))_{c < D}.
//     orthogonal: rows are taken in blocks of D (the last block keeps only M mod D rows, i.e. it
//       is truncated); within a block each row, in order, has its projections on the block's
//       earlier rows removed twice (modified Gram–Schmidt with one re-orthogonalization pass)
//       and is divided by its norm: the Q factor of the QR decomposition of the block's
//       transpose (R with positive diagonal), a Haar-distributed orthonormal set.
//     iid: each row is divided by its own norm (a uniform direction).
//  3. Norms. chi: row r is multiplied by |(normal(seed, h, 1, r D + c))_{c < D}|, an independent
//     chi(D) draw, so every row is marginally N(0, I_D) (iid + chi is a plain Gaussian matrix).
//     sqrt_dim: every row is multiplied by sqrt(D).
//  4. The double result is rounded to float.
//
// Portability: everything is computed in double with operations IEEE 754 rounds correctly
// (+, -, *, /, sqrt, std::fma) and with every multiply-add written as std::fma, so neither
// FMA contraction nor a platform's libm can change a bit; ln, sin and cos are the polynomials
// below, not libm. (Compiling with -ffast-math or on x87 excess precision voids this.)
#pragma once
#include <cmath>
#include <cstdint>
#include <vector>

#include "effattn/core/error.hpp"
#include "effattn/core/philox.hpp"

namespace effattn {

enum class Orthogonality { orthogonal, iid };
enum class RowScaling { chi, sqrt_dim };

namespace detail {
namespace portable {

/// 1 / n!, exact n! for n <= 18.
inline double inverse_factorial(int n) {
  double f = 1;
  for (int i = 2; i <= n; ++i) f *= i;
  return 1.0 / f;
}

/// ln x for x in (0, 1]: x = m 2^e with m in [sqrt(1/2), sqrt(2)), ln m = 2 atanh((m-1)/(m+1)).
inline double log_unit(double x) {
  int e = 0;
  double m = std::frexp(x, &e);  // exact
  if (m < 0.70710678118654752440) {
    m = std::ldexp(m, 1);
    e -= 1;
  }
  const double s = (m - 1) / (m + 1);  // |s| <= 0.1716, so terms past s^25 are below 1e-19
  const double s2 = s * s;
  double p = 1.0 / 25;
  for (int k = 23; k >= 1; k -= 2) p = std::fma(p, s2, 1.0 / k);
  const double log_m = std::ldexp(s, 1) * p;
  // ln 2 split so that e * kLn2Hi is exact for |e| < 2^11.
  constexpr double kLn2Hi = 0x1.62e42fefa3800p-1, kLn2Lo = 0x1.ef35793c76730p-45;
  return std::fma(static_cast<double>(e), kLn2Hi, std::fma(static_cast<double>(e), kLn2Lo, log_m));
}

/// sin(2 pi u) and cos(2 pi u) for u in [0, 1): the quadrant is exact, the rest a Taylor
/// polynomial on |x| <= pi/4 (first omitted terms below 1e-17).
inline void sincos_2pi(double u, double* sin_out, double* cos_out) {
  const double t = std::ldexp(u, 2);  // 4u: whole quarter turns
  const double q = std::floor(t + 0.5);
  const double x = (t - q) * 1.57079632679489661923;  // t - q is exact
  const double x2 = x * x;
  double ps = (8 % 2 ? -1 : 1) * inverse_factorial(17);
  for (int k = 7; k >= 1; --k) ps = std::fma(ps, x2, (k % 2 ? -1 : 1) * inverse_factorial(2 * k + 1));
  double pc = inverse_factorial(16);
  for (int k = 7; k >= 1; --k) pc = std::fma(pc, x2, (k % 2 ? -1 : 1) * inverse_factorial(2 * k));
  const double s = std::fma(x * x2, ps, x), c = std::fma(x2, pc, 1.0);
  switch (static_cast<int>(q) & 3) {
    case 0: *sin_out = s; *cos_out = c; break;
    case 1: *sin_out = c; *cos_out = -s; break;
    case 2: *sin_out = -s; *cos_out = -c; break;
    default: *sin_out = -c; *cos_out = s; break;
  }
}

/// 53 uniform bits from two words, as an integer in [0, 2^53).
inline double bits53(uint32_t a, uint32_t b) {
  return static_cast<double>((static_cast<uint64_t>(a >> 5) << 26) | (b >> 6));
}

/// The i-th standard normal of (seed, head, stream); see step 1 above.
inline double normal(uint64_t seed, uint32_t head, uint32_t stream, uint64_t i) {
  const uint64_t pair = i / 2;
  const U32x4 r = philox4x32_10(U32x4{static_cast<uint32_t>(pair), static_cast<uint32_t>(pair >> 32), head, stream}, seed);
  const double u1 = std::ldexp(bits53(r.x, r.y) + 1, -53);  // (0, 1]: the log is finite
  const double u2 = std::ldexp(bits53(r.z, r.w), -53);      // [0, 1)
  const double radius = std::sqrt(-2.0 * log_unit(u1));
  double s, c;
  sincos_2pi(u2, &s, &c);
  return radius * (i % 2 == 0 ? c : s);
}

inline double dot(const double* a, const double* b, int n) {
  double d = 0;
  for (int c = 0; c < n; ++c) d = std::fma(a[c], b[c], d);
  return d;
}

}  // namespace portable

/// favor_projection computed in double: contiguous [heads, features, dim].
inline std::vector<double> favor_projection_f64(uint64_t seed, int heads, int features, int dim,
                                                Orthogonality orth = Orthogonality::orthogonal,
                                                RowScaling scaling = RowScaling::chi) {
  constexpr const char* where = "effattn::favor_projection";
  require(heads >= 1, where, ": heads = ", heads, " must be >= 1");
  require(features >= 1, where, ": features = ", features, " must be >= 1");
  require(dim >= 1, where, ": dim = ", dim, " must be >= 1");
  using namespace portable;
  const int64_t M = features, D = dim;
  std::vector<double> w(static_cast<size_t>(heads * M * D));
  for (int h = 0; h < heads; ++h) {
    double* W = w.data() + h * M * D;
    // Unit directions first (Gram–Schmidt needs the earlier rows of the block at unit length).
    for (int64_t r = 0; r < M; ++r) {
      double* row = W + r * D;
      for (int64_t c = 0; c < D; ++c) row[c] = normal(seed, static_cast<uint32_t>(h), 0, static_cast<uint64_t>(r * D + c));
      if (orth == Orthogonality::orthogonal) {
        const int64_t block_start = r / D * D;
        for (int pass = 0; pass < 2; ++pass)
          for (int64_t p = block_start; p < r; ++p) {
            const double* prev = W + p * D;
            const double proj = dot(row, prev, dim);
            for (int64_t c = 0; c < D; ++c) row[c] = std::fma(-proj, prev[c], row[c]);
          }
      }
      // norm == 0 has probability zero (a Gaussian block is almost surely full rank).
      const double norm = std::sqrt(dot(row, row, dim));
      for (int64_t c = 0; c < D; ++c) row[c] = norm > 0 ? row[c] / norm : 0.0;
    }
    // Then the row norms.
    for (int64_t r = 0; r < M; ++r) {
      double length = std::sqrt(static_cast<double>(D));
      if (scaling == RowScaling::chi) {
        double sq = 0;
        for (int64_t c = 0; c < D; ++c) {
          const double g = normal(seed, static_cast<uint32_t>(h), 1, static_cast<uint64_t>(r * D + c));
          sq = std::fma(g, g, sq);
        }
        length = std::sqrt(sq);
      }
      for (int64_t c = 0; c < D; ++c) W[r * D + c] = W[r * D + c] * length;
    }
  }
  return w;
}

}  // namespace detail

/// Random features for Favor::projection, host memory, contiguous [heads, features, dim]
/// (view it as Tensor [1, heads, features, dim]). The same seed gives the same bits everywhere.
inline std::vector<float> favor_projection(uint64_t seed, int heads, int features, int dim,
                                           Orthogonality orth = Orthogonality::orthogonal,
                                           RowScaling scaling = RowScaling::chi) {
  const std::vector<double> w = detail::favor_projection_f64(seed, heads, features, dim, orth, scaling);
  return std::vector<float>(w.begin(), w.end());
}

}  // namespace effattn
