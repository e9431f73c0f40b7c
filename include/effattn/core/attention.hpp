// The public entry points. attention<Backend>(method, q, k, v, out) forwards to
// Operator<Backend, Method>, of which each backend header specializes one per method.
#pragma once
#include <cstddef>
#include <type_traits>

#include "effattn/core/exec.hpp"
#include "effattn/core/methods.hpp"
#include "effattn/core/tensor.hpp"

namespace effattn {

template <class>
inline constexpr bool dependent_false = false;

/// One specialization per (backend, method) provides
///   template <class T> static void run(const Method&, Tensor<const T> q, k, v, Tensor<T> out,
///                                      const Masks&, const Exec<Backend>&);
///   template <class T> static size_t workspace_bytes(const Method&, Tensor<const T> q, k, v,
///                                                    const Exec<Backend>&);
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
}  // namespace detail

/// out = Method-attention(q, k, v). q [B,H,Nq,D], k [B,Hk,Nk,D], v [B,Hk,Nk,Dv], out [B,H,Nq,Dv].
template <class Backend, class Method, class T>
void attention(const Method& m, Tensor<const detail::identity_t<T>> q, Tensor<const detail::identity_t<T>> k,
               Tensor<const detail::identity_t<T>> v, Tensor<T> out, const Masks& masks = {},
               const Exec<Backend>& exec = {}) {
  static_assert(!std::is_const_v<T>, "effattn::attention: out must be a mutable Tensor<T>");
  Operator<Backend, Method>::template run<T>(m, q, k, v, out, masks, exec);
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

}  // namespace effattn
