// The CUDA building block: fused softmax attention on a raw tile problem, FlashAttention-2
// style. One block of 4 warps owns 64 query rows of one (batch, head); its query tile stays in
// shared memory while key/value tiles stream through shared memory (cp.async, double-buffered
// where it fits); each warp keeps 16 rows' logits, running max/sum and output accumulators in
// registers (online softmax), so no Nq x Nk buffer ever exists in device memory.
//
// The matrix products run on the tensor cores (mma.sync m16n8k16, float accumulation) for
// __half / __nv_bfloat16, and as float FMAs in the same register layout for float, which keeps
// float results as accurate as naive float math (tf32 would not be).
//
// Users of the raw interface (the landmark operators: Lq over (K, V), Q over (Lk, W)) fill a
// SoftmaxTiles and call run_softmax_tiles (runtime head dim) or launch_softmax_tiles<D>.
// Query, key/value and output element types may differ: the tiles are converted in shared
// memory to the compute type softmax_compute_t<TQ, TKV> (16-bit if either input is 16-bit,
// else float), so a float query workspace can attend over __half keys, or __half queries over
// float landmark keys/values, with the output in any of the three types.
#pragma once
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>

#include "effattn/cuda/common.cuh"
#include "effattn/cuda/ptx.cuh"

namespace effattn {
namespace cuda {

/// Strides in elements between consecutive batches, heads and rows of one operand; columns
/// are contiguous. A batch (or head) stride of 0 shares the operand across batches (heads).
struct RowStrides {
  int64_t batch = 0, head = 0, row = 0;
};

/// Row strides of a [B, H, S, D] view (whose stride[3] must be 1).
template <class T>
RowStrides row_strides(const Tensor<T>& t) {
  return {t.stride[0], t.stride[1], t.stride[2]};
}

/// One softmax-attention problem over batch x heads independent heads:
///   out[b,h,i,:] = sum_j softmax_j(scale * q[b,h,i,:] . k[b,h/group,j,:]) v[b,h/group,j,:]
/// over allowed j: key_valid[b,j] (when given), j < nk, and with causal j <= i + causal_offset.
/// Rows with no allowed key and invalid queries (query_valid[b,i] == 0) are written as zeros.
/// All pointers are device memory.
template <class TQ, class TKV = TQ, class TOut = TQ>
struct SoftmaxTiles {
  const TQ* q = nullptr;   // [batch, heads, nq, head_dim]
  const TKV* k = nullptr;  // [batch, heads / group, nk, head_dim]
  const TKV* v = nullptr;  // [batch, heads / group, nk, head_dim]
  TOut* out = nullptr;     // [batch, heads, nq, head_dim]; must not overlap the inputs
  RowStrides q_stride, k_stride, v_stride, out_stride;
  int64_t batch = 1, heads = 1;
  int64_t group = 1;  // query heads per key/value head
  int64_t nq = 0, nk = 0;
  int64_t head_dim = 0;  // D = Dv, one of 32, 64, 96, 128, 256
  const uint8_t* query_valid = nullptr;  // [batch] rows of nq bytes, 1 = valid; null = all valid
  int64_t query_batch_stride = 0;
  const uint8_t* key_valid = nullptr;  // [batch] rows of nk bytes, 1 = valid; null = all valid
  int64_t key_batch_stride = 0;
  float scale = 1;  // logits are scale * q . k
  bool causal = false;
  int64_t causal_offset = 0;  // nk - nq gives FlashAttention's bottom-right alignment
};

/// The type the tiles are staged and multiplied in: 16-bit if either input is 16-bit.
template <class TQ, class TKV>
using softmax_compute_t =
    std::conditional_t<sizeof(TKV) == 2, TKV, std::conditional_t<sizeof(TQ) == 2, TQ, float>>;

constexpr bool softmax_head_dim_supported(int64_t d) {
  return d == 32 || d == 64 || d == 96 || d == 128 || d == 256;
}

/// Calls f(std::integral_constant<int, D>{}) for the runtime head dim d, or throws Error.
template <class F>
void dispatch_head_dim(int64_t d, const char* where, F&& f) {
  switch (d) {
    case 32: return f(std::integral_constant<int, 32>{});
    case 64: return f(std::integral_constant<int, 64>{});
    case 96: return f(std::integral_constant<int, 96>{});
    case 128: return f(std::integral_constant<int, 128>{});
    case 256: return f(std::integral_constant<int, 256>{});
    default:
      throw Error(detail::concat(where, ": head dim ", d, " is not supported on Cuda (supported: 32, 64, 96, 128, 256)"));
  }
}

namespace tiles {

constexpr int kWarps = 4;
constexpr int kThreads = 32 * kWarps;
constexpr int kRows = 16 * kWarps;            // query rows per block, 16 per warp
constexpr size_t kSharedTargetLimit = 101376;  // smallest opt-in limit of sm_80/86/89/90 (99 KB)

/// Tile shape for compute type Tc and head dim D, chosen so that every target fits.
template <class Tc, int D>
struct Config {
  static constexpr bool kTensorCores = sizeof(Tc) == 2;
  static constexpr int kKeys = kTensorCores ? (D <= 128 ? 64 : 32) : (D <= 128 ? 32 : 16);  // keys per tile
  static constexpr int kStages = kTensorCores ? (D <= 128 ? 2 : 1) : (D <= 96 ? 2 : 1);     // K/V buffers
  static constexpr int kChunk = 16 / static_cast<int>(sizeof(Tc));  // elements per 16-byte copy
  static constexpr int kStride = D + kChunk;  // padded shared row: ldmatrix rows hit distinct banks
  static constexpr size_t kQBytes = sizeof(Tc) * kRows * kStride;
  static constexpr size_t kTileBytes = sizeof(Tc) * kKeys * kStride;  // one K or V tile
  static constexpr size_t kSharedBytes = kQBytes + 2 * kStages * kTileBytes + kStages * kKeys;
  static_assert(D % 32 == 0 && kKeys % 16 == 0, "tile shapes must fit the 16x8x16 fragments");
  static_assert(kSharedBytes <= kSharedTargetLimit, "tile does not fit an sm_86 block's shared memory");
};

/// One past the last key any query row in [i0, i0 + rows) may attend to: nk, or with causal
/// the diagonal of the last row (key tiles from there on are skipped); 0 when none.
constexpr __host__ __device__ int64_t key_end(int64_t nk, int64_t i0, int64_t rows, bool causal,
                                              int64_t causal_offset) {
  const int64_t diagonal_end = i0 + rows + causal_offset;
  const int64_t end = causal && diagonal_end < nk ? diagonal_end : nk;
  return end > 0 ? end : 0;
}

/// True when every key of [j0, j0 + keys) is allowed for every query row >= i0, so the tile
/// needs no per-element mask.
constexpr __host__ __device__ bool tile_unmasked(int64_t j0, int64_t keys, int64_t nk, int64_t i0, bool causal,
                                                 int64_t causal_offset, bool key_mask) {
  return !key_mask && j0 + keys <= nk && (!causal || j0 + keys - 1 <= i0 + causal_offset);
}

/// Base-2 exponentials (scale folded with log2 e) for the 16-bit types, where they are the
/// cheap path; precise natural exp for float, whose results must match naive float math.
template <class Tc>
struct SoftmaxExp {
  static constexpr bool kBase2 = sizeof(Tc) == 2;
  __device__ static float logit_scale(float scale) { return kBase2 ? scale * 1.4426950408889634f : scale; }
  __device__ static float exp(float x) { return kBase2 ? exp2f(x) : expf(x); }
};

/// Whether each operand may be copied with 16-byte cp.async (same type as the compute type,
/// 16-byte aligned base and strides); otherwise element loads convert on the way.
struct LoadPlan {
  bool q_vector = false;
  bool kv_vector = false;
};

/// Copies rows [row0, row0 + kTileRows) x [0, D) of a strided global matrix (`base` is its row 0)
/// into a padded shared tile; rows at or beyond `valid_rows` (counted from row0) become zeros.
template <class Tc, int D, int kTileRows, class Src>
__device__ __forceinline__ void load_tile(Tc* tile, const Src* base, int64_t row0, int64_t row_stride,
                                          int64_t valid_rows, bool vector) {
  using C = Config<Tc, D>;
  if constexpr (std::is_same_v<Src, Tc>) {
    if (vector) {
      constexpr int kPerRow = D / C::kChunk;
      for (int c = threadIdx.x; c < kTileRows * kPerRow; c += kThreads) {
        const int r = c / kPerRow, col = (c % kPerRow) * C::kChunk;
        const bool inside = r < valid_rows;
        const Src* src = inside ? base + (row0 + r) * row_stride + col : base;  // not read when outside
        ptx::cp_async_16(tile + r * C::kStride + col, src, inside);
      }
      return;
    }
  }
  for (int e = threadIdx.x; e < kTileRows * D; e += kThreads) {
    const int r = e / D, col = e % D;
    tile[r * C::kStride + col] =
        r < valid_rows ? convert<Tc>(base[(row0 + r) * row_stride + col]) : from_float<Tc>(0.0f);
  }
}

/// s = Q_w K^T for warp w's 16 query rows and the kKeys keys of k_tile, in the C-fragment layout:
/// s[n][0..1] = (row g, keys 8n + 2t..+1), s[n][2..3] = (row g + 8, same keys).
template <class Tc, int D>
__device__ __forceinline__ void tile_scores(float (&s)[Config<Tc, D>::kKeys / 8][4], const Tc* q_tile,
                                            const Tc* k_tile, int warp, int lane) {
  using C = Config<Tc, D>;
  using F = ptx::Fragments;
  constexpr int kN = C::kKeys / 8;
#pragma unroll
  for (int n = 0; n < kN; ++n) s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.0f;
  if constexpr (C::kTensorCores) {
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      // A = Q rows [16w, 16w + 16) x dims [16kk, 16kk + 16).
      uint32_t a[4];
      ptx::ldmatrix_x4(a, q_tile + (warp * 16 + F::a_row(lane)) * C::kStride + kk * 16 + F::a_col(lane));
#pragma unroll
      for (int np = 0; np < kN / 2; ++np) {
        // B = K^T for keys [16np, 16np + 16) (blocks 2np, 2np + 1): K rows are B's columns.
        uint32_t b[4];
        ptx::ldmatrix_x4(b, k_tile + (np * 16 + F::bn_row(lane)) * C::kStride + kk * 16 + F::bn_col(lane));
        ptx::mma_16816<Tc>(s[2 * np], a, b[0], b[1]);
        ptx::mma_16816<Tc>(s[2 * np + 1], a, b[2], b[3]);
      }
    }
  } else {
    const int g = lane / 4, t = lane % 4;
    const float* qa = q_tile + (warp * 16 + g) * C::kStride;
    const float* qb = qa + 8 * C::kStride;
#pragma unroll 2
    for (int d = 0; d < D; d += 4) {
      const float4 x = *reinterpret_cast<const float4*>(qa + d);
      const float4 y = *reinterpret_cast<const float4*>(qb + d);
#pragma unroll
      for (int n = 0; n < kN; ++n)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const float4 kr = *reinterpret_cast<const float4*>(k_tile + (8 * n + 2 * t + e) * C::kStride + d);
          s[n][e] = fmaf(x.w, kr.w, fmaf(x.z, kr.z, fmaf(x.y, kr.y, fmaf(x.x, kr.x, s[n][e]))));
          s[n][2 + e] = fmaf(y.w, kr.w, fmaf(y.z, kr.z, fmaf(y.y, kr.y, fmaf(y.x, kr.x, s[n][2 + e]))));
        }
    }
  }
}

/// o += P V_tile, P being the weights in s (same layout as tile_scores), o[n] covering output
/// columns 8n + 2t..+1 of rows g and g + 8.
template <class Tc, int D>
__device__ __forceinline__ void tile_accumulate(float (&o)[D / 8][4], const float (&s)[Config<Tc, D>::kKeys / 8][4],
                                                const Tc* v_tile, int lane) {
  using C = Config<Tc, D>;
  using F = ptx::Fragments;
  if constexpr (C::kTensorCores) {
#pragma unroll
    for (int kk = 0; kk < C::kKeys / 16; ++kk) {
      // The weights of key blocks 2kk, 2kk + 1 are already in A's layout for keys [16kk, 16kk + 16).
      uint32_t a[4];
#pragma unroll
      for (int r = 0; r < 4; ++r) {
        const float* c = s[2 * kk + F::acc_block(r)];
        a[r] = ptx::pack2<Tc>(c[F::acc_elem(r)], c[F::acc_elem(r) + 1]);
      }
#pragma unroll
      for (int dp = 0; dp < D / 16; ++dp) {
        // B = V keys [16kk, 16kk + 16) x dims [16dp, 16dp + 16) (output blocks 2dp, 2dp + 1).
        uint32_t b[4];
        ptx::ldmatrix_x4_trans(b, v_tile + (kk * 16 + F::bk_row(lane)) * C::kStride + dp * 16 + F::bk_col(lane));
        ptx::mma_16816<Tc>(o[2 * dp], a, b[0], b[1]);
        ptx::mma_16816<Tc>(o[2 * dp + 1], a, b[2], b[3]);
      }
    }
  } else {
    const int t = lane % 4;
#pragma unroll
    for (int j = 0; j < C::kKeys; ++j) {
      // The weights of key j for rows g and g + 8, from the lane of this quad that holds them.
      const int src = F::owner_lane(lane, j);
      const float pa = __shfl_sync(0xffffffffu, s[j / 8][F::owner_elem(j)], src);
      const float pb = __shfl_sync(0xffffffffu, s[j / 8][F::owner_elem(j) + 2], src);
      const float* vrow = v_tile + j * C::kStride + 2 * t;
#pragma unroll
      for (int n = 0; n < D / 8; ++n) {
        const float2 x = *reinterpret_cast<const float2*>(vrow + 8 * n);
        o[n][0] = fmaf(pa, x.x, o[n][0]);
        o[n][1] = fmaf(pa, x.y, o[n][1]);
        o[n][2] = fmaf(pb, x.x, o[n][2]);
        o[n][3] = fmaf(pb, x.y, o[n][3]);
      }
    }
  }
}

template <class Tc, int D, class TQ, class TKV, class TOut>
__global__ void __launch_bounds__(kThreads)
    softmax_tiles_kernel(const SoftmaxTiles<TQ, TKV, TOut> p, const LoadPlan plan) {
  using C = Config<Tc, D>;
  using Exp = SoftmaxExp<Tc>;
  constexpr int kKeys = C::kKeys;
  const float kNegInf = -INFINITY;

  extern __shared__ __align__(16) unsigned char smem[];
  Tc* const q_tile = reinterpret_cast<Tc*>(smem);
  // Stage s holds K at kv + 2s tiles and V right after it; key_ok[s] the keys' validity.
  Tc* const kv = reinterpret_cast<Tc*>(smem + C::kQBytes);
  uint8_t* const key_ok = smem + C::kQBytes + 2 * C::kStages * C::kTileBytes;
  const auto k_tile = [&](int stage) { return kv + (2 * stage) * kKeys * C::kStride; };
  const auto v_tile = [&](int stage) { return kv + (2 * stage + 1) * kKeys * C::kStride; };

  // Work item: blocks run the last query tiles (the longest under causal) of every head first.
  const int64_t heads_total = p.batch * p.heads;
  const int64_t query_tiles = (p.nq + kRows - 1) / kRows;
  const int64_t item = blockIdx.x;
  const int64_t bh = item % heads_total;
  const int64_t i0 = (query_tiles - 1 - item / heads_total) * kRows;  // first query row
  const int64_t b = bh / p.heads, h = bh % p.heads, hk = h / p.group;
  const TQ* const q = p.q + b * p.q_stride.batch + h * p.q_stride.head;
  const TKV* const k = p.k + b * p.k_stride.batch + hk * p.k_stride.head;
  const TKV* const v = p.v + b * p.v_stride.batch + hk * p.v_stride.head;
  TOut* const out = p.out + b * p.out_stride.batch + h * p.out_stride.head;
  const uint8_t* const key_valid = p.key_valid == nullptr ? nullptr : p.key_valid + b * p.key_batch_stride;
  const uint8_t* const query_valid =
      p.query_valid == nullptr ? nullptr : p.query_valid + b * p.query_batch_stride;

  const int64_t rows_here = p.nq - i0 < kRows ? p.nq - i0 : kRows;
  const int64_t key_tiles = (key_end(p.nk, i0, rows_here, p.causal, p.causal_offset) + kKeys - 1) / kKeys;

  // Stages key tile `tile` (zero rows past nk) and its validity bytes into buffer `stage`.
  const auto load_keys = [&](int64_t tile, int stage) {
    const int64_t j0 = tile * kKeys;
    const int64_t valid = p.nk - j0 < kKeys ? p.nk - j0 : kKeys;
    load_tile<Tc, D, kKeys>(k_tile(stage), k, j0, p.k_stride.row, valid, plan.kv_vector);
    load_tile<Tc, D, kKeys>(v_tile(stage), v, j0, p.v_stride.row, valid, plan.kv_vector);
    if (threadIdx.x < kKeys) {
      const int c = threadIdx.x;
      key_ok[stage * kKeys + c] = c < valid && (key_valid == nullptr || key_valid[j0 + c] != 0);
    }
  };

  load_tile<Tc, D, kRows>(q_tile, q, i0, p.q_stride.row, rows_here, plan.q_vector);
  if (key_tiles > 0) load_keys(0, 0);
  ptx::cp_async_commit();

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  const int64_t row_a = i0 + warp * 16 + g;  // query row of s[.][0..1]; s[.][2..3] is row_a + 8
  const float logit_scale = Exp::logit_scale(p.scale);
  float o[D / 8][4];
#pragma unroll
  for (int n = 0; n < D / 8; ++n) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.0f;
  float row_max[2] = {kNegInf, kNegInf};  // running max of the (scaled) logits, per quad
  float row_sum[2] = {0.0f, 0.0f};        // this thread's part of the running denominator

  for (int64_t tile = 0; tile < key_tiles; ++tile) {
    const int stage = C::kStages == 2 ? static_cast<int>(tile & 1) : 0;
    if (C::kStages == 2 && tile + 1 < key_tiles) {
      load_keys(tile + 1, stage ^ 1);  // that buffer was last read before the previous barrier
      ptx::cp_async_commit();
      ptx::cp_async_wait<1>();
    } else {
      ptx::cp_async_wait<0>();
    }
    __syncthreads();

    float s[kKeys / 8][4];
    tile_scores<Tc, D>(s, q_tile, k_tile(stage), warp, lane);

    // Scaled logits; disallowed keys (invalid, past nk, or after the causal diagonal) -> -inf.
    const int64_t j0 = tile * kKeys;
    const bool all_allowed = tile_unmasked(j0, kKeys, p.nk, i0, p.causal, p.causal_offset, key_valid != nullptr);
    const uint8_t* const ok = key_ok + stage * kKeys;
#pragma unroll
    for (int n = 0; n < kKeys / 8; ++n)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int c = 8 * n + 2 * t + (e & 1);
        const int64_t row = row_a + 8 * (e >> 1);
        const bool allowed = all_allowed || (ok[c] != 0 && (!p.causal || j0 + c <= row + p.causal_offset));
        s[n][e] = allowed ? s[n][e] * logit_scale : kNegInf;
      }

    // Online softmax per row: the quad (4 lanes) holding a row agrees on its max.
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float mx = kNegInf;
#pragma unroll
      for (int n = 0; n < kKeys / 8; ++n) mx = fmaxf(mx, fmaxf(s[n][2 * r], s[n][2 * r + 1]));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
      const float new_max = fmaxf(row_max[r], mx);
      // A row with no allowed key so far keeps zero weights: exp(-inf - 0) = 0, never NaN.
      const float base = new_max == kNegInf ? 0.0f : new_max;
      const float rescale = Exp::exp(row_max[r] - base);  // 0 while the row was empty
      row_max[r] = new_max;
      float sum = 0.0f;
#pragma unroll
      for (int n = 0; n < kKeys / 8; ++n)
#pragma unroll
        for (int e = 2 * r; e < 2 * r + 2; ++e) {
          s[n][e] = Exp::exp(s[n][e] - base);
          sum += s[n][e];
        }
      row_sum[r] = row_sum[r] * rescale + sum;
#pragma unroll
      for (int n = 0; n < D / 8; ++n) {
        o[n][2 * r] *= rescale;
        o[n][2 * r + 1] *= rescale;
      }
    }

    tile_accumulate<Tc, D>(o, s, v_tile(stage), lane);
    __syncthreads();  // every warp is done with this stage before it is refilled
    if (C::kStages == 1 && tile + 1 < key_tiles) {
      load_keys(tile + 1, 0);
      ptx::cp_async_commit();
    }
  }
  ptx::cp_async_wait<0>();  // the query tile's copies, when no key tile ran

  // Normalize and store; rows with no allowed key or an invalid query get zeros.
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    float sum = row_sum[r];
    sum += __shfl_xor_sync(0xffffffffu, sum, 1);
    sum += __shfl_xor_sync(0xffffffffu, sum, 2);
    const int64_t row = row_a + 8 * r;
    if (row >= p.nq) continue;
    const bool live = sum > 0.0f && (query_valid == nullptr || query_valid[row] != 0);
    const float inv = live ? 1.0f / sum : 0.0f;
    TOut* const dst = out + row * p.out_stride.row + 2 * t;
#pragma unroll
    for (int n = 0; n < D / 8; ++n) {
      dst[8 * n] = from_float<TOut>(live ? o[n][2 * r] * inv : 0.0f);
      dst[8 * n + 1] = from_float<TOut>(live ? o[n][2 * r + 1] * inv : 0.0f);
    }
  }
}

}  // namespace tiles

/// Validates a raw problem (sizes, pointers) for head dim D; messages name `where`.
template <class TQ, class TKV, class TOut>
void check_softmax_tiles(const char* where, const SoftmaxTiles<TQ, TKV, TOut>& p) {
  detail::require(p.q != nullptr && p.k != nullptr && p.v != nullptr && p.out != nullptr, where,
                  ": null pointer (q ", static_cast<const void*>(p.q), ", k ", static_cast<const void*>(p.k), ", v ",
                  static_cast<const void*>(p.v), ", out ", static_cast<const void*>(p.out), ")");
  detail::require(p.batch > 0 && p.heads > 0 && p.group > 0 && p.nq > 0 && p.nk > 0, where,
                  ": sizes must be positive: batch ", p.batch, ", heads ", p.heads, ", group ", p.group, ", nq ",
                  p.nq, ", nk ", p.nk);
  detail::require(p.heads % p.group == 0, where, ": heads (", p.heads, ") must be a multiple of group (", p.group,
                  ")");
}

/// Launches the fused kernel for a compile-time head dim D (== p.head_dim) on `stream`.
/// Asynchronous: never synchronizes; launch failures throw CudaError, bad arguments Error.
template <int D, class TQ, class TKV, class TOut>
void launch_softmax_tiles(const SoftmaxTiles<TQ, TKV, TOut>& p, cudaStream_t stream) {
  static_assert(is_element_v<TQ> && is_element_v<TKV> && is_element_v<TOut>,
                "effattn: tile operands must be float, __half or __nv_bfloat16");
  static_assert(sizeof(TQ) == 4 || sizeof(TKV) == 4 || std::is_same_v<TQ, TKV>,
                "effattn: __half and __nv_bfloat16 inputs cannot be mixed");
  using Tc = softmax_compute_t<TQ, TKV>;
  using C = tiles::Config<Tc, D>;
  constexpr const char* where = "effattn::cuda::launch_softmax_tiles";
  check_softmax_tiles(where, p);
  detail::require(p.head_dim == D, where, ": head_dim = ", p.head_dim, " but the kernel was chosen for ", D);

  const int64_t query_tiles = (p.nq + tiles::kRows - 1) / tiles::kRows;
  const int64_t blocks = query_tiles * p.batch * p.heads;
  detail::require(blocks <= std::numeric_limits<int32_t>::max(), where, ": ", blocks,
                  " blocks (batch * heads * ceil(nq / 64)) exceed the grid limit 2^31 - 1");
  tiles::LoadPlan plan;
  plan.q_vector = std::is_same_v<TQ, Tc> &&
                  vector_aligned<TQ>(p.q, 16, {p.q_stride.batch, p.q_stride.head, p.q_stride.row});
  plan.kv_vector = std::is_same_v<TKV, Tc> &&
                   vector_aligned<TKV>(p.k, 16, {p.k_stride.batch, p.k_stride.head, p.k_stride.row}) &&
                   vector_aligned<TKV>(p.v, 16, {p.v_stride.batch, p.v_stride.head, p.v_stride.row});

  const auto kernel = &tiles::softmax_tiles_kernel<Tc, D, TQ, TKV, TOut>;
  constexpr int kBytes = static_cast<int>(C::kSharedBytes);
  if (kBytes > 48 * 1024) {
    const int limit = max_dynamic_shared_bytes();
    detail::require(kBytes <= limit, where, ": head dim ", D, " needs ", kBytes,
                    " bytes of shared memory per block but this device allows ", limit);
    EFFATTN_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kBytes));
  }
  // cudaLaunchKernel reports this launch's own failure, not an earlier error of the caller's.
  SoftmaxTiles<TQ, TKV, TOut> params = p;
  void* args[] = {&params, &plan};
  EFFATTN_CUDA_CHECK(cudaLaunchKernel(reinterpret_cast<const void*>(kernel), dim3(static_cast<unsigned>(blocks)),
                                      dim3(tiles::kThreads), args, kBytes, stream));
}

/// launch_softmax_tiles for the runtime head dim p.head_dim (Error when unsupported).
template <class TQ, class TKV, class TOut>
void run_softmax_tiles(const SoftmaxTiles<TQ, TKV, TOut>& p, cudaStream_t stream) {
  dispatch_head_dim(p.head_dim, "effattn::cuda::run_softmax_tiles",
                    [&](auto d) { launch_softmax_tiles<decltype(d)::value>(p, stream); });
}

}  // namespace cuda
}  // namespace effattn
