// Helpers of the backward suites: owned, poisoned gradient buffers, their check against a float64
// reference, and directional finite differences of a float64 forward reference.
#pragma once
#include <functional>
#include <random>
#include <vector>

#include "test_util.hpp"

namespace testing_util {

/// Gradient buffers shaped like q, k, v (and optionally the proxies), NaN-poisoned with a sentinel
/// around each view, so expect_matches sees every element written and nothing outside.
template <class T>
struct GradData {
  HostTensor<T> dq, dk, dv;
  std::vector<HostTensor<T>> dproxy;  // [0] dproxy_q, [1] dproxy_k when the method has proxies
  template <class U>
  GradData(const Tensor<U>& q, const Tensor<U>& k, const Tensor<U>& v, Layout layout)
      : dq(q.shape[0], q.shape[1], q.shape[2], q.shape[3], layout),
        dk(k.shape[0], k.shape[1], k.shape[2], k.shape[3], layout),
        dv(v.shape[0], v.shape[1], v.shape[2], v.shape[3], layout) {
    for (auto* t : {&dq, &dk, &dv}) prepare(*t);
  }
  template <class U>
  void add_proxies(const Tensor<U>& pq, const Tensor<U>& pk, Layout layout) {
    dproxy.emplace_back(pq.shape[0], pq.shape[1], pq.shape[2], pq.shape[3], layout);
    dproxy.emplace_back(pk.shape[0], pk.shape[1], pk.shape[2], pk.shape[3], layout);
    for (auto& t : dproxy) prepare(t);
  }
  effattn::Grads<T> grads() {
    effattn::Grads<T> g{dq.view, dk.view, dv.view, {}, {}};
    if (!dproxy.empty()) g.dproxy_q = dproxy[0].view, g.dproxy_k = dproxy[1].view;
    return g;
  }
  static T sentinel() { return T(-777); }
  /// Each gradient within `tolerance` of the reference, relative to the largest element of its
  /// magnitude (ref::Grads::size).
  void expect_matches(const ref::Grads& r, double tolerance) const {
    const char* names[5] = {"dq", "dk", "dv", "dproxy_q", "dproxy_k"};
    const HostTensor<T>* mine[5] = {&dq, &dk, &dv, dproxy.empty() ? nullptr : &dproxy[0],
                                    dproxy.empty() ? nullptr : &dproxy[1]};
    const ref::Result* theirs[5] = {&r.dq, &r.dk, &r.dv, &r.dproxy_q, &r.dproxy_k};
    const ref::Result* sizes[5] = {&r.size.dq, &r.size.dk, &r.size.dv, &r.size.dproxy_q, &r.size.dproxy_k};
    for (int i = 0; i < 5; ++i) {
      if (mine[i] == nullptr) continue;
      SCOPED_TRACE(names[i]);
      EXPECT_LE(relative_error(mine[i]->view, *theirs[i], sizes[i]), tolerance) << names[i];
      EXPECT_TRUE(outside_untouched(*mine[i], sentinel())) << "wrote outside the " << names[i] << " view";
    }
  }

 private:
  static void prepare(HostTensor<T>& t) {
    t.poison();
    mark_outside(t, sentinel());
  }
};

/// One backward problem: AttentionData's inputs, masks (the last sequence has no valid key, the
/// first of 3+ no valid query), a random upstream gradient dout, and the forward's out.
template <class T>
struct BackwardData {
  AttentionData<T> data;
  HostTensor<T> dout;
  std::vector<uint8_t> qm, km;
  effattn::Masks masks;
  BackwardData(int64_t B, int64_t H, int64_t Hk, int64_t Nq, int64_t Nk, int64_t D, int64_t Dv, bool with_masks,
               Layout layout)
      : data(B, H, Hk, Nq, Nk, D, Dv, layout), dout(B, H, Nq, Dv, layout) {
    dout.fill_normal();
    if (with_masks) {
      km = random_mask(B, Nk, 0.7, B > 1 ? B - 1 : -1);
      qm = random_mask(B, Nq, 0.8, B > 2 ? 0 : -1);
      masks = {qm.data(), Nq, km.data(), Nk};
    }
  }
  /// The forward; `saving`: the training forward (attention_with_saved), whose block, poisoned
  /// first, the backward then reads (attention_backward_with_saved).
  template <class Method>
  void forward(const Method& m, bool saving = false, int threads = 0) {
    const effattn::Exec<effattn::Cpu> exec{threads};
    if (!saving) {
      saved = {};
      effattn::attention<effattn::Cpu>(m, data.q.cview(), data.k.cview(), data.v.cview(), data.out.view, masks, exec);
      return;
    }
    const size_t bytes = effattn::saved_bytes<effattn::Cpu>(m, data.q.cview(), data.k.cview(), data.v.cview());
    saved_block.assign(bytes / 8 + 8, ~uint64_t(0));  // NaN bit patterns; 64-byte aligned below
    auto* base = reinterpret_cast<unsigned char*>(saved_block.data());
    base += (64 - reinterpret_cast<uintptr_t>(base) % 64) % 64;
    saved = {bytes > 0 ? base : nullptr, bytes};
    effattn::attention_with_saved<effattn::Cpu>(m, data.q.cview(), data.k.cview(), data.v.cview(), data.out.view,
                                                saved, masks, exec);
  }
  template <class Method>
  void backward(const Method& m, const effattn::Grads<T>& g, int threads = 0) {
    const effattn::Exec<effattn::Cpu> exec{threads};
    if (saved.data != nullptr)
      effattn::attention_backward_with_saved<effattn::Cpu>(m, data.q.cview(), data.k.cview(), data.v.cview(),
                                                           data.out.cview(), dout.cview(), saved, g, masks, exec);
    else
      effattn::attention_backward<effattn::Cpu>(m, data.q.cview(), data.k.cview(), data.v.cview(), data.out.cview(),
                                                dout.cview(), g, masks, exec);
  }
  effattn::Saved saved;
  std::vector<uint64_t> saved_block;
};

/// Sum over the view of a (a Tensor) times b (a reference Result of the same logical shape).
template <class T>
double dot(const Tensor<T>& a, const ref::Result& b) {
  double s = 0;
  for (int64_t i = 0; i < b.B; ++i)
    for (int64_t h = 0; h < b.H; ++h)
      for (int64_t n = 0; n < b.N; ++n)
        for (int64_t c = 0; c < b.Dv; ++c) s += ref::at(a, i, h, n, c) * b(i, h, n, c);
  return s;
}

/// Directional finite differences of a float64 forward: for inputs x (contiguous double tensors)
/// and directions δ of the same shapes, compares d/dt ⟨dO, f(x + tδ)⟩ at t = 0 (5-point stencil,
/// error O(h⁴)) with the analytic ⟨grad, δ⟩ = Σ ⟨grads[i], δ[i]⟩. Returns |fd − analytic| divided
/// by Σ |grad · δ| elementwise (the size of the terms, so cancellation cannot hide an error).
/// `branches`, when set, reports the forward's discrete choices (an arg-max, a step count): where
/// they differ across the stencil f is not smooth there, and the step shrinks until they agree.
struct DirectionalCheck {
  std::vector<HostTensor<double>*> inputs;
  std::vector<const ref::Result*> grads;  // the analytic gradient of each input
  std::function<double()> objective;      // ⟨dO, f(inputs)⟩ at the inputs' current values
  std::function<std::vector<int64_t>()> branches = nullptr;
  double step = 1e-3;
  double converged = 1e-10;  // two estimates this close (relative to the terms' size) have converged

  double relative_error() {
    std::normal_distribution<double> n(0.0, 1.0);
    std::vector<std::vector<double>> dirs;
    double analytic = 0, size = 0;
    for (size_t i = 0; i < inputs.size(); ++i) {
      std::vector<double> d(inputs[i]->storage.size());
      for (double& x : d) x = n(rng());
      const auto& v = inputs[i]->view;
      const ref::Result& g = *grads[i];
      for (int64_t b = 0; b < g.B; ++b)
        for (int64_t h = 0; h < g.H; ++h)
          for (int64_t s = 0; s < g.N; ++s)
            for (int64_t c = 0; c < g.Dv; ++c) {
              const double term = g(b, h, s, c) * d[static_cast<size_t>(v.offset(b, h, s, c))];
              analytic += term;
              size += std::abs(term);
            }
      dirs.push_back(std::move(d));
    }
    // f at x + tδ, and whether the forward made the same discrete choices there as at x.
    std::vector<int64_t> center;
    if (branches) center = branches();
    const auto at = [&](double t, bool& same) {
      std::vector<std::vector<double>> saved;
      for (size_t i = 0; i < inputs.size(); ++i) {
        saved.push_back(inputs[i]->storage);
        for (size_t e = 0; e < dirs[i].size(); ++e) inputs[i]->storage[e] += t * dirs[i][e];
      }
      const double f = objective();
      if (branches) same = same && branches() == center;
      for (size_t i = 0; i < inputs.size(); ++i) inputs[i]->storage = saved[i];
      return f;
    };
    // The stencil's truncation error is O(h⁴) times f's fifth derivative, which can be large (six
    // Newton–Schulz steps compound it), and rounding grows as eps·|f|/h: walk h down by 4 and take
    // the first estimate that agrees with the one before (Richardson: their gap bounds the coarser
    // one's truncation error), else the pair that agrees best. The analytic side plays no part in
    // picking h, so a wrong gradient still shows.
    double previous = 0, best_gap = -1, best_fd = 0;
    bool have_previous = false;
    for (double h = step; h > step * 1e-5; h /= 4) {
      bool same = true;
      const double fd = (at(-2 * h, same) - 8 * at(-h, same) + 8 * at(h, same) - at(2 * h, same)) / (12 * h);
      if (!same) {  // a branch changes within the stencil: closer, and start a fresh pair
        have_previous = false;
        continue;
      }
      if (have_previous) {
        const double gap = std::abs(fd - previous);
        if (best_gap < 0 || gap < best_gap) best_gap = gap, best_fd = fd;
        if (gap <= converged * std::max(size, 1e-300)) break;
      }
      previous = fd;
      have_previous = true;
    }
    if (best_gap < 0) {
      ADD_FAILURE() << "no two steps down to " << step * 1e-5 << " keep the forward's branches fixed";
      return 0;
    }
    return size > 0 ? std::abs(best_fd - analytic) / size : std::abs(best_fd - analytic);
  }
};

/// ⟨dO, r⟩ over a reference result.
inline double inner(const ref::Result& dO, const ref::Result& r) {
  double s = 0;
  for (size_t i = 0; i < r.a.size(); ++i) s += dO.a[i] * r.a[i];
  return s;
}

/// A double copy of a view, contiguous [B, H, S, D].
template <class T>
HostTensor<double> to_double(const Tensor<T>& t) {
  HostTensor<double> c(t.shape[0], t.shape[1], t.shape[2], t.shape[3]);
  for (int64_t b = 0; b < t.shape[0]; ++b)
    for (int64_t h = 0; h < t.shape[1]; ++h)
      for (int64_t s = 0; s < t.shape[2]; ++s)
        for (int64_t d = 0; d < t.shape[3]; ++d) c.view(b, h, s, d) = ref::at(t, b, h, s, d);
  return c;
}

/// A view's values as a reference Result (contiguous double).
template <class T>
ref::Result as_result(const Tensor<T>& t) {
  ref::Result r(t.shape[0], t.shape[1], t.shape[2], t.shape[3]);
  for (int64_t b = 0; b < r.B; ++b)
    for (int64_t h = 0; h < r.H; ++h)
      for (int64_t s = 0; s < r.N; ++s)
        for (int64_t d = 0; d < r.Dv; ++d) r(b, h, s, d) = ref::at(t, b, h, s, d);
  return r;
}

}  // namespace testing_util
