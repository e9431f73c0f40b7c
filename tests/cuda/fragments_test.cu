// The kernels' lane-to-element maps (ptx::Fragments) against the PTX ISA's definitions of
// ldmatrix and mma.m16n8k16, emulated on the host: S = Q K^T and O = P V of one warp must come
// out right; and the causal tile bounds against brute force. Runs without a GPU, so CI checks
// the index math the fused softmax kernel relies on.
#include <gtest/gtest.h>

#include <effattn/cuda/ptx.cuh>
#include <effattn/cuda/softmax_tiles.cuh>
#include <algorithm>
#include <array>
#include <cmath>
#include <random>
#include <vector>

namespace {

using F = effattn::cuda::ptx::Fragments;

/// A register of two 16-bit halves as the emulation sees it: {low, high}.
struct Reg {
  double lo = 0, hi = 0;
};

/// A row-major matrix in "shared memory", with a padded row stride as the kernels use.
struct Smem {
  int rows, cols, stride;
  std::vector<double> a;
  Smem(int r, int c) : rows(r), cols(c), stride(c + 8), a(static_cast<size_t>(r) * (c + 8), NAN) {
    std::mt19937 gen(r * 131 + c);
    std::uniform_int_distribution<int> d(-8, 8);  // small integers: every product is exact
    for (int i = 0; i < r; ++i)
      for (int j = 0; j < c; ++j) a[i * stride + j] = d(gen);
  }
  double at(int r, int c) const { return a[r * stride + c]; }
};

/// ldmatrix.x4 as PTX defines it: lanes 8i..8i+7 give the row addresses (here: offsets) of
/// matrix i; lane l receives row l/4, elements 2(l%4), 2(l%4)+1 of each matrix, or with .trans
/// rows 2(l%4), 2(l%4)+1 of column l/4.
std::vector<std::array<Reg, 4>> ldmatrix_x4(const Smem& m, const int (&offset)[32], bool trans) {
  std::vector<std::array<Reg, 4>> regs(32);
  for (int l = 0; l < 32; ++l)
    for (int i = 0; i < 4; ++i) {
      const auto row = [&](int r) { return offset[8 * i + r]; };
      if (!trans) {
        regs[l][i] = {m.a[row(l / 4) + 2 * (l % 4)], m.a[row(l / 4) + 2 * (l % 4) + 1]};
      } else {
        regs[l][i] = {m.a[row(2 * (l % 4)) + l / 4], m.a[row(2 * (l % 4) + 1) + l / 4]};
      }
    }
  return regs;
}

/// mma.m16n8k16.row.col with PTX's fragment layouts (g = l/4, t = l%4):
/// A: a[r] = (row g + 8 (r%2), cols 2t + 8 (r/2) + {0,1}); B: b[r] = (k 2t + 8r + {0,1}, n g);
/// C: c[e] = (row g + 8 (e/2), col 2t + e%2).
void mma(std::vector<std::array<double, 4>>& c, const std::vector<std::array<Reg, 4>>& a,
         const std::vector<std::array<Reg, 2>>& b) {
  double A[16][16], B[16][8];
  for (int l = 0; l < 32; ++l) {
    const int g = l / 4, t = l % 4;
    for (int r = 0; r < 4; ++r) {
      A[g + 8 * (r % 2)][2 * t + 8 * (r / 2)] = a[l][r].lo;
      A[g + 8 * (r % 2)][2 * t + 8 * (r / 2) + 1] = a[l][r].hi;
    }
    for (int r = 0; r < 2; ++r) {
      B[2 * t + 8 * r][g] = b[l][r].lo;
      B[2 * t + 8 * r + 1][g] = b[l][r].hi;
    }
  }
  for (int l = 0; l < 32; ++l)
    for (int e = 0; e < 4; ++e) {
      const int row = l / 4 + 8 * (e / 2), col = 2 * (l % 4) + e % 2;
      for (int k = 0; k < 16; ++k) c[l][e] += A[row][k] * B[k][col];
    }
}

TEST(Fragments, ScoresQKt) {
  // S (16 rows x 16 keys) = Q (16 x 16 dims) K^T, K stored key-major like the K tile.
  const Smem q(16, 16), k(16, 16);
  int qa[32], kb[32];
  for (int l = 0; l < 32; ++l) {
    qa[l] = F::a_row(l) * q.stride + F::a_col(l);
    kb[l] = F::bn_row(l) * k.stride + F::bn_col(l);
  }
  const auto a = ldmatrix_x4(q, qa, false);
  const auto b = ldmatrix_x4(k, kb, false);
  for (int n = 0; n < 2; ++n) {  // key blocks 0..7 and 8..15
    std::vector<std::array<Reg, 2>> bn(32);
    for (int l = 0; l < 32; ++l) bn[l] = {b[l][2 * n], b[l][2 * n + 1]};
    std::vector<std::array<double, 4>> s(32, {0, 0, 0, 0});
    mma(s, a, bn);
    for (int l = 0; l < 32; ++l)
      for (int e = 0; e < 4; ++e) {
        const int row = l / 4 + 8 * (e / 2), key = 8 * n + 2 * (l % 4) + e % 2;
        double want = 0;
        for (int d = 0; d < 16; ++d) want += q.at(row, d) * k.at(key, d);
        ASSERT_EQ(s[l][e], want) << "lane " << l << " element " << e << " key block " << n;
      }
  }
}

TEST(Fragments, WeightsTimesValues) {
  // O (16 rows x 16 dims) = P (16 x 16 keys) V, P given as the two key blocks' accumulators.
  const Smem p(16, 16), v(16, 16);
  std::vector<std::array<double, 4>> acc[2];
  for (int n = 0; n < 2; ++n) {
    acc[n].resize(32);
    for (int l = 0; l < 32; ++l)
      for (int e = 0; e < 4; ++e) acc[n][l][e] = p.at(l / 4 + 8 * (e / 2), 8 * n + 2 * (l % 4) + e % 2);
  }
  std::vector<std::array<Reg, 4>> a(32);
  for (int l = 0; l < 32; ++l)
    for (int r = 0; r < 4; ++r) {
      const auto& c = acc[F::acc_block(r)][l];
      a[l][r] = {c[F::acc_elem(r)], c[F::acc_elem(r) + 1]};
    }
  int vb[32];
  for (int l = 0; l < 32; ++l) vb[l] = F::bk_row(l) * v.stride + F::bk_col(l);
  const auto b = ldmatrix_x4(v, vb, true);
  for (int n = 0; n < 2; ++n) {  // output dims 0..7 and 8..15
    std::vector<std::array<Reg, 2>> bn(32);
    for (int l = 0; l < 32; ++l) bn[l] = {b[l][2 * n], b[l][2 * n + 1]};
    std::vector<std::array<double, 4>> o(32, {0, 0, 0, 0});
    mma(o, a, bn);
    for (int l = 0; l < 32; ++l)
      for (int e = 0; e < 4; ++e) {
        const int row = l / 4 + 8 * (e / 2), col = 8 * n + 2 * (l % 4) + e % 2;
        double want = 0;
        for (int j = 0; j < 16; ++j) want += p.at(row, j) * v.at(j, col);
        ASSERT_EQ(o[l][e], want) << "lane " << l << " element " << e << " dim block " << n;
      }
  }
}

TEST(Fragments, OwnerOfEachWeight) {
  // The float path fetches weight (row g [+8], key j) from another lane of the quad.
  for (int l = 0; l < 32; ++l)
    for (int j = 0; j < 64; ++j) {
      const int owner = F::owner_lane(l, j), e = F::owner_elem(j);
      EXPECT_EQ(owner / 4, l / 4) << "outside the quad";
      EXPECT_EQ(8 * (j / 8) + 2 * (owner % 4) + e, j) << "lane " << l << " key " << j;
    }
}

TEST(Fragments, LdmatrixRowsAreSixteenByteAligned) {
  for (int l = 0; l < 32; ++l) {
    EXPECT_EQ(F::a_col(l) % 8, 0);
    EXPECT_EQ(F::bn_col(l) % 8, 0);
    EXPECT_EQ(F::bk_col(l) % 8, 0);
  }
}

TEST(TileBounds, CausalKeyRangeAndUnmaskedTilesMatchBruteForce) {
  namespace tiles = effattn::cuda::tiles;
  constexpr int64_t kRows = tiles::kRows;
  for (int64_t nq : {1, 7, 64, 65, 200})
    for (int64_t nk : {1, 5, 63, 64, 130, 300})
      for (int64_t offset : {nk - nq, int64_t(0), int64_t(-70), int64_t(37)})
        for (bool causal : {false, true})
          for (int64_t i0 = 0; i0 < nq; i0 += kRows) {
            const int64_t rows = std::min(kRows, nq - i0);
            const auto allowed = [&](int64_t i, int64_t j) { return j < nk && (!causal || j <= i + offset); };
            int64_t want_end = 0;  // one past the last key some row of the block may see
            for (int64_t i = i0; i < i0 + rows; ++i)
              for (int64_t j = 0; j < nk; ++j)
                if (allowed(i, j)) want_end = std::max(want_end, j + 1);
            ASSERT_EQ(tiles::key_end(nk, i0, rows, causal, offset), want_end)
                << "nq " << nq << " nk " << nk << " offset " << offset << " causal " << causal << " i0 " << i0;
            for (int64_t keys : {16, 32, 64})
              for (int64_t j0 = 0; j0 < nk; j0 += keys) {
                if (!tiles::tile_unmasked(j0, keys, nk, i0, causal, offset, false)) continue;
                for (int64_t i = i0; i < i0 + kRows; ++i)
                  for (int64_t j = j0; j < j0 + keys; ++j)
                    ASSERT_TRUE(allowed(i, j)) << "tile " << j0 << " claimed unmasked for row " << i;
              }
            EXPECT_FALSE(tiles::tile_unmasked(0, 16, nk, i0, false, 0, true)) << "a key mask always masks";
          }
}

}  // namespace
