// Compiled by the host compiler (not nvcc) in the test cuda.header_needs_nvcc, which passes when
// the compiler stops at <effattn/cuda.cuh>'s static_assert with its message.
#include <effattn/cuda.cuh>

int main() { return 0; }
