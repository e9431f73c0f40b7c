// Landmark attention on CUDA, the shared core of Nyström and Proxy (DESIGN.md, "Landmark
// attention"): out = K1 · Z · (K3 · V), Z = pinv(K2) by Newton–Schulz. Same semantics as the CPU
// core (include/effattn/cpu/landmark.hpp): dropped query landmarks zero their rows of K2 and K3,
// dropped key landmarks are excluded from the softmax of K1 and K2.
//
// Launches, all on the caller's stream, none per head or per matrix product:
//   segment_means_kernel  Nyström landmarks, one pass over Q and K (masked means, validity)
//   softmax tiles         K3·V = attention of Lq over (K, V)              (softmax_tiles.cuh)
//   pinv_kernel           per (b, h) matrix (per head when proxies are batch-shared): K2, its
//                         column dropout, Z0 and every Newton–Schulz iteration, one CTA each
//   apply_z_kernel        W = Z · (K3·V) per (b, h)
//   softmax tiles         out = K1·W = attention of Q over (Lk, W)
// Landmark intermediates are float. The tile kernel stages its operands in the 16-bit compute
// type when either side is 16-bit (softmax_compute_t), so for __half / __nv_bfloat16 inputs Lq,
// Lk and W are rounded to that type inside the two softmax launches (Proxy stores W in T).
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>

#include "effattn/cuda/common.cuh"
#include "effattn/cuda/kernel_util.cuh"
#include "effattn/cuda/softmax_tiles.cuh"

namespace effattn {
namespace cuda {
namespace landmark {

constexpr int kMeanThreads = 128;
constexpr int kThreads = 256;          // pinv and apply CTAs
constexpr int64_t kPinvBlocks = 512;   // pinv CTAs at most; each owns pinv_scratch_floats(M)

/// Scratch floats of one pinv CTA: K2, KZ, A, S [M, M] and the guard's P, K2·P, (K2 Z)·(K2 P)
/// [M, kGuardProbes].
constexpr int64_t pinv_scratch_floats(int64_t m) { return 4 * m * m + 3 * m * effattn::detail::kGuardProbes; }
constexpr int64_t kMaxLandmarks = 256;
constexpr int kMaxHeadDim = 256;  // the tile kernel's largest head dim

/// means[b, h, i, :] = mean of the valid rows of segment i of x[b, h / src_group]; segment i of
/// n rows is [floor(i n / m), floor((i + 1) n / m)). A segment with no valid row gives zeros and
/// landmark_valid[b, i] = 0 (written by head 0; validity depends on the batch only).
template <class T>
__global__ void __launch_bounds__(kMeanThreads)
    segment_means_kernel(const T* x, RowStrides xs, int64_t heads, int64_t src_group, int64_t n, int64_t d,
                         int64_t m, const uint8_t* valid, int64_t valid_stride, float* means,
                         uint8_t* landmark_valid) {
  const int64_t item = blockIdx.x;
  const int64_t i = item % m, bh = item / m, h = bh % heads, b = bh / heads;
  const T* src = x + b * xs.batch + (h / src_group) * xs.head;
  const uint8_t* ok = valid == nullptr ? nullptr : valid + b * valid_stride;
  const int64_t r0 = i * n / m, r1 = (i + 1) * n / m;
  float* dst = means + item * d;
  int64_t count = 0;
  for (int64_t c = threadIdx.x; c < d; c += kMeanThreads) {
    float acc = 0.0f;
    count = 0;
    for (int64_t r = r0; r < r1; ++r) {
      if (ok != nullptr && ok[r] == 0) continue;
      ++count;
      acc += to_float(src[r * xs.row + c]);
    }
    dst[c] = count > 0 ? acc / static_cast<float>(count) : 0.0f;
  }
  if (threadIdx.x == 0 && h == 0) landmark_valid[b * m + i] = count > 0 ? 1 : 0;
}

/// One CTA: C[rows, cols] = diag · I + alpha · A[rows, inner] · B[inner, cols], row-major float
/// operands in global memory (L2-resident for the M ≤ 256 matrices here). 64×64 output tiles,
/// 4×4 outputs per thread, 16-deep shared slabs. C must not alias A or B. Ends with a barrier,
/// so the CTA may read C next.
template <class TC>
__device__ __noinline__ void block_gemm(TC* c, int64_t ldc, const float* a, int64_t lda, const float* b, int64_t ldb,
                           int64_t rows, int64_t cols, int64_t inner, float diag, float alpha) {
  __shared__ float as[16][64 + 4];  // as[k][row]
  __shared__ float bs[16][64 + 4];  // bs[k][col]
  const int t = threadIdx.x, tx = t % 16, ty = t / 16;
  for (int64_t r0 = 0; r0 < rows; r0 += 64)
    for (int64_t c0 = 0; c0 < cols; c0 += 64) {
      float acc[4][4] = {};
      for (int64_t k0 = 0; k0 < inner; k0 += 16) {
#pragma unroll
        for (int q = 0; q < 4; ++q) {
          const int e = t + kThreads * q;
          const int ar = e / 16, ak = e % 16;
          as[ak][ar] = (r0 + ar < rows && k0 + ak < inner) ? a[(r0 + ar) * lda + k0 + ak] : 0.0f;
          const int bk = e / 64, bc = e % 64;
          bs[bk][bc] = (k0 + bk < inner && c0 + bc < cols) ? b[(k0 + bk) * ldb + c0 + bc] : 0.0f;
        }
        __syncthreads();
#pragma unroll
        for (int k = 0; k < 16; ++k) {
          float av[4], bv[4];
#pragma unroll
          for (int i = 0; i < 4; ++i) av[i] = as[k][ty + 16 * i];
#pragma unroll
          for (int j = 0; j < 4; ++j) bv[j] = bs[k][tx + 16 * j];
#pragma unroll
          for (int i = 0; i < 4; ++i)
#pragma unroll
            for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(av[i], bv[j], acc[i][j]);
        }
        __syncthreads();
      }
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          const int64_t r = r0 + ty + 16 * i, col = c0 + tx + 16 * j;
          if (r < rows && col < cols) c[r * ldc + col] = from_float<TC>((r == col ? diag : 0.0f) + alpha * acc[i][j]);
        }
    }
  __syncthreads();
}

/// The pinv work: one K2 per matrix index i = b · heads + h (b = 0 only when proxies are shared).
struct PinvParams {
  int64_t matrices = 0, heads = 1, m = 0, d = 0;
  int iterations = 0;
  float scale = 1;
  float dropout = 0;  // Proxy's decomposed column dropout, drawn at (seed, b, h, column)
  uint64_t seed = 0;
  const uint8_t* lq_valid = nullptr;  // [B, m] landmark validity (Nyström), null = all kept
  const uint8_t* lk_valid = nullptr;
  float* z = nullptr;        // [matrices, m, m] result
  float* scratch = nullptr;  // [gridDim.x, pinv_scratch_floats(m)]: K2, KZ, A, S, P, KP, KZ·KP
};

/// K2 = softmax_row(s Lq Lkᵀ) (rows of dropped query landmarks zero, dropped key landmarks
/// excluded), column dropout, Z0 = K2ᵀ / (max column sum · max row sum), then
/// Z <- 0.25 Z (13I − KZ (15I − KZ (7I − KZ))), KZ = K2 Z, up to `iterations` times (the
/// probe-residual guard); as the CPU's landmark::kernel2 and newton_schulz. Grid-strided over
/// the matrices.
template <class TL>
__global__ void __launch_bounds__(kThreads)
    pinv_kernel(const TL* lq, RowStrides lqs, const TL* lk, RowStrides lks, const PinvParams p) {
  __shared__ float red[kThreads / 32];
  __shared__ float lk_tile[32][kMaxHeadDim + 1];
  const int64_t m = p.m, mm = m * m;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  float* const k2 = p.scratch + static_cast<int64_t>(blockIdx.x) * pinv_scratch_floats(m);
  float* const kz = k2 + mm;
  float* const amat = kz + mm;
  float* const smat = amat + mm;
  constexpr int kProbes = effattn::detail::kGuardProbes;
  float* const probes = smat + mm;           // P [m, kProbes]
  float* const kp = probes + m * kProbes;    // K2·P
  float* const probed = kp + m * kProbes;    // (K2 Z)·(K2 P)
  for (int64_t e = threadIdx.x; e < m * kProbes; e += kThreads)
    probes[e] = effattn::detail::guard_probe(e / kProbes, static_cast<int>(e % kProbes));
  const float keep_scale = 1.0f / (1.0f - p.dropout);
  const float kNegInf = -INFINITY;
  for (int64_t item = blockIdx.x; item < p.matrices; item += gridDim.x) {
    const int64_t b = item / p.heads, h = item % p.heads;
    const TL* const q = lq + b * lqs.batch + h * lqs.head;
    const TL* const k = lk + b * lks.batch + h * lks.head;
    float* const z = p.z + item * mm;

    // Logits of K2 into its rows, 32 key landmarks at a time staged in shared memory (lane c of
    // a warp reads landmark c, conflict-free); a warp per query landmark row.
    for (int64_t c0 = 0; c0 < m; c0 += 32) {
      const int64_t nc = m - c0 < 32 ? m - c0 : 32;
      for (int64_t e = threadIdx.x; e < 32 * p.d; e += kThreads) {
        const int64_t c = e / p.d, col = e % p.d;
        lk_tile[c][col] = c < nc ? to_float(k[(c0 + c) * lks.row + col]) : 0.0f;
      }
      __syncthreads();
      for (int64_t r = warp; r < m; r += kThreads / 32) {
        const int64_t c = c0 + lane;
        if (c >= m) continue;
        float logit = kNegInf;
        if ((p.lq_valid == nullptr || p.lq_valid[b * m + r] != 0) &&
            (p.lk_valid == nullptr || p.lk_valid[b * m + c] != 0)) {
          float dot = 0.0f;
          for (int64_t e = 0; e < p.d; ++e) dot = fmaf(to_float(q[r * lqs.row + e]), lk_tile[lane][e], dot);
          logit = dot * p.scale;
        }
        k2[r * m + c] = logit;
      }
      __syncthreads();  // the tile is restaged next
    }
    // Softmax of each row with its column dropout, by the lanes that wrote it (c % 32 == lane).
    for (int64_t r = warp; r < m; r += kThreads / 32) {
      float* const row = k2 + r * m;
      float mx = kNegInf;
      for (int64_t c = lane; c < m; c += 32) mx = fmaxf(mx, row[c]);
      for (int o = 16; o > 0; o /= 2) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
      float sum = 0.0f;
      for (int64_t c = lane; c < m; c += 32) {
        const float w = row[c] == kNegInf ? 0.0f : expf(row[c] - mx);
        row[c] = w;
        sum += w;
      }
      for (int o = 16; o > 0; o /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, o);
      const float inv = sum > 0.0f ? 1.0f / sum : 0.0f;  // a row with no kept key stays zero
      for (int64_t c = lane; c < m; c += 32) {
        float drop = 1.0f;
        if (p.dropout > 0.0f) drop = column_keep(p.seed, b, h, c, p.dropout) ? keep_scale : 0.0f;
        row[c] = row[c] * inv * drop;
      }
    }
    __syncthreads();

    // Z0 from the largest column and row sums of this matrix alone.
    float max_col = kNegInf, max_row = kNegInf;
    for (int64_t j = threadIdx.x; j < m; j += kThreads) {
      float col = 0.0f, rsum = 0.0f;
      for (int64_t i = 0; i < m; ++i) {
        col += k2[i * m + j];
        rsum += k2[j * m + i];
      }
      max_col = fmaxf(max_col, col);
      max_row = fmaxf(max_row, rsum);
    }
    const float denom = block_max<kThreads>(max_col, red) * block_max<kThreads>(max_row, red);
    if (!(denom > 0.0f && denom < INFINITY)) {  // every landmark dropped: pinv(0) = 0; non-finite K2: NaN
      const float fill = denom == 0.0f ? 0.0f : __int_as_float(0x7fffffff);
      for (int64_t e = threadIdx.x; e < mm; e += kThreads) z[e] = fill;
      __syncthreads();
      continue;
    }
    for (int64_t e = threadIdx.x; e < mm; e += kThreads) z[e] = k2[(e % m) * m + e / m] / denom;
    __syncthreads();
    block_gemm(kp, kProbes, k2, m, probes, kProbes, m, kProbes, m, 0.0f, 1.0f);  // K2·P

    // As the CPU's newton_schulz: stop before an iterate whose probe residual ‖(K2 Z − I) K2 P‖
    // exceeds twice its best (it never grows in exact arithmetic; rounding in a near-singular
    // K2 is taking over), keeping the iterate before. Every thread sees the same residual.
    float* cur = z;
    float* spare = smat;
    float best = INFINITY;
    for (int it = 0; it <= p.iterations; ++it) {
      block_gemm(kz, m, k2, m, cur, m, m, m, m, 0.0f, 1.0f);                   // KZ = K2 Z
      block_gemm(probed, kProbes, kz, m, kp, kProbes, m, kProbes, m, 0.0f, 1.0f);  // KZ·(K2 P)
      float part = 0.0f;
      for (int64_t e = threadIdx.x; e < m * kProbes; e += kThreads) {
        const float r = probed[e] - kp[e];
        part = fmaf(r, r, part);
      }
      const float residual = sqrtf(block_sum<kThreads>(part, red));
      if (it > 0 && !(residual <= 2.0f * best)) {  // grown, or NaN: back to the previous iterate
        float* const t = cur;
        cur = spare;
        spare = t;
        break;
      }
      best = fminf(best, residual);
      if (it == p.iterations) break;
      for (int64_t e = threadIdx.x; e < mm; e += kThreads) amat[e] = (e / m == e % m ? 7.0f : 0.0f) - kz[e];
      __syncthreads();
      block_gemm(spare, m, kz, m, amat, m, m, m, m, 15.0f, -1.0f);  // S = 15I − KZ A
      block_gemm(amat, m, kz, m, spare, m, m, m, m, 13.0f, -1.0f);  // A = 13I − KZ S
      block_gemm(spare, m, cur, m, amat, m, m, m, m, 0.0f, 0.25f);  // Z' = 0.25 Z A
      float* const t = cur;
      cur = spare;
      spare = t;
    }
    if (cur != z) {
      for (int64_t e = threadIdx.x; e < mm; e += kThreads) z[e] = cur[e];
      __syncthreads();
    }
  }
}

/// w[i] = z[i or h] · kv[i] for every (b, h) item i = b · heads + h; [m, d] row-major each.
template <class TW>
__global__ void __launch_bounds__(kThreads)
    apply_z_kernel(const float* z, bool z_per_head, const float* kv, TW* w, int64_t heads, int64_t m, int64_t d) {
  const int64_t item = blockIdx.x;
  const float* const zi = z + (z_per_head ? item % heads : item) * m * m;
  block_gemm(w + item * m * d, d, zi, m, kv + item * m * d, d, m, d, m, 0.0f, 1.0f);
}

}  // namespace landmark

/// One landmark call after the operator's checks. TL is the landmarks' element type (float
/// workspace for Nyström, T for the caller's proxies); W is stored in TL too, because the tile
/// kernel takes keys and values of one type.
template <class T, class TL>
struct LandmarkCall {
  int64_t M = 0;
  bool segment_means = false;  // Nyström: Lq, Lk are masked segment means of q, k
  const TL* proxy_q = nullptr;  // Proxy: [1 or B, H, M, D] with these row strides
  const TL* proxy_k = nullptr;
  RowStrides proxy_q_stride, proxy_k_stride;
  bool shared_z = false;  // proxies shared by the batch: one Z per head
  int iterations = 0;
  bool invert = true;  // false: W = K3·V (Proxy with pinv_iterations = 0)
  float dropout = 0;
  uint64_t seed = 0;
  float scale = 1;
};

/// The device workspace of one landmark call. carve() is its only layout: with a ByteCounter it
/// sizes the workspace (workspace_bytes), with the arena it hands out the pieces (run).
template <class TL>
struct LandmarkBuffers {
  float* lq = nullptr;         // [B, H, M, D] Nyström query landmarks; reused for W afterwards
  float* lk = nullptr;         // [B, H, M, D] Nyström key landmarks (per query head: K1 has group 1)
  uint8_t* lq_valid = nullptr;  // [B, M]
  uint8_t* lk_valid = nullptr;  // [B, M]
  float* kv = nullptr;          // [B, H, M, D] K3·V in float when it is inverted after
  float* z = nullptr;           // [matrices, M, M]
  float* pinv_scratch = nullptr;  // [min(matrices, kPinvBlocks), pinv_scratch_floats(M)]
  TL* w = nullptr;              // [B, H, M, D] W = Z·(K3·V) (aliases lq for Nyström)

  template <class T, class Alloc>
  static LandmarkBuffers carve(const LandmarkCall<T, TL>& c, const detail::Dims& d, Alloc& alloc) {
    LandmarkBuffers r;
    const size_t bhmd = static_cast<size_t>(d.B * d.H * c.M * d.D), bm = static_cast<size_t>(d.B * c.M);
    if (c.segment_means) {
      r.lq = alloc.template take<float>(bhmd);
      r.lk = alloc.template take<float>(bhmd);
      r.lq_valid = alloc.template take<uint8_t>(bm);
      r.lk_valid = alloc.template take<uint8_t>(bm);
    }
    if (c.invert) {
      const int64_t matrices = matrix_count(c, d);
      r.kv = alloc.template take<float>(bhmd);
      r.z = alloc.template take<float>(static_cast<size_t>(matrices * c.M * c.M));
      r.pinv_scratch = alloc.template take<float>(
          static_cast<size_t>(std::min(matrices, landmark::kPinvBlocks) * landmark::pinv_scratch_floats(c.M)));
    }
    if constexpr (std::is_same_v<TL, float>) {
      if (c.segment_means) r.w = r.lq;  // Lq is dead once K3·V and Z are done
    }
    if (r.w == nullptr) r.w = alloc.template take<TL>(bhmd);
    return r;
  }

  template <class T>
  static int64_t matrix_count(const LandmarkCall<T, TL>& c, const detail::Dims& d) {
    return (c.shared_z ? 1 : d.B) * d.H;
  }
};

template <class T, class TL>
size_t landmark_workspace_bytes(const LandmarkCall<T, TL>& c, const detail::Dims& d) {
  ByteCounter counter;
  LandmarkBuffers<TL>::carve(c, d, counter);
  return counter.bytes;
}

/// out = K1 · Z · (K3 · V) on exec.stream. Arguments are checked by the operator; views have
/// contiguous rows and D = Dv in the tile kernel's set.
template <class T, class TL>
void landmark_attention(const char* where, const LandmarkCall<T, TL>& c, const detail::Dims& d,
                        Tensor<const T> q, Tensor<const T> k, Tensor<const T> v, Tensor<T> out,
                        const Masks& masks, const Exec<Cuda>& exec) {
  using namespace landmark;
  detail::require(c.M >= 1 && c.M <= kMaxLandmarks, where, ": ", c.M, " landmarks; the CUDA backend supports 1 to ",
                  kMaxLandmarks);
  detail::require(d.D <= kMaxHeadDim, where, ": head dim ", d.D, " above ", kMaxHeadDim);
  cudaStream_t stream = exec.stream;
  DeviceWorkspace ws(exec, landmark_workspace_bytes(c, d));
  detail::Arena arena = ws.arena();
  const LandmarkBuffers<TL> buf = LandmarkBuffers<TL>::carve(c, d, arena);
  const RowStrides dense{d.H * c.M * d.D, c.M * d.D, d.D};  // a [B, H, M, D] workspace tensor

  // Landmarks: the caller's proxies, or masked segment means of Q and K.
  const TL* lq = c.proxy_q;
  const TL* lk = c.proxy_k;
  RowStrides lq_stride = c.proxy_q_stride, lk_stride = c.proxy_k_stride;
  if (c.segment_means) {
    if constexpr (std::is_same_v<TL, float>) {
      const int64_t blocks = d.B * d.H * c.M;
      launch(&segment_means_kernel<T>, blocks, kMeanThreads, 0, stream, q.data, row_strides(q), d.H, int64_t(1),
             d.Nq, d.D, c.M, masks.query_valid, masks.query_batch_stride, buf.lq, buf.lq_valid);
      launch(&segment_means_kernel<T>, blocks, kMeanThreads, 0, stream, k.data, row_strides(k), d.H, d.group(), d.Nk,
             d.D, c.M, masks.key_valid, masks.key_batch_stride, buf.lk, buf.lk_valid);
      lq = buf.lq;
      lk = buf.lk;
      lq_stride = lk_stride = dense;
    }
  }

  // K3·V: the query landmarks attend over (K, V); float when Z multiplies it next.
  const auto k3v = [&](auto* kv_out) {
    SoftmaxTiles<TL, T, std::remove_pointer_t<decltype(kv_out)>> p;
    p.q = lq;
    p.k = k.data;
    p.v = v.data;
    p.out = kv_out;
    p.q_stride = lq_stride;
    p.k_stride = row_strides(k);
    p.v_stride = row_strides(v);
    p.out_stride = dense;
    p.batch = d.B;
    p.heads = d.H;
    p.group = d.group();
    p.nq = c.M;
    p.nk = d.Nk;
    p.head_dim = d.D;
    p.query_valid = buf.lq_valid;
    p.query_batch_stride = c.M;
    p.key_valid = masks.key_valid;
    p.key_batch_stride = masks.key_batch_stride;
    p.scale = c.scale;
    run_softmax_tiles(p, stream);
  };

  if (c.invert) {
    k3v(buf.kv);
    PinvParams pp;
    pp.matrices = LandmarkBuffers<TL>::matrix_count(c, d);
    pp.heads = d.H;
    pp.m = c.M;
    pp.d = d.D;
    pp.iterations = c.iterations;
    pp.scale = c.scale;
    pp.dropout = c.dropout;
    pp.seed = c.seed;
    pp.lq_valid = buf.lq_valid;
    pp.lk_valid = buf.lk_valid;
    pp.z = buf.z;
    pp.scratch = buf.pinv_scratch;
    launch(&pinv_kernel<TL>, std::min(pp.matrices, kPinvBlocks), kThreads, 0, stream, lq, lq_stride, lk, lk_stride,
           pp);
    launch(&apply_z_kernel<TL>, d.B * d.H, kThreads, 0, stream, static_cast<const float*>(buf.z), c.shared_z,
           static_cast<const float*>(buf.kv), buf.w, d.H, c.M, d.D);
  } else {
    k3v(buf.w);
  }

  // out = K1·W: the queries attend over (Lk, W), one key/value head per query head.
  SoftmaxTiles<T, TL, T> p;
  p.q = q.data;
  p.k = lk;
  p.v = buf.w;
  p.out = out.data;
  p.q_stride = row_strides(q);
  p.k_stride = lk_stride;
  p.v_stride = dense;
  p.out_stride = row_strides(out);
  p.batch = d.B;
  p.heads = d.H;
  p.group = 1;
  p.nq = d.Nq;
  p.nk = c.M;
  p.head_dim = d.D;
  p.query_valid = masks.query_valid;
  p.query_batch_stride = masks.query_batch_stride;
  p.key_valid = buf.lk_valid;
  p.key_batch_stride = c.M;
  p.scale = c.scale;
  run_softmax_tiles(p, stream);
  ws.release();
}

}  // namespace cuda
}  // namespace effattn
