// Bad input that must not slip through: thread counts beyond the documented bound, an output
// overlapping a mask, a caller workspace overlapping anything the call reads or writes (forward
// and backward), a workspace size without a pointer, and partial overlaps that end or start at a
// single element. Each case lays the buffers out inside one block, so a check that misses them
// writes inside memory the test owns (and fails on the result) instead of corrupting the heap.
#include <effattn/effattn.hpp>

#include <cstring>

#include "reference/softmax.hpp"
#include "test_util.hpp"

namespace {

using namespace testing_util;
using effattn::Cpu;
using effattn::Exec;
using effattn::Tensor;

// ---- threads -----------------------------------------------------------------------------------

TEST(Hardening, ThreadCountAboveTheLimitIsAnError) {
  HostTensor<float> q(1, 2, 20, 8), k(1, 2, 20, 8), v(1, 2, 20, 8), out(1, 2, 20, 8);
  for (auto* t : {&q, &k, &v}) t->fill_normal();
  const effattn::Proxy<float> proxy{q.cview(), k.cview()};
  const std::vector<float> w = effattn::favor_projection(1, 2, 16, 8);
  const effattn::Favor favor{Tensor<const float>(w.data(), {1, 2, 16, 8}, {256, 128, 8, 1})};
  for (int threads : {Exec<Cpu>::max_threads + 1, 20000, 100000, std::numeric_limits<int>::max()}) {
    SCOPED_TRACE(threads);
    const Exec<Cpu> exec{threads};
    const std::string seen = "exec.threads = " + std::to_string(threads);
    const std::string range = "[0, " + std::to_string(Exec<Cpu>::max_threads) + "]";
    expect_error([&] { effattn::attention<Cpu>(effattn::Softmax{}, q.cview(), k.cview(), v.cview(), out.view, {}, exec); },
                 {seen, range});
    expect_error([&] { effattn::attention<Cpu>(effattn::Nystrom{4}, q.cview(), k.cview(), v.cview(), out.view, {}, exec); },
                 {seen});
    expect_error([&] { effattn::attention<Cpu>(proxy, q.cview(), k.cview(), v.cview(), out.view, {}, exec); }, {seen});
    expect_error([&] { effattn::attention<Cpu>(favor, q.cview(), k.cview(), v.cview(), out.view, {}, exec); }, {seen});
    expect_error([&] { (void)effattn::workspace_bytes<Cpu>(effattn::Softmax{}, q.view, k.view, v.view, exec); },
                 {seen});
    HostTensor<float> dq(1, 2, 20, 8), dk(1, 2, 20, 8), dv(1, 2, 20, 8);
    expect_error(
        [&] {
          effattn::attention_backward<Cpu>(effattn::Softmax{}, q.cview(), k.cview(), v.cview(), out.cview(),
                                           v.cview(), effattn::Grads<float>{dq.view, dk.view, dv.view, {}, {}}, {}, exec);
        },
        {seen});
  }
}

// The limit itself runs (one thread per work item here: 1024 heads of one query tile each) and
// gives the reference result; the workspace is reserved for the work items, not for the threads.
TEST(Hardening, ThreadCountAtTheLimitRunsAndIsCappedAtTheWork) {
  const int64_t H = Exec<Cpu>::max_threads;
  HostTensor<float> q(1, H, 5, 4), k(1, H, 5, 4), v(1, H, 5, 4), out(1, H, 5, 4);
  for (auto* t : {&q, &k, &v}) t->fill_normal();
  out.poison();
  effattn::attention<Cpu>(effattn::Softmax{}, q.cview(), k.cview(), v.cview(), out.view, {},
                          Exec<Cpu>{Exec<Cpu>::max_threads});
  EXPECT_LE(relative_error(out.view, ref::softmax(q.cview(), k.cview(), v.cview(), {}, 0, false)), 1e-5);
  HostTensor<float> small(1, 1, 100, 16);  // 2 query tiles: 2 work items
  const auto bytes = [&](int threads) {
    return effattn::workspace_bytes<Cpu>(effattn::Softmax{}, small.view, small.view, small.view, Exec<Cpu>{threads});
  };
  EXPECT_EQ(bytes(Exec<Cpu>::max_threads), bytes(2));
  EXPECT_EQ(bytes(2), 2 * bytes(1));
}

// ---- one block, several views inside it ----------------------------------------------------------

/// An aligned block of floats in which a test places q, k, v, out, masks and a workspace where it
/// wants them (offsets in floats; everything starts 64-byte aligned when the offset is a multiple
/// of 16).
struct Block {
  std::vector<float> storage;
  float* base;
  explicit Block(size_t floats) : storage(floats + 16) {
    auto p = reinterpret_cast<uintptr_t>(storage.data());
    base = reinterpret_cast<float*>((p + 63) / 64 * 64);
    std::normal_distribution<float> n(0.f, 1.f);
    for (auto& x : storage) x = n(rng());
  }
  float* at(size_t offset) { return base + offset; }
  uint8_t* bytes(size_t offset) { return reinterpret_cast<uint8_t*>(base + offset); }
};

constexpr int64_t kB = 2, kH = 2, kN = 16, kD = 8;
constexpr size_t kView = size_t(kB * kH * kN * kD);  // floats in one contiguous [B, H, N, D] view

Tensor<float> view_at(Block& blk, size_t offset) { return effattn::bhsd(blk.at(offset), kB, kH, kN, kD); }

void set_mask_ones(uint8_t* m, int64_t stride, int64_t n) {
  for (int64_t b = 0; b < kB; ++b) std::memset(m + b * stride, 1, size_t(n));
}

TEST(Hardening, OutStartingAtTheLastElementOfAnInput) {
  // q, k, v and out contiguous in one block, out shifted back by one element onto each input in
  // turn (q, then k alone, then v alone: k and v never share memory here).
  const char* names[3] = {"q", "k", "v"};
  for (int victim = 0; victim < 3; ++victim) {
    SCOPED_TRACE(names[victim]);
    Block blk(4 * kView + 64);
    // The victim first; out from its last element on; the two other inputs after out.
    Tensor<float> in[3];
    for (int j = 0, slot = 2; j < 3; ++j)
      in[j] = j == victim ? view_at(blk, 0) : view_at(blk, size_t(slot++) * (kView + 16));
    float* out_start = in[victim].data + kView - 1;
    Tensor<float> out = effattn::bhsd(out_start, kB, kH, kN, kD);
    ASSERT_LE(out.data + kView, blk.at(4 * kView + 64));
    for (int j = 0; j < 3; ++j)
      if (j != victim) {
        ASSERT_FALSE(effattn::detail::overlaps(in[j], out)) << "test layout: " << names[j];
      }
    expect_error(
        [&] {
          effattn::attention<Cpu>(effattn::Softmax{}, Tensor<const float>(in[0]), Tensor<const float>(in[1]),
                                  Tensor<const float>(in[2]), out);
        },
        {std::string("out overlaps input ") + names[victim]});
  }
}

TEST(Hardening, OutAdjacentToAnInputIsFine) {
  Block blk(3 * kView + 32 + kView);
  const Tensor<float> q = view_at(blk, 0), k = view_at(blk, kView), v = view_at(blk, 2 * kView);
  Tensor<float> out = view_at(blk, 3 * kView);  // starts right after v's last element
  const auto r = ref::softmax(Tensor<const float>(q), Tensor<const float>(k), Tensor<const float>(v), {}, 0, false);
  effattn::attention<Cpu>(effattn::Softmax{}, Tensor<const float>(q), Tensor<const float>(k), Tensor<const float>(v),
                          out);
  EXPECT_LE(relative_error(out, r), 1e-5);
}

// The mask byte range of a [B, N] mask with batch stride st is [base, base + (B − 1)·st + N).
TEST(Hardening, OutOverlappingAMask) {
  for (bool key : {false, true}) {
    SCOPED_TRACE(key ? "key mask" : "query mask");
    for (int64_t stride : {int64_t(0), kN, kN + 40}) {
      SCOPED_TRACE("batch stride " + std::to_string(stride));
      const int64_t reach = (kB - 1) * stride + kN;  // bytes the mask spans
      Block blk(4 * kView + 256);
      const Tensor<float> q = view_at(blk, 0), k = view_at(blk, kView), v = view_at(blk, 2 * kView);
      Tensor<float> out = view_at(blk, 3 * kView + 64);
      uint8_t* out_bytes = reinterpret_cast<uint8_t*>(out.data);
      const auto run = [&](uint8_t* mask) {
        set_mask_ones(mask, stride, kN);
        effattn::Masks m;
        if (key)
          m = {nullptr, 0, mask, stride};
        else
          m = {mask, stride, nullptr, 0};
        effattn::attention<Cpu>(effattn::Softmax{}, Tensor<const float>(q), Tensor<const float>(k),
                                Tensor<const float>(v), out, m);
      };
      const std::string name = key ? "out overlaps masks.key_valid" : "out overlaps masks.query_valid";
      // The mask's last byte is out's first byte: only the last batch row (at (B - 1)·st) touches out.
      expect_error([&] { run(out_bytes - reach + 1); }, {name});
      // The mask starts at out's last byte.
      expect_error([&] { run(out_bytes + kView * sizeof(float) - 1); }, {name});
      // The mask ends right where out starts: no overlap, the call runs.
      out.data[0] = NAN;
      run(out_bytes - reach);
      EXPECT_TRUE(std::isfinite(out.data[0]));
    }
  }
}

// ---- the caller's workspace -----------------------------------------------------------------------

TEST(Hardening, WorkspaceSizeWithoutAPointerIsAnError) {
  HostTensor<float> q(1, 2, 20, 8), out(1, 2, 20, 8), dq(1, 2, 20, 8), dk(1, 2, 20, 8), dv(1, 2, 20, 8);
  q.fill_normal();
  const Exec<Cpu> exec{1, nullptr, 4096};
  const auto message = {std::string("exec.workspace is null but exec.workspace_size = 4096")};
  expect_error([&] { effattn::attention<Cpu>(effattn::Softmax{}, q.cview(), q.cview(), q.cview(), out.view, {}, exec); },
               message);
  expect_error([&] { effattn::attention<Cpu>(effattn::Nystrom{4}, q.cview(), q.cview(), q.cview(), out.view, {}, exec); },
               message);
  HostTensor<float> lse(1, 2, 20, 1);
  expect_error(
      [&] {
        effattn::attention_with_lse<Cpu>(effattn::Softmax{}, q.cview(), q.cview(), q.cview(), out.view, lse.view, {},
                                         exec);
      },
      message);
  expect_error(
      [&] {
        effattn::attention_backward<Cpu>(effattn::Softmax{}, q.cview(), q.cview(), q.cview(), out.cview(), out.cview(),
                                         effattn::Grads<float>{dq.view, dk.view, dv.view, {}, {}}, {}, exec);
      },
      message);
}

/// A softmax problem inside one block, with room at the front for a workspace of `ws_floats`.
struct WorkspaceProblem {
  size_t ws_floats;
  Block blk;
  Tensor<float> q, k, v, out, dout, dq, dk, dv;
  uint8_t* qmask;
  uint8_t* kmask;
  explicit WorkspaceProblem(size_t ws)
      : ws_floats(ws), blk(ws + 8 * kView + 8 * 16 + 64),
        q(view_at(blk, ws)), k(view_at(blk, ws + kView + 16)), v(view_at(blk, ws + 2 * (kView + 16))),
        out(view_at(blk, ws + 3 * (kView + 16))), dout(view_at(blk, ws + 4 * (kView + 16))),
        dq(view_at(blk, ws + 5 * (kView + 16))), dk(view_at(blk, ws + 6 * (kView + 16))),
        dv(view_at(blk, ws + 7 * (kView + 16))), qmask(blk.bytes(ws + 8 * (kView + 16))),
        kmask(qmask + kB * kN) {
    set_mask_ones(qmask, kN, kN);
    set_mask_ones(kmask, kN, kN);
  }
  effattn::Masks masks() const { return {qmask, kN, kmask, kN}; }
  Tensor<const float> c(const Tensor<float>& t) const { return t; }
};

TEST(Hardening, WorkspaceOverlappingWhatTheCallTouches) {
  const Exec<Cpu> probe{1};
  HostTensor<float> shape(kB, kH, kN, kD);
  const size_t fwd = effattn::workspace_bytes<Cpu>(effattn::Softmax{}, shape.view, shape.view, shape.view, probe);
  const size_t bwd =
      effattn::backward_workspace_bytes<Cpu>(effattn::Softmax{}, shape.view, shape.view, shape.view, probe);
  const size_t ws_floats = (std::max(fwd, bwd) / sizeof(float) + 15) / 16 * 16;
  WorkspaceProblem p(ws_floats);
  void* ws = p.blk.at(0);
  const size_t fits = ws_floats * sizeof(float);  // ends right where q starts
  const auto forward = [&](size_t size, const Tensor<float>& out) {
    effattn::attention<Cpu>(effattn::Softmax{}, p.c(p.q), p.c(p.k), p.c(p.v), out, p.masks(), Exec<Cpu>{1, ws, size});
  };
  forward(fits, p.out);  // adjacent: fine
  const auto r = ref::softmax(p.c(p.q), p.c(p.k), p.c(p.v), p.masks(), 0, false);
  EXPECT_LE(relative_error(p.out, r), 1e-5);
  expect_error([&] { forward(fits + 1, p.out); }, {"effattn::attention<Cpu>(Softmax)", "exec.workspace", "overlaps q"});

  // A workspace laid over each of the other views and masks (starting 64-byte aligned on it).
  const auto over = [&](const void* at, size_t size, const Tensor<float>& out) {
    effattn::attention<Cpu>(effattn::Softmax{}, p.c(p.q), p.c(p.k), p.c(p.v), out, p.masks(),
                            Exec<Cpu>{1, const_cast<void*>(at), size});
  };
  // 64 bytes each: were an overlap missed, the size check would reject the call (another message)
  // before anything is written.
  expect_error([&] { over(p.k.data, 64, p.out); }, {"overlaps k"});
  expect_error([&] { over(p.v.data + kView - 1, 64, p.out); }, {"overlaps v"});
  expect_error([&] { over(p.out.data, 64, p.out); }, {"overlaps out"});
  expect_error([&] { over(p.qmask, 64, p.out); }, {"overlaps masks.query_valid"});
  // The workspace's last byte is the key mask's last byte.
  expect_error([&] { over(p.kmask + kB * kN - 16, 16, p.out); }, {"overlaps masks.key_valid"});

  // attention_with_lse: the lse is written too.
  HostTensor<float> lse(kB, kH, kN, 1);
  expect_error(
      [&] {
        effattn::attention_with_lse<Cpu>(effattn::Softmax{}, p.c(p.q), p.c(p.k), p.c(p.v), p.out, lse.view, {},
                                         Exec<Cpu>{1, lse.storage.data(), 64});
      },
      {"attention_with_lse", "overlaps lse"});

  // The backward: out and dout are read, the gradients written.
  const auto backward = [&](const void* at, size_t size) {
    effattn::attention_backward<Cpu>(effattn::Softmax{}, p.c(p.q), p.c(p.k), p.c(p.v), p.c(p.out), p.c(p.dout),
                                     effattn::Grads<float>{p.dq, p.dk, p.dv, {}, {}}, p.masks(), Exec<Cpu>{1, const_cast<void*>(at), size});
  };
  backward(ws, fits);
  expect_error([&] { backward(ws, fits + 4); }, {"attention_backward<Cpu>(Softmax)", "overlaps q"});
  expect_error([&] { backward(p.out.data, 64); }, {"overlaps out"});
  expect_error([&] { backward(p.dout.data, 64); }, {"overlaps dout"});
  expect_error([&] { backward(p.dq.data, 64); }, {"overlaps grads.dq"});
  expect_error([&] { backward(p.dk.data, 64); }, {"overlaps grads.dk"});
  expect_error([&] { backward(p.dv.data + kView - 1, 64); }, {"overlaps grads.dv"});
  expect_error([&] { backward(p.kmask, 32); }, {"overlaps masks.key_valid"});
  HostTensor<float> lse2(kB, kH, kN, 1);
  expect_error(
      [&] {
        effattn::attention_backward_with_lse<Cpu>(effattn::Softmax{}, p.c(p.q), p.c(p.k), p.c(p.v), p.c(p.out),
                                                  p.c(p.dout), lse2.cview(), effattn::Grads<float>{p.dq, p.dk, p.dv, {}, {}}, {},
                                                  Exec<Cpu>{1, lse2.storage.data(), 64});
      },
      {"attention_backward_with_lse", "overlaps lse"});
}

TEST(Hardening, WorkspaceOverlappingTheMethodsOwnTensors) {
  HostTensor<float> q(kB, kH, 40, kD), out(kB, kH, 40, kD), proxies(1, kH, 8, kD);
  q.fill_normal();
  proxies.fill_normal();
  const effattn::Proxy<float> proxy{proxies.cview(), proxies.cview()};
  expect_error(
      [&] {
        effattn::attention<Cpu>(proxy, q.cview(), q.cview(), q.cview(), out.view, {},
                                Exec<Cpu>{1, proxies.storage.data() + 5, 64});
      },
      {"attention<Cpu>(Proxy)", "overlaps proxy_q"});
  std::vector<float> w = effattn::favor_projection(3, kH, 16, kD);
  const effattn::Favor favor{Tensor<const float>(w.data(), {1, kH, 16, kD}, {kH * 16 * kD, 16 * kD, kD, 1})};
  expect_error(
      [&] {
        effattn::attention<Cpu>(favor, q.cview(), q.cview(), q.cview(), out.view, {},
                                Exec<Cpu>{1, w.data() + w.size() - 1, 64});
      },
      {"attention<Cpu>(Favor)", "overlaps projection"});
}

// ---- the backward: gradients against masks and lse against masks --------------------------------

TEST(Hardening, GradientOverlappingAMask) {
  WorkspaceProblem p(0);
  const auto backward = [&](const effattn::Masks& m) {
    effattn::attention_backward<Cpu>(effattn::Softmax{}, p.c(p.q), p.c(p.k), p.c(p.v), p.c(p.out), p.c(p.dout),
                                     effattn::Grads<float>{p.dq, p.dk, p.dv, {}, {}}, m);
  };
  // A key mask inside dq's memory; a query mask whose last byte is dv's first (in the gap before dv).
  uint8_t* inside_dq = reinterpret_cast<uint8_t*>(p.dq.data + 100);
  set_mask_ones(inside_dq, kN, kN);
  expect_error([&] { backward({nullptr, 0, inside_dq, kN}); }, {"grads.dq overlaps input masks.key_valid"});
  uint8_t* before_dv = reinterpret_cast<uint8_t*>(p.dv.data) - (kB * kN - 1);
  set_mask_ones(before_dv, kN, kN);
  expect_error([&] { backward({before_dv, kN, nullptr, 0}); }, {"grads.dv overlaps input masks.query_valid"});
  // A shared row (batch stride 0) spans only N bytes: ending right before dv is fine.
  uint8_t* shared = reinterpret_cast<uint8_t*>(p.dv.data) - kN;
  set_mask_ones(shared, 0, kN);
  backward({shared, 0, nullptr, 0});
}

TEST(Hardening, LseOverlappingAMask) {
  WorkspaceProblem p(0);
  HostTensor<float> lse(kB, kH, kN, 1);
  // A shared key-mask row whose last byte is lse's last byte.
  uint8_t* inside = reinterpret_cast<uint8_t*>(lse.storage.data() + lse.storage.size()) - kN;
  std::memset(inside, 1, kN);
  expect_error(
      [&] {
        effattn::attention_with_lse<Cpu>(effattn::Softmax{}, p.c(p.q), p.c(p.k), p.c(p.v), p.out, lse.view,
                                         {nullptr, 0, inside, 0});
      },
      {"lse overlaps masks.key_valid"});
}

}  // namespace
