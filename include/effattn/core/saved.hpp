// What a training forward keeps for its backward: one caller-owned block (as cuDNN's reserve
// space), written by attention_with_saved and read by attention_backward_with_saved. Its layout
// is the backend's; a header at the front records the call it belongs to, so that a block from
// another call is an Error rather than wrong gradients.
#pragma once
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <vector>

#include "effattn/core/error.hpp"
#include "effattn/core/memory.hpp"
#include "effattn/core/workspace.hpp"

namespace effattn {

/// A block of saved_bytes(...) bytes, 64-byte aligned, that the caller keeps from the forward to
/// the backward. The library never allocates or frees it.
struct Saved {
  void* data = nullptr;
  size_t bytes = 0;
};

namespace detail {

/// The call a saved block belongs to. `layout` names the backend's arrangement of the rest.
struct SavedHeader {
  static constexpr uint64_t kMagic = 0x65666661'74747376ULL;  // "effattsv"
  uint64_t magic = 0;                                         // kMagic once the forward finished
  int64_t layout = 0, B = 0, H = 0, Nq = 0, Nk = 0, D = 0, Dv = 0, M = 0, iterations = 0;

  bool same_call(const SavedHeader& o) const {
    return layout == o.layout && B == o.B && H == o.H && Nq == o.Nq && Nk == o.Nk && D == o.D && Dv == o.Dv &&
           M == o.M && iterations == o.iterations;
  }
};

/// Bytes of the header, padded so that what follows stays aligned.
constexpr size_t saved_header_bytes() { return bytes_of<SavedHeader>(1); }

inline NamedRange saved_range(const Saved& s) {
  const auto base = reinterpret_cast<uintptr_t>(s.data);
  return {"saved", s.data != nullptr ? ByteRange{base, base + s.bytes} : ByteRange{0, 0}};
}

/// Everything else a call touches: q, k, v, the masks, the method's tensors, the caller's
/// workspace and `extra` (out, dout, gradients).
template <class Method, class T, class Backend>
std::vector<NamedRange> call_ranges(const Method& m, const Tensor<const T>& q, const Tensor<const T>& k,
                                    const Tensor<const T>& v, const Masks& masks, const Exec<Backend>& exec,
                                    std::vector<NamedRange> extra) {
  std::vector<NamedRange> r{named("q", q), named("k", k), named("v", v)};
  for (const NamedRange& mr : mask_ranges(masks, q.shape[0], q.shape[2], k.shape[2])) r.push_back(mr);
  for (const NamedRange& mr : method_ranges(m)) r.push_back(mr);
  if (exec.workspace != nullptr) {
    const auto base = reinterpret_cast<uintptr_t>(exec.workspace);
    r.push_back({"exec.workspace", {base, base + exec.workspace_size}});
  }
  r.insert(r.end(), extra.begin(), extra.end());
  return r;
}

/// The caller's block: present, large enough, aligned, and overlapping nothing else of the call.
inline void check_saved(const char* where, const Saved& s, size_t needed, const std::vector<NamedRange>& others) {
  require(s.data != nullptr || needed == 0, where, ": saved.data is null; pass a block of saved_bytes(...) = ",
          needed, " bytes");
  require(s.bytes >= needed, where, ": saved.bytes = ", s.bytes, " but this call needs ", needed, " (saved_bytes)");
  require(reinterpret_cast<uintptr_t>(s.data) % kAlign == 0, where, ": saved.data must be ", kAlign,
          "-byte aligned");
  const NamedRange mine = saved_range(s);
  for (const NamedRange& o : others)
    require(!ranges_meet(mine.range, o.range), where, ": saved (", s.bytes, " bytes) overlaps ", o.name,
            " in memory; it must be memory of its own");
}

/// The forward: starts the block as unfinished (finish_saved marks it done).
inline void begin_saved(const Saved& s, SavedHeader h) {
  h.magic = 0;
  std::memcpy(s.data, &h, sizeof h);
}
inline void finish_saved(const Saved& s) {
  const uint64_t magic = SavedHeader::kMagic;
  std::memcpy(s.data, &magic, sizeof magic);
}

/// The backward: the block must be a finished forward's for a call of the same shapes.
inline void check_saved_header(const char* where, const Saved& s, const SavedHeader& expected) {
  SavedHeader h;
  std::memcpy(&h, s.data, sizeof h);
  require(h.magic == SavedHeader::kMagic, where,
          ": saved holds no finished forward (write it with attention_with_saved, same arguments)");
  require(h.same_call(expected), where, ": saved was written for B=", h.B, " H=", h.H, " Nq=", h.Nq, " Nk=", h.Nk,
          " D=", h.D, " Dv=", h.Dv, " M=", h.M, " iterations=", h.iterations, " (layout ", h.layout,
          ") but this call has B=", expected.B, " H=", expected.H, " Nq=", expected.Nq, " Nk=", expected.Nk,
          " D=", expected.D, " Dv=", expected.Dv, " M=", expected.M, " iterations=", expected.iterations, " (layout ",
          expected.layout, ")");
}

}  // namespace detail
}  // namespace effattn
