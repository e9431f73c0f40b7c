// The backend-independent part of effattn: views, method structs, errors, dispatch, Philox.
// Free of Eigen and of CUDA, so every translation unit may include it.
#pragma once
#include "effattn/core/attention.hpp"
#include "effattn/core/check.hpp"
#include "effattn/core/error.hpp"
#include "effattn/core/exec.hpp"
#include "effattn/core/memory.hpp"
#include "effattn/core/methods.hpp"
#include "effattn/core/philox.hpp"
#include "effattn/core/tensor.hpp"
#include "effattn/core/workspace.hpp"
