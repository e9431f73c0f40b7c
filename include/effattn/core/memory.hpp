// Byte ranges of the memory a call touches (views, masks, the method's own tensors, the caller's
// workspace) and the overlap checks between them, shared by every backend. On CUDA the pointers
// are device addresses: the checks are the same byte-range comparisons.
#pragma once
#include <algorithm>
#include <array>
#include <cstddef>
#include <cstdint>
#include <string>
#include <type_traits>
#include <vector>

#include "effattn/core/error.hpp"
#include "effattn/core/exec.hpp"
#include "effattn/core/methods.hpp"
#include "effattn/core/tensor.hpp"

namespace effattn {
namespace detail {

using ByteRange = std::array<uintptr_t, 2>;  // [lo, hi)

/// Byte range [lo, hi) that a view can touch; empty for empty views.
template <class T>
ByteRange byte_range(const Tensor<T>& t) {
  int64_t lo = 0, hi = 0;
  for (int i = 0; i < 4; ++i) {
    const int64_t reach = (t.shape[i] - 1) * t.stride[i];
    (reach < 0 ? lo : hi) += reach;
  }
  const auto base = reinterpret_cast<uintptr_t>(t.data);
  return {base + lo * sizeof(T), base + (hi + 1) * sizeof(T)};
}

/// Whether two byte ranges share a byte (empty ranges share none).
inline bool ranges_meet(const ByteRange& a, const ByteRange& b) {
  return a[0] < a[1] && b[0] < b[1] && a[0] < b[1] && b[0] < a[1];
}

template <class A, class B>
bool overlaps(const Tensor<A>& a, const Tensor<B>& b) {
  const auto ra = byte_range(a), rb = byte_range(b);
  return ra[0] < rb[1] && rb[0] < ra[1];
}

/// A named byte range [lo, hi) that an output must not overlap.
struct NamedRange {
  const char* name;
  ByteRange range;
};

/// A view's range; empty for a view with no data or a non-positive extent (an absent view, or one
/// the shape checks reject).
template <class T>
NamedRange named(const char* name, const Tensor<T>& t) {
  bool present = t.data != nullptr;
  for (int i = 0; i < 4; ++i) present = present && t.shape[i] > 0;
  return {name, present ? byte_range(t) : ByteRange{0, 0}};
}

/// The bytes of a [batch, n] mask whose rows start `batch_stride` bytes apart:
/// [base + min(0, (batch − 1)·stride), base + max(0, (batch − 1)·stride) + n); empty when absent.
inline NamedRange mask_range(const char* name, const uint8_t* mask, int64_t batch_stride, int64_t batch, int64_t n) {
  if (mask == nullptr || batch <= 0 || n <= 0) return {name, {0, 0}};
  const int64_t reach = (batch - 1) * batch_stride;
  const auto base = reinterpret_cast<uintptr_t>(mask);
  return {name, {base + static_cast<uintptr_t>(std::min<int64_t>(0, reach)),
                 base + static_cast<uintptr_t>(std::max<int64_t>(0, reach) + n)}};
}

/// The two masks of a call with `batch` sequences of nq queries and nk keys.
inline std::array<NamedRange, 2> mask_ranges(const Masks& m, int64_t batch, int64_t nq, int64_t nk) {
  return {mask_range("masks.query_valid", m.query_valid, m.query_batch_stride, batch, nq),
          mask_range("masks.key_valid", m.key_valid, m.key_batch_stride, batch, nk)};
}

/// The tensors a method reads besides q, k, v (proxies, the FAVOR projection).
inline std::vector<NamedRange> method_ranges(const Softmax&) { return {}; }
inline std::vector<NamedRange> method_ranges(const Nystrom&) { return {}; }
inline std::vector<NamedRange> method_ranges(const Favor& m) { return {named("projection", m.projection)}; }
template <class T>
std::vector<NamedRange> method_ranges(const Proxy<T>& m) {
  return {named("proxy_q", m.proxy_q), named("proxy_k", m.proxy_k)};
}

/// Names for the messages of the entry points.
template <class Backend>
constexpr const char* backend_name() {
  return std::is_same_v<Backend, Cpu> ? "Cpu" : std::is_same_v<Backend, Cuda> ? "Cuda" : "?";
}
inline const char* method_name(const Softmax&) { return "Softmax"; }
inline const char* method_name(const Nystrom&) { return "Nystrom"; }
inline const char* method_name(const Favor&) { return "Favor"; }
template <class T>
const char* method_name(const Proxy<T>&) {
  return "Proxy";
}

/// The caller's workspace (exec.workspace, exec.workspace_size bytes): a size without a pointer
/// is an error, and the block may overlap nothing the call reads or writes (`used`).
inline void check_workspace(const std::string& where, const void* workspace, size_t size,
                            const std::vector<NamedRange>& used) {
  require(workspace != nullptr || size == 0, where, ": exec.workspace is null but exec.workspace_size = ", size,
          "; pass both (a workspace of workspace_bytes(...) bytes) or neither");
  if (workspace == nullptr) return;
  const auto base = reinterpret_cast<uintptr_t>(workspace);
  const ByteRange ws{base, base + size};
  for (const NamedRange& r : used)
    require(!ranges_meet(ws, r.range), where, ": exec.workspace (", size, " bytes) overlaps ", r.name,
            " in memory; the workspace must be memory of its own");
}

/// The memory of one attention call as the entry points see it: q, k, v, the masks and the
/// method's tensors, plus what the call writes (`extra`: out, lse, gradients, dout, ...).
template <class Backend, class Method, class T>
void check_call_memory(const char* entry, const Method& m, const Exec<Backend>& exec, const Tensor<const T>& q,
                       const Tensor<const T>& k, const Tensor<const T>& v, const Masks& masks,
                       const std::vector<NamedRange>& extra) {
  if (exec.workspace == nullptr && exec.workspace_size == 0) return;  // nothing to check: the common case
  std::vector<NamedRange> used{named("q", q), named("k", k), named("v", v)};
  for (const NamedRange& r : mask_ranges(masks, q.shape[0], q.shape[2], k.shape[2])) used.push_back(r);
  for (const NamedRange& r : method_ranges(m)) used.push_back(r);
  used.insert(used.end(), extra.begin(), extra.end());
  check_workspace(concat(entry, "<", backend_name<Backend>(), ">(", method_name(m), ")"), exec.workspace,
                  exec.workspace_size, used);
}

}  // namespace detail
}  // namespace effattn
