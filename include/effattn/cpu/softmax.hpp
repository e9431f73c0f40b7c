// Exact softmax attention on the CPU: every (batch, head, query tile) is an independent work
// item of the tiled online-softmax kernel in softmax_tiles.hpp.
#pragma once
#include "effattn/core.hpp"
#include "effattn/cpu/parallel.hpp"
#include "effattn/cpu/softmax_tiles.hpp"

namespace effattn {
namespace cpu {

/// Rows of one (batch, head) of a [B, H, S, D] view as a matrix [S, D].
template <class T>
MatrixView<T> head_rows(const Tensor<T>& t, int64_t b, int64_t h) {
  return {t.data + b * t.stride[0] + h * t.stride[1], t.shape[2], t.shape[3], t.stride[2], t.stride[3]};
}

inline const uint8_t* mask_row(const uint8_t* mask, int64_t batch_stride, int64_t b) {
  return mask == nullptr ? nullptr : mask + b * batch_stride;
}

template <class T>
constexpr void require_cpu_type() {
  static_assert(std::is_same_v<T, float> || std::is_same_v<T, double>,
                "effattn: the CPU backend computes in float or double");
}

}  // namespace cpu

template <>
struct Operator<Cpu, Softmax> {
  static int64_t query_tiles(int64_t nq) {
    return (nq + cpu::Tiles::kQuery - 1) / cpu::Tiles::kQuery;
  }

  template <class T>
  static size_t workspace_bytes(const Softmax&, Tensor<const T> q, Tensor<const T>, Tensor<const T> v,
                                const Exec<Cpu>& exec) {
    cpu::require_cpu_type<T>();
    const int64_t items = q.shape[0] * q.shape[1] * query_tiles(q.shape[2]);
    return cpu::parallel_bytes(cpu::thread_count(exec), items, cpu::tile_scratch_bytes<T>(q.shape[3], v.shape[3]));
  }

  template <class T>
  static void run(const Softmax& m, Tensor<const T> q, Tensor<const T> k, Tensor<const T> v, Tensor<T> out,
                  const Masks& masks, const Exec<Cpu>& exec) {
    cpu::require_cpu_type<T>();
    constexpr const char* where = "effattn::attention<Cpu>(Softmax)";
    const detail::Dims d = detail::check_attention(where, q, k, v, out, masks);
    const T scale = static_cast<T>(detail::resolve_scale(where, m.scale, d.D));
    const int threads = cpu::thread_count(exec);
    const int64_t tiles = query_tiles(d.Nq);
    const int64_t items = d.B * d.H * tiles;
    const size_t per_thread = cpu::tile_scratch_bytes<T>(d.D, d.Dv);
    detail::HostWorkspace ws(exec.workspace, exec.workspace_size, cpu::parallel_bytes(threads, items, per_thread));
    detail::Arena arena = ws.arena();
    cpu::parallel_for(threads, items, arena, per_thread, [&](int64_t item, detail::Arena scratch) {
      const int64_t tile = item % tiles, bh = item / tiles, b = bh / d.H, h = bh % d.H;
      const int64_t hk = h / d.group();
      cpu::HeadAttention<T> p;
      p.q = cpu::head_rows(q, b, h);
      p.k = cpu::head_rows(k, b, hk);
      p.v = cpu::head_rows(v, b, hk);
      p.out = cpu::head_rows(out, b, h);
      p.key_valid = cpu::mask_row(masks.key_valid, masks.key_batch_stride, b);
      p.query_valid = cpu::mask_row(masks.query_valid, masks.query_batch_stride, b);
      p.scale = scale;
      p.causal = m.causal;
      p.causal_offset = d.Nk - d.Nq;  // bottom-right aligned, as FlashAttention
      const int64_t i0 = tile * cpu::Tiles::kQuery;
      cpu::attend_rows(p, i0, std::min(d.Nq, i0 + cpu::Tiles::kQuery), scratch);
    });
  }
};

}  // namespace effattn
