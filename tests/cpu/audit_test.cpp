// Tests from the planted-bug audit: each would fail for a realistic mutation the other suites let
// through. column_keep's Philox counter layout pinned by an independent Philox4x32-10; landmark and
// proxy counts of 200 and 256 (the CUDA maximum); a 2-row causal query tile (Nq ≡ 2 mod 64) for
// softmax and FAVOR; inputs whose innermost stride is not 1 (every-other-element and transposed
// views) for q, k, v and out in every forward operator; bshd()/bhsd() strides against raw index
// arithmetic; and one generator per test, so a seed replays one test alone.
#include <effattn/effattn.hpp>

#include <array>
#include <type_traits>

#include "reference/favor.hpp"
#include "reference/landmark.hpp"
#include "reference/softmax.hpp"
#include "test_util.hpp"

namespace {

using namespace testing_util;
using effattn::Cpu;
using effattn::FeatureMap;

// ---- Philox4x32-10 and column_keep ---------------------------------------------------------------

/// Philox4x32-10 written from its definition (Salmon, Moraes, Dror, Shaw, SC'11, and Random123's
/// philox.h), independently of effattn::detail::philox4x32_10: round r uses key + r·(W0, W1); each
/// round maps (x0, x1, x2, x3) to (hi(M1·x2) ^ x1 ^ k0, lo(M1·x2), hi(M0·x0) ^ x3 ^ k1, lo(M0·x0)).
std::array<uint32_t, 4> philox_reference(std::array<uint32_t, 4> x, std::array<uint32_t, 2> key) {
  constexpr uint64_t M0 = 0xD2511F53u, M1 = 0xCD9E8D57u;
  constexpr uint32_t W0 = 0x9E3779B9u, W1 = 0xBB67AE85u;
  for (uint32_t r = 0; r < 10; ++r) {
    const uint32_t k0 = key[0] + r * W0, k1 = key[1] + r * W1;
    const uint64_t p0 = M0 * x[0], p1 = M1 * x[2];
    x = {uint32_t(p1 >> 32) ^ x[1] ^ k0, uint32_t(p1), uint32_t(p0 >> 32) ^ x[3] ^ k1, uint32_t(p0)};
  }
  return x;
}

/// The Proxy dropout draw as DESIGN.md fixes it and this test pins it: counter (c, h, b low 32
/// bits, b high 32 bits), key = the 64-bit seed (low word first), keep iff the top 24 bits of the
/// first output word, as a fraction of 2^24, are >= p.
bool keep_reference(uint64_t seed, int64_t b, int64_t h, int64_t c, float p) {
  if (!(p > 0)) return true;
  const auto ub = uint64_t(b);
  const auto r = philox_reference({uint32_t(c), uint32_t(h), uint32_t(ub), uint32_t(ub >> 32)},
                                  {uint32_t(seed), uint32_t(seed >> 32)});
  return float(r[0] >> 8) * (1.0f / 16777216.0f) >= p;
}

TEST(Audit, PhiloxReferenceMatchesRandom123KnownAnswers) {
  // Random123 kat_vectors, philox4x32_10: (counter, key) -> output.
  struct Kat {
    std::array<uint32_t, 4> ctr;
    std::array<uint32_t, 2> key;
    std::array<uint32_t, 4> out;
  };
  const Kat kats[] = {
      {{0, 0, 0, 0}, {0, 0}, {0x6627e8d5, 0xe169c58d, 0xbc57ac4c, 0x9b00dbd8}},
      {{0xffffffff, 0xffffffff, 0xffffffff, 0xffffffff},
       {0xffffffff, 0xffffffff},
       {0x408f276d, 0x41c83b0e, 0xa20bc7c6, 0x6d5451fd}},
      {{0x243f6a88, 0x85a308d3, 0x13198a2e, 0x03707344},
       {0xa4093822, 0x299f31d0},
       {0xd16cfe09, 0x94fdcceb, 0x5001e420, 0x24126ea1}},
  };
  for (const Kat& k : kats) {
    EXPECT_EQ(philox_reference(k.ctr, k.key), k.out);
    const auto lib = effattn::detail::philox4x32_10({k.ctr[0], k.ctr[1], k.ctr[2], k.ctr[3]},
                                                    uint64_t(k.key[0]) | uint64_t(k.key[1]) << 32);
    EXPECT_EQ((std::array<uint32_t, 4>{lib.x, lib.y, lib.z, lib.w}), k.out);
  }
}

TEST(Audit, ColumnKeepCounterLayoutIsPinned) {
  // Golden bits computed with keep_reference (column c of 64 is bit c), for a seed with both words
  // nonzero and a batch index above 2^32, so swapped or truncated counter words change them.
  struct Golden {
    uint64_t seed;
    int64_t b, h;
    float p;
    uint64_t bits;
  };
  const Golden golden[] = {
      {0x0123456789abcdefull, 0, 0, 0.5f, 0x478ec115e185259full},
      {0x0123456789abcdefull, 3, 5, 0.5f, 0x758d904b36096a66ull},
      {0xfedcba9876543210ull, (int64_t(1) << 32) + 7, 1, 0.1f, 0x3fd7fbedeffb7df7ull},
      {42, 1, 300, 0.9f, 0x2800000000040008ull},
  };
  for (const Golden& g : golden) {
    uint64_t bits = 0, ref_bits = 0;
    for (int c = 0; c < 64; ++c) {
      bits |= uint64_t(effattn::column_keep(g.seed, g.b, g.h, c, g.p)) << c;
      ref_bits |= uint64_t(keep_reference(g.seed, g.b, g.h, c, g.p)) << c;
    }
    EXPECT_EQ(ref_bits, g.bits) << "the test's own reference changed";
    EXPECT_EQ(bits, g.bits) << "seed " << g.seed << " b " << g.b << " h " << g.h << " p " << g.p;
  }
  // And over random arguments (the whole range of every counter word).
  for (int i = 0; i < 20000; ++i) {
    const uint64_t seed = rng()();
    const int64_t b = int64_t(rng()() >> 1), h = int64_t(rng()() % 100000), c = int64_t(rng()() % 100000);
    const float p = float(rng()() % 1000) / 1000.0f;
    ASSERT_EQ(effattn::column_keep(seed, b, h, c, p), keep_reference(seed, b, h, c, p))
        << "seed " << seed << " b " << b << " h " << h << " c " << c << " p " << p;
  }
}

// ---- views against raw index arithmetic -----------------------------------------------------------

TEST(Audit, ViewStridesMatchRawIndexArithmetic) {
  const int64_t B = 2, H = 3, S = 5, D = 7;
  std::vector<int> mem(size_t(B * H * S * D));
  const auto bshd = effattn::bshd(mem.data(), B, S, H, D);
  const auto bhsd = effattn::bhsd(mem.data(), B, H, S, D);
  EXPECT_EQ(bshd.shape, (std::array<int64_t, 4>{B, H, S, D}));
  EXPECT_EQ(bhsd.shape, (std::array<int64_t, 4>{B, H, S, D}));
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < H; ++h)
      for (int64_t s = 0; s < S; ++s)
        for (int64_t d = 0; d < D; ++d) {
          EXPECT_EQ(&bshd(b, h, s, d), &mem[size_t(((b * S + s) * H + h) * D + d)]) << b << h << s << d;
          EXPECT_EQ(&bhsd(b, h, s, d), &mem[size_t(((b * H + h) * S + s) * D + d)]) << b << h << s << d;
        }
  // The test layouts, likewise.
  HostTensor<int> t(B, H, S, D, Layout::transposed), st(B, H, S, D, Layout::strided), bs(B, H, S, D, Layout::bshd);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < H; ++h)
      for (int64_t s = 0; s < S; ++s)
        for (int64_t d = 0; d < D; ++d) {
          EXPECT_EQ(&t.view(b, h, s, d), &t.storage[size_t(((b * H + h) * D + d) * S + s)]);
          EXPECT_EQ(&st.view(b, h, s, d), &st.storage[size_t(2 * (((b * H + h) * S + s) * D + d))]);
          EXPECT_EQ(&bs.view(b, h, s, d), &bs.storage[size_t(((b * S + s) * H + h) * D + d)]);
        }
}

// A [B, S, H, D] problem built and read back by raw index arithmetic only: the reference runs on
// bhsd copies made the same way, so a wrong bshd() stride cannot cancel out.
TEST(Audit, BshdMemoryEndToEnd) {
  const int64_t B = 2, H = 3, N = 70, D = 16;
  std::vector<float> q(size_t(B * N * H * D)), k(q.size()), v(q.size()), out(q.size(), NAN);
  std::normal_distribution<float> n(0.f, 1.f);
  for (auto* x : {&q, &k, &v})
    for (float& e : *x) e = n(rng());
  const auto raw = [&](int64_t b, int64_t h, int64_t s, int64_t d) { return size_t(((b * N + s) * H + h) * D + d); };
  HostTensor<float> qc(B, H, N, D), kc(B, H, N, D), vc(B, H, N, D);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < H; ++h)
      for (int64_t s = 0; s < N; ++s)
        for (int64_t d = 0; d < D; ++d) {
          qc.storage[size_t(((b * H + h) * N + s) * D + d)] = q[raw(b, h, s, d)];
          kc.storage[size_t(((b * H + h) * N + s) * D + d)] = k[raw(b, h, s, d)];
          vc.storage[size_t(((b * H + h) * N + s) * D + d)] = v[raw(b, h, s, d)];
        }
  for (bool causal : {false, true}) {
    effattn::attention<Cpu>(effattn::Softmax{0, causal}, effattn::bshd<const float>(q.data(), B, N, H, D),
                            effattn::bshd<const float>(k.data(), B, N, H, D),
                            effattn::bshd<const float>(v.data(), B, N, H, D), effattn::bshd(out.data(), B, N, H, D));
    const ref::Result r = ref::softmax(qc.cview(), kc.cview(), vc.cview(), {}, 0, causal);
    double diff = 0, mx = 0;
    for (int64_t b = 0; b < B; ++b)
      for (int64_t h = 0; h < H; ++h)
        for (int64_t s = 0; s < N; ++s)
          for (int64_t d = 0; d < D; ++d) {
            diff = std::max(diff, std::abs(double(out[raw(b, h, s, d)]) - r(b, h, s, d)));
            mx = std::max(mx, std::abs(r(b, h, s, d)));
          }
    EXPECT_LE(diff / mx, 1e-5) << (causal ? "causal" : "");
  }
}

// ---- shared problem runner -----------------------------------------------------------------------

struct Shape {
  int64_t B, H, Hk, Nq, Nk, D, Dv;
};

std::string describe(const Shape& s, Layout l) {
  return "B=" + std::to_string(s.B) + " H=" + std::to_string(s.H) + " Hk=" + std::to_string(s.Hk) +
         " Nq=" + std::to_string(s.Nq) + " Nk=" + std::to_string(s.Nk) + " D=" + std::to_string(s.D) +
         " Dv=" + std::to_string(s.Dv) + " " + layout_name(l);
}

/// Masks of a problem: the last sequence has no valid key; random drops elsewhere.
struct MaskSet {
  std::vector<uint8_t> qm, km;
  effattn::Masks masks;
  MaskSet(const Shape& s, bool on) {
    if (!on) return;
    km = random_mask(s.B, s.Nk, 0.7, s.B > 1 ? s.B - 1 : -1);
    qm = random_mask(s.B, s.Nq, 0.8);
    masks = {qm.data(), s.Nq, km.data(), s.Nk};
  }
};

template <class T>
void softmax_case(const Shape& s, Layout l, bool causal, bool masks) {
  SCOPED_TRACE(describe(s, l) + (causal ? " causal" : "") + (masks ? " masks" : ""));
  AttentionData<T> data(s.B, s.H, s.Hk, s.Nq, s.Nk, s.D, s.Dv, l);
  MaskSet m(s, masks);
  effattn::attention<Cpu>(effattn::Softmax{0, causal}, data.q.cview(), data.k.cview(), data.v.cview(), data.out.view,
                          m.masks);
  data.expect_matches(ref::softmax(data.q.cview(), data.k.cview(), data.v.cview(), m.masks, 0, causal),
                      cpu_tolerance<T>());
}

template <class T>
void nystrom_case(const Shape& s, int M, Layout l, bool masks) {
  SCOPED_TRACE(describe(s, l) + " M=" + std::to_string(M) + (masks ? " masks" : ""));
  AttentionData<T> data(s.B, s.H, s.Hk, s.Nq, s.Nk, s.D, s.Dv, l);
  MaskSet m(s, masks);
  effattn::attention<Cpu>(effattn::Nystrom{M}, data.q.cview(), data.k.cview(), data.v.cview(), data.out.view,
                          m.masks);
  data.expect_matches(ref::nystrom(data.q.cview(), data.k.cview(), data.v.cview(), m.masks, M, 6, 0),
                      cpu_tolerance<T>());
}

template <class T>
void proxy_case(const Shape& s, int64_t M, int64_t proxy_batch, Layout l, bool masks, float dropout) {
  SCOPED_TRACE(describe(s, l) + " M=" + std::to_string(M) + " proxy batch " + std::to_string(proxy_batch) +
               (masks ? " masks" : "") + " dropout " + std::to_string(dropout));
  AttentionData<T> data(s.B, s.H, s.Hk, s.Nq, s.Nk, s.D, s.Dv, l);
  HostTensor<T> pq(proxy_batch, s.H, M, s.D, l), pk(proxy_batch, s.H, M, s.D, l);
  pq.fill_normal(1.5);
  pk.fill_normal(1.5);
  MaskSet m(s, masks);
  const uint64_t seed = rng()();
  effattn::attention<Cpu>(effattn::Proxy<T>{pq.cview(), pk.cview(), 6, dropout, seed}, data.q.cview(), data.k.cview(),
                          data.v.cview(), data.out.view, m.masks);
  data.expect_matches(ref::proxy(data.q.cview(), data.k.cview(), data.v.cview(), m.masks, pq.cview(), pk.cview(), 6,
                                 dropout, seed, 0),
                      cpu_tolerance<T>());
}

/// FAVOR positive or relu (normalizer condition 1: DESIGN.md's tolerance applies as is).
template <class T>
void favor_case(const Shape& s, int64_t M, FeatureMap map, Layout l, bool causal, bool masks) {
  SCOPED_TRACE(describe(s, l) + " M=" + std::to_string(M) + (map == FeatureMap::relu ? " relu" : " positive") +
               (causal ? " causal" : "") + (masks ? " masks" : ""));
  AttentionData<T> data(s.B, s.H, s.Hk, s.Nq, s.Nk, s.D, s.Dv, l);
  data.q.fill_normal();
  data.k.fill_normal();
  MaskSet m(s, masks);
  const std::vector<float> w = effattn::favor_projection(rng()(), int(s.H), int(M), int(s.D));
  const effattn::Tensor<const float> proj(w.data(), {1, s.H, M, s.D}, {s.H * M * s.D, M * s.D, s.D, 1});
  effattn::attention<Cpu>(effattn::Favor{proj, map, causal}, data.q.cview(), data.k.cview(), data.v.cview(),
                          data.out.view, m.masks);
  using Wide = std::conditional_t<std::is_same_v<T, double>, long double, double>;
  data.expect_matches(
      ref::favor<Wide>(data.q.cview(), data.k.cview(), data.v.cview(), m.masks, proj, map, causal, 0, 0),
      cpu_tolerance<T>());
}

template <class T>
class Audit : public ::testing::Test {};
using Types = ::testing::Types<float, double>;
TYPED_TEST_SUITE(Audit, Types);

// ---- M >= 200 -------------------------------------------------------------------------------------

// No other CPU operator call runs above 128 landmarks; CUDA supports up to 256. N not divisible by
// M, masks that empty segments, grouped heads, Dv != D.
TYPED_TEST(Audit, NystromWith200And256Landmarks) {
  nystrom_case<TypeParam>({1, 2, 1, 700, 700, 32, 24}, 200, Layout::bhsd, true);
  nystrom_case<TypeParam>({2, 1, 1, 777, 650, 32, 32}, 256, Layout::bshd, true);
  nystrom_case<TypeParam>({1, 1, 1, 1000, 1000, 16, 16}, 256, Layout::bhsd, false);
}

TYPED_TEST(Audit, ProxyWith200And256Proxies) {
  proxy_case<TypeParam>({2, 2, 1, 500, 450, 32, 24}, 200, 1, Layout::bhsd, true, 0.1f);
  proxy_case<TypeParam>({2, 1, 1, 300, 700, 32, 32}, 256, 2, Layout::padded, true, 0);
  proxy_case<TypeParam>({1, 1, 1, 600, 600, 16, 16}, 256, 1, Layout::bhsd, false, 0.3f);
}

// ---- a 2-row causal query tile ----------------------------------------------------------------------

// Nq ≡ 2 (mod 64): the last query tile (softmax) and causal chunk (FAVOR) has 2 rows, on the
// diagonal; with Nk - Nq > 0, = 0 and < 0.
constexpr std::pair<int64_t, int64_t> kTwoRowTiles[] = {{2, 2}, {2, 67}, {66, 66}, {130, 130},
                                                        {130, 386}, {258, 130}, {66, 300}};

TYPED_TEST(Audit, SoftmaxCausalTwoRowQueryTile) {
  for (auto [nq, nk] : kTwoRowTiles) {
    softmax_case<TypeParam>({2, 2, 1, nq, nk, 32, 32}, Layout::bhsd, true, false);
    softmax_case<TypeParam>({2, 2, 2, nq, nk, 16, 24}, Layout::bshd, true, true);
  }
}

TYPED_TEST(Audit, FavorCausalTwoRowQueryChunk) {
  for (auto [nq, nk] : kTwoRowTiles)
    for (FeatureMap map : {FeatureMap::positive, FeatureMap::relu}) {
      favor_case<TypeParam>({1, 2, 1, nq, nk, 32, 32}, 48, map, Layout::bhsd, true, false);
      favor_case<TypeParam>({2, 2, 2, nq, nk, 16, 24}, 40, map, Layout::bshd, true, true);
    }
}

// ---- innermost stride != 1 ----------------------------------------------------------------------------

// q, k, v and out (and the proxies) in views whose last dimension is not contiguous: every other
// element (stride 2) or transposed memory [B, H, D, S] (stride S); the packing paths see real input.
constexpr Layout kNonUnit[] = {Layout::strided, Layout::transposed};

TYPED_TEST(Audit, SoftmaxNonUnitInnermostStride) {
  for (Layout l : kNonUnit)
    for (bool causal : {false, true}) {
      softmax_case<TypeParam>({2, 2, 1, 130, 300, 32, 24}, l, causal, true);
      softmax_case<TypeParam>({1, 2, 2, 70, 70, 7, 9}, l, causal, false);
    }
}

TYPED_TEST(Audit, NystromNonUnitInnermostStride) {
  for (Layout l : kNonUnit) {
    nystrom_case<TypeParam>({2, 2, 1, 300, 280, 32, 24}, 16, l, true);
    nystrom_case<TypeParam>({1, 2, 2, 40, 300, 8, 8}, 64, l, false);  // the exact-softmax fallback
  }
}

TYPED_TEST(Audit, ProxyNonUnitInnermostStride) {
  for (Layout l : kNonUnit) {
    proxy_case<TypeParam>({2, 2, 1, 300, 280, 32, 24}, 16, 1, l, true, 0.2f);
    proxy_case<TypeParam>({2, 2, 2, 100, 130, 8, 12}, 8, 2, l, false, 0);
  }
}

TYPED_TEST(Audit, FavorNonUnitInnermostStride) {
  for (Layout l : kNonUnit)
    for (bool causal : {false, true}) {
      favor_case<TypeParam>({2, 2, 1, 130, 300, 32, 24}, 40, FeatureMap::positive, l, causal, true);
      favor_case<TypeParam>({1, 2, 2, 70, 70, 7, 9}, 16, FeatureMap::relu, l, causal, false);
    }
}

// ---- one generator per test -------------------------------------------------------------------------

// rng() restarts at seed_for(base seed, this test's full name) in every test, so a failing draw
// replays with EFFATTN_TEST_SEED=<base> and --gtest_filter=<this test> alone.
TEST(Audit, EachTestHasItsOwnGenerator) {
  const ::testing::TestInfo* info = ::testing::UnitTest::GetInstance()->current_test_info();
  const std::string name = std::string(info->test_suite_name()) + "." + info->name();
  EXPECT_EQ(name, "Audit.EachTestHasItsOwnGenerator");
  std::mt19937_64 expected(seed_for(base_seed(), name));
  for (int i = 0; i < 4; ++i) EXPECT_EQ(rng()(), expected());
  EXPECT_NE(seed_for(base_seed(), name), seed_for(base_seed(), "Audit.Other"));
  EXPECT_NE(seed_for(base_seed(), name), seed_for(base_seed() + 1, name));
}

}  // namespace
