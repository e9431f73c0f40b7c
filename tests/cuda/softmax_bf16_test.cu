// CUDA softmax attention in __nv_bfloat16 against the float64 reference (cases in softmax_cases.cuh).
#include "softmax_cases.cuh"

namespace {
EFFATTN_SOFTMAX_CUDA_TESTS(SoftmaxCudaBf16, __nv_bfloat16)
}  // namespace
