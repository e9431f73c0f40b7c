// Philox4x32-10 (Salmon et al., SC'11): a counter-based generator, written here so that a seed
// gives the same numbers on every compiler, platform and backend (host and CUDA device).
#pragma once
#include <cstdint>

#include "effattn/core/macros.hpp"

namespace effattn {
namespace detail {

struct U32x4 {
  uint32_t x, y, z, w;
};

EFFATTN_HD uint32_t mulhilo32(uint32_t a, uint32_t b, uint32_t* hi) {
  const uint64_t p = static_cast<uint64_t>(a) * b;
  *hi = static_cast<uint32_t>(p >> 32);
  return static_cast<uint32_t>(p);
}

/// Ten rounds of Philox4x32 on `counter` under the 64-bit `key`.
EFFATTN_HD U32x4 philox4x32_10(U32x4 c, uint64_t key) {
  uint32_t k0 = static_cast<uint32_t>(key), k1 = static_cast<uint32_t>(key >> 32);
  for (int round = 0; round < 10; ++round) {
    uint32_t hi0, hi1;
    const uint32_t lo0 = mulhilo32(0xD2511F53u, c.x, &hi0);
    const uint32_t lo1 = mulhilo32(0xCD9E8D57u, c.z, &hi1);
    c = U32x4{hi1 ^ c.y ^ k0, lo1, hi0 ^ c.w ^ k1, lo0};
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  return c;
}

/// The top 24 bits of r as a float in [0, 1): exact in float, so host and device agree.
EFFATTN_HD float uniform01(uint32_t r) { return static_cast<float>(r >> 8) * (1.0f / 16777216.0f); }

/// Newton–Schulz's guard (DESIGN 3.2) measures its residual on kGuardProbes fixed vectors.
constexpr int kGuardProbes = 8;

/// Entry (j, c) of the guard's probe matrix P [M, kGuardProbes]: the sum of the top 22 bits of
/// the four words of Philox4x32-10 of (j, c, 0, 0) under a fixed key, centred and times 2^-22, so
/// in [-2, 2) with mean 0, nearly normal, and exact in float: the same P on every backend.
EFFATTN_HD float guard_probe(int64_t j, int c) {
  const U32x4 r =
      philox4x32_10(U32x4{static_cast<uint32_t>(j), static_cast<uint32_t>(c), 0u, 0u}, 0x6A09E667F3BCC909ull);
  const int32_t sum = static_cast<int32_t>((r.x >> 10) + (r.y >> 10) + (r.z >> 10) + (r.w >> 10)) - (1 << 23);
  return static_cast<float>(sum) * (1.0f / 4194304.0f);
}

}  // namespace detail

/// Proxy's decomposed-dropout draw: is column c of K2 kept for (batch b, head h)?
/// Kept with probability 1 - p; the same answer on every backend for the same arguments.
EFFATTN_HD bool column_keep(uint64_t seed, int64_t b, int64_t h, int64_t c, float p) {
  if (!(p > 0.0f)) return true;
  const uint64_t ub = static_cast<uint64_t>(b);
  const detail::U32x4 r = detail::philox4x32_10(
      detail::U32x4{static_cast<uint32_t>(c), static_cast<uint32_t>(h), static_cast<uint32_t>(ub),
                    static_cast<uint32_t>(ub >> 32)},
      seed);
  return detail::uniform01(r.x) >= p;
}

}  // namespace effattn
