// Tensor: a non-owning strided 4-D view, logical layout [batch, heads, seq, dim].
#pragma once
#include <array>
#include <cstdint>
#include <type_traits>

#include "effattn/core/macros.hpp"

namespace effattn {

template <class T>
struct Tensor {
  T* data = nullptr;
  std::array<int64_t, 4> shape{};   // [batch, heads, seq, dim]
  std::array<int64_t, 4> stride{};  // in elements

  Tensor() = default;
  Tensor(T* p, std::array<int64_t, 4> sh, std::array<int64_t, 4> st) : data(p), shape(sh), stride(st) {}
  // A mutable view converts to a read-only one (Tensor<float> -> Tensor<const float>).
  template <class U, class = std::enable_if_t<std::is_same_v<const U, T> && !std::is_const_v<U>>>
  Tensor(const Tensor<U>& o) : data(o.data), shape(o.shape), stride(o.stride) {}

  int64_t batch() const { return shape[0]; }
  int64_t heads() const { return shape[1]; }
  int64_t seq() const { return shape[2]; }
  int64_t dim() const { return shape[3]; }
  int64_t numel() const { return shape[0] * shape[1] * shape[2] * shape[3]; }
  int64_t offset(int64_t b, int64_t h, int64_t s, int64_t d) const {
    return b * stride[0] + h * stride[1] + s * stride[2] + d * stride[3];
  }
  T& operator()(int64_t b, int64_t h, int64_t s, int64_t d) const { return data[offset(b, h, s, d)]; }
};

/// Contiguous [B, H, S, D] memory.
template <class T>
Tensor<T> bhsd(T* p, int64_t b, int64_t h, int64_t s, int64_t d) {
  return Tensor<T>(p, {b, h, s, d}, {h * s * d, s * d, d, 1});
}

/// Contiguous [B, S, H, D] memory (the layout of most frameworks), viewed as [B, H, S, D].
template <class T>
Tensor<T> bshd(T* p, int64_t b, int64_t s, int64_t h, int64_t d) {
  return Tensor<T>(p, {b, h, s, d}, {s * h * d, d, h * d, 1});
}

}  // namespace effattn
