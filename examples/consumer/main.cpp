// The smallest program on an installed effattn: exact softmax attention on the CPU, checked
// against a direct computation of one output row, and Nyström attention with as many landmarks
// as tokens, which DESIGN.md defines to be exact (so the installed headers hold every operator).
#include <effattn/effattn.hpp>

#include <cmath>
#include <cstdio>
#include <vector>

int main() {
  const int64_t B = 1, H = 2, N = 100, D = 32;
  std::vector<float> q(B * H * N * D), k(q.size()), v(q.size()), out(q.size());
  for (size_t i = 0; i < q.size(); ++i) {
    q[i] = std::sin(0.37f * i);
    k[i] = std::cos(0.11f * i);
    v[i] = std::sin(0.05f * i + 1.0f);
  }
  effattn::attention<effattn::Cpu>(effattn::Softmax{}, effattn::bhsd<const float>(q.data(), B, H, N, D),
                                   effattn::bhsd<const float>(k.data(), B, H, N, D),
                                   effattn::bhsd<const float>(v.data(), B, H, N, D),
                                   effattn::bhsd(out.data(), B, H, N, D));
  // Row 0 of head 0, directly: softmax(q0 . k_j / sqrt(D)) v_j.
  std::vector<double> w(N);
  double sum = 0, max_err = 0;
  for (int64_t j = 0; j < N; ++j) {
    double dot = 0;
    for (int64_t c = 0; c < D; ++c) dot += q[c] * k[j * D + c];
    sum += w[j] = std::exp(dot / std::sqrt(double(D)));
  }
  for (int64_t c = 0; c < D; ++c) {
    double o = 0;
    for (int64_t j = 0; j < N; ++j) o += w[j] / sum * v[j * D + c];
    max_err = std::fmax(max_err, std::fabs(o - out[c]));
  }
  std::printf("consumer: softmax attention row 0, max |error| = %.2e\n", max_err);

  std::vector<float> out_nystrom(q.size());
  effattn::Nystrom nystrom;
  nystrom.landmarks = N;
  effattn::attention<effattn::Cpu>(nystrom, effattn::bhsd<const float>(q.data(), B, H, N, D),
                                   effattn::bhsd<const float>(k.data(), B, H, N, D),
                                   effattn::bhsd<const float>(v.data(), B, H, N, D),
                                   effattn::bhsd(out_nystrom.data(), B, H, N, D));
  double nystrom_diff = 0;
  for (size_t i = 0; i < out.size(); ++i) nystrom_diff = std::fmax(nystrom_diff, std::fabs(out_nystrom[i] - out[i]));
  std::printf("consumer: nystrom with %d landmarks vs softmax, max |difference| = %.2e\n", nystrom.landmarks,
              nystrom_diff);
  return max_err < 1e-5 && nystrom_diff < 1e-5 ? 0 : 1;
}
