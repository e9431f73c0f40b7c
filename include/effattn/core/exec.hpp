// Backends are tag types; Exec<Backend> carries where and how an operator runs.
#pragma once
#include <cstddef>

namespace effattn {

struct Cpu {};   // host memory, Eigen, OpenMP threads
struct Cuda {};  // device memory, CUDA kernels (include <effattn/cuda.cuh>)

template <class Backend>
struct Exec;

/// CPU execution: OpenMP thread count and an optional caller-owned workspace of
/// workspace_bytes<Cpu>(...) bytes; without one the operator allocates its own.
///
/// threads: 0 = OpenMP's default (omp_get_max_threads(), at most max_threads); otherwise
/// 1..max_threads, and anything outside that range throws effattn::Error (OpenMP itself cannot
/// start hundreds of thousands of threads: the runtime overflows its stack). A call never runs more
/// threads than it has independent work items, nor reserves workspace for more.
///
/// workspace: memory of its own (it may overlap no input, mask, output or gradient of the call:
/// effattn::Error otherwise); a nonzero workspace_size with a null workspace is an error too.
template <>
struct Exec<Cpu> {
  static constexpr int max_threads = 1024;
  int threads = 0;
  void* workspace = nullptr;
  size_t workspace_size = 0;
};

}  // namespace effattn
