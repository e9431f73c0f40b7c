#!/usr/bin/env bash
# Builds the library's tests, examples and benches and runs every test (CPU; CUDA tests are
# built when nvcc is found and skip without a GPU). Installs missing dependencies when root.
#   bash scripts/test.sh            # from the repository root
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/install_deps.sh
cmake --preset default
cmake --build --preset default
ctest --preset default
