#pragma once
// Functions shared by host code and CUDA kernels.
#if defined(__CUDACC__)
#define EFFATTN_HD __host__ __device__ __forceinline__
#else
#define EFFATTN_HD inline
#endif
