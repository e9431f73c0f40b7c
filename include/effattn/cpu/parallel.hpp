// Threads for the CPU backend: a parallel loop over independent work items, each thread with
// its own slice of the workspace.
#pragma once
#include <algorithm>
#include <cstdint>
#include <exception>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "effattn/core/exec.hpp"
#include "effattn/core/workspace.hpp"

namespace effattn {
namespace cpu {

/// Threads a call will use: exec.threads (0..Exec<Cpu>::max_threads, else an Error), or OpenMP's
/// default when 0, capped at max_threads; parallel_for further caps it at the work items.
inline int thread_count(const Exec<Cpu>& exec) {
  detail::require(exec.threads >= 0 && exec.threads <= Exec<Cpu>::max_threads, "effattn: exec.threads = ",
                  exec.threads, " must be in [0, ", Exec<Cpu>::max_threads, "] (0 = OpenMP's default)");
#ifdef _OPENMP
  return exec.threads > 0 ? exec.threads : std::min(omp_get_max_threads(), Exec<Cpu>::max_threads);
#else
  return 1;
#endif
}

/// Runs body(item, scratch) for item in [0, items) on `threads` threads; each thread's scratch
/// is its own `per_thread` bytes cut from `arena`. The first exception thrown is rethrown.
template <class Body>
void parallel_for(int threads, int64_t items, detail::Arena& arena, size_t per_thread, Body body) {
  if (items <= 0) return;
  const int n = static_cast<int>(std::min<int64_t>(threads, items));
  unsigned char* base = arena.take<unsigned char>(per_thread * n);
  std::exception_ptr error;
#ifdef _OPENMP
#pragma omp parallel num_threads(n)
#endif
  {
#ifdef _OPENMP
    const int t = omp_get_thread_num();
#else
    const int t = 0;
#endif
    detail::Arena mine(base + per_thread * t, per_thread);
#ifdef _OPENMP
    // Every item runs on this one thread. Without this, a team of one (threads or items = 1)
    // leaves the nested level free and Eigen forks an OpenMP team inside every small GEMM (20x
    // slower for FAVOR at B*H = 1). Only this thread's nested setting changes.
    omp_set_num_threads(1);
#endif
#ifdef _OPENMP
#pragma omp for schedule(dynamic, 1)
#endif
    for (int64_t i = 0; i < items; ++i) {
      try {
        body(i, mine);
      } catch (...) {
#ifdef _OPENMP
#pragma omp critical(effattn_error)
#endif
        if (!error) error = std::current_exception();
      }
    }
  }
  if (error) std::rethrow_exception(error);
}

/// Workspace for parallel_for with `threads` threads over `items` items.
inline size_t parallel_bytes(int threads, int64_t items, size_t per_thread) {
  return per_thread * static_cast<size_t>(std::max<int64_t>(1, std::min<int64_t>(threads, items)));
}

}  // namespace cpu
}  // namespace effattn
