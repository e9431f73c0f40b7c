// CUDA softmax attention in __half against the float64 reference (cases in softmax_cases.cuh).
#include "softmax_cases.cuh"

namespace {
EFFATTN_SOFTMAX_CUDA_TESTS(SoftmaxCudaHalf, __half)
}  // namespace
