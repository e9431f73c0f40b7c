#!/usr/bin/env bash
# Reproduces the papers' throughput and memory-per-sequence tables on this machine, in one command:
# installs what is missing (as root on Debian), builds the bench binaries (Release) for the best
# backend here (CUDA when nvcc is at /usr/local/cuda/bin and nvidia-smi sees a GPU, else CPU), runs
# a short sweep with progress, writes JSON + markdown + PNG under the output dir and prints the table.
#
#   bash scripts/bench.sh                  # short sweep: a few minutes on a 2-core CPU
#   bash scripts/bench.sh --full           # the whole issue sweep (LRA + FlashAttention shapes,
#                                          # N = 512..65536): meant for a GPU; hours on a small CPU
#   bash scripts/bench.sh --cpu            # CPU backend even when a GPU is present
#   bash scripts/bench.sh --peers          # side by side with torch SDPA, nystrom-attention and
#                                          # performer-pytorch (needs torch: bench/peers/README.md),
#                                          # interleaved rounds, medians and per-round ratios
#   bash scripts/bench.sh --out DIR [-- extra attention_*_bench flags, e.g. --seq=1024,4096]
# EFFATTN_BENCH_BUILD_DIR overrides the build directory (default build/bench-cpu or build/bench-cuda);
# with --peers, EFFATTN_PEERS_PYTHON names the python that has torch (default: .venv*/bin/python, then
# python3) and EFFATTN_PEERS_ROUNDS the number of rounds (default 3).
set -euo pipefail
cd "$(dirname "$0")/.."

args_seen="$*"
out_dir=out/bench
full=0
force_cpu=0
peers=0
extra=()
while [ $# -gt 0 ]; do
  case "$1" in
    --out) out_dir=$2; shift 2 ;;
    --out=*) out_dir=${1#--out=}; shift ;;
    --full) full=1; shift ;;
    --cpu) force_cpu=1; shift ;;
    --peers) peers=1; shift ;;
    --) shift; extra+=("$@"); break ;;
    -h|--help) sed -n '2,19p' "$0"; exit 0 ;;
    *) extra+=("$1"); shift ;;
  esac
done

# --- dependencies: build tools and libraries, python3; matplotlib only for the PNG ---------------
find_plot_python() {
  for py in python3 /usr/bin/python3; do
    if command -v "$py" >/dev/null 2>&1 && "$py" -c "import matplotlib" >/dev/null 2>&1; then
      echo "$py"; return 0
    fi
  done
  return 1
}
extra_debs=(python3)
if ! find_plot_python >/dev/null; then extra_debs+=(python3-matplotlib); fi
# Installs only what is missing (one apt-get update); as non-root it names what to install.
if ! source scripts/install_deps.sh "${extra_debs[@]}"; then
  # Everything but the PNG works without matplotlib (and the bench needs no GoogleTest): go on
  # when the tools are there; CMake names a missing library (Eigen, Google Benchmark) itself.
  for tool in cmake ninja g++ python3; do
    command -v "$tool" >/dev/null || { echo "bench.sh: $tool is required" >&2; exit 1; }
  done
fi
plot_py=$(find_plot_python || true)
render_py=${plot_py:-python3}

# --- backend ---------------------------------------------------------------------------------------
backend=cpu
if [ $force_cpu -eq 0 ] && [ -x /usr/local/cuda/bin/nvcc ] && command -v nvidia-smi >/dev/null 2>&1 \
   && nvidia-smi -L 2>/dev/null | grep -q '^GPU'; then
  backend=cuda
fi

slug() { tr '[:upper:]' '[:lower:]' | sed -e 's/([^)]*)//g' -e 's/[^a-z0-9]\+/-/g' -e 's/^-//' -e 's/-$//'; }
if [ $backend = cuda ]; then
  device=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)
  arch=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -1 | tr -d '.')
  build_dir=${EFFATTN_BENCH_BUILD_DIR:-build/bench-cuda}
  cmake_args=(-DEFFATTN_CUDA=ON -DCMAKE_CUDA_COMPILER=/usr/local/cuda/bin/nvcc -DCMAKE_CUDA_ARCHITECTURES="$arch")
  target=attention_cuda_bench
else
  # The model name alone can be the same for different CPUs (a KVM guest's "Intel(R) Xeon(R)
  # Processor"), so the family and model numbers go into the name of the result files too.
  cpu_field() { sed -n "s/^$1[[:space:]]*:[[:space:]]*//p" /proc/cpuinfo | head -1; }
  device="$(cpu_field 'model name'), family $(cpu_field 'cpu family') model $(cpu_field 'model'), $(nproc) threads"
  build_dir=${EFFATTN_BENCH_BUILD_DIR:-build/bench-cpu}
  cmake_args=(-DEFFATTN_CUDA=OFF)
  target=attention_cpu_bench
fi
name=$(echo "$device" | slug)
commit=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
if [ -n "$(git status --porcelain --untracked-files=no -- include cuda bench 2>/dev/null)" ]; then commit="$commit+local-changes"; fi

echo "bench.sh: backend $backend on '$device'; build in $build_dir; results in $out_dir/$name.*"
cmake -S . -B "$build_dir" -G Ninja -DCMAKE_BUILD_TYPE=Release -DEFFATTN_BUILD_TESTS=OFF \
  -DEFFATTN_BUILD_EXAMPLES=OFF "${cmake_args[@]}" >/dev/null
cmake --build "$build_dir" --target "$target"

# --- side by side with the peers (--peers) ---------------------------------------------------------
peers_python=""
if [ $peers -eq 1 ]; then
  for py in ${EFFATTN_PEERS_PYTHON:-} .venv*/bin/python python3; do
    if [ -x "$py" ] || command -v "$py" >/dev/null 2>&1; then
      if "$py" -c "import torch" >/dev/null 2>&1; then peers_python=$py; break; fi
    fi
  done
  if [ -z "$peers_python" ]; then
    echo "bench.sh: --peers needs torch in some python (none found; bench/peers/README.md says how to get it):" \
         "running the effattn sweep alone" >&2
  fi
fi
if [ -n "$peers_python" ]; then
  mkdir -p "$out_dir"
  rounds=${EFFATTN_PEERS_ROUNDS:-3}
  bin="$build_dir/bench/$target"
  # Three sessions, each interleaving effattn and the peers per (shape, N) for $rounds rounds:
  # the LRA table (+ the per-issue targets), the FlashAttention shape, and double at the LRA shape.
  common=(--bench "$bin" --rounds "$rounds" --device-name "$device" --commit "$commit" --quiet --min-calls 3)
  if [ $backend = cuda ]; then types_lra=half; else types_lra=float; fi
  sessions=(
    "lra|--shapes lra --seq 512,1024,2048,4096,8192 --types $types_lra --targets
      --bench-methods standard,softmax,softmax-causal,nystrom-128,proxy-128,favor-256
      --methods torch-standard,torch-sdpa,torch-sdpa-causal,nystrom-attention-128,performer-256"
    "fa64|--shapes fa64 --seq 1024,2048,4096 --tokens 4096 --types $types_lra
      --bench-methods softmax,softmax-causal --methods torch-sdpa,torch-sdpa-causal")
  if [ $backend = cpu ]; then
    sessions+=("double|--shapes lra --seq 1024,2048,4096 --types double --bench-methods softmax,softmax-causal
      --methods torch-sdpa,torch-sdpa-causal")
    # Training: forward + backward against the peers' autograd (the CUDA backend has no backward yet).
    sessions+=("lra-backward|--shapes lra --seq 1024,2048,4096,8192 --types float --pass forward,backward
      --bench-methods softmax,nystrom-128,proxy-128,favor-256 --methods torch-sdpa,nystrom-attention-128,performer-256"
      "fa64-backward|--shapes fa64 --seq 1024,2048,4096 --tokens 4096 --types float --pass forward,backward
      --bench-methods softmax --methods torch-sdpa")
  fi
  jsons=()
  for s in "${sessions[@]}"; do
    tag=${s%%|*}
    read -r -a flags <<< "$(echo "${s#*|}" | tr '\n' ' ')"
    prefix=$out_dir/$name.side-by-side.$tag
    for x in "${extra[@]}"; do flags+=("--bench-arg=$x"); done
    echo "bench.sh: $peers_python bench/peers/run_peers.py ${common[*]} ${flags[*]} --out $prefix"
    "$peers_python" bench/peers/run_peers.py "${common[@]}" "${flags[@]}" --out "$prefix"
    jsons+=("$prefix.json" "$prefix.peers.json")
  done
  png_args=()
  if [ -n "$plot_py" ]; then png_args=(--png "$out_dir/$name.side-by-side.png"); fi
  "$render_py" bench/render.py "${jsons[@]}" --out "$out_dir/$name.side-by-side.md" "${png_args[@]}" \
    --command "bash scripts/bench.sh${args_seen:+ $args_seen}"
  echo "bench.sh: wrote $out_dir/$name.side-by-side.{md,*.json${plot_py:+,png}}"
  exit 0
fi

# --- the sweep -----------------------------------------------------------------------------------
if [ $full -eq 1 ]; then
  sweep=(--suite=table,targets --shapes=lra,fa64,fa128 --seq=512,1024,2048,4096,8192,16384,32768,65536
         --methods=standard,softmax,softmax-causal,nystrom-128,proxy-128,favor-256,favor-256-causal)
  if [ $backend = cuda ]; then sweep+=(--types=float,half,bf16 --max-scores-mb=32768); else sweep+=(--types=float); fi
elif [ $backend = cuda ]; then
  # The LRA and one FlashAttention shape up to 16k, fp16, and the targets: about a minute on an H100.
  sweep=(--suite=table,targets --shapes=lra,fa64 --seq=512,1024,2048,4096,8192,16384 --types=half
         --methods=standard,softmax,nystrom-128,proxy-128,favor-256)
else
  # The papers' range (Nyströmformer Table 1: 512..8192) on the LRA shape, and the targets.
  sweep=(--suite=table,targets --shapes=lra --seq=512,1024,2048,4096,8192
         --methods=standard,softmax,nystrom-128,proxy-128,favor-256 --pass=forward,backward)
fi
mkdir -p "$out_dir"
json=$out_dir/$name.json
cmd=("$build_dir/bench/$target" "${sweep[@]}" "${extra[@]}" --device="$device" --commit="$commit"
     --benchmark_min_time=0.2 --benchmark_out="$json" --benchmark_out_format=json)
echo "bench.sh: ${cmd[*]}"
status=0
"${cmd[@]}" || status=$?  # a failed case (exit 3) still leaves the other rows to render

# --- tables and plot -------------------------------------------------------------------------------
png_args=()
if [ -n "$plot_py" ]; then png_args=(--png "$out_dir/$name.png"); else
  echo "bench.sh: no matplotlib, so no PNG (pip install matplotlib, or apt-get install python3-matplotlib)" >&2
fi
"$render_py" bench/render.py "$json" --out "$out_dir/$name.md" "${png_args[@]}" \
  --command "bash scripts/bench.sh${args_seen:+ $args_seen}"
echo "bench.sh: wrote $out_dir/$name.{json,md${plot_py:+,png}}"
if [ $status -ne 0 ]; then
  echo "bench.sh: the bench exited with status $status (a case failed: ERROR OCCURRED above)" >&2
  exit $status
fi
