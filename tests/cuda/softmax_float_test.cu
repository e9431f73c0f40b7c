// CUDA softmax attention in float against the float64 reference (cases in softmax_cases.cuh).
#include "softmax_cases.cuh"

namespace {
EFFATTN_SOFTMAX_CUDA_TESTS(SoftmaxCudaFloat, float)
}  // namespace
