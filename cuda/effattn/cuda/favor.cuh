// FAVOR+ (Performer) attention on CUDA, same function as the CPU backend (cpu/favor.hpp):
// out_i = phi(q_i)ᵀ S / phi(q_i)ᵀ z, S = sum_j phi(k_j) v_jᵀ, z = sum_j phi(k_j) over valid keys.
// phi(Q) and phi(K) never reach device memory: every kernel projects its token tile (u = x' Wᵀ)
// in shared memory, 32 features at a time, and maps it on the fly.
//
// The eps of the positive and relu maps makes phi = e + eps with e the rescalable part, so
//   S_f = sum_j e_jf v_j + eps sum_j v_j,  z_f = sum_j e_jf + eps · (valid keys),
// and the per-(b, h) key max c needs no pass of its own in the bidirectional case:
//   pass 1 (favor_keys_kernel)   CTAs over (state head, 32-feature block, key range) stream K/V
//                                tiles, keep sum e v and sum e relative to a running max with
//                                rescaling, and store a partial (max, S, z, sum v, count);
//   combine (favor_combine_kernel) rescales the partials to the global max and adds the eps terms;
//   pass 2 (favor_queries_kernel) streams Q tiles through every feature block and writes out.
// The query max of the positive map (per row, over all features) is a running max too.
// Causal (favor_causal_kernel): one CTA per (b, h) walks 32-row query chunks in order with the
// O(M·Dv) state (S, z) in workspace: the prefix state serves the whole chunk, the chunk's own
// keys are done quadratically, then join the state. The key max is over all valid keys (DESIGN),
// so causal runs pass 1 first in "max only" mode.
// The M^-1/2 factor of DESIGN.md's phi cancels in the ratio and is left out, as on the CPU; trig
// queries use their own |q'|²/2 as stabilizer (a factor per row, which cancels as well).
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>

#include "effattn/cuda/common.cuh"
#include "effattn/cuda/kernel_util.cuh"
#include "effattn/cuda/softmax.cuh"

namespace effattn {
namespace cuda {
namespace favor {

constexpr int kThreads = 256;               // 8 warps
constexpr int kTok = 32;                    // token rows per tile
constexpr int kFeat = 32;                   // features per block (for trig: 16 projection rows, cos and sin)
constexpr int64_t kTargetBlocks = 512;      // pass-1 CTAs aimed for; fixes the split of the keys
constexpr int kWarpRows = kFeat / 8;        // feature (or query) rows per warp

/// Everything the kernels read; views have contiguous rows, D = Dv.
template <class T>
struct Params {
  const T* q = nullptr;
  const T* k = nullptr;
  const T* v = nullptr;
  T* out = nullptr;
  RowStrides qs, ks, vs, os;
  const float* proj = nullptr;  // projection [1, Hp, M, D], any strides
  int64_t proj_head = 0, proj_row = 0, proj_col = 1;
  bool proj_per_head = false;  // Hp = H; else one projection for every head
  int64_t batch = 1, heads = 1, group = 1, nq = 0, nk = 0;
  int64_t features = 0;  // M, projection rows
  int64_t blocks = 0;    // feature blocks of kFeat
  int64_t state_heads = 1;  // per batch: H with per-head projections, else Hk (keys shared by the group)
  const uint8_t* query_valid = nullptr;
  int64_t query_batch_stride = 0;
  const uint8_t* key_valid = nullptr;
  int64_t key_batch_stride = 0;
  int map = 0;  // FeatureMap
  float sqrt_scale = 1, half_scale = 0.5f, eps = 0;
  int64_t causal_offset = 0;
  // Pass-1 partials, index (state head · splits + split) · blocks + block.
  int64_t splits = 1, tiles_per_split = 1;
  bool accumulate = true;  // false: key max only (causal)
  float* part_max = nullptr;    // [.]
  float* part_s = nullptr;      // [., kFeat, D]; slot split 0 receives the combined S
  float* part_z = nullptr;      // [., kFeat]
  float* part_vsum = nullptr;   // [state head · splits + split, D]
  float* part_count = nullptr;  // [state head · splits + split]
  float* state_s = nullptr;     // causal: [B · H, blocks, kFeat, D]
  float* state_z = nullptr;     // causal: [B · H, blocks, kFeat]

  __host__ __device__ int proj_rows() const { return map == static_cast<int>(FeatureMap::trig) ? kFeat / 2 : kFeat; }
};

/// One token tile in shared memory: rows, projections u, features g, s|x|²/2, validity.
template <int D>
struct Tile {
  float x[kTok][D + 1];  // odd row stride: the projection's row reads hit distinct banks
  float u[kTok][kFeat + 1];
  float g[kTok][kFeat + 1];
  float sq[kTok];
  uint8_t ok[kTok];
};

/// Rows [row0, row0 + n) of x into the tile (zeros past n); ok = inside and valid. Then a barrier
/// and s |x|² / 2 per row, then a barrier.
template <int D, class T>
__device__ void load_tile(Tile<D>& t, const T* x, int64_t row_stride, int64_t row0, int64_t n, const uint8_t* valid,
                          float half_scale) {
  for (int e = threadIdx.x; e < kTok * D; e += kThreads) {
    const int r = e / D, c = e % D;
    t.x[r][c] = r < n ? to_float(x[(row0 + r) * row_stride + c]) : 0.0f;
  }
  if (threadIdx.x < kTok) {
    const int r = threadIdx.x;
    t.ok[r] = r < n && (valid == nullptr || valid[row0 + r] != 0);
  }
  __syncthreads();
  if (threadIdx.x < kTok) {
    const int r = threadIdx.x;
    float s = 0.0f;
    for (int c = 0; c < D; ++c) s = fmaf(t.x[r][c], t.x[r][c], s);
    t.sq[r] = s * half_scale;
  }
  __syncthreads();
}

/// u[r][p] = sqrt(s) x_r · W[p0 + p] for the block's projection rows p < proj_rows (0 past M).
/// No barrier: the caller syncs before reading u.
template <int D, class T>
__device__ void project(Tile<D>& t, const Params<T>& p, const float* w_head, int64_t block) {
  const int rows = p.proj_rows();
  const int64_t p0 = block * rows;
  const int r = threadIdx.x / 8;
#pragma unroll
  for (int kk = 0; kk < 4; ++kk) {
    const int f = threadIdx.x % 8 + 8 * kk;
    if (f >= rows) continue;
    float acc = 0.0f;
    if (p0 + f < p.features) {
      const float* w = w_head + (p0 + f) * p.proj_row;
#pragma unroll 8
      for (int c = 0; c < D; ++c) acc = fmaf(t.x[r][c], __ldg(w + c * p.proj_col), acc);
    }
    t.u[r][f] = acc * p.sqrt_scale;
  }
}

/// Is feature l of block `block` a real one (its projection row below M)?
template <class T>
__device__ __forceinline__ bool real_feature(const Params<T>& p, int64_t block, int l) {
  const int rows = p.proj_rows();
  return block * rows + l % rows < p.features;
}

/// Key features into t.g: for valid keys and real features, e + add with e the map's core at
/// stabilizer `shift` (positive: exp(u − s|k|²/2 − shift); relu: max(u, 0); trig:
/// exp(s|k|²/2 − shift) [cos u, sin u]); zero otherwise. No barrier.
template <int D, class T>
__device__ void key_features(Tile<D>& t, const Params<T>& p, int64_t block, float shift, float add) {
  const int rows = p.proj_rows();
  for (int e = threadIdx.x; e < kTok * kFeat; e += kThreads) {
    const int r = e / kFeat, l = e % kFeat, f = l % rows;
    float g = 0.0f;
    if (t.ok[r] && real_feature(p, block, l)) {
      const float u = t.u[r][f];
      if (p.map == static_cast<int>(FeatureMap::positive))
        g = expf(u - t.sq[r] - shift) + add;
      else if (p.map == static_cast<int>(FeatureMap::relu))
        g = fmaxf(u, 0.0f) + add;
      else
        g = expf(t.sq[r] - shift) * (l < rows ? cosf(u) : sinf(u)) + add;
    }
    t.g[r][l] = g;
  }
}

/// Query features of this warp's rows r = kWarpRows · warp + i into t.g (without eps). For the
/// positive map the row max over all features is a running max: `rescale(i, factor)` is called
/// whenever row i's max grows, so that what was accumulated at the old max can follow. Ends
/// with __syncwarp (the rows are this warp's own).
template <int D, class T, class Rescale>
__device__ void query_features(Tile<D>& t, const Params<T>& p, int64_t block, float (&row_max)[kWarpRows],
                               Rescale&& rescale) {
  const int warp = threadIdx.x / 32, l = threadIdx.x % 32, rows = p.proj_rows();
  const bool real = real_feature(p, block, l);
#pragma unroll
  for (int i = 0; i < kWarpRows; ++i) {
    const int r = kWarpRows * warp + i;
    const float u = t.u[r][l % rows];
    float g = 0.0f;
    if (p.map == static_cast<int>(FeatureMap::positive)) {
      float mx = real ? u : -INFINITY;
      for (int o = 16; o > 0; o /= 2) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
      const float new_max = fmaxf(row_max[i], mx);  // finite: feature 0 of every block is real
      if (new_max > row_max[i]) rescale(i, expf(row_max[i] - new_max));  // 0 while the row was empty
      row_max[i] = new_max;
      g = real ? expf(u - t.sq[r] - new_max) : 0.0f;
    } else if (p.map == static_cast<int>(FeatureMap::relu)) {
      g = real ? fmaxf(u, 0.0f) : 0.0f;
    } else {
      g = real ? (l < rows ? cosf(u) : sinf(u)) : 0.0f;
    }
    t.g[r][l] = g;
  }
  __syncwarp();
}

/// (b, h) of a query head -> its state head (b, hs) and the projection head.
template <class T>
__device__ __forceinline__ int64_t state_head_of(const Params<T>& p, int64_t b, int64_t h) {
  return b * p.state_heads + (p.proj_per_head ? h : h / p.group);
}

/// Pass 1: CTA (state head, feature block, split) over the split's key tiles. Keeps sum e v and
/// sum e of its 32 features relative to a running key max (rescaled when it grows), plus sum v
/// and the valid-key count (block 0 only), and stores them as one partial.
template <class T, int D>
__global__ void __launch_bounds__(kThreads) favor_keys_kernel(const Params<T> p) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  Tile<D>& t = *reinterpret_cast<Tile<D>*>(smem_raw);
  __shared__ float red[kThreads / 32];
  const int64_t cta = blockIdx.x;
  const int64_t split = cta % p.splits, block = (cta / p.splits) % p.blocks, sh = cta / (p.splits * p.blocks);
  const int64_t b = sh / p.state_heads, hs = sh % p.state_heads;
  const int64_t hk = p.proj_per_head ? hs / p.group : hs;
  const T* const k = p.k + b * p.ks.batch + hk * p.ks.head;
  const T* const v = p.v + b * p.vs.batch + hk * p.vs.head;
  const float* const w_head = p.proj + (p.proj_per_head ? hs : 0) * p.proj_head;
  const uint8_t* const key_valid = p.key_valid == nullptr ? nullptr : p.key_valid + b * p.key_batch_stride;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const bool relu = p.map == static_cast<int>(FeatureMap::relu);
  const bool trig = p.map == static_cast<int>(FeatureMap::trig);
  const bool sums = p.accumulate && block == 0;  // sum v and the count, once per key range

  float run_max = relu ? 0.0f : -INFINITY;
  float acc[kWarpRows][D / 32] = {};
  float zacc[kWarpRows] = {};
  float vsum[D / 32] = {};
  float count = 0.0f;
  const int64_t tile_end = imin((split + 1) * p.tiles_per_split, (p.nk + kTok - 1) / kTok);
  for (int64_t tile = split * p.tiles_per_split; tile < tile_end; ++tile) {
    const int64_t j0 = tile * kTok, n = imin(kTok, p.nk - j0);
    load_tile(t, k, p.ks.row, j0, n, key_valid, p.half_scale);
    if (!trig) project(t, p, w_head, block);
    __syncthreads();
    if (!relu) {  // the running key max: positive over u, trig over s|k|²/2
      float mx = -INFINITY;
      for (int e = threadIdx.x; e < kTok * kFeat; e += kThreads) {
        const int r = e / kFeat, l = e % kFeat;
        if (!t.ok[r]) continue;
        if (trig)
          mx = fmaxf(mx, t.sq[r]);
        else if (real_feature(p, block, l))
          mx = fmaxf(mx, t.u[r][l]);
      }
      mx = block_max<kThreads>(mx, red);
      if (mx == -INFINITY) continue;  // no valid key in this tile (uniform); load_tile syncs first
      const float new_max = fmaxf(run_max, mx);
      if (p.accumulate && new_max > run_max) {
        const float f = expf(run_max - new_max);  // 0 while nothing was accumulated
#pragma unroll
        for (int i = 0; i < kWarpRows; ++i) {
          zacc[i] *= f;
#pragma unroll
          for (int c = 0; c < D / 32; ++c) acc[i][c] *= f;
        }
      }
      run_max = new_max;
    }
    if (!p.accumulate) continue;
    if (trig) project(t, p, w_head, block);  // trig needs u only for the features
    __syncthreads();
    key_features(t, p, block, run_max, 0.0f);
    __syncthreads();
#pragma unroll 1
    for (int j = 0; j < n; ++j) {
      if (!t.ok[j]) continue;
      const T* const vrow = v + (j0 + j) * p.vs.row + lane;
      float g[kWarpRows];
#pragma unroll
      for (int i = 0; i < kWarpRows; ++i) {
        g[i] = t.g[j][kWarpRows * warp + i];
        zacc[i] += g[i];
      }
#pragma unroll
      for (int c = 0; c < D / 32; ++c) {
        const float x = to_float(vrow[32 * c]);
#pragma unroll
        for (int i = 0; i < kWarpRows; ++i) acc[i][c] = fmaf(g[i], x, acc[i][c]);
        if (sums) vsum[c] += x;
      }
      count += 1.0f;
    }
    __syncthreads();  // every warp is done with t before the next tile is loaded
  }

  const int64_t part = (sh * p.splits + split) * p.blocks + block;
  if (threadIdx.x == 0) p.part_max[part] = run_max;
  if (!p.accumulate) return;
#pragma unroll
  for (int i = 0; i < kWarpRows; ++i) {
    const int64_t f = kWarpRows * warp + i;
#pragma unroll
    for (int c = 0; c < D / 32; ++c) p.part_s[(part * kFeat + f) * D + 32 * c + lane] = acc[i][c];
    if (lane == 0) p.part_z[part * kFeat + f] = zacc[i];
  }
  if (sums && warp == 0) {
    const int64_t range = sh * p.splits + split;
#pragma unroll
    for (int c = 0; c < D / 32; ++c) p.part_vsum[range * D + 32 * c + lane] = vsum[c];
    if (lane == 0) p.part_count[range] = count;
  }
}

/// The key max c of state head sh: the largest partial max over its splits and blocks (0 when
/// it has no valid key; nothing uses it then).
template <class T>
__device__ float key_max(const Params<T>& p, int64_t sh, float* red) {
  float c = -INFINITY;
  const int64_t n = p.splits * p.blocks;
  for (int64_t e = threadIdx.x; e < n; e += kThreads) c = fmaxf(c, p.part_max[sh * n + e]);
  c = block_max<kThreads>(c, red);
  return c == -INFINITY ? 0.0f : c;
}

/// Combine: CTA (state head, block) rescales its partials to the key max and adds the eps terms;
/// writes S, z into the split-0 slot (each element read and written by one thread).
template <class T, int D>
__global__ void __launch_bounds__(kThreads) favor_combine_kernel(const Params<T> p) {
  __shared__ float red[kThreads / 32];
  const int64_t sh = blockIdx.x / p.blocks, block = blockIdx.x % p.blocks;
  const float c = key_max(p, sh, red);
  const auto weight = [&](int64_t split) {
    const float m = p.part_max[(sh * p.splits + split) * p.blocks + block];
    return m == -INFINITY ? 0.0f : expf(m - c);
  };
  const auto slot = [&](int64_t split) { return (sh * p.splits + split) * p.blocks + block; };
  for (int e = threadIdx.x; e < kFeat * D; e += kThreads) {
    const int f = e / D, col = e % D;
    float s = 0.0f, vsum = 0.0f;
    for (int64_t split = 0; split < p.splits; ++split) {
      s = fmaf(weight(split), p.part_s[slot(split) * kFeat * D + e], s);
      vsum += p.part_vsum[(sh * p.splits + split) * D + col];
    }
    if (real_feature(p, block, f)) s = fmaf(p.eps, vsum, s);
    p.part_s[slot(0) * kFeat * D + e] = s;
  }
  for (int f = threadIdx.x; f < kFeat; f += kThreads) {
    float z = 0.0f, count = 0.0f;
    for (int64_t split = 0; split < p.splits; ++split) {
      z = fmaf(weight(split), p.part_z[slot(split) * kFeat + f], z);
      count += p.part_count[sh * p.splits + split];
    }
    if (real_feature(p, block, f)) z = fmaf(p.eps, count, z);
    p.part_z[slot(0) * kFeat + f] = z;
  }
}

/// Writes this warp's rows of a query tile: out = (E + eps·Ssum) / (den + eps·zsum), zero for
/// invalid queries and rows with a zero denominator.
template <int D, class T>
__device__ void write_rows(const Tile<D>& t, T* out, int64_t row_stride, int64_t i0, int64_t n, float eps,
                           const float (&num)[kWarpRows][D / 32], const float (&den)[kWarpRows],
                           const float (&eps_num)[D / 32], float eps_den) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
#pragma unroll
  for (int i = 0; i < kWarpRows; ++i) {
    const int r = kWarpRows * warp + i;
    if (r >= n) continue;
    const float d = fmaf(eps, eps_den, den[i]);
    const bool live = t.ok[r] && d != 0.0f;
    const float inv = live ? 1.0f / d : 0.0f;
    T* const dst = out + (i0 + r) * row_stride + lane;
#pragma unroll
    for (int c = 0; c < D / 32; ++c) dst[32 * c] = from_float<T>(live ? fmaf(eps, eps_num[c], num[i][c]) * inv : 0.0f);
  }
}

/// Pass 2: CTA (b, h, 32-row query tile) through every feature block of the combined S, z.
template <class T, int D>
__global__ void __launch_bounds__(kThreads) favor_queries_kernel(const Params<T> p) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  Tile<D>& t = *reinterpret_cast<Tile<D>*>(smem_raw);
  const int64_t tiles = (p.nq + kTok - 1) / kTok;
  const int64_t tile = blockIdx.x % tiles, bh = blockIdx.x / tiles, b = bh / p.heads, h = bh % p.heads;
  const int64_t sh = state_head_of(p, b, h), i0 = tile * kTok, n = imin(kTok, p.nq - i0);
  const float* const w_head = p.proj + (p.proj_per_head ? h : 0) * p.proj_head;
  const uint8_t* const query_valid =
      p.query_valid == nullptr ? nullptr : p.query_valid + b * p.query_batch_stride;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;

  load_tile(t, p.q + b * p.qs.batch + h * p.qs.head, p.qs.row, i0, n, query_valid, p.half_scale);
  float num[kWarpRows][D / 32] = {}, den[kWarpRows] = {}, row_max[kWarpRows];
  float eps_num[D / 32] = {}, eps_den = 0.0f;
#pragma unroll
  for (int i = 0; i < kWarpRows; ++i) row_max[i] = -INFINITY;
  const auto rescale = [&](int i, float f) {
    den[i] *= f;
#pragma unroll
    for (int c = 0; c < D / 32; ++c) num[i][c] *= f;
  };
  for (int64_t block = 0; block < p.blocks; ++block) {
    project(t, p, w_head, block);
    __syncthreads();
    query_features(t, p, block, row_max, rescale);
    const int64_t slot = (sh * p.splits) * p.blocks + block;
    const float* const s = p.part_s + slot * kFeat * D + lane;
    const float* const z = p.part_z + slot * kFeat;
    for (int l = 0; l < kFeat; ++l) {
      const float zl = z[l];
      eps_den += zl;
#pragma unroll
      for (int i = 0; i < kWarpRows; ++i) den[i] = fmaf(t.g[kWarpRows * warp + i][l], zl, den[i]);
#pragma unroll
      for (int c = 0; c < D / 32; ++c) {
        const float x = s[l * D + 32 * c];
        eps_num[c] += x;
#pragma unroll
        for (int i = 0; i < kWarpRows; ++i) num[i][c] = fmaf(t.g[kWarpRows * warp + i][l], x, num[i][c]);
      }
    }
    __syncthreads();  // u is rewritten by the next block's projection
  }
  write_rows(t, p.out + b * p.os.batch + h * p.os.head, p.os.row, i0, n, p.eps, num, den, eps_num, eps_den);
}

/// Adds keys (the tile's first n rows, features in t.g for `block`) to block `block` of the state:
/// S += gᵀ V, z += gᵀ 1. Warp w owns feature rows kWarpRows·w.., lane the columns lane + 32c.
template <int D, class T>
__device__ void add_to_state(const Tile<D>& t, int64_t n, const T* v, int64_t v_row, int64_t j0, float* s, float* z) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  float acc[kWarpRows][D / 32] = {}, zacc[kWarpRows] = {};
#pragma unroll 1
  for (int j = 0; j < n; ++j) {
    if (!t.ok[j]) continue;
    const T* const vrow = v + (j0 + j) * v_row + lane;
    float g[kWarpRows];
#pragma unroll
    for (int i = 0; i < kWarpRows; ++i) {
      g[i] = t.g[j][kWarpRows * warp + i];
      zacc[i] += g[i];
    }
#pragma unroll
    for (int c = 0; c < D / 32; ++c) {
      const float x = to_float(vrow[32 * c]);
#pragma unroll
      for (int i = 0; i < kWarpRows; ++i) acc[i][c] = fmaf(g[i], x, acc[i][c]);
    }
  }
#pragma unroll
  for (int i = 0; i < kWarpRows; ++i) {
    const int f = kWarpRows * warp + i;
#pragma unroll
    for (int c = 0; c < D / 32; ++c) s[f * D + 32 * c + lane] += acc[i][c];
    if (lane == 0) z[f] += zacc[i];
  }
}

/// Shared memory of the causal kernel: the query chunk, the key tile, and the chunk's scores.
template <int D>
struct CausalSmem {
  Tile<D> q, k;
  float a[kTok][kTok + 1];  // sum over features of e(q_r) phi(k_j) at the row's running max
  float ksum[kTok];         // sum over real features of phi(k_j)
  float red[kThreads / 32];
};

/// Causal: CTA (b, h) walks the query chunks in order with its state (S, z) in workspace.
template <class T, int D>
__global__ void __launch_bounds__(kThreads) favor_causal_kernel(const Params<T> p) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  CausalSmem<D>& sm = *reinterpret_cast<CausalSmem<D>*>(smem_raw);
  const int64_t bh = blockIdx.x, b = bh / p.heads, h = bh % p.heads, hk = h / p.group;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const float* const w_head = p.proj + (p.proj_per_head ? h : 0) * p.proj_head;
  const T* const q = p.q + b * p.qs.batch + h * p.qs.head;
  const T* const k = p.k + b * p.ks.batch + hk * p.ks.head;
  const T* const v = p.v + b * p.vs.batch + hk * p.vs.head;
  const uint8_t* const key_valid = p.key_valid == nullptr ? nullptr : p.key_valid + b * p.key_batch_stride;
  const uint8_t* const query_valid =
      p.query_valid == nullptr ? nullptr : p.query_valid + b * p.query_batch_stride;
  const float shift = p.map == static_cast<int>(FeatureMap::relu) ? 0.0f : key_max(p, state_head_of(p, b, h), sm.red);
  float* const state_s = p.state_s + bh * p.blocks * kFeat * D;
  float* const state_z = p.state_z + bh * p.blocks * kFeat;
  for (int64_t e = threadIdx.x; e < p.blocks * kFeat * D; e += kThreads) state_s[e] = 0.0f;
  for (int64_t e = threadIdx.x; e < p.blocks * kFeat; e += kThreads) state_z[e] = 0.0f;
  __syncthreads();

  const int64_t off = p.causal_offset;
  const auto clamp_key = [&](int64_t j) { return imin(p.nk, imax(0, j)); };
  // Adds keys [j0, j0 + n), n <= kTok, already in sm.k, to every block of the state.
  const auto add_tile = [&](int64_t j0, int64_t n) {
    for (int64_t block = 0; block < p.blocks; ++block) {
      project(sm.k, p, w_head, block);
      __syncthreads();
      key_features(sm.k, p, block, shift, p.eps);
      __syncthreads();
      add_to_state(sm.k, n, v, p.vs.row, j0, state_s + block * kFeat * D, state_z + block * kFeat);
      __syncthreads();
    }
  };

  int64_t in_state = 0;  // keys [0, in_state) are in the state
  for (int64_t i0 = 0; i0 < p.nq; i0 += kTok) {
    const int64_t n = imin(kTok, p.nq - i0);
    // Every row of the chunk sees keys [0, p0); row r also sees [p0, i0 + r + off].
    const int64_t p0 = clamp_key(i0 + off), p1 = clamp_key(i0 + n + off), m = p1 - p0;
    for (int64_t j0 = in_state; j0 < p0; j0 += kTok) {
      const int64_t cnt = imin(kTok, p0 - j0);
      load_tile(sm.k, k, p.ks.row, j0, cnt, key_valid, p.half_scale);
      add_tile(j0, cnt);
    }
    in_state = imax(in_state, p0);

    load_tile(sm.q, q, p.qs.row, i0, n, query_valid, p.half_scale);
    load_tile(sm.k, k, p.ks.row, p0, m, key_valid, p.half_scale);
    for (int e = threadIdx.x; e < kTok * (kTok + 1); e += kThreads) (&sm.a[0][0])[e] = 0.0f;
    if (threadIdx.x < kTok) sm.ksum[threadIdx.x] = 0.0f;
    float num[kWarpRows][D / 32] = {}, den[kWarpRows] = {}, row_max[kWarpRows];
    float eps_num[D / 32] = {}, eps_den = 0.0f;
#pragma unroll
    for (int i = 0; i < kWarpRows; ++i) row_max[i] = -INFINITY;
    const auto rescale = [&](int i, float f) {
      den[i] *= f;
#pragma unroll
      for (int c = 0; c < D / 32; ++c) num[i][c] *= f;
      sm.a[kWarpRows * warp + i][lane] *= f;  // this warp's own row of the scores
    };
    __syncthreads();
    for (int64_t block = 0; block < p.blocks; ++block) {
      project(sm.q, p, w_head, block);
      project(sm.k, p, w_head, block);
      __syncthreads();
      key_features(sm.k, p, block, shift, p.eps);
      query_features(sm.q, p, block, row_max, rescale);
      __syncthreads();
      if (threadIdx.x < kTok) {
        float s = 0.0f;
        for (int l = 0; l < kFeat; ++l) s += sm.k.g[threadIdx.x][l];
        sm.ksum[threadIdx.x] += s;
      }
      // Scores of this warp's rows against the chunk's keys (lane = key), and the prefix state.
      const float* const s = state_s + block * kFeat * D + lane;
      const float* const z = state_z + block * kFeat;
#pragma unroll
      for (int i = 0; i < kWarpRows; ++i) {
        const int r = kWarpRows * warp + i;
        float a = 0.0f;
        for (int l = 0; l < kFeat; ++l) a = fmaf(sm.q.g[r][l], sm.k.g[lane][l], a);
        sm.a[r][lane] += a;
      }
      for (int l = 0; l < kFeat; ++l) {
        const float zl = z[l];
        eps_den += zl;
#pragma unroll
        for (int i = 0; i < kWarpRows; ++i) den[i] = fmaf(sm.q.g[kWarpRows * warp + i][l], zl, den[i]);
#pragma unroll
        for (int c = 0; c < D / 32; ++c) {
          const float x = s[l * D + 32 * c];
          eps_num[c] += x;
#pragma unroll
          for (int i = 0; i < kWarpRows; ++i) num[i][c] = fmaf(sm.q.g[kWarpRows * warp + i][l], x, num[i][c]);
        }
      }
      __syncthreads();  // the prefix state of this block is read by all before the chunk's keys join
      if (m > 0) add_to_state(sm.k, m, v, p.vs.row, p0, state_s + block * kFeat * D, state_z + block * kFeat);
      __syncthreads();
    }
    in_state = imax(in_state, p1);

    // The chunk's own keys: weight (a + eps · ksum) for key j <= i0 + r + off.
#pragma unroll
    for (int i = 0; i < kWarpRows; ++i) {
      const int r = kWarpRows * warp + i;
      const int64_t last = imin(m - 1, i0 + r + off - p0);
      for (int64_t j = 0; j <= last; ++j) {
        if (!sm.k.ok[j]) continue;
        const float wgt = fmaf(p.eps, sm.ksum[j], sm.a[r][j]);
        den[i] += wgt;
        const T* const vrow = v + (p0 + j) * p.vs.row + lane;
#pragma unroll
        for (int c = 0; c < D / 32; ++c) num[i][c] = fmaf(wgt, to_float(vrow[32 * c]), num[i][c]);
      }
    }
    write_rows(sm.q, p.out + b * p.os.batch + h * p.os.head, p.os.row, i0, n, p.eps, num, den, eps_num, eps_den);
    __syncthreads();  // the next chunk reloads the tiles
  }
}

/// Workspace pieces; carve() is the only layout (sizing and run).
struct Buffers {
  float *part_max = nullptr, *part_s = nullptr, *part_z = nullptr, *part_vsum = nullptr, *part_count = nullptr;
  float *state_s = nullptr, *state_z = nullptr;

  template <class T, class Alloc>
  static Buffers carve(const Params<T>& p, bool causal, int64_t D, Alloc& alloc) {
    Buffers r;
    const auto n = [](int64_t x) { return static_cast<size_t>(x); };
    const int64_t parts = p.batch * p.state_heads * p.splits * p.blocks;
    const bool need_max = !causal || p.map != static_cast<int>(FeatureMap::relu);
    if (need_max) r.part_max = alloc.template take<float>(n(parts));
    if (!causal) {
      r.part_s = alloc.template take<float>(n(parts * kFeat * D));
      r.part_z = alloc.template take<float>(n(parts * kFeat));
      r.part_vsum = alloc.template take<float>(n(p.batch * p.state_heads * p.splits * D));
      r.part_count = alloc.template take<float>(n(p.batch * p.state_heads * p.splits));
    } else {
      r.state_s = alloc.template take<float>(n(p.batch * p.heads * p.blocks * kFeat * D));
      r.state_z = alloc.template take<float>(n(p.batch * p.heads * p.blocks * kFeat));
    }
    return r;
  }
};

/// Sizes, strides and the key split of one call (no pointers into the workspace yet).
template <class T>
Params<T> plan(const Favor& m, const Tensor<const T>& q, const Tensor<const T>& k, const Tensor<const T>& v,
               const detail::Dims& d, double scale) {
  Params<T> p;
  p.q = q.data;
  p.k = k.data;
  p.v = v.data;
  p.qs = row_strides(q);
  p.ks = row_strides(k);
  p.vs = row_strides(v);
  p.proj = m.projection.data;
  p.proj_head = m.projection.stride[1];
  p.proj_row = m.projection.stride[2];
  p.proj_col = m.projection.stride[3];
  p.proj_per_head = m.projection.shape[1] != 1;
  p.batch = d.B;
  p.heads = d.H;
  p.group = d.group();
  p.nq = d.Nq;
  p.nk = d.Nk;
  p.map = static_cast<int>(m.map);
  p.features = m.projection.shape[2];
  p.blocks = (p.features + p.proj_rows() - 1) / p.proj_rows();
  p.state_heads = p.proj_per_head ? d.H : d.Hk;
  p.sqrt_scale = static_cast<float>(std::sqrt(scale));
  p.half_scale = static_cast<float>(scale / 2);
  p.eps = static_cast<float>(detail::favor_eps(m.map, m.eps));
  p.causal_offset = d.Nk - d.Nq;
  // Split the keys so that pass 1 has about kTargetBlocks CTAs (a fixed rule: workspace_bytes
  // does not depend on the device).
  const int64_t key_tiles = (d.Nk + kTok - 1) / kTok;
  const int64_t per_split_ctas = d.B * p.state_heads * p.blocks;
  const int64_t want = std::clamp<int64_t>((kTargetBlocks + per_split_ctas - 1) / per_split_ctas, 1, key_tiles);
  p.tiles_per_split = (key_tiles + want - 1) / want;
  p.splits = (key_tiles + p.tiles_per_split - 1) / p.tiles_per_split;
  return p;
}

/// Raises the kernel's dynamic shared memory limit when it needs more than 48 KB.
template <class K>
void allow_shared(K* kernel, size_t bytes, const char* where) {
  if (bytes <= 48 * 1024) return;
  const int limit = max_dynamic_shared_bytes();
  detail::require(bytes <= static_cast<size_t>(limit), where, ": needs ", bytes,
                  " bytes of shared memory per block but this device allows ", limit);
  EFFATTN_CUDA_CHECK(cudaFuncSetAttribute(reinterpret_cast<const void*>(kernel),
                                          cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)));
}

template <class T, int D>
void run(Params<T> p, bool causal, const Buffers& buf, cudaStream_t stream, const char* where) {
  p.part_max = buf.part_max;
  p.part_s = buf.part_s;
  p.part_z = buf.part_z;
  p.part_vsum = buf.part_vsum;
  p.part_count = buf.part_count;
  p.state_s = buf.state_s;
  p.state_z = buf.state_z;
  const int64_t pass1 = p.batch * p.state_heads * p.blocks * p.splits;
  if (!causal) {
    p.accumulate = true;
    allow_shared(&favor_keys_kernel<T, D>, sizeof(Tile<D>), where);
    launch(&favor_keys_kernel<T, D>, pass1, kThreads, sizeof(Tile<D>), stream, p);
    launch(&favor_combine_kernel<T, D>, p.batch * p.state_heads * p.blocks, kThreads, 0, stream, p);
    allow_shared(&favor_queries_kernel<T, D>, sizeof(Tile<D>), where);
    launch(&favor_queries_kernel<T, D>, p.batch * p.heads * ((p.nq + kTok - 1) / kTok), kThreads, sizeof(Tile<D>),
           stream, p);
    return;
  }
  if (p.map != static_cast<int>(FeatureMap::relu)) {
    p.accumulate = false;  // the key max over all valid keys, before the scan needs it
    allow_shared(&favor_keys_kernel<T, D>, sizeof(Tile<D>), where);
    launch(&favor_keys_kernel<T, D>, pass1, kThreads, sizeof(Tile<D>), stream, p);
  }
  allow_shared(&favor_causal_kernel<T, D>, sizeof(CausalSmem<D>), where);
  launch(&favor_causal_kernel<T, D>, p.batch * p.heads, kThreads, sizeof(CausalSmem<D>), stream, p);
}

}  // namespace favor
}  // namespace cuda

template <>
struct Operator<Cuda, Favor> {
  template <class T>
  static size_t workspace_bytes(const Favor& m, Tensor<const T> q, Tensor<const T> k, Tensor<const T> v,
                                const Exec<Cuda>&) {
    cuda::require_cuda_type<T>();
    constexpr const char* where = "effattn::workspace_bytes<Cuda>(Favor)";
    const detail::Dims d = detail::dims_of(q, k, v);
    const double scale = detail::check_favor(where, m, d);
    const auto p = cuda::favor::plan(m, q, k, v, d, scale);
    cuda::ByteCounter counter;
    cuda::favor::Buffers::carve(p, m.causal, d.D, counter);
    return counter.bytes;
  }

  /// Masks and the projection point to device memory (upload favor_projection's result once).
  /// Runs asynchronously on exec.stream.
  template <class T>
  static void run(const Favor& m, Tensor<const T> q, Tensor<const T> k, Tensor<const T> v, Tensor<T> out,
                  const Masks& masks, const Exec<Cuda>& exec) {
    cuda::require_cuda_type<T>();
    constexpr const char* where = "effattn::attention<Cuda>(Favor)";
    const detail::Dims d = detail::check_attention(where, q, k, v, out, masks);
    const double scale = detail::check_favor(where, m, d);
    cuda::check_cuda_views(where, q, k, v, out);
    detail::require(!detail::overlaps(m.projection, out), where, ": out overlaps projection in memory");
    auto p = cuda::favor::plan(m, q, k, v, d, scale);
    p.out = out.data;
    p.os = cuda::row_strides(out);
    p.query_valid = masks.query_valid;
    p.query_batch_stride = masks.query_batch_stride;
    p.key_valid = masks.key_valid;
    p.key_batch_stride = masks.key_batch_stride;
    cuda::ByteCounter counter;
    cuda::favor::Buffers::carve(p, m.causal, d.D, counter);
    cuda::DeviceWorkspace ws(exec, counter.bytes);
    detail::Arena arena = ws.arena();
    const auto buf = cuda::favor::Buffers::carve(p, m.causal, d.D, arena);
    cuda::dispatch_head_dim(d.D, where, [&](auto dim) {
      cuda::favor::run<T, decltype(dim)::value>(p, m.causal, buf, exec.stream, where);
    });
    ws.release();
  }
};

}  // namespace effattn
