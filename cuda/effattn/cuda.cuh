// effattn's CUDA backend: Exec<Cuda> and the CUDA operators. Include from a translation unit
// compiled by nvcc (a .cu file); the CPU backend is <effattn/effattn.hpp>.
#pragma once
#if !defined(__CUDACC__)
static_assert(false,
              "effattn: <effattn/cuda.cuh> is CUDA code and needs nvcc: compile this translation unit as CUDA "
              "(a .cu file, or LANGUAGE CUDA in CMake); host-only code uses <effattn/effattn.hpp>");
#else
#include "effattn/core.hpp"
#include "effattn/cuda/common.cuh"
// The operators, one header each.
#include "effattn/cuda/softmax.cuh"
#include "effattn/cuda/nystrom.cuh"
#include "effattn/cuda/proxy.cuh"
#include "effattn/cuda/favor.cuh"
#endif
