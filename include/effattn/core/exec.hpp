// Backends are tag types; Exec<Backend> carries where and how an operator runs.
#pragma once
#include <cstddef>

namespace effattn {

struct Cpu {};   // host memory, Eigen, OpenMP threads
struct Cuda {};  // device memory, CUDA kernels (include <effattn/cuda.cuh>)

template <class Backend>
struct Exec;

/// CPU execution: OpenMP thread count (0 = OpenMP's default) and an optional caller-owned
/// workspace of workspace_bytes<Cpu>(...) bytes; without one the operator allocates its own.
template <>
struct Exec<Cpu> {
  int threads = 0;
  void* workspace = nullptr;
  size_t workspace_size = 0;
};

}  // namespace effattn
