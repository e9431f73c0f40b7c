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
#include <cstdint>
#include <utility>

#include "effattn/core.hpp"
#include "effattn/cpu/common.hpp"
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

/// Scratch for newton_schulz on M×M.
template <class T>
constexpr size_t pinv_scratch_bytes(int64_t M) {
  return 3 * detail::bytes_of<T>(static_cast<size_t>(M * M));
}

/// Z = pinv(K2) by Nyströmformer's Newton–Schulz iteration: Z0 = K2ᵀ / (max column sum · max
/// row sum) of this matrix alone, then Z <- 0.25 Z (13I − K2Z (15I − K2Z (7I − K2Z))) `iterations`
/// times. Zero rows/columns of K2 stay zero columns/rows of Z; K2 = 0 gives Z = 0.
template <class T>
void newton_schulz(const T* k2, int64_t M, int iterations, T* z, detail::Arena scratch) {
  ConstMap<T> K2(k2, M, M);
  const T denom = K2.colwise().sum().maxCoeff() * K2.rowwise().sum().maxCoeff();
  Map<T> Z(z, M, M);
  if (!(denom > T(0))) {  // every landmark dropped: pinv(0) = 0
    Z.setZero();
    return;
  }
  Z = K2.transpose() / denom;
  Map<T> KZ(scratch.take<T>(M * M), M, M), A(scratch.take<T>(M * M), M, M);
  T* cur = z;
  T* spare = scratch.take<T>(M * M);
  const auto I = RowMatrix<T>::Identity(M, M);
  for (int it = 0; it < iterations; ++it) {
    Map<T> Zc(cur, M, M), S(spare, M, M);
    KZ.noalias() = K2 * Zc;
    A = T(7) * I - KZ;
    S = T(15) * I;  // S holds 15I − KZ·A, then the next Z
    S.noalias() -= KZ * A;
    A = T(13) * I;
    A.noalias() -= KZ * S;
    S.noalias() = T(0.25) * (Zc * A);
    std::swap(cur, spare);
  }
  if (cur != z) Z = Map<T>(cur, M, M);
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
  if (drop.p > 0.0f) {
    const T keep_scale = T(1) / (T(1) - static_cast<T>(drop.p));
    Map<T> K2(k2, M, Mk);
    for (int64_t c = 0; c < Mk; ++c) K2.col(c) *= column_keep(drop.seed, drop.b, drop.h, c, drop.p) ? keep_scale : T(0);
  }
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
/// No exact-softmax fallback here (Nyström applies it before calling).
template <class T>
void landmark_attention(const LandmarkSpec<T>& spec, const detail::Dims& d, Tensor<const T> q, Tensor<const T> k,
                        Tensor<const T> v, Tensor<T> out, const Masks& masks, const Exec<Cpu>& exec) {
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
      compute_z(head_rows(spec.proxy_q, 0, h), nullptr, head_rows(spec.proxy_k, 0, h), nullptr, spec.scale,
                Dropout{spec.dropout_seed, 0, h, spec.column_dropout}, spec.iterations, shared_z + h * MM, scratch);
    });
  }

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
      T* w = w_all + i * M * d.Dv;
      T* kv = spec.invert ? scratch.take<T>(M * d.Dv) : w;
      T* z = spec.shared_z() ? shared_z + h * MM : spec.invert ? scratch.take<T>(MM) : nullptr;

      HeadAttention<T> p;  // K3·V: the landmarks attend over (K, V)
      p.q = lq;
      p.k = K;
      p.v = head_rows(v, b, hk);
      p.out = dense(kv, M, d.Dv);
      p.key_valid = key_valid;
      p.query_valid = lq_valid;
      p.scale = spec.scale;
      attend_head(p, scratch);
      if (!spec.invert) return;
      if (!spec.shared_z())
        compute_z(lq, lq_valid, lk_of(i, b, h), lk_valid_of(i), spec.scale,
                  Dropout{spec.dropout_seed, b, h, spec.column_dropout}, spec.iterations, z, scratch);
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
      const int64_t i0 = tile * Tiles::kQuery;
      attend_rows(p, i0, std::min(d.Nq, i0 + Tiles::kQuery), scratch);
    });
  }
}

}  // namespace cpu
}  // namespace effattn
