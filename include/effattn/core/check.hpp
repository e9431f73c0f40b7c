// Argument checks shared by every backend, so that each operator validates the same way and
// every message names the argument and the values seen.
#pragma once
#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <initializer_list>
#include <vector>

#include "effattn/core/attention.hpp"
#include "effattn/core/error.hpp"
#include "effattn/core/memory.hpp"
#include "effattn/core/methods.hpp"
#include "effattn/core/tensor.hpp"

namespace effattn {
namespace detail {

/// The sizes of one attention call: q [B,H,Nq,D], k [B,Hk,Nk,D], v [B,Hk,Nk,Dv], out [B,H,Nq,Dv].
struct Dims {
  int64_t B, H, Hk, Nq, Nk, D, Dv;
  int64_t group() const { return H / Hk; }  // query heads per key/value head
};

inline const char* kDimNames[4] = {"batch", "heads", "seq", "dim"};

template <class T>
std::string shape_str(const Tensor<T>& t) {
  return concat("[", t.shape[0], ", ", t.shape[1], ", ", t.shape[2], ", ", t.shape[3], "]");
}

template <class T>
void check_view(const char* where, const char* name, const Tensor<T>& t) {
  for (int i = 0; i < 4; ++i)
    require(t.shape[i] > 0, where, ": ", name, ".shape[", i, "] (", kDimNames[i], ") = ", t.shape[i],
            " must be positive; ", name, " shape is ", shape_str(t));
  require(t.data != nullptr, where, ": ", name, ".data is null (shape ", shape_str(t), ")");
}

/// No two elements of `out` may share an address: writes would race and results depend on order.
template <class T>
void check_writable(const char* where, const Tensor<T>& out, const char* name = "out") {
  std::array<int, 4> order{0, 1, 2, 3};
  std::sort(order.begin(), order.end(), [&](int a, int b) {
    return std::abs(out.stride[a]) < std::abs(out.stride[b]);
  });
  int64_t span = 1;  // elements covered by the dims so far
  for (int i : order) {
    if (out.shape[i] == 1) continue;
    require(std::abs(out.stride[i]) >= span, where, ": ", name, ".stride = [", out.stride[0], ", ", out.stride[1],
            ", ", out.stride[2], ", ", out.stride[3], "] makes elements of ", name, " (shape ", shape_str(out),
            ") alias each other");
    span = std::abs(out.stride[i]) * out.shape[i];
  }
}

/// The sizes of a call, read from q, k and v without checking them (check_attention checks).
template <class T>
Dims dims_of(const Tensor<T>& q, const Tensor<T>& k, const Tensor<T>& v) {
  return {q.shape[0], q.shape[1], k.shape[1], q.shape[2], k.shape[2], q.shape[3], v.shape[3]};
}

/// Checks q, k, v and masks against each other and returns the sizes.
template <class T>
Dims check_inputs(const char* where, const Tensor<const T>& q, const Tensor<const T>& k, const Tensor<const T>& v,
                  const Masks& masks) {
  check_view(where, "q", q);
  check_view(where, "k", k);
  check_view(where, "v", v);
  const Dims d = dims_of(q, k, v);
  require(k.shape[0] == d.B && v.shape[0] == d.B, where, ": batch sizes disagree: q ", d.B, ", k ", k.shape[0],
          ", v ", v.shape[0]);
  require(v.shape[1] == d.Hk, where, ": k has ", d.Hk, " heads but v has ", v.shape[1]);
  require(d.H % d.Hk == 0, where, ": q heads (", d.H, ") must be a multiple of k/v heads (", d.Hk, ")");
  require(v.shape[2] == d.Nk, where, ": k has ", d.Nk, " keys (seq) but v has ", v.shape[2]);
  require(k.shape[3] == d.D, where, ": head dims disagree: q.shape[3] = ", d.D, ", k.shape[3] = ", k.shape[3]);
  // A batch stride of 0 shares one mask row across the batch.
  const auto stride_ok = [&](int64_t stride, int64_t n) { return d.B == 1 || stride == 0 || stride >= n; };
  require(masks.query_valid == nullptr || stride_ok(masks.query_batch_stride, d.Nq), where,
          ": masks.query_batch_stride = ", masks.query_batch_stride, " must be 0 or at least Nq = ", d.Nq);
  require(masks.key_valid == nullptr || stride_ok(masks.key_batch_stride, d.Nk), where,
          ": masks.key_batch_stride = ", masks.key_batch_stride, " must be 0 or at least Nk = ", d.Nk);
  return d;
}

/// `t` (named `name`) must be a view of the given shape.
template <class T>
void check_shape(const char* where, const char* name, const Tensor<T>& t, const std::array<int64_t, 4>& shape,
                 const char* like) {
  check_view(where, name, t);
  require(t.shape == shape, where, ": ", name, " has shape ", shape_str(t), " but must be ",
          shape_str(Tensor<const T>(nullptr, shape, {})), " (", like, ")");
}

/// Checks q, k, v, out and masks against each other and returns the sizes.
template <class T>
Dims check_attention(const char* where, const Tensor<const T>& q, const Tensor<const T>& k,
                     const Tensor<const T>& v, const Tensor<T>& out, const Masks& masks) {
  const Dims d = check_inputs(where, q, k, v, masks);
  check_view(where, "out", out);
  require(out.shape[0] == d.B, where, ": batch sizes disagree: q ", d.B, ", out ", out.shape[0]);
  require(out.shape[1] == d.H, where, ": out has ", out.shape[1], " heads but q has ", d.H);
  require(out.shape[2] == d.Nq, where, ": out has ", out.shape[2], " rows (seq) but q has ", d.Nq);
  require(out.shape[3] == d.Dv, where, ": out.shape[3] = ", out.shape[3], " but v.shape[3] = ", d.Dv);
  check_writable(where, out);
  const char* names[3] = {"q", "k", "v"};
  const Tensor<const T>* ins[3] = {&q, &k, &v};
  for (int i = 0; i < 3; ++i)
    require(!overlaps(*ins[i], out), where, ": out overlaps input ", names[i],
            " in memory; attention cannot run in place");
  const NamedRange mine = named("out", out);
  for (const NamedRange& m : mask_ranges(masks, d.B, d.Nq, d.Nk))
    require(!ranges_meet(mine.range, m.range), where, ": out overlaps ", m.name, " in memory");
  return d;
}

/// The backward's inputs and gradients: out and dout of shape [B, H, Nq, Dv], each gradient shaped
/// like its input, writable, and overlapping neither an input (masks included; nor `reads`, e.g.
/// proxies) nor another gradient. dproxy_q/dproxy_k are checked by the method (only Proxy has them).
template <class T>
Dims check_backward(const char* where, const Tensor<const T>& q, const Tensor<const T>& k, const Tensor<const T>& v,
                    const Tensor<const T>& out, const Tensor<const T>& dout, const Grads<T>& g, const Masks& masks,
                    std::initializer_list<NamedRange> reads = {}) {
  const Dims d = check_inputs(where, q, k, v, masks);
  const std::array<int64_t, 4> out_shape{d.B, d.H, d.Nq, d.Dv};
  check_shape(where, "out", out, out_shape, "[B, H, Nq, Dv] of q and v");
  check_shape(where, "dout", dout, out_shape, "[B, H, Nq, Dv] of q and v");
  check_shape(where, "grads.dq", g.dq, q.shape, "q's shape");
  check_shape(where, "grads.dk", g.dk, k.shape, "k's shape");
  check_shape(where, "grads.dv", g.dv, v.shape, "v's shape");
  std::vector<NamedRange> ins{named("q", q), named("k", k), named("v", v), named("out", out), named("dout", dout)};
  for (const NamedRange& m : mask_ranges(masks, d.B, d.Nq, d.Nk)) ins.push_back(m);
  ins.insert(ins.end(), reads.begin(), reads.end());
  const NamedRange outs[5] = {named("grads.dq", g.dq), named("grads.dk", g.dk), named("grads.dv", g.dv),
                              named("grads.dproxy_q", g.dproxy_q), named("grads.dproxy_k", g.dproxy_k)};
  const auto hit = [](const NamedRange& a, const NamedRange& b) { return ranges_meet(a.range, b.range); };
  for (int i = 0; i < 5; ++i) {
    for (const NamedRange& in : ins)
      require(!hit(outs[i], in), where, ": ", outs[i].name, " overlaps input ", in.name,
              " in memory; gradients cannot be written in place");
    for (int j = 0; j < i; ++j)
      require(!hit(outs[i], outs[j]), where, ": ", outs[i].name, " overlaps ", outs[j].name, " in memory");
  }
  check_writable(where, g.dq, "grads.dq");
  check_writable(where, g.dk, "grads.dk");
  check_writable(where, g.dv, "grads.dv");
  return d;
}

/// Methods without proxies take no proxy gradients.
template <class T>
void require_no_proxy_grads(const char* where, const Grads<T>& g) {
  require(g.dproxy_q.data == nullptr && g.dproxy_k.data == nullptr, where,
          ": grads.dproxy_q / grads.dproxy_k are given (shapes ", shape_str(g.dproxy_q), ", ", shape_str(g.dproxy_k),
          ") but this method has no proxies; leave them empty");
}

/// The softmax scale s: 0 selects 1/sqrt(D); anything else must be finite.
inline double resolve_scale(const char* where, double scale, int64_t D) {
  require(std::isfinite(scale), where, ": scale = ", scale, " must be finite (0 selects 1/sqrt(D))");
  return scale == 0.0 ? 1.0 / std::sqrt(static_cast<double>(D)) : scale;
}

/// DESIGN.md: with no more tokens than landmarks on either side, Nyström is exact softmax.
inline bool nystrom_is_exact(const Nystrom& m, int64_t nq, int64_t nk) { return std::min(nq, nk) <= m.landmarks; }

/// Nystrom's own parameters (shared by every backend).
inline void check_nystrom(const char* where, const Nystrom& m) {
  require(m.landmarks >= 1, where, ": landmarks = ", m.landmarks, " must be >= 1");
  require(m.pinv_iterations >= 0, where, ": pinv_iterations = ", m.pinv_iterations, " must be >= 0");
}

/// Proxy's parameters against q: proxies [1 or B, H, M, D], M equal on both sides.
template <class T>
void check_proxy(const char* where, const Proxy<T>& m, const Tensor<const T>& q) {
  check_view(where, "proxy_q", m.proxy_q);
  check_view(where, "proxy_k", m.proxy_k);
  const int64_t B = q.shape[0], H = q.shape[1], D = q.shape[3];
  const char* names[2] = {"proxy_q", "proxy_k"};
  const Tensor<const T>* proxies[2] = {&m.proxy_q, &m.proxy_k};
  for (int i = 0; i < 2; ++i) {
    const Tensor<const T>& p = *proxies[i];
    require(p.shape[0] == 1 || p.shape[0] == B, where, ": ", names[i], ".shape[0] (batch) = ", p.shape[0],
            " must be 1 (shared) or q's batch ", B, "; ", names[i], " shape is ", shape_str(p));
    require(p.shape[1] == H, where, ": ", names[i], ".shape[1] (heads) = ", p.shape[1], " must equal q's heads ", H,
            "; ", names[i], " shape is ", shape_str(p));
    require(p.shape[3] == D, where, ": ", names[i], ".shape[3] (dim) = ", p.shape[3], " must equal q's head dim ", D,
            "; ", names[i], " shape is ", shape_str(p));
  }
  require(m.proxy_q.shape[2] == m.proxy_k.shape[2], where, ": proxy_q has ", m.proxy_q.shape[2],
          " proxies (seq) but proxy_k has ", m.proxy_k.shape[2]);
  require(m.pinv_iterations >= 0, where, ": pinv_iterations = ", m.pinv_iterations, " must be >= 0 (0: no inverse)");
  require(m.column_dropout >= 0.0f && m.column_dropout < 1.0f, where, ": column_dropout = ", m.column_dropout,
          " must be in [0, 1)");
}

/// Favor's parameters against the call's sizes; returns the resolved scale (> 0).
inline double check_favor(const char* where, const Favor& m, const Dims& d) {
  const Tensor<const float>& p = m.projection;
  require(p.shape[2] >= 1, where, ": projection.shape[2] (features M) = ", p.shape[2], " must be >= 1");
  check_view(where, "projection", p);
  require(p.shape[0] == 1, where, ": projection.shape[0] = ", p.shape[0], " must be 1 (shape ", shape_str(p), ")");
  require(p.shape[1] == 1 || p.shape[1] == d.H, where, ": projection has ", p.shape[1],
          " heads; it must have 1 or H = ", d.H, " (shape ", shape_str(p), ")");
  require(p.shape[3] == d.D, where, ": projection.shape[3] = ", p.shape[3], " must equal the head dim of q, D = ", d.D);
  const double scale = resolve_scale(where, m.scale, d.D);
  require(scale > 0, where, ": scale = ", m.scale, " must be positive (FAVOR uses sqrt(scale))");
  require(m.map == FeatureMap::positive || m.map == FeatureMap::relu || m.map == FeatureMap::trig, where,
          ": map = ", static_cast<int>(m.map), " is not a FeatureMap");
  require(std::isfinite(m.eps) && m.eps >= 0, where, ": eps = ", m.eps,
          " must be finite and >= 0 (0 selects the map's default)");
  require(m.map != FeatureMap::trig || m.eps == 0, where, ": eps = ", m.eps,
          " has no meaning for FeatureMap::trig (leave it 0)");
  return scale;
}

/// The FAVOR map's eps: 0 selects its default (1e-6 positive, 1e-3 relu); trig has none.
inline double favor_eps(FeatureMap map, double eps) {
  if (map == FeatureMap::trig) return 0.0;
  if (eps != 0.0) return eps;
  return map == FeatureMap::positive ? 1e-6 : 1e-3;
}

}  // namespace detail
}  // namespace effattn
