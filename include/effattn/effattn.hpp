// effattn: attention operators for long sequences. This umbrella header brings the public API
// and the CPU (Eigen) backend; CUDA code adds <effattn/cuda.cuh>.
#pragma once
#include "effattn/core.hpp"
#include "effattn/cpu/favor.hpp"
#include "effattn/cpu/nystrom.hpp"
#include "effattn/cpu/proxy.hpp"
#include "effattn/cpu/softmax.hpp"
#include "effattn/favor_projection.hpp"
