// Scratch memory: a bump arena over one caller-given or library-allocated block, and the
// library-wide allocation counters that the benches read for memory per sequence.
#pragma once
#include <atomic>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <new>

#include "effattn/core/error.hpp"

namespace effattn {

/// Bytes the library itself holds (workspace it allocated; on CUDA the stream-ordered pool).
struct AllocationStats {
  size_t current = 0;
  size_t peak = 0;
};

namespace detail {
inline std::atomic<size_t> g_alloc_current{0};
inline std::atomic<size_t> g_alloc_peak{0};

inline void note_alloc(size_t n) {
  const size_t now = g_alloc_current.fetch_add(n) + n;
  size_t peak = g_alloc_peak.load();
  while (now > peak && !g_alloc_peak.compare_exchange_weak(peak, now)) {
  }
}
inline void note_free(size_t n) { g_alloc_current.fetch_sub(n); }

constexpr size_t kAlign = 64;  // a cache line; also enough for every vector type
constexpr size_t align_up(size_t n) { return (n + kAlign - 1) / kAlign * kAlign; }

/// Bytes of `count` elements of T, padded so that consecutive takes stay aligned.
template <class T>
constexpr size_t bytes_of(size_t count) {
  return align_up(count * sizeof(T));
}

/// Hands out aligned pieces of one block, front to back. Never frees piecewise.
class Arena {
 public:
  Arena(void* base, size_t size) : base_(static_cast<unsigned char*>(base)), size_(size) {}
  template <class T>
  T* take(size_t count) {
    const size_t n = bytes_of<T>(count);
    require(used_ + n <= size_, "effattn: workspace exhausted (", used_ + n, " bytes needed, ", size_,
            " given); size it with workspace_bytes");
    T* p = reinterpret_cast<T*>(base_ + used_);
    used_ += n;
    return p;
  }
  size_t used() const { return used_; }

 private:
  unsigned char* base_;
  size_t size_;
  size_t used_ = 0;
};

/// Host scratch: the caller's block when given (checked against `needed`), else an owned one.
class HostWorkspace {
 public:
  HostWorkspace(void* given, size_t given_size, size_t needed) {
    if (given != nullptr) {
      require(given_size >= needed, "effattn: exec.workspace_size = ", given_size,
              " bytes but this call needs ", needed, " (workspace_bytes)");
      require(reinterpret_cast<uintptr_t>(given) % kAlign == 0, "effattn: exec.workspace must be ",
              kAlign, "-byte aligned");
      base_ = given;
      size_ = given_size;
    } else if (needed > 0) {
      owned_ = std::aligned_alloc(kAlign, align_up(needed));
      if (owned_ == nullptr) throw std::bad_alloc();
      note_alloc(align_up(needed));
      base_ = owned_;
      size_ = align_up(needed);
    }
  }
  ~HostWorkspace() {
    if (owned_ != nullptr) {
      std::free(owned_);
      note_free(size_);
    }
  }
  HostWorkspace(const HostWorkspace&) = delete;
  HostWorkspace& operator=(const HostWorkspace&) = delete;
  Arena arena() const { return Arena(base_, size_); }

 private:
  void* base_ = nullptr;
  void* owned_ = nullptr;
  size_t size_ = 0;
};
}  // namespace detail

inline AllocationStats allocation_stats() {
  return {detail::g_alloc_current.load(), detail::g_alloc_peak.load()};
}
/// Starts a new high-water mark from what is held now.
inline void reset_allocation_peak() { detail::g_alloc_peak.store(detail::g_alloc_current.load()); }

}  // namespace effattn
