// The public entry points. attention<Backend>(method, q, k, v, out) and attention_backward forward
// to Operator<Backend, Method>, of which each backend header specializes one per method.
#pragma once
#include <cstddef>
#include <type_traits>
#include <vector>

#include "effattn/core/exec.hpp"
#include "effattn/core/memory.hpp"
#include "effattn/core/methods.hpp"
#include "effattn/core/saved.hpp"
#include "effattn/core/tensor.hpp"

namespace effattn {

template <class>
inline constexpr bool dependent_false = false;

/// One specialization per (backend, method) provides
///   template <class T> static void run(const Method&, Tensor<const T> q, k, v, Tensor<T> out,
///                                      const Masks&, const Exec<Backend>&);
///   template <class T> static size_t workspace_bytes(const Method&, Tensor<const T> q, k, v,
///                                                    const Exec<Backend>&);
/// where the backend writes the softmax row statistics (static constexpr bool kHasLse = true),
///   template <class T> static void run_with_lse(const Softmax&, q, k, v, out, Tensor<acc_t<T>> lse,
///                                               const Masks&, const Exec<Backend>&);
/// and, where the backend has the gradient (static constexpr bool kHasBackward = true),
///   template <class T> static void backward(const Method&, q, k, v, out, dout, const Grads<T>&,
///                                           const Masks&, const Exec<Backend>&);
///   template <class T> static size_t backward_workspace_bytes(const Method&, q, k, v, const Exec<Backend>&);
/// and, where the forward can keep what its backward would recompute (kHasSaved = true),
///   template <class T> static size_t saved_bytes(const Method&, q, k, v);
///   template <class T> static void run_saving(const Method&, q, k, v, out, const Saved&, const Masks&,
///                                             const Exec<Backend>&);
///   template <class T> static void backward_saved(const Method&, q, k, v, out, dout, const Saved&,
///                                                 const Grads<T>&, const Masks&, const Exec<Backend>&);
template <class Backend, class Method>
struct Operator {
  static_assert(dependent_false<Method>,
                "effattn: no operator for this (Backend, Method). Include <effattn/effattn.hpp> for the "
                "CPU operators and <effattn/cuda.cuh> (compiled by nvcc) for the CUDA ones.");
};

namespace detail {
template <class T>
struct identity {
  using type = T;
};
template <class T>
using identity_t = typename identity<T>::type;  // blocks deduction: T comes from `out`

template <class Op, class = void>
struct has_backward : std::false_type {};
template <class Op>
struct has_backward<Op, std::enable_if_t<Op::kHasBackward>> : std::true_type {};

template <class Backend, class Method>
constexpr void require_backward() {
  static_assert(has_backward<Operator<Backend, Method>>::value,
                "effattn: this backend has no attention_backward for this method yet (the CPU backend has all four)");
}

template <class Op, class = void>
struct has_lse : std::false_type {};
template <class Op>
struct has_lse<Op, std::enable_if_t<Op::kHasLse>> : std::true_type {};

template <class Op, class = void>
struct has_saved : std::false_type {};
template <class Op>
struct has_saved<Op, std::enable_if_t<Op::kHasSaved>> : std::true_type {};

template <class Backend>
constexpr void require_lse() {
  static_assert(has_lse<Operator<Backend, Softmax>>::value,
                "effattn: this backend has no attention_with_lse yet (the CPU backend has it); use attention");
}
}  // namespace detail

/// The type a backend accumulates in for element type T: float, and double for double. The softmax
/// row statistics (log-sum-exp) are stored in it.
template <class T>
struct accumulator {
  using type = float;
};
template <>
struct accumulator<double> {
  using type = double;
};
template <class T>
using acc_t = typename accumulator<T>::type;

/// The gradients attention_backward writes, each laid out like its input (any strides):
/// dq like q, dk like k, dv like v (grouped heads: summed over the query heads of the group).
/// dproxy_q / dproxy_k: Proxy only, like proxy_q / proxy_k (batch extent 1: summed over the
/// batch); leave them empty (default-constructed) for the other methods.
template <class T>
struct Grads {
  Tensor<T> dq, dk, dv;
  Tensor<T> dproxy_q, dproxy_k;
};

namespace detail {
/// What a backward call reads besides q, k, v, masks and the method (out, dout, the forward's lse)
/// and what it writes (the gradients), for check_call_memory.
template <class T>
std::vector<NamedRange> backward_ranges(const Tensor<const T>& out, const Tensor<const T>& dout, const Grads<T>& g,
                                        const Tensor<const acc_t<T>>* lse = nullptr) {
  std::vector<NamedRange> r{named("out", out),           named("dout", dout),
                            named("grads.dq", g.dq),     named("grads.dk", g.dk),
                            named("grads.dv", g.dv),     named("grads.dproxy_q", g.dproxy_q),
                            named("grads.dproxy_k", g.dproxy_k)};
  if (lse != nullptr) r.push_back(named("lse", *lse));
  return r;
}
}  // namespace detail

/// out = Method-attention(q, k, v). q [B,H,Nq,D], k [B,Hk,Nk,D], v [B,Hk,Nk,Dv], out [B,H,Nq,Dv].
template <class Backend, class Method, class T>
void attention(const Method& m, Tensor<const detail::identity_t<T>> q, Tensor<const detail::identity_t<T>> k,
               Tensor<const detail::identity_t<T>> v, Tensor<T> out, const Masks& masks = {},
               const Exec<Backend>& exec = {}) {
  static_assert(!std::is_const_v<T>, "effattn::attention: out must be a mutable Tensor<T>");
  detail::check_call_memory<Backend, Method, T>("effattn::attention", m, exec, q, k, v, masks,
                                                {detail::named("out", out)});
  Operator<Backend, Method>::template run<T>(m, q, k, v, out, masks, exec);
}

/// Softmax attention that also writes each row's log-sum-exp of the scaled logits,
/// lse_i = log sum_j exp(s q_i·k_j) over the allowed keys, into lse [B, H, Nq, 1] (any strides) in
/// acc_t<T>; -inf for a row with no allowed key and for an invalid query. attention_backward_with_lse
/// takes it back to skip recomputing the row statistics; partial results over disjoint key sets
/// merge exactly with it: out = sum_p exp(lse_p - lse) out_p, lse = log sum_p exp(lse_p).
template <class Backend, class T>
void attention_with_lse(const Softmax& m, Tensor<const detail::identity_t<T>> q,
                        Tensor<const detail::identity_t<T>> k, Tensor<const detail::identity_t<T>> v, Tensor<T> out,
                        Tensor<acc_t<T>> lse, const Masks& masks = {}, const Exec<Backend>& exec = {}) {
  static_assert(!std::is_const_v<T>, "effattn::attention_with_lse: out must be a mutable Tensor<T>");
  detail::require_lse<Backend>();
  detail::check_call_memory<Backend, Softmax, T>("effattn::attention_with_lse", m, exec, q, k, v, masks,
                                                 {detail::named("out", out), detail::named("lse", lse)});
  if constexpr (detail::has_lse<Operator<Backend, Softmax>>::value)  // else only require_lse's message
    Operator<Backend, Softmax>::template run_with_lse<T>(m, q, k, v, out, lse, masks, exec);
}

/// The gradients of attention(m, q, k, v) for the upstream gradient dout [B, H, Nq, Dv]: writes
/// every element of grads' views (zeros where an input has no influence: invalid queries and
/// keys). `out` is the forward's output for the same arguments.
template <class Backend, class Method, class T>
void attention_backward(const Method& m, Tensor<const detail::identity_t<T>> q,
                        Tensor<const detail::identity_t<T>> k, Tensor<const detail::identity_t<T>> v,
                        Tensor<const detail::identity_t<T>> out, Tensor<const detail::identity_t<T>> dout,
                        const Grads<T>& grads, const Masks& masks = {}, const Exec<Backend>& exec = {}) {
  static_assert(!std::is_const_v<T>, "effattn::attention_backward: grads must be mutable Tensor<T> views");
  detail::require_backward<Backend, Method>();
  detail::check_call_memory<Backend, Method, T>("effattn::attention_backward", m, exec, q, k, v, masks,
                                                detail::backward_ranges(out, dout, grads));
  if constexpr (detail::has_backward<Operator<Backend, Method>>::value)
    Operator<Backend, Method>::template backward<T>(m, q, k, v, out, dout, grads, masks, exec);
}

/// The softmax backward with the forward's lse (attention_with_lse): the row statistics are not
/// recomputed, one matrix product per tile fewer.
template <class Backend, class T>
void attention_backward_with_lse(const Softmax& m, Tensor<const detail::identity_t<T>> q,
                                 Tensor<const detail::identity_t<T>> k, Tensor<const detail::identity_t<T>> v,
                                 Tensor<const detail::identity_t<T>> out, Tensor<const detail::identity_t<T>> dout,
                                 Tensor<const acc_t<T>> lse, const Grads<T>& grads, const Masks& masks = {},
                                 const Exec<Backend>& exec = {}) {
  static_assert(!std::is_const_v<T>, "effattn::attention_backward_with_lse: grads must be mutable Tensor<T> views");
  detail::require_backward<Backend, Softmax>();
  detail::check_call_memory<Backend, Softmax, T>("effattn::attention_backward_with_lse", m, exec, q, k, v, masks,
                                                 detail::backward_ranges(out, dout, grads, &lse));
  if constexpr (detail::has_backward<Operator<Backend, Softmax>>::value)
    Operator<Backend, Softmax>::template backward_with_lse<T>(m, q, k, v, out, dout, lse, grads, masks, exec);
}

/// Bytes of the block attention_with_saved fills for attention_backward_with_saved (0: the method
/// keeps nothing beyond `out`, and the pair is attention and attention_backward).
template <class Backend, class Method, class Q, class K, class V>
size_t saved_bytes(const Method& m, Tensor<Q> q, Tensor<K> k, Tensor<V> v) {
  using T = std::remove_const_t<Q>;
  static_assert(std::is_same_v<T, std::remove_const_t<K>> && std::is_same_v<T, std::remove_const_t<V>>,
                "effattn::saved_bytes: q, k and v must have one element type");
  detail::require_backward<Backend, Method>();
  if constexpr (detail::has_saved<Operator<Backend, Method>>::value)
    return Operator<Backend, Method>::template saved_bytes<T>(m, Tensor<const T>(q), Tensor<const T>(k),
                                                              Tensor<const T>(v));
  else
    return 0;
}

/// The forward of a training step: out as attention(m, q, k, v) computes it, and into `saved`
/// (saved_bytes(m, q, k, v) bytes, 64-byte aligned, memory of its own) what the backward would
/// otherwise recompute: softmax's row log-sum-exp; for Nyström and Proxy K3·V with its row
/// statistics, K1's row statistics, and Z with its Newton–Schulz iterates.
template <class Backend, class Method, class T>
void attention_with_saved(const Method& m, Tensor<const detail::identity_t<T>> q,
                          Tensor<const detail::identity_t<T>> k, Tensor<const detail::identity_t<T>> v, Tensor<T> out,
                          const Saved& saved, const Masks& masks = {}, const Exec<Backend>& exec = {}) {
  static_assert(!std::is_const_v<T>, "effattn::attention_with_saved: out must be a mutable Tensor<T>");
  detail::require_backward<Backend, Method>();
  if constexpr (detail::has_saved<Operator<Backend, Method>>::value) {
    detail::check_call_memory<Backend, Method, T>("effattn::attention_with_saved", m, exec, q, k, v, masks,
                                                  {detail::named("out", out)});
    // The operator checks `saved` itself, after its arguments (its size follows from their shapes).
    Operator<Backend, Method>::template run_saving<T>(m, q, k, v, out, saved, masks, exec);
  } else {
    attention<Backend, Method, T>(m, q, k, v, out, masks, exec);
  }
}

/// attention_backward given the block attention_with_saved filled for the same arguments (any
/// Exec): nothing of the forward is recomputed. The same workspace as attention_backward.
template <class Backend, class Method, class T>
void attention_backward_with_saved(const Method& m, Tensor<const detail::identity_t<T>> q,
                                   Tensor<const detail::identity_t<T>> k, Tensor<const detail::identity_t<T>> v,
                                   Tensor<const detail::identity_t<T>> out, Tensor<const detail::identity_t<T>> dout,
                                   const Saved& saved, const Grads<T>& grads, const Masks& masks = {},
                                   const Exec<Backend>& exec = {}) {
  static_assert(!std::is_const_v<T>, "effattn::attention_backward_with_saved: grads must be mutable Tensor<T> views");
  detail::require_backward<Backend, Method>();
  if constexpr (detail::has_saved<Operator<Backend, Method>>::value) {
    detail::check_call_memory<Backend, Method, T>("effattn::attention_backward_with_saved", m, exec, q, k, v, masks,
                                                  detail::backward_ranges(out, dout, grads));
    Operator<Backend, Method>::template backward_saved<T>(m, q, k, v, out, dout, saved, grads, masks, exec);
  } else {
    attention_backward<Backend, Method, T>(m, q, k, v, out, dout, grads, masks, exec);
  }
}

/// Scratch bytes attention<Backend>(m, q, k, v, ...) needs when the caller passes a workspace
/// in exec; a call without one allocates this much itself.
template <class Backend, class Method, class Q, class K, class V>
size_t workspace_bytes(const Method& m, Tensor<Q> q, Tensor<K> k, Tensor<V> v, const Exec<Backend>& exec = {}) {
  using T = std::remove_const_t<Q>;
  static_assert(std::is_same_v<T, std::remove_const_t<K>> && std::is_same_v<T, std::remove_const_t<V>>,
                "effattn::workspace_bytes: q, k and v must have one element type");
  return Operator<Backend, Method>::template workspace_bytes<T>(m, Tensor<const T>(q), Tensor<const T>(k),
                                                                Tensor<const T>(v), exec);
}

/// Scratch bytes attention_backward<Backend>(m, q, k, v, ...) needs when the caller passes a
/// workspace in exec (the same for attention_backward_with_lse and _with_saved); without one it allocates this much.
template <class Backend, class Method, class Q, class K, class V>
size_t backward_workspace_bytes(const Method& m, Tensor<Q> q, Tensor<K> k, Tensor<V> v,
                                const Exec<Backend>& exec = {}) {
  using T = std::remove_const_t<Q>;
  static_assert(std::is_same_v<T, std::remove_const_t<K>> && std::is_same_v<T, std::remove_const_t<V>>,
                "effattn::backward_workspace_bytes: q, k and v must have one element type");
  detail::require_backward<Backend, Method>();
  if constexpr (detail::has_backward<Operator<Backend, Method>>::value)
    return Operator<Backend, Method>::template backward_workspace_bytes<T>(m, Tensor<const T>(q), Tensor<const T>(k),
                                                                           Tensor<const T>(v), exec);
  else
    return 0;
}

}  // namespace effattn
