// Helpers shared by the test suites: owned host tensors in several layouts, fresh random data,
// poisoned outputs, masks and the relative-error comparison of DESIGN.md.
#pragma once
#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <cstdint>
#include <cstdlib>
#include <limits>
#include <random>
#include <initializer_list>
#include <string>
#include <type_traits>
#include <vector>

#include "effattn/core.hpp"
#include "reference/common.hpp"

namespace testing_util {

using effattn::Tensor;

/// Seed for this process: EFFATTN_TEST_SEED if set (to reproduce a failure), else fresh.
inline uint64_t base_seed() {
  static const uint64_t seed = [] {
    if (const char* s = std::getenv("EFFATTN_TEST_SEED")) return static_cast<uint64_t>(std::strtoull(s, nullptr, 10));
    return (static_cast<uint64_t>(std::random_device{}()) << 32) ^ std::random_device{}();
  }();
  return seed;
}

/// The seed of one test: the base seed mixed with the test's full name (suite.name), so a test's
/// draws do not depend on which tests ran before it.
inline uint64_t seed_for(uint64_t base, const std::string& full_name) {
  uint64_t h = 0xcbf29ce484222325ull;  // FNV-1a of the name
  for (unsigned char c : full_name) h = (h ^ c) * 0x100000001b3ull;
  uint64_t z = base ^ h;  // then a splitmix64 finalizer
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

/// A generator per test: reseeded with seed_for(base_seed(), name) as each test starts (by the
/// listener below), so EFFATTN_TEST_SEED=<base> ./test --gtest_filter=<name> replays exactly the
/// draws of that test; a failing test prints that command line.
inline std::mt19937_64& rng() {
  static std::mt19937_64 gen(base_seed());
  return gen;
}

/// Reseeds rng() per test and prints how to replay a failing one.
class SeedListener : public ::testing::EmptyTestEventListener {
 public:
  static std::string full_name(const ::testing::TestInfo& t) {
    return std::string(t.test_suite_name()) + "." + t.name();
  }
  void OnTestStart(const ::testing::TestInfo& t) override { rng().seed(seed_for(base_seed(), full_name(t))); }
  void OnTestEnd(const ::testing::TestInfo& t) override {
    if (t.result() != nullptr && t.result()->Failed())
      std::printf("[ replay   ] EFFATTN_TEST_SEED=%llu <this test binary> --gtest_filter='%s'\n",
                  static_cast<unsigned long long>(base_seed()), full_name(t).c_str());
  }
};
inline const bool seed_listener_installed = [] {
  ::testing::UnitTest::GetInstance()->listeners().Append(new SeedListener);  // gtest owns it
  return true;
}();

// padded: bhsd with gaps between rows and heads; strided: bhsd with every element two apart
// (innermost stride 2); transposed: [B, H, D, S] memory (innermost, dim, stride S).
enum class Layout { bhsd, bshd, padded, strided, transposed };

inline const char* layout_name(Layout l) {
  switch (l) {
    case Layout::bhsd: return "bhsd";
    case Layout::bshd: return "bshd";
    case Layout::padded: return "padded";
    case Layout::strided: return "strided";
    case Layout::transposed: return "transposed";
  }
  return "?";
}

/// Owns storage for a logical [B, H, S, D] tensor in the given layout.
template <class T>
struct HostTensor {
  std::vector<T> storage;
  Tensor<T> view;
  HostTensor(int64_t b, int64_t h, int64_t s, int64_t d, Layout layout = Layout::bhsd) {
    if (layout == Layout::bshd) {
      storage.resize(static_cast<size_t>(b * s * h * d));
      view = effattn::bshd(storage.data(), b, s, h, d);
    } else if (layout == Layout::padded) {
      const int64_t row = d + 3, head = s * row + 5, batch = h * head + 7;
      storage.resize(static_cast<size_t>(b * batch));
      view = Tensor<T>(storage.data(), {b, h, s, d}, {batch, head, row, 1});
    } else if (layout == Layout::strided) {
      storage.resize(static_cast<size_t>(2 * b * h * s * d));
      view = Tensor<T>(storage.data(), {b, h, s, d}, {2 * h * s * d, 2 * s * d, 2 * d, 2});
    } else if (layout == Layout::transposed) {
      storage.resize(static_cast<size_t>(b * h * s * d));
      view = Tensor<T>(storage.data(), {b, h, s, d}, {h * d * s, d * s, 1, s});
    } else {
      storage.resize(static_cast<size_t>(b * h * s * d));
      view = effattn::bhsd(storage.data(), b, h, s, d);
    }
  }
  Tensor<const T> cview() const { return view; }
  void fill_normal(double stddev = 1.0) {
    std::normal_distribution<double> n(0.0, stddev);
    for (auto& x : storage) x = static_cast<T>(n(rng()));
  }
  void poison() { std::fill(storage.begin(), storage.end(), std::numeric_limits<T>::quiet_NaN()); }
};

/// Random validity mask [B, N]; row `fully_masked_row` (if >= 0) has no valid entry.
inline std::vector<uint8_t> random_mask(int64_t B, int64_t N, double p_valid, int64_t fully_masked_row = -1) {
  std::bernoulli_distribution keep(p_valid);
  std::vector<uint8_t> m(static_cast<size_t>(B * N));
  for (int64_t b = 0; b < B; ++b)
    for (int64_t i = 0; i < N; ++i) m[b * N + i] = (b != fully_masked_row && keep(rng())) ? 1 : 0;
  return m;
}

/// max |out - ref| / max |ref| over all elements (or / max |size| when given: the magnitude of the
/// terms that make each element, see ref::Grads); fails the test on any non-finite output (a
/// poisoned element that was never written stays NaN).
template <class T>
double relative_error(const Tensor<T>& out, const ref::Result& r, const ref::Result* size = nullptr) {
  double max_diff = 0, max_ref = 0;
  int64_t bad = 0;
  for (int64_t b = 0; b < r.B; ++b)
    for (int64_t h = 0; h < r.H; ++h)
      for (int64_t i = 0; i < r.N; ++i)
        for (int64_t c = 0; c < r.Dv; ++c) {
          const double o = ref::at(out, b, h, i, c), e = r(b, h, i, c);
          if (!std::isfinite(o)) {
            if (bad++ < 3) ADD_FAILURE() << "out(" << b << "," << h << "," << i << "," << c << ") = " << o;
            continue;
          }
          max_diff = std::max(max_diff, std::abs(o - e));
          max_ref = std::max(max_ref, std::abs(size != nullptr ? (*size)(b, h, i, c) : e));
        }
  EXPECT_EQ(bad, 0) << "non-finite or unwritten output elements";
  return max_ref > 0 ? max_diff / max_ref : max_diff;
}

/// Storage outside the view must be untouched: fills it with a sentinel before the call
/// (call mark_outside), and checks it after (call outside_untouched).
template <class T>
std::vector<uint8_t> covered(const HostTensor<T>& t) {
  std::vector<uint8_t> in(t.storage.size(), 0);
  const auto& v = t.view;
  for (int64_t b = 0; b < v.shape[0]; ++b)
    for (int64_t h = 0; h < v.shape[1]; ++h)
      for (int64_t s = 0; s < v.shape[2]; ++s)
        for (int64_t d = 0; d < v.shape[3]; ++d) in[static_cast<size_t>(v.offset(b, h, s, d))] = 1;
  return in;
}
template <class T>
void mark_outside(HostTensor<T>& t, T sentinel) {
  const auto in = covered(t);
  for (size_t i = 0; i < in.size(); ++i)
    if (!in[i]) t.storage[i] = sentinel;
}
template <class T>
bool outside_untouched(const HostTensor<T>& t, T sentinel) {
  const auto in = covered(t);
  for (size_t i = 0; i < in.size(); ++i)
    if (!in[i] && !(t.storage[i] == sentinel)) return false;
  return true;
}

/// The owned tensors of one attention problem, ready for a call: q and k drawn from N(0, 1.5²),
/// v from N(0, 1), out poisoned with NaN and its storage outside the view set to a sentinel, so
/// expect_matches can check every element was written and nothing outside `out`.
template <class T>
struct AttentionData {
  HostTensor<T> q, k, v, out;
  AttentionData(int64_t B, int64_t H, int64_t Hk, int64_t Nq, int64_t Nk, int64_t D, int64_t Dv, Layout layout)
      : q(B, H, Nq, D, layout), k(B, Hk, Nk, D, layout), v(B, Hk, Nk, Dv, layout), out(B, H, Nq, Dv, layout) {
    q.fill_normal(1.5);
    k.fill_normal(1.5);
    v.fill_normal();
    out.poison();
    mark_outside(out, sentinel());
  }
  static T sentinel() { return T(12345); }
  /// out against the reference within `tolerance`, and the storage around the view untouched.
  void expect_matches(const ref::Result& r, double tolerance) const {
    EXPECT_LE(relative_error(out.view, r), tolerance);
    EXPECT_TRUE(outside_untouched(out, sentinel())) << "wrote outside the out view";
  }
};

/// Runs f and expects effattn::Error whose message contains every one of `parts`.
template <class F>
void expect_error(F&& f, std::initializer_list<std::string> parts) {
  try {
    f();
    ADD_FAILURE() << "no effattn::Error thrown";
  } catch (const effattn::Error& e) {
    const std::string what = e.what();
    for (const std::string& part : parts)
      EXPECT_NE(what.find(part), std::string::npos) << "message: " << what << "\nmissing: " << part;
  }
}

/// Whether a method struct has a `causal` field (Nystrom and Proxy must not: DESIGN.md forbids it).
template <class M, class = void>
struct has_causal : std::false_type {};
template <class M>
struct has_causal<M, std::void_t<decltype(std::declval<M>().causal)>> : std::true_type {};

/// The tolerance DESIGN.md sets for the CPU backend.
template <class T>
constexpr double cpu_tolerance() {
  return std::is_same_v<T, double> ? 1e-12 : 1e-5;
}

}  // namespace testing_util

#define EFFATTN_TRACE_SEED() SCOPED_TRACE("EFFATTN_TEST_SEED=" + std::to_string(testing_util::base_seed()))
