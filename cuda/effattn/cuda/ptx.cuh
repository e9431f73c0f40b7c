// Thin wrappers over the sm_80 instructions the tile kernels use: cp.async, ldmatrix and
// mma.sync m16n8k16. Fragment layouts follow the PTX ISA ("Matrix Fragments for mma.m16n8k16");
// with g = lane / 4 and t = lane % 4, a thread holds
//   A (16x16, row-major):  a[0] = (g, 2t..2t+1)   a[1] = (g+8, 2t..2t+1)
//                          a[2] = (g, 2t+8..+9)   a[3] = (g+8, 2t+8..+9)
//   B (16x8, "col"):       b[0] = (k 2t..2t+1, n g)   b[1] = (k 2t+8..+9, n g)
//   C/D (16x8, float):     c[0..1] = (g, 2t..2t+1)    c[2..3] = (g+8, 2t..2t+1)
// where a register's lower 16 bits hold the lower column (or k) index.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <type_traits>

namespace effattn {
namespace cuda {
namespace ptx {

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

/// Copies 16 bytes global -> shared asynchronously; with `fill` false writes 16 zero bytes and
/// reads nothing (src must still be a valid address expression).
__device__ __forceinline__ void cp_async_16(void* smem, const void* gmem, bool fill) {
  const int src_bytes = fill ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(smem)), "l"(gmem),
               "r"(src_bytes)
               : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
/// Waits until at most `Pending` of this thread's committed groups are still in flight.
template <int Pending>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(Pending) : "memory");
}

/// Four 8x8 16-bit matrices; lanes 8i..8i+7 give the row addresses of matrix i, and a thread
/// receives (row lane/4, cols 2(lane%4)..+1) of each matrix in r[i].
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* smem) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(smem)));
}
/// As ldmatrix_x4, transposed: a thread receives (rows 2(lane%4)..+1, col lane/4) of each matrix.
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* smem) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(smem)));
}

/// c += A(16x16) * B(16x8) on the tensor cores, T = __half or __nv_bfloat16, float accumulators.
template <class T>
__device__ __forceinline__ void mma_16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  if constexpr (std::is_same_v<T, __half>) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    static_assert(std::is_same_v<T, __nv_bfloat16>, "mma_16816: __half or __nv_bfloat16");
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
}

/// Lane-to-element maps of the fragments, as the kernels use them. Host-callable, so that a test
/// can check them against the PTX layouts above without a GPU.
struct Fragments {
  // ldmatrix_x4 addresses: the row and column of a 16x16 block that lane l points at, so that
  // the four registers come out in mma's operand order.
  /// A (16 rows x 16 k, row-major): r[0..3] = a[0..3].
  static constexpr __host__ __device__ int a_row(int lane) { return lane % 16; }
  static constexpr __host__ __device__ int a_col(int lane) { return (lane / 16) * 8; }
  /// B of two n-blocks from an n-major tile (row = n, col = k: K rows for Q K^T), no transpose:
  /// r[0], r[1] = b[0], b[1] of n 0..7; r[2], r[3] = those of n 8..15.
  static constexpr __host__ __device__ int bn_row(int lane) { return lane % 8 + (lane / 16) * 8; }
  static constexpr __host__ __device__ int bn_col(int lane) { return ((lane / 8) % 2) * 8; }
  /// B of two n-blocks from a k-major tile (row = k, col = n: V rows for P V), ldmatrix_x4_trans:
  /// r[0], r[1] = b[0], b[1] of n 0..7; r[2], r[3] = those of n 8..15.
  static constexpr __host__ __device__ int bk_row(int lane) { return lane % 8 + ((lane / 8) % 2) * 8; }
  static constexpr __host__ __device__ int bk_col(int lane) { return (lane / 16) * 8; }

  // Accumulators c of n-blocks 2kk, 2kk + 1 reused as the A operand of k-block kk (16 wide):
  // a[r] packs c[2kk + acc_block(r)][acc_elem(r)] (low half) and [acc_elem(r) + 1].
  static constexpr __host__ __device__ int acc_block(int r) { return r / 2; }
  static constexpr __host__ __device__ int acc_elem(int r) { return (r % 2) * 2; }

  // Accumulator element (row g + 8 * half, column j of a 16 x kKeys tile) lives in lane
  // owner_lane(lane, j) of the quad that holds row g, at c[j / 8][owner_elem(j) + 2 * half].
  static constexpr __host__ __device__ int owner_lane(int lane, int j) { return (lane & ~3) | ((j % 8) / 2); }
  static constexpr __host__ __device__ int owner_elem(int j) { return j % 2; }
};

/// Two floats rounded to T and packed into one register, `lo` in the lower 16 bits.
template <class T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi) {
  if constexpr (std::is_same_v<T, __half>) {
    const __half2 v = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<const uint32_t*>(&v);
  } else {
    static_assert(std::is_same_v<T, __nv_bfloat16>, "pack2: __half or __nv_bfloat16");
    const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<const uint32_t*>(&v);
  }
}

}  // namespace ptx
}  // namespace cuda
}  // namespace effattn
