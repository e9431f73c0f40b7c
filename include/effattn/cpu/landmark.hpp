// Landmark attention on the CPU, the shared core of Nyström and Proxy (DESIGN.md, "Landmark
// attention"): out = K1 · Z · (K3 · V) with Z = pinv(K2) by Newton–Schulz.
//
// Every softmax here is the tiled kernel of softmax_tiles.hpp (no second softmax):
//   K3·V  = attention of Lq over (K, V) with the key mask,
//   K2    = attention of Lq over (Lk, I): values = identity gives the softmax matrix itself,
//   K1·W  = attention of Q over (Lk, W) with W = Z·(K3·V).
//
// Dropped landmarks (Nyström segments with no valid token) with separate query and key masks:
// query landmark i with no valid query in its segment zeroes row i of K2 and of K3; key landmark
// j with no valid key zeroes column j of K2 and is excluded from the softmax of K1 (and of K2's
// rows). This is DESIGN.md's "row and column of K2 are zero, column of K1 excluded, row of K3
// zero", reading "row" as the query side and "column" as the key side; with one shared mask both
// sides drop together, exactly as written there.
//
// Memory: (batch, head) pairs are processed in chunks of one per thread; a chunk holds Lk and W
// per head, each thread its own M×M matrices and one tile scratch, so the workspace is
// O(M·(D + Dv) + M²) per concurrently processed (b, h), never O(N). Proxies shared by the batch
// keep one Z per head (H·M²), computed once.
#pragma once
#include <Eigen/Core>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <utility>

#include "effattn/core.hpp"
#include "effattn/cpu/common.hpp"
#include "effattn/cpu/gemm.hpp"
#include "effattn/cpu/parallel.hpp"
#include "effattn/cpu/softmax_tiles.hpp"

namespace effattn {
namespace cpu {

/// What differs between the landmark operators: where Lq and Lk come from and how Z is formed.
template <class T>
struct LandmarkSpec {
  int64_t M = 0;                     // landmarks per (batch, head)
  Tensor<const T> proxy_q, proxy_k;  // Proxy: [1 or B, H, M, D]; data == nullptr: Nyström segment means
  int iterations = 0;                // Newton–Schulz steps (0: Z = Z0)
  bool invert = true;                // false: no K2 at all, W = K3·V (Proxy with pinv_iterations = 0)
  float column_dropout = 0;          // Proxy's decomposed dropout on the columns of K2
  uint64_t dropout_seed = 0;
  T scale = 1;

  bool given() const { return proxy_q.data != nullptr; }
  /// Proxies of batch extent 1 on both sides: K2, and so Z, is one per head for the whole batch.
  bool shared_z() const { return invert && given() && proxy_q.shape[0] == 1 && proxy_k.shape[0] == 1; }
};

namespace landmark {

using detail_tiles::RowMatrix;
template <class T>
using Map = Eigen::Map<RowMatrix<T>>;
template <class T>
using ConstMap = Eigen::Map<const RowMatrix<T>>;

/// A row-major Eigen map as the operand of gemm, as its transpose, and as gemm's output.
template <class M>
MatrixView<const typename M::Scalar> in(const M& m) {
  return {m.data(), m.rows(), m.cols(), m.outerStride(), 1};
}
template <class M>
MatrixView<const typename M::Scalar> in_t(const M& m) {
  return {m.data(), m.cols(), m.rows(), 1, m.outerStride()};
}
template <class T>
MatrixView<T> out(Map<T>& m) {
  return {m.data(), m.rows(), m.cols(), m.outerStride(), 1};
}

/// A contiguous row-major [rows, cols] matrix as a MatrixView.
template <class T>
MatrixView<T> dense(T* p, int64_t rows, int64_t cols) {
  return {p, rows, cols, cols, 1};
}

/// Segment-mean landmarks of x [N, D]: segment i is [floor(i N / M), floor((i+1) N / M)); the mean
/// is over valid rows only. A segment without one gives a zero row and landmark_valid[i] = 0.
template <class T>
void segment_means(const MatrixView<const T>& x, const uint8_t* valid, int64_t M, T* means, uint8_t* landmark_valid) {
  const int64_t N = x.rows, D = x.cols;
  for (int64_t i = 0; i < M; ++i) {
    Eigen::Map<Eigen::Matrix<T, 1, Eigen::Dynamic>> mean(means + i * D, D);
    mean.setZero();
    int64_t count = 0;
    for (int64_t r = i * N / M, end = (i + 1) * N / M; r < end; ++r) {
      if (valid != nullptr && valid[r] == 0) continue;
      ++count;
      if (x.col_stride == 1)
        mean += Eigen::Map<const Eigen::Matrix<T, 1, Eigen::Dynamic>>(x.data + r * x.row_stride, D);
      else
        for (int64_t c = 0; c < D; ++c) mean(c) += x(r, c);
    }
    if (count > 0) mean /= static_cast<T>(count);
    landmark_valid[i] = count > 0 ? 1 : 0;
  }
}

using detail::kGuardProbes;

/// The guard's probes P [M, kGuardProbes] row-major (detail::guard_probe).
template <class T>
void guard_probes(T* p, int64_t M) {
  for (int64_t j = 0; j < M; ++j)
    for (int c = 0; c < kGuardProbes; ++c) p[j * kGuardProbes + c] = static_cast<T>(detail::guard_probe(j, c));
}

/// Scratch for newton_schulz on M×M: three M² matrices and the guard's three [M, kGuardProbes].
template <class T>
constexpr size_t pinv_scratch_bytes(int64_t M) {
  return 3 * detail::bytes_of<T>(static_cast<size_t>(M * M)) +
         3 * detail::bytes_of<T>(static_cast<size_t>(M * kGuardProbes)) + gemm_scratch_bytes<T>(M);
}

/// What newton_schulz records for its backward: the iterates Z0, Z1, ... and each step's
/// products X = K2 Z, Y2, Y3 (so the backward need not recompute them).
template <class T>
struct NewtonSchulzTape {
  T* iterates = nullptr;  // [(iterations + 1) M, M]
  T* products = nullptr;  // [3 iterations M, M]: X, Y2, Y3 of step 0, then step 1, ...
  static constexpr size_t elements(int64_t M, int iterations) {
    return static_cast<size_t>((4 * iterations + 1) * M * M);
  }
  static NewtonSchulzTape carve(T* at, int64_t M, int iterations) {
    if (at == nullptr) return {};  // a Carver counting bytes
    return {at, at + (iterations + 1) * M * M};
  }
};

/// Z0 = K2ᵀ / (c r) with c the largest column sum and r the largest row sum of K2 (the first
/// column / row on ties: the backward differentiates through that column and row).
template <class T>
struct Z0Scale {
  T c = 0, r = 0;
  int64_t column = 0, row = 0;
  T denom() const { return c * r; }
};
template <class T>
Z0Scale<T> z0_scale(const ConstMap<T>& K2) {
  Z0Scale<T> z;
  z.c = z.r = -std::numeric_limits<T>::infinity();
  for (int64_t j = 0; j < K2.cols(); ++j) {
    const T col = K2.col(j).sum(), row = K2.row(j).sum();
    if (col > z.c) z.c = col, z.column = j;
    if (row > z.r) z.r = row, z.row = j;
  }
  return z;
}

/// The guard's probe residual ‖(K2 Z − I) K2 P‖_F, given KZ = K2 Z and KP = K2 P [M, kGuardProbes],
/// with `tmp` [M, kGuardProbes] as scratch: O(M²) a step instead of the full residual's M³.
template <class T>
T probe_residual(const Map<T>& KZ, const Map<T>& KP, Map<T>& tmp) {
  tmp.noalias() = KZ * KP;
  tmp -= KP;
  return tmp.norm();
}

/// Z = pinv(K2) by Nyströmformer's Newton–Schulz iteration: Z0 = K2ᵀ / (max column sum · max
/// row sum) of this matrix alone, then Z <- 0.25 Z (13I − K2Z (15I − K2Z (7I − K2Z))) up to
/// `iterations` times. Zero rows/columns of K2 stay zero columns/rows of Z; K2 = 0 gives Z = 0.
///
/// Guard: in exact arithmetic the Penrose residual (K2 Z − I) K2 shrinks along the iteration in
/// every singular direction of K2 (1 − x ↦ (1 − x)³ (4 − x) / 4 on [0, 1]), so the norm of its
/// product with any fixed P never grows. Once ‖(K2 Z − I) K2 P‖ with the guard_probes P exceeds
/// twice its smallest value so far (or is not finite), rounding amplified by a near-singular K2
/// has taken over (each step multiplies what lies in K2's near null space by up to 3.25): the
/// iteration stops and keeps the iterate before. So any count is safe; where the result is
/// meaningful the guard never fires. Returns the steps taken. With a tape, records what the
/// backward needs.
template <class T>
int newton_schulz(const T* k2, int64_t M, int iterations, T* z, detail::Arena scratch,
                  const NewtonSchulzTape<T>& tape = {}) {
  T* const iterates = tape.iterates;
  ConstMap<T> K2(k2, M, M);
  const T denom = z0_scale(K2).denom();
  Map<T> Z(z, M, M);
  if (!(denom > T(0) && std::isfinite(denom))) {
    // Every landmark dropped: pinv(0) = 0. A non-finite K2 (from non-finite input) must show as
    // NaN, not vanish into a zero Z.
    if (denom == T(0)) Z.setZero();
    else Z.setConstant(std::numeric_limits<T>::quiet_NaN());
    if (iterates != nullptr) Map<T>(iterates, M, M) = Z;
    return 0;
  }
  Z = K2.transpose() / denom;
  if (iterates != nullptr) Map<T>(iterates, M, M) = Z;
  Map<T> KZ(scratch.take<T>(M * M), M, M), A(scratch.take<T>(M * M), M, M);
  T* cur = z;
  T* spare = scratch.take<T>(M * M);
  Map<T> P(scratch.take<T>(M * kGuardProbes), M, kGuardProbes), KP(scratch.take<T>(M * kGuardProbes), M, kGuardProbes),
      probed(scratch.take<T>(M * kGuardProbes), M, kGuardProbes);
  guard_probes(P.data(), M);
  KP.noalias() = K2 * P;
  const auto I = RowMatrix<T>::Identity(M, M);
  T best = std::numeric_limits<T>::infinity();
  int steps = 0;
  for (int it = 0; it <= iterations; ++it) {
    Map<T> Zc(cur, M, M), S(spare, M, M);
    gemm<T>(in(K2), in(Zc), T(1), false, out(KZ), scratch);
    const T residual = probe_residual(KZ, KP, probed);
    if (it > 0 && !(residual <= 2 * best)) {  // grown, or NaN: back to the previous iterate
      std::swap(cur, spare);
      --steps;
      break;
    }
    best = std::min(best, residual);
    if (it == iterations) break;
    A = T(7) * I - KZ;
    gemm<T>(in(KZ), in(A), T(-1), false, out(S), scratch);  // S holds 15I − KZ·A, then the next Z
    S.diagonal().array() += T(15);
    gemm<T>(in(KZ), in(S), T(-1), false, out(A), scratch);
    A.diagonal().array() += T(13);
    if (tape.products != nullptr) {  // X = K2 Z, Y2 = 15I − X Y1, Y3 = 13I − X Y2 of this step
      T* x = tape.products + 3 * steps * M * M;
      Map<T>(x, M, M) = KZ;
      Map<T>(x + M * M, M, M) = S;
      Map<T>(x + 2 * M * M, M, M) = A;
    }
    gemm<T>(in(Zc), in(A), T(0.25), false, out(S), scratch);
    std::swap(cur, spare);
    ++steps;
    if (iterates != nullptr) Map<T>(iterates + steps * M * M, M, M) = S;
  }
  if (cur != z) Z = Map<T>(cur, M, M);
  return steps;
}

/// Scratch for kernel2 + newton_schulz (not counting K2 and Z themselves).
template <class T>
constexpr size_t z_scratch_bytes(int64_t M, int64_t D) {
  return detail::bytes_of<T>(2 * M - 1) + std::max(tile_scratch_bytes<T>(D, M), pinv_scratch_bytes<T>(M));
}

/// Column dropout draw of one K2: the (batch, head) of K2 and the drop probability.
struct Dropout {
  uint64_t seed = 0;
  int64_t b = 0, h = 0;
  float p = 0;
};

/// The dropout's factor of column c: 1/(1 − p) when kept, 0 when dropped.
template <class T>
T column_factor(const Dropout& drop, int64_t c) {
  return column_keep(drop.seed, drop.b, drop.h, c, drop.p) ? T(1) / (T(1) - static_cast<T>(drop.p)) : T(0);
}

/// K2's columns times their dropout factors (nothing without dropout).
template <class T>
void apply_column_dropout(const Dropout& drop, T* k2, int64_t rows, int64_t cols) {
  if (!(drop.p > 0.0f)) return;
  Map<T> K2(k2, rows, cols);
  for (int64_t c = 0; c < cols; ++c) K2.col(c) *= column_factor<T>(drop, c);
}

/// K2 = softmax_row(s Lq Lkᵀ) [M, M] by the tile kernel over values = identity; rows of dropped
/// query landmarks are zero, dropped key landmarks are excluded. Then the decomposed dropout:
/// column c is kept with probability 1 − p (column_keep) and scaled by 1/(1 − p), else zeroed.
template <class T>
void kernel2(const MatrixView<const T>& lq, const uint8_t* lq_valid, const MatrixView<const T>& lk,
             const uint8_t* lk_valid, T scale, const Dropout& drop, T* k2, detail::Arena scratch) {
  const int64_t M = lq.rows, Mk = lk.rows;
  // The identity as a strided view of one unit vector e (length 2Mk − 1, e[Mk − 1] = 1):
  // element (r, c) = e[Mk − 1 + r − c], so O(M) memory instead of M².
  T* e = scratch.take<T>(2 * Mk - 1);
  std::fill(e, e + 2 * Mk - 1, T(0));
  e[Mk - 1] = T(1);
  HeadAttention<T> p;
  p.q = lq;
  p.k = lk;
  p.v = MatrixView<const T>{e + Mk - 1, Mk, Mk, 1, -1};
  p.out = dense(k2, M, Mk);
  p.key_valid = lk_valid;
  p.query_valid = lq_valid;
  p.scale = scale;
  attend_head(p, scratch);
  apply_column_dropout(drop, k2, M, Mk);
}

/// Z for one (batch, head): K2 then Newton–Schulz. z_scratch_bytes + one M² of scratch.
template <class T>
void compute_z(const MatrixView<const T>& lq, const uint8_t* lq_valid, const MatrixView<const T>& lk,
               const uint8_t* lk_valid, T scale, const Dropout& drop, int iterations, T* z, detail::Arena scratch) {
  const int64_t M = lq.rows;
  T* k2 = scratch.take<T>(M * M);
  kernel2(lq, lq_valid, lk, lk_valid, scale, drop, k2, scratch);
  newton_schulz(k2, M, iterations, z, scratch);
}

/// Z as the forward computes it (compute_z), keeping what its backward needs: K2 before the
/// dropout, A = K2 after it, and Z with its Newton–Schulz tape. Returns the steps taken.
/// Scratch: z_scratch_bytes.
template <class T>
int z_with_tape(const MatrixView<const T>& lq, const uint8_t* lq_valid, const MatrixView<const T>& lk,
                const uint8_t* lk_valid, T scale, const Dropout& drop, int iterations, T* k2, T* a, T* z,
                const NewtonSchulzTape<T>& tape, detail::Arena scratch) {
  const int64_t M = lq.rows;
  kernel2(lq, lq_valid, lk, lk_valid, scale, Dropout{}, k2, scratch);
  std::copy(k2, k2 + M * M, a);
  apply_column_dropout(drop, a, M, M);
  return newton_schulz(a, M, iterations, z, scratch, tape);
}

/// Counts bytes (arena == nullptr) or hands out pieces of an arena: one layout for both.
struct Carver {
  detail::Arena* arena = nullptr;
  size_t bytes = 0;
  template <class U>
  U* take(int64_t count) {
    if (arena != nullptr) return arena->take<U>(static_cast<size_t>(count));
    bytes += detail::bytes_of<U>(static_cast<size_t>(count));
    return nullptr;
  }
};

/// Z with what its backward needs: K2 before the column dropout, A = K2 after it, and the
/// Newton–Schulz tape. Contiguous, one record after another.
template <class T>
struct ZRecord {
  T *z = nullptr, *k2 = nullptr, *a = nullptr;  // [M, M]
  NewtonSchulzTape<T> tape;
  static constexpr size_t elements(int64_t M, int iterations) {
    return 3 * static_cast<size_t>(M * M) + NewtonSchulzTape<T>::elements(M, iterations);
  }
  static ZRecord at(T* base, int64_t M, int iterations) {
    return {base, base + M * M, base + 2 * M * M, NewtonSchulzTape<T>::carve(base + 3 * M * M, M, iterations)};
  }
};

/// What a training forward keeps for the backward in its Saved block, after the header: per
/// (b, h) K1's row lse [Nq], W3 = K3·V [M, Dv] and K3's row lse [M]; with a Z, one ZRecord and its
/// step count per Z (each (b, h), or each head when the proxies are shared by the batch).
/// Independent of the thread count, so forward and backward may use different Execs.
template <class T>
struct SavedState {
  T *lse1 = nullptr, *w3 = nullptr, *lse3 = nullptr, *records = nullptr;
  int* steps = nullptr;
  int64_t Nq = 0, M = 0, Dv = 0;
  int iterations = 0;

  static int64_t z_count(const LandmarkSpec<T>& spec, const detail::Dims& d) {
    return !spec.invert ? 0 : spec.shared_z() ? d.H : d.B * d.H;
  }
  /// The layout, carved (or counted) by `c`.
  static SavedState carve(Carver& c, const LandmarkSpec<T>& spec, const detail::Dims& d) {
    const int64_t BH = d.B * d.H, Z = z_count(spec, d);
    SavedState s;
    s.Nq = d.Nq, s.M = spec.M, s.Dv = d.Dv, s.iterations = spec.iterations;
    s.lse1 = c.take<T>(BH * d.Nq);
    s.w3 = c.take<T>(BH * spec.M * d.Dv);
    s.lse3 = c.take<T>(BH * spec.M);
    s.records = c.take<T>(Z * static_cast<int64_t>(ZRecord<T>::elements(spec.M, spec.iterations)));
    s.steps = c.take<int>(Z);
    return s;
  }
  static size_t bytes(const LandmarkSpec<T>& spec, const detail::Dims& d) {
    Carver count;
    carve(count, spec, d);
    return detail::saved_header_bytes() + count.bytes;
  }
  /// In a block checked against bytes().
  static SavedState at(const Saved& saved, const LandmarkSpec<T>& spec, const detail::Dims& d) {
    detail::Arena body(saved_body(saved), saved.bytes - detail::saved_header_bytes());
    Carver c{&body};
    return carve(c, spec, d);
  }

  T* lse1_of(int64_t bh) const { return lse1 + bh * Nq; }
  T* w3_of(int64_t bh) const { return w3 + bh * M * Dv; }
  T* lse3_of(int64_t bh) const { return lse3 + bh * M; }
  ZRecord<T> record(int64_t i) const {
    return ZRecord<T>::at(records + static_cast<size_t>(i) * ZRecord<T>::elements(M, iterations), M, iterations);
  }
};

/// Workspace layout of one landmark call; run and workspace_bytes both use it, so the byte
/// count is the truth.
struct Plan {
  int threads = 1;
  int64_t heads = 1;    // H, for the shared-Z prepass
  int64_t chunk = 1;    // (b, h) pairs per chunk
  int64_t tiles = 1;    // query tiles per head
  size_t shared_z = 0;  // [H, M, M] when proxies are shared by the batch
  size_t per_head = 0;  // kept from phase 1 to phase 2: W, and for Nyström Lk and its validity
  size_t prepass = 0;   // per thread, computing the shared Z
  size_t phase1 = 0;    // per thread: Lq, K3·V, Z and their scratch
  size_t phase2 = 0;    // per thread: K1·W tiles

  /// The shared Z stays; the prepass scratch and then each chunk reuse the space after it.
  size_t total() const {
    const size_t chunked =
        per_head * static_cast<size_t>(chunk) +
        std::max(parallel_bytes(threads, chunk, phase1), parallel_bytes(threads, chunk * tiles, phase2));
    return shared_z + std::max(shared_z > 0 ? parallel_bytes(threads, heads, prepass) : 0, chunked);
  }
};

template <class T>
Plan plan(const LandmarkSpec<T>& spec, const detail::Dims& d, int threads) {
  using detail::bytes_of;
  const int64_t M = spec.M, MM = M * M;
  Plan p;
  p.threads = threads;
  p.heads = d.H;
  p.chunk = std::max<int64_t>(1, std::min<int64_t>(threads, d.B * d.H));
  p.tiles = (d.Nq + Tiles::kQuery - 1) / Tiles::kQuery;
  const bool shared = spec.shared_z(), own_z = spec.invert && !shared;
  if (shared) {
    p.shared_z = bytes_of<T>(d.H * MM);
    p.prepass = z_scratch_bytes<T>(M, d.D) + bytes_of<T>(MM);
  }
  p.per_head = bytes_of<T>(M * d.Dv) + (spec.given() ? 0 : bytes_of<T>(M * d.D) + bytes_of<uint8_t>(M));
  const size_t own = (spec.given() ? 0 : bytes_of<T>(M * d.D) + bytes_of<uint8_t>(M)) +  // Lq, its validity
                     (spec.invert ? bytes_of<T>(M * d.Dv) : 0) +                         // K3·V
                     (own_z ? bytes_of<T>(MM) : 0);                                      // Z
  const size_t z_work = own_z ? z_scratch_bytes<T>(M, d.D) + bytes_of<T>(MM) : 0;
  p.phase1 = own + std::max(tile_scratch_bytes<T>(d.D, d.Dv), z_work);
  p.phase2 = tile_scratch_bytes<T>(d.D, d.Dv);
  return p;
}

}  // namespace landmark

/// Workspace bytes of landmark_attention.
template <class T>
size_t landmark_workspace_bytes(const LandmarkSpec<T>& spec, const detail::Dims& d, int threads) {
  return landmark::plan(spec, d, threads).total();
}

/// out = K1 · Z · (K3 · V) for every (batch, head); arguments already checked by the operator.
/// No exact-softmax fallback here (Nyström applies it before calling). With `saved`, also keeps
/// what the backward needs there (the same workspace, the same arithmetic: out is unchanged).
template <class T>
void landmark_attention(const LandmarkSpec<T>& spec, const detail::Dims& d, Tensor<const T> q, Tensor<const T> k,
                        Tensor<const T> v, Tensor<T> out, const Masks& masks, const Exec<Cpu>& exec,
                        const landmark::SavedState<T>* saved = nullptr) {
  using namespace landmark;
  using detail::Arena;
  const int threads = thread_count(exec);
  const Plan pl = plan(spec, d, threads);
  detail::HostWorkspace ws(exec.workspace, exec.workspace_size, pl.total());
  Arena arena = ws.arena();
  const int64_t M = spec.M, MM = M * M, BH = d.B * d.H;

  // Proxies shared by the batch: one Z per head, the dropout draw at batch index 0 (the
  // proxies' own batch index).
  T* shared_z = nullptr;
  if (spec.shared_z()) {
    shared_z = arena.take<T>(d.H * MM);
    Arena pre = arena;
    parallel_for(threads, d.H, pre, pl.prepass, [&](int64_t h, Arena scratch) {
      const Dropout drop{spec.dropout_seed, 0, h, spec.column_dropout};
      const auto lq = head_rows(spec.proxy_q, 0, h), lk = head_rows(spec.proxy_k, 0, h);
      if (saved == nullptr) {
        compute_z(lq, nullptr, lk, nullptr, spec.scale, drop, spec.iterations, shared_z + h * MM, scratch);
      } else {
        const ZRecord<T> r = saved->record(h);
        saved->steps[h] = z_with_tape(lq, nullptr, lk, nullptr, spec.scale, drop, spec.iterations, r.k2, r.a, r.z,
                                      r.tape, scratch);
      }
    });
  }
  const auto shared_z_of = [&](int64_t h) { return saved != nullptr ? saved->record(h).z : shared_z + h * MM; };

  // Per head of the chunk, kept from phase 1 to phase 2.
  Arena chunk_arena = arena;
  T* w_all = chunk_arena.take<T>(pl.chunk * M * d.Dv);
  T* lk_all = spec.given() ? nullptr : chunk_arena.take<T>(pl.chunk * M * d.D);
  uint8_t* lk_valid_all = spec.given() ? nullptr : chunk_arena.take<uint8_t>(pl.chunk * M);

  for (int64_t first = 0; first < BH; first += pl.chunk) {
    const int64_t count = std::min(pl.chunk, BH - first);
    const auto lk_of = [&](int64_t i, int64_t b, int64_t h) {
      return spec.given() ? head_rows(spec.proxy_k, spec.proxy_k.shape[0] == 1 ? 0 : b, h)
                          : MatrixView<const T>(dense<const T>(lk_all + i * M * d.D, M, d.D));
    };
    const auto lk_valid_of = [&](int64_t i) { return spec.given() ? nullptr : lk_valid_all + i * M; };

    // Phase 1, per (b, h): landmarks, K3·V, Z, W = Z·(K3·V).
    Arena phase1 = chunk_arena;
    parallel_for(threads, count, phase1, pl.phase1, [&](int64_t i, Arena scratch) {
      const int64_t b = (first + i) / d.H, h = (first + i) % d.H, hk = h / d.group();
      const auto K = head_rows(k, b, hk);
      const uint8_t* key_valid = mask_row(masks.key_valid, masks.key_batch_stride, b);
      MatrixView<const T> lq;
      const uint8_t* lq_valid = nullptr;
      if (spec.given()) {
        lq = head_rows(spec.proxy_q, spec.proxy_q.shape[0] == 1 ? 0 : b, h);
      } else {
        T* lq_data = scratch.take<T>(M * d.D);
        uint8_t* lq_valid_data = scratch.take<uint8_t>(M);
        segment_means(head_rows(q, b, h), mask_row(masks.query_valid, masks.query_batch_stride, b), M, lq_data,
                      lq_valid_data);
        segment_means(K, key_valid, M, lk_all + i * M * d.D, lk_valid_all + i * M);
        lq = dense<const T>(lq_data, M, d.D);
        lq_valid = lq_valid_data;
      }
      const int64_t bh = first + i;
      T* w = w_all + i * M * d.Dv;
      T* kv = saved != nullptr ? saved->w3_of(bh) : spec.invert ? scratch.take<T>(M * d.Dv) : w;
      T* z = spec.shared_z() ? shared_z_of(h) : !spec.invert ? nullptr : saved != nullptr ? saved->record(bh).z
                                                                                          : scratch.take<T>(MM);

      HeadAttention<T> p;  // K3·V: the landmarks attend over (K, V)
      p.q = lq;
      p.k = K;
      p.v = head_rows(v, b, hk);
      p.out = dense(kv, M, d.Dv);
      p.key_valid = key_valid;
      p.query_valid = lq_valid;
      p.scale = spec.scale;
      if (saved != nullptr) p.lse = saved->lse3_of(bh);
      attend_head(p, scratch);
      if (!spec.invert) {
        if (kv != w) std::copy(kv, kv + M * d.Dv, w);
        return;
      }
      if (!spec.shared_z()) {
        const Dropout drop{spec.dropout_seed, b, h, spec.column_dropout};
        if (saved == nullptr) {
          compute_z(lq, lq_valid, lk_of(i, b, h), lk_valid_of(i), spec.scale, drop, spec.iterations, z, scratch);
        } else {
          const ZRecord<T> r = saved->record(bh);
          saved->steps[bh] = z_with_tape(lq, lq_valid, lk_of(i, b, h), lk_valid_of(i), spec.scale, drop,
                                         spec.iterations, r.k2, r.a, r.z, r.tape, scratch);
        }
      }
      Map<T>(w, M, d.Dv).noalias() = ConstMap<T>(z, M, M) * ConstMap<T>(kv, M, d.Dv);
    });

    // Phase 2, per (b, h, query tile): out = K1·W, the queries attending over (Lk, W).
    Arena phase2 = chunk_arena;
    parallel_for(threads, count * pl.tiles, phase2, pl.phase2, [&](int64_t item, Arena scratch) {
      const int64_t i = item / pl.tiles, tile = item % pl.tiles;
      const int64_t b = (first + i) / d.H, h = (first + i) % d.H;
      HeadAttention<T> p;
      p.q = head_rows(q, b, h);
      p.k = lk_of(i, b, h);
      p.v = dense<const T>(w_all + i * M * d.Dv, M, d.Dv);
      p.out = head_rows(out, b, h);
      p.key_valid = lk_valid_of(i);
      p.query_valid = mask_row(masks.query_valid, masks.query_batch_stride, b);
      p.scale = spec.scale;
      if (saved != nullptr) p.lse = saved->lse1_of(first + i);
      const int64_t i0 = tile * Tiles::kQuery;
      attend_rows(p, i0, std::min(d.Nq, i0 + Tiles::kQuery), scratch);
    });
  }
}

// ---- Backward ------------------------------------------------------------------------------------
// DESIGN.md, "Backward", landmark: with W3 = K3·V and W = Z·W3, out is the attention of Q over
// (Lk, W): its softmax backward gives dQ (direct part), dLk and dW. Then dZ = dW·W3ᵀ, dW3 = Zᵀ·dW;
// W3 is the attention of Lq over (K, V): its backward gives dLq, dK, dV. Z is differentiated
// through the Newton–Schulz steps as computed (reverse mode over the stored iterates, Z0's scale
// through its arg-max column and row), then K2's dropout factors and row softmax give more dLq,
// dLk. Nyström spreads dLq_i over the valid rows of segment i as dLq_i / count_i (dLk likewise);
// Proxy returns them as the proxy gradients, summed over the batch for batch-extent-1 proxies.
//
// Work items are (batch, key head) pairs, each running its group's query heads in order, so
// dk, dv have one writer; items run in chunks of one per thread. Proxy gradients of batch extent 1
// (and, for shared proxies, dZ) go to per-item slots that are added up after each chunk in item
// order: sums over the batch are deterministic. Shared proxies differentiate their one Z per head
// at the end, from dZ summed over the batch.
namespace landmark {

/// dA for Z = newton_schulz(A, steps), from its tape and dZ = ∂L/∂Z. Each step Z' = ¼ Z Y3
/// with X = A Z, Y1 = 7I − X, Y2 = 15I − X Y1, Y3 = 13I − X Y2 is reversed operation by operation
/// (X, Y2, Y3 from the tape); Z0 = Aᵀ / (c r) last. Scratch: ns_backward_scratch_bytes.
template <class T>
void newton_schulz_backward(const T* a, int64_t M, int steps, const NewtonSchulzTape<T>& tape, const T* dz, T* da,
                            detail::Arena scratch) {
  ConstMap<T> A(a, M, M);
  Map<T> dA(da, M, M);
  dA.setZero();
  const Z0Scale<T> z0 = z0_scale(A);
  const T denom = z0.denom();
  if (!(denom > T(0) && std::isfinite(denom))) {  // Z = 0 (nothing to differentiate) or NaN (stays NaN)
    if (denom != T(0)) dA.setConstant(std::numeric_limits<T>::quiet_NaN());
    return;
  }
  const auto take = [&] { return Map<T>(scratch.take<T>(M * M), M, M); };
  Map<T> G = take(), Y1 = take(), gY = take(), gX = take(), gZ = take();
  G = ConstMap<T>(dz, M, M);
  const auto I = RowMatrix<T>::Identity(M, M);
  for (int t = steps - 1; t >= 0; --t) {
    const ConstMap<T> Z(tape.iterates + t * M * M, M, M);
    const T* x = tape.products + 3 * t * M * M;
    const ConstMap<T> X(x, M, M), Y2(x + M * M, M, M), Y3(x + 2 * M * M, M, M);
    Y1 = T(7) * I - X;
    G *= T(0.25);                                         // ∂L/∂(Z Y3)
    gemm<T>(in(G), in_t(Y3), T(1), false, out(gZ), scratch);     // through Z of Z·Y3
    gemm<T>(in_t(Z), in(G), T(1), false, out(gY), scratch);      // ∂L/∂Y3
    gemm<T>(in(gY), in_t(Y2), T(-1), false, out(gX), scratch);   // Y3 = 13I − X Y2
    gemm<T>(in_t(X), in(gY), T(-1), false, out(G), scratch);     // ∂L/∂Y2
    gemm<T>(in(G), in_t(Y1), T(-1), true, out(gX), scratch);     // Y2 = 15I − X Y1
    gemm<T>(in_t(X), in(G), T(-1), false, out(gY), scratch);     // ∂L/∂Y1
    gX -= gY;                                             // Y1 = 7I − X
    gemm<T>(in(gX), in_t(Z), T(1), true, out(dA), scratch);      // X = A Z
    gemm<T>(in_t(A), in(gX), T(1), true, out(gZ), scratch);
    G = gZ;                                               // ∂L/∂Z of this step's input
  }
  // Z0 = Aᵀ / (c r), c = column sum at z0.column, r = row sum at z0.row.
  dA += G.transpose() / denom;
  const T sigma = (G.transpose().array() * A.array()).sum();  // ⟨G, Aᵀ⟩
  dA.col(z0.column).array() -= sigma / (z0.c * denom);
  dA.row(z0.row).array() -= sigma / (z0.r * denom);
}

/// Scratch bytes of newton_schulz_backward.
template <class T>
constexpr size_t ns_backward_scratch_bytes(int64_t M) {
  return 5 * detail::bytes_of<T>(static_cast<size_t>(M * M)) + gemm_scratch_bytes<T>(M);
}

/// Scratch bytes of kernel2_backward.
template <class T>
constexpr size_t kernel2_backward_scratch_bytes(int64_t M, int64_t D) {
  return detail::bytes_of<T>(static_cast<size_t>(M * M)) + 2 * detail::bytes_of<T>(static_cast<size_t>(M * D));
}

/// K2 = softmax_row(s Lq Lkᵀ) with dropped entries fixed at 0: for dK2, adds s dS Lk to dLq and
/// s dSᵀ Lq to dLk, dS = K2 ∘ (dK2 − rowsum(dK2 ∘ K2)). Scratch: kernel2_backward_scratch_bytes.
template <class T>
void kernel2_backward(const T* k2, const T* dk2, const MatrixView<const T>& lq, const MatrixView<const T>& lk, T scale,
                      T* dlq, T* dlk, detail::Arena scratch) {
  const int64_t M = lq.rows, D = lq.cols;
  const ConstMap<T> K2(k2, M, M), dK2(dk2, M, M);
  Map<T> dS(scratch.take<T>(M * M), M, M);
  dS = K2.array() * (dK2.array().colwise() - (dK2.array() * K2.array()).rowwise().sum());
  const auto Lq = detail_tiles::rows_of(lq, 0, M, scratch.take<T>(M * D));
  const auto Lk = detail_tiles::rows_of(lk, 0, M, scratch.take<T>(M * D));
  Map<T>(dlq, M, D).noalias() += scale * (dS * Lk);
  Map<T>(dlk, M, D).noalias() += scale * (dS.transpose() * Lq);
}

/// dst rows [0, M) (+)= src [M, cols] (dense), through a strided view.
template <class T>
void add_to(const MatrixView<T>& dst, const T* src, bool assign) {
  for (int64_t r = 0; r < dst.rows; ++r)
    for (int64_t c = 0; c < dst.cols; ++c) dst(r, c) = (assign ? T(0) : dst(r, c)) + src[r * dst.cols + c];
}

/// Nyström's landmark gradient dL [M, D] into the rows it averaged: row r of segment i gets
/// dL_i / count_i when valid (the segments of segment_means).
template <class T>
void spread_segments(const T* dl, int64_t M, const uint8_t* valid, const MatrixView<T>& dx) {
  const int64_t N = dx.rows, D = dx.cols;
  for (int64_t i = 0; i < M; ++i) {
    const int64_t r0 = i * N / M, r1 = (i + 1) * N / M;
    int64_t count = 0;
    for (int64_t r = r0; r < r1; ++r) count += valid == nullptr || valid[r] != 0;
    if (count == 0) continue;
    const T inv = T(1) / static_cast<T>(count);
    for (int64_t r = r0; r < r1; ++r)
      if (valid == nullptr || valid[r] != 0)
        for (int64_t c = 0; c < D; ++c) dx(r, c) += dl[i * D + c] * inv;
  }
}

/// The buffers of one (b, h) of the backward.
template <class T>
struct HeadBuffers {
  T *lq = nullptr, *lk = nullptr;                  // [M, D] Nyström landmarks (Proxy: the views)
  uint8_t *lq_valid = nullptr, *lk_valid = nullptr;
  T* lse3 = nullptr;                               // [M] row statistics of K3
  T *w3 = nullptr, *w = nullptr, *dw = nullptr, *dw3 = nullptr;  // [M, Dv]
  T *dlq = nullptr, *dlk = nullptr;                // [M, D]
  T *k2 = nullptr, *a = nullptr, *z = nullptr, *dz = nullptr, *da = nullptr;  // [M, M]
  NewtonSchulzTape<T> tape;                        // own_z: Z's iterates and products

  /// own_z: K2 and Z per (b, h) (not shared), so K2, A, the tape and dA live here.
  static HeadBuffers carve(Carver& c, int64_t M, int64_t D, int64_t Dv, bool nystrom, bool invert, bool own_z,
                           int iterations) {
    HeadBuffers h;
    if (nystrom) {
      h.lq = c.take<T>(M * D);
      h.lk = c.take<T>(M * D);
      h.lq_valid = c.take<uint8_t>(M);
      h.lk_valid = c.take<uint8_t>(M);
    }
    h.lse3 = c.take<T>(M);
    h.w3 = c.take<T>(M * Dv);
    h.dw = c.take<T>(M * Dv);
    if (invert) {
      h.w = c.take<T>(M * Dv);
      h.dw3 = c.take<T>(M * Dv);
      h.dz = c.take<T>(M * M);
    }
    h.dlq = c.take<T>(M * D);
    h.dlk = c.take<T>(M * D);
    if (own_z) {
      h.k2 = c.take<T>(M * M);
      h.a = c.take<T>(M * M);
      h.z = c.take<T>(M * M);
      h.da = c.take<T>(M * M);
      h.tape = NewtonSchulzTape<T>::carve(c.take<T>(NewtonSchulzTape<T>::elements(M, iterations)), M, iterations);
    }
    return h;
  }
};

/// Shared proxies: each head's one Z, kept from the prepass to the final phase with what its
/// backward needs (K2 before and after dropout, the Newton–Schulz tape), and dZ summed over the
/// batch. In the shared region, head after head.
template <class T>
struct SharedZ {
  ZRecord<T> rec;          // recomputed (without a saved forward)
  T* dz_sum = nullptr;     // [M, M]
  static constexpr size_t elements(int64_t M, int iterations) {
    return ZRecord<T>::elements(M, iterations) + static_cast<size_t>(M * M);
  }
  static SharedZ at(T* region, int64_t h, int64_t M, int iterations) {
    T* base = region + h * elements(M, iterations);
    return {ZRecord<T>::at(base, M, iterations), base + ZRecord<T>::elements(M, iterations)};
  }
};

/// Scratch, after a head's buffers, for the stages that run one after another on it.
template <class T>
size_t backward_work_bytes(int64_t M, int64_t D, int64_t Dv) {
  using detail::bytes_of;
  return std::max({tile_scratch_bytes<T>(D, Dv), z_scratch_bytes<T>(M, D), backward_scratch_bytes<T>(D, Dv),
                   ns_backward_scratch_bytes<T>(M), kernel2_backward_scratch_bytes<T>(M, D)});
}

/// Workspace layout of one landmark backward (run and backward_workspace_bytes share it).
struct BackwardPlan {
  int threads = 1;
  int64_t items = 1, chunk = 1;  // (b, key head) pairs, and how many run at once
  size_t shared = 0;             // shared proxies: SharedZ per head, and the step counts
  size_t prepass = 0;            // per thread: one head's Z (shared proxies)
  size_t per_item = 0;           // per thread: one head's buffers + work scratch
  size_t slots = 0;              // per item: batch-extent-1 proxy gradients and dZ of its heads
  size_t final_head = 0;         // per thread: differentiating one shared Z
  int64_t heads = 1;             // the prepass and the final phase run per head
  size_t total() const {
    const size_t chunked = slots * static_cast<size_t>(chunk) + parallel_bytes(threads, chunk, per_item);
    return shared + std::max({chunked, shared > 0 ? parallel_bytes(threads, heads, prepass) : 0,
                              shared > 0 ? parallel_bytes(threads, heads, final_head) : 0});
  }
};

template <class T>
BackwardPlan backward_plan(const LandmarkSpec<T>& spec, const detail::Dims& d, int threads) {
  using detail::bytes_of;
  const int64_t M = spec.M, MM = M * M;
  const bool shared = spec.shared_z(), own_z = spec.invert && !shared;
  BackwardPlan p;
  p.threads = threads;
  p.items = d.B * d.Hk;
  p.chunk = std::max<int64_t>(1, std::min<int64_t>(threads, p.items));
  Carver head;
  HeadBuffers<T>::carve(head, M, d.D, d.Dv, !spec.given(), spec.invert, own_z, spec.iterations);
  p.per_item = head.bytes + backward_work_bytes<T>(M, d.D, d.Dv);
  if (spec.given()) {
    const size_t per_head = (spec.proxy_q.shape[0] == 1 ? bytes_of<T>(M * d.D) : 0) +
                            (spec.proxy_k.shape[0] == 1 ? bytes_of<T>(M * d.D) : 0) + (shared ? bytes_of<T>(MM) : 0);
    p.slots = per_head * static_cast<size_t>(d.group());
  }
  if (shared) {
    p.shared = bytes_of<T>(d.H * SharedZ<T>::elements(M, spec.iterations)) + bytes_of<int>(d.H);
    p.prepass = z_scratch_bytes<T>(M, d.D);
    p.final_head = bytes_of<T>(MM) + 2 * bytes_of<T>(M * d.D) +
                   std::max(ns_backward_scratch_bytes<T>(M), kernel2_backward_scratch_bytes<T>(M, d.D));
    p.heads = d.H;
  }
  return p;
}

}  // namespace landmark

/// Workspace bytes of landmark_backward.
template <class T>
size_t landmark_backward_workspace_bytes(const LandmarkSpec<T>& spec, const detail::Dims& d, int threads) {
  return landmark::backward_plan(spec, d, threads).total();
}

/// A training forward's block (the operator's arguments already checked): checked against the
/// call, its header begun (detail::finish_saved marks it done), and its layout.
template <class Method, class T>
landmark::SavedState<T> saved_for_forward(const char* where, const Method& m, const LandmarkSpec<T>& spec,
                                          const detail::Dims& d, Tensor<const T> q, Tensor<const T> k,
                                          Tensor<const T> v, Tensor<T> out, const Masks& masks, const Exec<Cpu>& exec,
                                          const Saved& saved) {
  detail::check_saved(where, saved, landmark::SavedState<T>::bytes(spec, d),
                      detail::call_ranges(m, q, k, v, masks, exec, {detail::named("out", out)}));
  detail::begin_saved(saved, saved_header(kSavedLandmark, d, spec.M, spec.iterations));
  return landmark::SavedState<T>::at(saved, spec, d);
}

/// The backward's view of that block: checked against the call and against its header.
template <class Method, class T>
landmark::SavedState<T> saved_for_backward(const char* where, const Method& m, const LandmarkSpec<T>& spec,
                                           const detail::Dims& d, Tensor<const T> q, Tensor<const T> k,
                                           Tensor<const T> v, Tensor<const T> out, Tensor<const T> dout,
                                           const Grads<T>& grads, const Masks& masks, const Exec<Cpu>& exec,
                                           const Saved& saved) {
  detail::check_saved(where, saved, landmark::SavedState<T>::bytes(spec, d),
                      detail::call_ranges(m, q, k, v, masks, exec, detail::backward_ranges(out, dout, grads)));
  detail::check_saved_header(where, saved, saved_header(kSavedLandmark, d, spec.M, spec.iterations));
  return landmark::SavedState<T>::at(saved, spec, d);
}

/// The gradients of landmark_attention (arguments already checked by the operator). With the
/// forward's `saved`, K3·V, Z and K1's row statistics are read, not recomputed (the same workspace).
template <class T>
void landmark_backward(const LandmarkSpec<T>& spec, const detail::Dims& d, Tensor<const T> q, Tensor<const T> k,
                       Tensor<const T> v, Tensor<const T> out, Tensor<const T> dout, const Grads<T>& grads,
                       const Masks& masks, const Exec<Cpu>& exec, const landmark::SavedState<T>* saved = nullptr) {
  using namespace landmark;
  using detail::Arena;
  const int threads = thread_count(exec);
  const BackwardPlan pl = backward_plan(spec, d, threads);
  detail::HostWorkspace ws(exec.workspace, exec.workspace_size, pl.total());
  Arena arena = ws.arena();
  const int64_t M = spec.M, MM = M * M, G = d.group();
  const bool nystrom = !spec.given(), shared = spec.shared_z(), own_z = spec.invert && !shared;
  const bool pq_shared = spec.given() && spec.proxy_q.shape[0] == 1, pk_shared = spec.given() && spec.proxy_k.shape[0] == 1;

  // Proxy gradients of batch extent 1 are sums over the batch: start them at zero.
  if (pq_shared)
    for (int64_t h = 0; h < d.H; ++h) fill(head_rows(grads.dproxy_q, 0, h), T(0));
  if (pk_shared)
    for (int64_t h = 0; h < d.H; ++h) fill(head_rows(grads.dproxy_k, 0, h), T(0));

  // Shared proxies: one Z per head, as the forward's compute_z (the dropout draw at batch index
  // 0), keeping K2, its dropped copy and the Newton–Schulz tape for the final phase.
  T* shared_region = nullptr;
  int* shared_steps = nullptr;
  const auto shared_head = [&](int64_t h) { return SharedZ<T>::at(shared_region, h, M, spec.iterations); };
  if (shared) {
    shared_region = arena.take<T>(d.H * SharedZ<T>::elements(M, spec.iterations));
    shared_steps = arena.take<int>(d.H);
    Arena pre = arena;
    parallel_for(threads, d.H, pre, pl.prepass, [&](int64_t h, Arena scratch) {
      const SharedZ<T> sz = shared_head(h);
      std::fill(sz.dz_sum, sz.dz_sum + MM, T(0));
      if (saved != nullptr) return;
      shared_steps[h] = z_with_tape(head_rows(spec.proxy_q, 0, h), nullptr, head_rows(spec.proxy_k, 0, h), nullptr,
                                    spec.scale, Dropout{spec.dropout_seed, 0, h, spec.column_dropout},
                                    spec.iterations, sz.rec.k2, sz.rec.a, sz.rec.z, sz.rec.tape, scratch);
    });
  }
  // Shared proxies: head h's Z record and its step count, from the forward or the prepass.
  const auto shared_record = [&](int64_t h) { return saved != nullptr ? saved->record(h) : shared_head(h).rec; };
  const auto shared_step_count = [&](int64_t h) { return saved != nullptr ? saved->steps[h] : shared_steps[h]; };

  Arena chunk_arena = arena;
  const size_t slot_elems = pl.slots / sizeof(T);  // slots are whole, aligned T blocks
  T* slots = pl.slots > 0 ? chunk_arena.take<T>(slot_elems * pl.chunk) : nullptr;
  const auto slot_parts = [&](int64_t i, int64_t g) {  // item i of the chunk, g-th head of its group
    T* base = slots + i * slot_elems + g * (slot_elems / G);
    struct {
      T *dlq, *dlk, *dz;
    } s{nullptr, nullptr, nullptr};
    if (pq_shared) s.dlq = base, base += detail::bytes_of<T>(M * d.D) / sizeof(T);
    if (pk_shared) s.dlk = base, base += detail::bytes_of<T>(M * d.D) / sizeof(T);
    if (shared) s.dz = base;
    return s;
  };

  for (int64_t first = 0; first < d.B * d.Hk; first += pl.chunk) {
    const int64_t count = std::min(pl.chunk, d.B * d.Hk - first);
    Arena items = chunk_arena;
    parallel_for(threads, count, items, pl.per_item, [&](int64_t i, Arena item_scratch) {
      const int64_t b = (first + i) / d.Hk, hk = (first + i) % d.Hk;
      const auto K = head_rows(k, b, hk), V = head_rows(v, b, hk);
      const auto dK = head_rows(grads.dk, b, hk), dV = head_rows(grads.dv, b, hk);
      const uint8_t* key_valid = mask_row(masks.key_valid, masks.key_batch_stride, b);
      const uint8_t* query_valid = mask_row(masks.query_valid, masks.query_batch_stride, b);
      fill(dK, T(0));
      fill(dV, T(0));
      for (int64_t g = 0; g < G; ++g) {
        const int64_t h = hk * G + g;
        Arena scratch = item_scratch;
        Carver carver{&scratch};
        const HeadBuffers<T> hb = HeadBuffers<T>::carve(carver, M, d.D, d.Dv, nystrom, spec.invert, own_z,
                                                        spec.iterations);
        const Arena work = scratch;

        // Landmarks.
        MatrixView<const T> lq, lk;
        if (nystrom) {
          segment_means(head_rows(q, b, h), query_valid, M, hb.lq, hb.lq_valid);
          segment_means(K, key_valid, M, hb.lk, hb.lk_valid);
          lq = dense<const T>(hb.lq, M, d.D);
          lk = dense<const T>(hb.lk, M, d.D);
        } else {
          lq = head_rows(spec.proxy_q, pq_shared ? 0 : b, h);
          lk = head_rows(spec.proxy_k, pk_shared ? 0 : b, h);
        }

        // The forward's W3 = K3·V with its row statistics, Z (and its iterates): saved, or again.
        const int64_t bh = b * d.H + h;
        T* const w3 = saved != nullptr ? saved->w3_of(bh) : hb.w3;
        T* const lse3 = saved != nullptr ? saved->lse3_of(bh) : hb.lse3;
        HeadAttention<T> p3;
        p3.q = lq;
        p3.k = K;
        p3.v = V;
        p3.out = dense(w3, M, d.Dv);
        p3.key_valid = key_valid;
        p3.query_valid = hb.lq_valid;
        p3.scale = spec.scale;
        p3.lse = lse3;
        if (saved == nullptr) attend_head(p3, work);
        ZRecord<T> zr{hb.z, hb.k2, hb.a, hb.tape};
        int steps = 0;
        if (shared) {
          zr = shared_record(h);
        } else if (own_z && saved != nullptr) {
          zr = saved->record(bh);
          steps = saved->steps[bh];
        } else if (own_z) {
          steps = z_with_tape(lq, hb.lq_valid, lk, hb.lk_valid, spec.scale,
                              Dropout{spec.dropout_seed, b, h, spec.column_dropout}, spec.iterations, zr.k2, zr.a,
                              zr.z, zr.tape, work);
        }
        const T* z = zr.z;
        const T* w = w3;
        if (spec.invert) {  // W = Z·W3, as the forward's phase 1
          Map<T>(hb.w, M, d.Dv).noalias() = ConstMap<T>(z, M, M) * ConstMap<T>(w3, M, d.Dv);
          w = hb.w;
        }

        // out = K1·W: dQ (direct), dLk, dW.
        HeadAttentionGrad<T> g1;
        g1.fwd.q = head_rows(q, b, h);
        g1.fwd.k = lk;
        g1.fwd.v = dense<const T>(w, M, d.Dv);
        g1.fwd.key_valid = hb.lk_valid;
        g1.fwd.query_valid = query_valid;
        g1.fwd.scale = spec.scale;
        g1.out = head_rows(out, b, h);
        g1.dout = head_rows(dout, b, h);
        g1.dq = head_rows(grads.dq, b, h);
        g1.dk = dense(hb.dlk, M, d.D);
        g1.dv = dense(hb.dw, M, d.Dv);
        if (saved != nullptr) g1.lse = saved->lse1_of(bh);
        fill(g1.dk, T(0));
        fill(g1.dv, T(0));
        backward_head(g1, work);

        // W = Z·W3: dZ = dW·W3ᵀ, dW3 = Zᵀ·dW.
        const T* dw3 = hb.dw;
        if (spec.invert) {
          Map<T>(hb.dz, M, M).noalias() = ConstMap<T>(hb.dw, M, d.Dv) * ConstMap<T>(w3, M, d.Dv).transpose();
          Map<T>(hb.dw3, M, d.Dv).noalias() = ConstMap<T>(z, M, M).transpose() * ConstMap<T>(hb.dw, M, d.Dv);
          dw3 = hb.dw3;
        }

        // W3 = K3·V: dLq, and this head's share of dK, dV.
        HeadAttentionGrad<T> g3;
        g3.fwd = p3;
        g3.out = dense<const T>(w3, M, d.Dv);
        g3.dout = dense<const T>(dw3, M, d.Dv);
        g3.lse = lse3;
        g3.dq = dense(hb.dlq, M, d.D);
        g3.dk = dK;
        g3.dv = dV;
        backward_head(g3, work);

        // Z through Newton–Schulz, the dropout factors and K2's softmax: more dLq, dLk.
        if (own_z) {
          newton_schulz_backward(zr.a, M, steps, zr.tape, hb.dz, hb.da, work);
          apply_column_dropout(Dropout{spec.dropout_seed, b, h, spec.column_dropout}, hb.da, M, M);
          kernel2_backward(zr.k2, hb.da, lq, lk, spec.scale, hb.dlq, hb.dlk, work);
        }

        // Into the gradients.
        if (nystrom) {
          spread_segments(hb.dlq, M, query_valid, head_rows(grads.dq, b, h));
          spread_segments(hb.dlk, M, key_valid, dK);
        } else {
          const auto sl = slot_parts(i, g);
          if (pq_shared) std::copy(hb.dlq, hb.dlq + M * d.D, sl.dlq);
          else add_to(head_rows(grads.dproxy_q, b, h), hb.dlq, true);
          if (pk_shared) std::copy(hb.dlk, hb.dlk + M * d.D, sl.dlk);
          else add_to(head_rows(grads.dproxy_k, b, h), hb.dlk, true);
          if (shared) std::copy(hb.dz, hb.dz + MM, sl.dz);
        }
      }
    });
    // Sums over the batch, in item order.
    for (int64_t i = 0; i < count && slots != nullptr; ++i)
      for (int64_t g = 0; g < G; ++g) {
        const int64_t h = ((first + i) % d.Hk) * G + g;
        const auto sl = slot_parts(i, g);
        if (pq_shared) add_to(head_rows(grads.dproxy_q, 0, h), sl.dlq, false);
        if (pk_shared) add_to(head_rows(grads.dproxy_k, 0, h), sl.dlk, false);
        if (shared) Map<T>(shared_head(h).dz_sum, M, M) += ConstMap<T>(sl.dz, M, M);
      }
  }

  if (!shared) return;
  // Shared proxies: each head's one Z, differentiated with dZ summed over the batch.
  Arena fin = arena;
  parallel_for(threads, d.H, fin, pl.final_head, [&](int64_t h, Arena scratch) {
    const SharedZ<T> sz = shared_head(h);
    const ZRecord<T> zr = shared_record(h);
    T* da = scratch.take<T>(MM);
    T* dlq = scratch.take<T>(M * d.D);
    T* dlk = scratch.take<T>(M * d.D);
    std::fill(dlq, dlq + M * d.D, T(0));
    std::fill(dlk, dlk + M * d.D, T(0));
    const auto lq = head_rows(spec.proxy_q, 0, h), lk = head_rows(spec.proxy_k, 0, h);
    newton_schulz_backward(zr.a, M, shared_step_count(h), zr.tape, sz.dz_sum, da, scratch);
    apply_column_dropout(Dropout{spec.dropout_seed, 0, h, spec.column_dropout}, da, M, M);
    kernel2_backward(zr.k2, da, lq, lk, spec.scale, dlq, dlk, scratch);
    add_to(head_rows(grads.dproxy_q, 0, h), dlq, false);
    add_to(head_rows(grads.dproxy_k, 0, h), dlk, false);
  });
}

}  // namespace cpu
}  // namespace effattn
