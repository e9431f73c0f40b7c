// cpu::gemm, the landmark core's small product, against a long-double loop: every shape class
// (tails of the row tile and of both panel widths, k = 1), transposed and strided operands,
// alpha, accumulate, an output it must not read, and NaN propagation.
#include <effattn/cpu/gemm.hpp>

#include <cmath>
#include <limits>
#include <memory>
#include <random>
#include <vector>

#include "test_util.hpp"

namespace {

using effattn::cpu::MatrixView;
using testing_util::rng;

template <class T>
struct Strided {  // a [rows, cols] matrix stored with the given strides, padding poisoned
  std::vector<T> mem;
  MatrixView<T> v;
  Strided(int64_t rows, int64_t cols, bool transposed, int64_t pad) {
    const int64_t rs = transposed ? 1 : cols + pad, cs = transposed ? rows + pad : 1;
    mem.assign(size_t(std::max<int64_t>(1, (rows - 1) * rs + (cols - 1) * cs + 1)), std::numeric_limits<T>::quiet_NaN());
    v = {mem.data(), rows, cols, rs, cs};
    std::normal_distribution<double> nd;
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t c = 0; c < cols; ++c) v(r, c) = T(nd(rng()));
  }
  MatrixView<const T> in() const { return {v.data, v.rows, v.cols, v.row_stride, v.col_stride}; }
};

struct Aligned {  // the workspace, 64-byte aligned as the library hands it out
  std::vector<unsigned char> bytes;
  effattn::detail::Arena arena(size_t n) {
    bytes.assign(n + 64, 0);
    void* p = bytes.data();
    size_t space = bytes.size();
    std::align(64, n, p, space);
    return effattn::detail::Arena(p, n);
  }
};

template <class T>
class Gemm : public ::testing::Test {};
using Types = ::testing::Types<float, double>;
TYPED_TEST_SUITE(Gemm, Types);

TYPED_TEST(Gemm, MatchesTheLongDoubleProductWithinTheDotProductBound) {
  using T = TypeParam;
  EFFATTN_TRACE_SEED();
  const double eps = std::numeric_limits<T>::epsilon();
  Aligned ws;
  for (int64_t m : {1, 5, 13, 128})
    for (int64_t k : {1, 7, 128})
      for (int64_t n : {1, 9, 16, 33, 64, 100, 128})
        for (int form = 0; form < 4; ++form) {  // A plain / transposed × B plain / transposed
          const bool at = form & 1, bt = form & 2;
          for (bool accumulate : {false, true}) {
            SCOPED_TRACE("m=" + std::to_string(m) + " k=" + std::to_string(k) + " n=" + std::to_string(n) +
                         " form=" + std::to_string(form) + (accumulate ? " accumulate" : ""));
            const Strided<T> A(m, k, at, 3), B(k, n, bt, 2);
            Strided<T> C(m, n, false, 5);
            std::vector<T> before(C.mem);
            if (!accumulate)  // C is written, never read: poison it
              for (int64_t r = 0; r < m; ++r)
                for (int64_t c = 0; c < n; ++c) C.v(r, c) = std::numeric_limits<T>::quiet_NaN();
            const T alpha = T(-0.75);
            effattn::cpu::gemm<T>(A.in(), B.in(), alpha, accumulate, C.v,
                                  ws.arena(effattn::cpu::gemm_scratch_bytes<T>(k)));
            for (int64_t r = 0; r < m; ++r)
              for (int64_t c = 0; c < n; ++c) {
                long double dot = 0, mag = 0;
                for (int64_t i = 0; i < k; ++i) {
                  dot += (long double)A.v(r, i) * B.v(i, c);
                  mag += std::abs((long double)A.v(r, i) * B.v(i, c));
                }
                const size_t at_rc = size_t(&C.v(r, c) - C.mem.data());
                const long double want = (accumulate ? (long double)before[at_rc] : 0) + alpha * dot;
                // Forward error of a dot product of length k, then the scale and the add.
                const double bound = (k + 2) * eps * double(std::abs(alpha) * mag + std::abs(want)) + 1e-300;
                ASSERT_LE(std::abs(double(C.v(r, c) - want)), bound) << "C(" << r << ", " << c << ")";
              }
            for (size_t i = 0; i < C.mem.size(); ++i) {  // padding between C's rows untouched
              const int64_t r = int64_t(i) / C.v.row_stride, c = int64_t(i) % C.v.row_stride;
              if (c >= n || r >= m) {
                ASSERT_TRUE(std::isnan(C.mem[i])) << "wrote outside C at " << i;
              }
            }
          }
        }
}

TYPED_TEST(Gemm, NaNInARowOfAOrAColumnOfBReachesExactlyItsOutputs) {
  using T = TypeParam;
  EFFATTN_TRACE_SEED();
  Aligned ws;
  const int64_t m = 19, k = 40, n = 70;
  Strided<T> A(m, k, false, 0), B(k, n, true, 1);
  A.v(4, 11) = std::numeric_limits<T>::quiet_NaN();
  B.v(27, 65) = std::numeric_limits<T>::infinity();
  Strided<T> C(m, n, false, 0);
  effattn::cpu::gemm<T>(A.in(), B.in(), T(1), false, C.v, ws.arena(effattn::cpu::gemm_scratch_bytes<T>(k)));
  for (int64_t r = 0; r < m; ++r)
    for (int64_t c = 0; c < n; ++c) {
      const bool hit = r == 4 || c == 65;
      EXPECT_EQ(!std::isfinite(C.v(r, c)), hit) << "C(" << r << ", " << c << ") = " << C.v(r, c);
    }
}

}  // namespace
