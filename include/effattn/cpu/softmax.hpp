// Exact softmax attention on the CPU: every (batch, head, query tile) is an independent work
// item of the tiled online-softmax kernel in softmax_tiles.hpp.
#pragma once
#include "effattn/core.hpp"
#include "effattn/cpu/common.hpp"
#include "effattn/cpu/parallel.hpp"
#include "effattn/cpu/softmax_tiles.hpp"

namespace effattn {

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
    forward<T>("effattn::attention<Cpu>(Softmax)", m, q, k, v, out, nullptr, masks, exec);
  }

  static constexpr bool kHasLse = true;
  template <class T>
  static void run_with_lse(const Softmax& m, Tensor<const T> q, Tensor<const T> k, Tensor<const T> v, Tensor<T> out,
                           Tensor<T> lse, const Masks& masks, const Exec<Cpu>& exec) {
    forward<T>("effattn::attention_with_lse<Cpu>(Softmax)", m, q, k, v, out, &lse, masks, exec);
  }

  // ---- Backward: one work item per (batch, key head), so that dk and dv, summed over the
  // group's query heads, have one writer; its query tiles run in order on one thread.
  static constexpr bool kHasBackward = true;

  template <class T>
  static size_t backward_workspace_bytes(const Softmax&, Tensor<const T> q, Tensor<const T> k, Tensor<const T> v,
                                         const Exec<Cpu>& exec) {
    cpu::require_cpu_type<T>();
    return cpu::parallel_bytes(cpu::thread_count(exec), q.shape[0] * k.shape[1],
                               cpu::backward_scratch_bytes<T>(q.shape[3], v.shape[3]));
  }

  template <class T>
  static void backward(const Softmax& m, Tensor<const T> q, Tensor<const T> k, Tensor<const T> v,
                       Tensor<const T> out, Tensor<const T> dout, const Grads<T>& grads, const Masks& masks,
                       const Exec<Cpu>& exec) {
    backward_impl<T>("effattn::attention_backward<Cpu>(Softmax)", m, q, k, v, out, dout, nullptr, grads, masks, exec);
  }

  template <class T>
  static void backward_with_lse(const Softmax& m, Tensor<const T> q, Tensor<const T> k, Tensor<const T> v,
                                Tensor<const T> out, Tensor<const T> dout, Tensor<const T> lse, const Grads<T>& grads,
                                const Masks& masks, const Exec<Cpu>& exec) {
    backward_impl<T>("effattn::attention_backward_with_lse<Cpu>(Softmax)", m, q, k, v, out, dout, &lse, grads, masks,
                     exec);
  }

  // ---- Training: the saved block holds the row log-sum-exp, [B, H, Nq] of acc_t<T>, after its
  // header; the backward reads it as attention_backward_with_lse would.
  static constexpr bool kHasSaved = true;

  template <class T>
  static size_t saved_bytes(const Softmax&, Tensor<const T> q, Tensor<const T>, Tensor<const T>) {
    cpu::require_cpu_type<T>();
    return detail::saved_header_bytes() + detail::bytes_of<acc_t<T>>(q.shape[0] * q.shape[1] * q.shape[2]);
  }

  template <class T>
  static void run_saving(const Softmax& m, Tensor<const T> q, Tensor<const T> k, Tensor<const T> v, Tensor<T> out,
                         const Saved& saved, const Masks& masks, const Exec<Cpu>& exec) {
    constexpr const char* where = "effattn::attention_with_saved<Cpu>(Softmax)";
    cpu::require_cpu_type<T>();
    const detail::Dims d = detail::check_attention(where, q, k, v, out, masks);
    detail::check_saved(where, saved, saved_bytes<T>(m, q, k, v),
                        detail::call_ranges(m, q, k, v, masks, exec, {detail::named("out", out)}));
    detail::begin_saved(saved, cpu::saved_header(cpu::kSavedSoftmax, d));
    const Tensor<T> lse = saved_lse<T>(saved, d);
    forward<T>(where, m, q, k, v, out, &lse, masks, exec);
    detail::finish_saved(saved);
  }

  template <class T>
  static void backward_saved(const Softmax& m, Tensor<const T> q, Tensor<const T> k, Tensor<const T> v,
                             Tensor<const T> out, Tensor<const T> dout, const Saved& saved, const Grads<T>& grads,
                             const Masks& masks, const Exec<Cpu>& exec) {
    constexpr const char* where = "effattn::attention_backward_with_saved<Cpu>(Softmax)";
    cpu::require_cpu_type<T>();
    detail::require_no_proxy_grads(where, grads);
    const detail::Dims d = detail::check_backward(where, q, k, v, out, dout, grads, masks);
    detail::check_saved(where, saved, saved_bytes<T>(m, q, k, v),
                        detail::call_ranges(m, q, k, v, masks, exec, detail::backward_ranges(out, dout, grads)));
    detail::check_saved_header(where, saved, cpu::saved_header(cpu::kSavedSoftmax, d));
    const Tensor<const T> lse = saved_lse<T>(saved, d);
    backward_impl<T>(where, m, q, k, v, out, dout, &lse, grads, masks, exec);
  }

 private:
  template <class T>
  static Tensor<T> saved_lse(const Saved& saved, const detail::Dims& d) {
    return bhsd(reinterpret_cast<T*>(cpu::saved_body(saved)), d.B, d.H, d.Nq, 1);
  }

  template <class T>
  static void forward(const char* where, const Softmax& m, Tensor<const T> q, Tensor<const T> k, Tensor<const T> v,
                      Tensor<T> out, const Tensor<T>* lse, const Masks& masks, const Exec<Cpu>& exec) {
    cpu::require_cpu_type<T>();
    const detail::Dims d = detail::check_attention(where, q, k, v, out, masks);
    if (lse != nullptr) {
      const auto mask_bytes = detail::mask_ranges(masks, d.B, d.Nq, d.Nk);
      check_lse(where, *lse, d, {detail::named("q", q), detail::named("k", k), detail::named("v", v),
                                 detail::named("out", out), mask_bytes[0], mask_bytes[1]});
    }
    const T scale = static_cast<T>(detail::resolve_scale(where, m.scale, d.D));
    const int threads = cpu::thread_count(exec);
    const int64_t tiles = query_tiles(d.Nq);
    const int64_t items = d.B * d.H * tiles;
    const size_t per_thread = cpu::tile_scratch_bytes<T>(d.D, d.Dv);
    detail::HostWorkspace ws(exec.workspace, exec.workspace_size, cpu::parallel_bytes(threads, items, per_thread));
    detail::Arena arena = ws.arena();
    cpu::parallel_for(threads, items, arena, per_thread, [&](int64_t item, detail::Arena scratch) {
      const int64_t tile = item % tiles, bh = item / tiles, b = bh / d.H, h = bh % d.H;
      cpu::HeadAttention<T> p = head_problem(m, q, k, v, masks, d, b, h, scale);
      p.out = cpu::head_rows(out, b, h);
      if (lse != nullptr) {
        p.lse = lse->data + b * lse->stride[0] + h * lse->stride[1];
        p.lse_stride = lse->stride[2];
      }
      const int64_t i0 = tile * cpu::Tiles::kQuery;
      cpu::attend_rows(p, i0, std::min(d.Nq, i0 + cpu::Tiles::kQuery), scratch);
    });
  }

  template <class T>
  static cpu::HeadAttention<T> head_problem(const Softmax& m, Tensor<const T> q, Tensor<const T> k,
                                            Tensor<const T> v, const Masks& masks, const detail::Dims& d, int64_t b,
                                            int64_t h, T scale) {
    const int64_t hk = h / d.group();
    cpu::HeadAttention<T> p;
    p.q = cpu::head_rows(q, b, h);
    p.k = cpu::head_rows(k, b, hk);
    p.v = cpu::head_rows(v, b, hk);
    p.key_valid = cpu::mask_row(masks.key_valid, masks.key_batch_stride, b);
    p.query_valid = cpu::mask_row(masks.query_valid, masks.query_batch_stride, b);
    p.scale = scale;
    p.causal = m.causal;
    p.causal_offset = d.Nk - d.Nq;  // bottom-right aligned, as FlashAttention
    return p;
  }

  /// lse is [B, H, Nq, 1] and, when written, no input's memory.
  template <class L>
  static void check_lse(const char* where, const Tensor<L>& lse, const detail::Dims& d,
                        std::initializer_list<detail::NamedRange> others) {
    detail::check_shape(where, "lse", lse, {d.B, d.H, d.Nq, 1}, "[B, H, Nq, 1] of q");
    if constexpr (!std::is_const_v<L>) {
      detail::check_writable(where, lse, "lse");
      const detail::NamedRange mine = detail::named("lse", lse);
      for (const detail::NamedRange& o : others)
        detail::require(!(mine.range[0] < o.range[1] && o.range[0] < mine.range[1]), where, ": lse overlaps ",
                        o.name, " in memory");
    }
  }

  template <class T>
  static void backward_impl(const char* where, const Softmax& m, Tensor<const T> q, Tensor<const T> k,
                            Tensor<const T> v, Tensor<const T> out, Tensor<const T> dout, const Tensor<const T>* lse,
                            const Grads<T>& grads, const Masks& masks, const Exec<Cpu>& exec) {
    cpu::require_cpu_type<T>();
    detail::require_no_proxy_grads(where, grads);
    const detail::Dims d =
        lse != nullptr
            ? detail::check_backward(where, q, k, v, out, dout, grads, masks, {detail::named("lse", *lse)})
            : detail::check_backward(where, q, k, v, out, dout, grads, masks);
    if (lse != nullptr) check_lse(where, *lse, d, {});
    const T scale = static_cast<T>(detail::resolve_scale(where, m.scale, d.D));
    const int threads = cpu::thread_count(exec);
    const size_t per_thread = cpu::backward_scratch_bytes<T>(d.D, d.Dv);
    const int64_t items = d.B * d.Hk;
    detail::HostWorkspace ws(exec.workspace, exec.workspace_size, cpu::parallel_bytes(threads, items, per_thread));
    detail::Arena arena = ws.arena();
    cpu::parallel_for(threads, items, arena, per_thread, [&](int64_t item, detail::Arena scratch) {
      const int64_t b = item / d.Hk, hk = item % d.Hk;
      cpu::HeadAttentionGrad<T> g;
      g.dk = cpu::head_rows(grads.dk, b, hk);
      g.dv = cpu::head_rows(grads.dv, b, hk);
      cpu::fill(g.dk, T(0));
      cpu::fill(g.dv, T(0));
      for (int64_t h = hk * d.group(); h < (hk + 1) * d.group(); ++h) {
        g.fwd = head_problem(m, q, k, v, masks, d, b, h, scale);
        g.out = cpu::head_rows(out, b, h);
        g.dout = cpu::head_rows(dout, b, h);
        g.dq = cpu::head_rows(grads.dq, b, h);
        if (lse != nullptr) {
          g.lse = lse->data + b * lse->stride[0] + h * lse->stride[1];
          g.lse_stride = lse->stride[2];
        }
        cpu::backward_head(g, scratch);
      }
    });
  }
};

}  // namespace effattn
