#!/usr/bin/env bash
# Validates the CUDA backend on this machine's NVIDIA GPU in one command that stops itself inside
# 9 minutes (sized for a 16-core H200 with no network):
#   1. configures for this GPU's architecture only (nvidia-smi compute_cap) and builds only the
#      CUDA tests and attention_cuda_bench;
#   2. ctest -L cuda: any failed or skipped test fails the check (the tests that put tensors at
#      offsets past 2^31, several GiB each, run one at a time after the rest);
#   3. compute-sanitizer memcheck and racecheck on one small case per operator (tensor-core, FP32
#      and scalar-load softmax paths, Nystrom, Proxy, FAVOR+ bidirectional and causal), plus
#      synccheck and initcheck;
#   4. attention_cuda_bench --check, the short CUDA sweep of scripts/bench.sh, softmax points at
#      D = 64 and 128 in half and bf16, and torch SDPA (flash, cuDNN) at the same shapes when
#      python3 can import torch.
#
#   bash scripts/gpu_check.sh [OUT_DIR]                  # default out/gpu-check
#   bash scripts/gpu_check.sh --filters-only BUILD_DIR   # only check that every sanitizer filter
#                                                        # names a built test (needs no GPU)
#
# OUT_DIR gets at most 8 files: summary.txt (one page: device, driver, date, commit, a verdict per
# step), build.log, ctest.log, sanitizer.log, bench.log (also the rendered tables), bench.json,
# bench-softmax.json, sdpa.json.
# Environment: EFFATTN_DEPS_PREFIX, a CMake prefix with Eigen, GoogleTest and Google Benchmark for a
# machine without them (scripts/make_deps_prefix.sh makes one; default .devdeps/ when present);
# GPU_CHECK_BUDGET_S (default 510: the whole run; each step's share scales with it),
# GPU_CHECK_JOBS (default nproc),
# GPU_CHECK_BUILD_DIR (default build/gpu-check-sm<arch>), GPU_CHECK_COMMIT (the commit to name
# where the tree is a copy without .git).
# Exit status: 0 everything ran and passed; 1 something failed (build, a failed or skipped test,
# a sanitizer error, the bench check, a sanitizer filter that names no test); 2 it could not
# start (no NVIDIA GPU, no nvcc, bad arguments); 3 nothing failed but some step did not run
# (time budget spent, or compute-sanitizer cannot use this device).
set -uo pipefail  # no -e: every step runs and reports, and the verdicts decide the exit status
cd "$(dirname "$0")/.." || exit 2

# One small case per (tool, operator path); the filters must name tests that exist (checked
# against --gtest_list_tests of the built binaries before anything runs).
#  tool       test binary              gtest filter                                  covers
SANITIZER_CASES=$(cat <<'EOF'
memcheck   cuda_softmax_half_test   SoftmaxCudaHalf.EveryHeadDim                  tensor cores, D = 32..256 (one stage at 256), causal, masks
memcheck   cuda_softmax_float_test  SoftmaxCudaFloat.EveryHeadDim                 FP32 path, one stage at D >= 128
memcheck   cuda_softmax_bf16_test   SoftmaxCudaBf16.Layouts                       padded views: scalar (converting) loads
memcheck   cuda_nystrom_test        NystromCuda/1.DifferentQueryAndKeyLengths     Nystrom, __half
memcheck   cuda_proxy_test          ProxyCuda/1.SharedPerSequenceAndMixedProxies  Proxy, __half
memcheck   cuda_favor_test          FavorCuda/1.EveryMapBidirectionalAndCausal    FAVOR+ bidirectional and causal, __half
racecheck  cuda_softmax_half_test   SoftmaxCudaHalf.EveryHeadDim                  cp.async stages, one-stage refill at D = 256
racecheck  cuda_softmax_float_test  SoftmaxCudaFloat.EveryHeadDim                 one-stage refill at D = 128, 256
racecheck  cuda_nystrom_test        NystromCuda/0.DifferentQueryAndKeyLengths     segment means, pinv, apply Z
racecheck  cuda_proxy_test          ProxyCuda/0.SharedPerSequenceAndMixedProxies  pinv with shared and per-sequence proxies
racecheck  cuda_favor_test          FavorCuda/0.EveryMapBidirectionalAndCausal    FAVOR+ passes and causal scan
synccheck  cuda_softmax_half_test   SoftmaxCudaHalf.CausalBottomRightAligned      barriers around skipped causal tiles
synccheck  cuda_favor_test          FavorCuda/0.EveryMapBidirectionalAndCausal    barriers after tiles without a valid key
initcheck  cuda_nystrom_test        NystromCuda/0.DifferentQueryAndKeyLengths     workspace read before written
initcheck  cuda_proxy_test          ProxyCuda/0.NoInverse                         workspace read before written
initcheck  cuda_favor_test          FavorCuda/0.EveryMapBidirectionalAndCausal    partials and causal state
EOF
)
# Tests that need several GiB of device memory each: run alone, after the others.
BIG_TESTS=OffsetsBeyond32Bits

# Prints "binary filter" for each sanitizer filter that names no test in BUILD_DIR; returns 1 if any.
check_filters() {
  local dir=$1 tool bin filter rest n bad=0
  while read -r tool bin filter rest; do
    [ -n "$tool" ] || continue
    if [ ! -x "$dir/tests/$bin" ]; then
      echo "sanitizer case $tool $bin: $dir/tests/$bin was not built"; bad=1; continue
    fi
    n=$("$dir/tests/$bin" --gtest_list_tests --gtest_filter="$filter" 2>/dev/null | grep -c '^  ')
    if [ "$n" -eq 0 ]; then
      echo "sanitizer case $tool $bin: filter '$filter' names no test (renamed? keep SANITIZER_CASES in scripts/gpu_check.sh in step with tests/cuda/)"
      bad=1
    fi
  done <<<"$SANITIZER_CASES"
  return $bad
}

if [ "${1:-}" = "--filters-only" ]; then
  [ $# -eq 2 ] || { echo "usage: $0 --filters-only BUILD_DIR" >&2; exit 2; }
  if check_filters "$2"; then echo "gpu_check.sh: every sanitizer filter names a test in $2"; exit 0; fi
  exit 1
fi
case "${1:-}" in -h|--help) sed -n '2,/^set /{/^set /!p}' "$0"; exit 0 ;; -*) echo "usage: $0 [OUT_DIR] | --filters-only BUILD_DIR" >&2; exit 2 ;; esac

out=${1:-out/gpu-check}
mkdir -p "$out" || exit 2
out=$(cd "$out" && pwd)
summary=$out/summary.txt
t0=$(date +%s)
budget=${GPU_CHECK_BUDGET_S:-510}
end=$((t0 + budget))
: >"$summary"
note() { echo "[$(($(date +%s) - t0)) s] $*" | tee -a "$summary"; }
fails=0 incomplete=0
fail() { note "FAIL: $*"; fails=$((fails + 1)); }
skip_step() { note "NOT RUN: $*"; incomplete=$((incomplete + 1)); }
# Seconds a step may take: at most CAP, leaving RESERVE seconds for the steps after it, both
# scaled by budget / 510 (a slower machine gets a larger budget); 0 when fewer than 10 remain
# (the caller then skips the step).
limit() {
  local cap=$(($1 * budget / 510)) reserve=$(($2 * budget / 510)) left
  left=$((end - $(date +%s) - reserve))
  ((left < cap)) && cap=$left
  ((cap < 10)) && cap=0
  echo "$cap"
}

# --- the machine ---------------------------------------------------------------------------------
export PATH=$PATH:/usr/local/cuda/bin
cap=
if command -v nvidia-smi >/dev/null 2>&1; then
  cap=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -1 | tr -d ' ')
fi
if ! [[ $cap =~ ^[0-9]+\.[0-9]+$ ]]; then
  note "gpu_check.sh: no NVIDIA GPU here (nvidia-smi is missing or lists no GPU); nothing was built or run"
  exit 2
fi
arch=${cap/./}
nvcc=$(command -v nvcc || true)
[ -n "$nvcc" ] || { note "gpu_check.sh: no nvcc (neither on PATH nor in /usr/local/cuda/bin); nothing was run"; exit 2; }
sanitizer=$(command -v compute-sanitizer || true)
jobs=${GPU_CHECK_JOBS:-$(nproc)}
build=${GPU_CHECK_BUILD_DIR:-build/gpu-check-sm$arch}
commit=${GPU_CHECK_COMMIT:-}  # for a copy of the tree without .git
if [ -z "$commit" ]; then
  commit=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
  if [ -n "$(git status --porcelain --untracked-files=no -- cuda include tests bench 2>/dev/null)" ]; then
    commit="$commit+local-changes"
  fi
fi
deps=${EFFATTN_DEPS_PREFIX:-}
if [ -z "$deps" ] && [ -d .devdeps ]; then deps=.devdeps; fi
if [ -n "$deps" ]; then
  [ -d "$deps" ] || { note "gpu_check.sh: EFFATTN_DEPS_PREFIX=$deps is not a directory"; exit 2; }
  deps=$(cd "$deps" && pwd)
fi
IFS=, read -r gpu_name driver gpu_mem <<<"$(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader |
  head -1 | sed 's/, */,/g')"
note "effattn gpu_check on $gpu_name (sm_$arch, $gpu_mem), driver $driver"
note "date $(date '+%Y-%m-%d %H:%M:%S %Z'), commit $commit, $(nproc) CPUs, budget $((end - t0)) s"
note "nvcc $("$nvcc" --version | sed -n 's/.*release \([0-9.]*\).*/\1/p'), $(cmake --version | head -1), $(g++ --version | head -1)"
note "deps prefix: ${deps:-none (system packages)}; compute-sanitizer: ${sanitizer:-not found}"

# --- 1. configure and build ----------------------------------------------------------------------
{
  nvidia-smi
  "$nvcc" --version
  [ -n "$sanitizer" ] && "$sanitizer" --version
  cmake --version
} >"$out/build.log" 2>&1
cmake_args=(-S . -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DEFFATTN_CUDA=ON -DCMAKE_CUDA_COMPILER="$nvcc"
            -DCMAKE_CUDA_ARCHITECTURES="$arch" -DEFFATTN_BUILD_EXAMPLES=OFF)
[ -n "$deps" ] && cmake_args+=(-DCMAKE_PREFIX_PATH="$deps")
t=$(limit 60 400)
if ((t == 0)); then skip_step "configure (budget spent)"; exit 3; fi
if ! timeout "$t" cmake "${cmake_args[@]}" >>"$out/build.log" 2>&1; then
  fail "configure (end of build.log follows)"
  tail -15 "$out/build.log" >>"$summary"
  exit 1
fi
targets=(attention_cuda_bench)
for src in tests/cuda/*_test.cu tests/cuda/*_test.cpp; do
  [ -e "$src" ] && targets+=("cuda_$(basename "${src%.*}")")
done
t=$(limit 270 200)
if ((t == 0)); then skip_step "build (budget spent)"; exit 3; fi
timeout "$t" cmake --build "$build" -j "$jobs" --target "${targets[@]}" -- -k 0 >>"$out/build.log" 2>&1
rc=$?
if ((rc == 0)); then note "build: ${#targets[@]} targets for sm_$arch"
elif ((rc == 124)); then fail "build did not finish in $t s (build.log)"
else fail "build rc=$rc ($(grep -c ': error' "$out/build.log") compiler errors; build.log)"; fi

if ! bad=$(check_filters "$build"); then
  fail "sanitizer filters: $bad"
fi

# --- 2. ctest ------------------------------------------------------------------------------------
# Host references run on the CPUs (hence -j); a skipped test means no device or too little memory.
t=$(limit 170 180)
if ((t == 0)); then skip_step "ctest (budget spent)"
else
  (cd "$build" && timeout "$t" ctest -L cuda -E "$BIG_TESTS" -j "$jobs" --timeout 200 --output-on-failure) >"$out/ctest.log" 2>&1
  rc1=$?
  t=$(limit 90 150)
  rc2=124
  if ((t > 0)); then
    (cd "$build" && timeout "$t" ctest -L cuda -R "$BIG_TESTS" -j 1 --timeout 120 --output-on-failure) >>"$out/ctest.log" 2>&1
    rc2=$?
  fi
  results=$(grep -E 'tests passed' "$out/ctest.log" | tr '\n' ';')
  skipped=$(grep -c '(Skipped)' "$out/ctest.log")
  failed=$(grep -E '^\s+[0-9]+ - .*\((Failed|Timeout|Exception|SEGFAULT|Not Run|Child aborted)' "$out/ctest.log")
  note "ctest: $results skipped: $skipped (rc $rc1, $rc2)"
  [ -n "$failed" ] && echo "$failed" | head -20 >>"$summary"
  if ((rc1 == 124 || rc2 == 124)); then skip_step "ctest stopped by the time budget (ctest.log)"; fi
  if ((skipped > 0)); then fail "$skipped CUDA tests skipped (ctest.log: a device check must run them all)"; fi
  if [ -n "$failed" ] || { ((rc1 != 0 && rc1 != 124)) || ((rc2 != 0 && rc2 != 124)); }; then fail "ctest (ctest.log)"; fi
fi

# --- 3. compute-sanitizer ------------------------------------------------------------------------
san_ok=0 san_bad=0 san_unavailable=0 san_skipped=0
: >"$out/sanitizer.log"
if [ -z "$sanitizer" ]; then
  skip_step "compute-sanitizer not found"
else
  while read -r tool bin filter rest; do
    [ -n "$tool" ] || continue
    t=$(limit 60 150)  # keeps 150 s for the bench
    if ((t == 0)); then san_skipped=$((san_skipped + 1)); continue; fi
    # Where the first case found that the sanitizer cannot attach to this device, so will the rest.
    if ((san_unavailable > 0 && san_ok + san_bad == 0)); then san_unavailable=$((san_unavailable + 1)); continue; fi
    echo "=== $tool $bin --gtest_filter=$filter   ($rest)" >>"$out/sanitizer.log"
    log=$(timeout "$t" "$sanitizer" --tool "$tool" --error-exitcode 99 --print-limit 20 \
          "$build/tests/$bin" --gtest_filter="$filter" 2>&1)
    rc=$?
    grep -vE '^\[ *(RUN|OK) *\]' <<<"$log" | head -60 >>"$out/sanitizer.log"
    if grep -qE 'Device not supported|not supported on this platform|Unable to find injection|error 999' <<<"$log"; then
      san_unavailable=$((san_unavailable + 1)); verdict="unavailable"
    elif ((rc == 0)) && grep -q 'PASSED' <<<"$log" && ! grep -q '\[  SKIPPED \]' <<<"$log"; then
      san_ok=$((san_ok + 1)); verdict="clean"
    elif ((rc == 124)); then
      san_skipped=$((san_skipped + 1)); verdict="stopped by the time budget"
    else
      san_bad=$((san_bad + 1))
      verdict="rc $rc: $(grep -hoE '(ERROR|RACECHECK) SUMMARY: .*' <<<"$log" | head -1)"
      grep -q '\[  SKIPPED \]' <<<"$log" && verdict="$verdict (test skipped)"
    fi
    echo "--- $verdict" >>"$out/sanitizer.log"
    [ "$verdict" = clean ] || note "sanitizer $tool $filter: $verdict"
  done <<<"$SANITIZER_CASES"
  note "sanitizer: $san_ok clean, $san_bad with errors or failures, $san_unavailable unavailable, $san_skipped not run"
  ((san_bad > 0)) && fail "compute-sanitizer (sanitizer.log)"
  ((san_unavailable > 0)) && skip_step "compute-sanitizer cannot use this device for $san_unavailable cases"
  ((san_skipped > 0)) && skip_step "$san_skipped sanitizer cases (time budget)"
fi

# --- 4. bench, and torch SDPA at the same shapes -------------------------------------------------
bench=$build/bench/attention_cuda_bench
{
  echo "=== attention_cuda_bench --check"
  t=$(limit 40 140)
  if ((t > 0)); then timeout "$t" "$bench" --check; echo "rc=$?"; else echo "not run (budget)"; fi
} >"$out/bench.log" 2>&1
if grep -q '^rc=0$' "$out/bench.log"; then note "bench --check: baseline agrees with effattn softmax"
elif grep -q 'not run' "$out/bench.log"; then skip_step "bench --check (budget)"
else fail "bench --check (bench.log)"; fi

common=(--device="$gpu_name" --commit="$commit" --benchmark_min_time=0.2 --benchmark_out_format=json)
run_bench() {  # JSON CAP RESERVE flags...: one sweep into OUT/JSON, its log into bench.log
  local json=$1 cap=$2 reserve=$3 t
  shift 3
  t=$(limit "$cap" "$reserve")
  echo "=== attention_cuda_bench $*" >>"$out/bench.log"
  if ((t == 0)); then echo "not run (budget)" >>"$out/bench.log"; skip_step "bench $json (budget)"; return; fi
  timeout "$t" "$bench" "$@" "${common[@]}" --benchmark_out="$out/$json" >>"$out/bench.log" 2>&1
  local rc=$?
  ((rc == 124)) && skip_step "bench $json stopped by the time budget"
  ((rc != 0 && rc != 124)) && fail "bench $json rc=$rc (bench.log)"
  return 0
}
# scripts/bench.sh's short CUDA sweep, then D = 64 / 128 softmax in half and bf16.
run_bench bench.json 150 90 --suite=table,targets --shapes=lra,fa64 --seq=512,1024,2048,4096,8192,16384 --types=half \
  --methods=standard,softmax,nystrom-128,proxy-128,favor-256
run_bench bench-softmax.json 60 45 --suite=table --shapes=fa64,fa128 --seq=4096,16384 --types=half,bf16 \
  --methods=softmax,softmax-causal
# A case that throws reports "ERROR OCCURRED"; only standard attention's size limit is expected.
errors=$(grep 'ERROR OCCURRED' "$out/bench.log" | grep -vc 'max-scores-mb')
((errors > 0)) && fail "bench: $errors cases reported an error (bench.log)"
jsons=("$out/bench.json" "$out/bench-softmax.json")
if python3 -c 'import torch, torch.nn.attention' >/dev/null 2>&1; then
  t=$(limit 90 10)
  if ((t > 0)); then
    echo "=== bench/peers/sdpa_cuda_ref.py" >>"$out/bench.log"
    timeout "$t" python3 bench/peers/sdpa_cuda_ref.py --shapes=lra,fa64,fa128 --seq=512,1024,2048,4096,8192,16384 \
      --types=half,bf16 --out "$out/sdpa.json" >>"$out/bench.log" 2>&1
    rc=$?
    if ((rc == 0)); then note "torch SDPA: $(grep -c ' ms/call' "$out/bench.log") cases timed, $(grep -c ': skipped' "$out/bench.log") skipped"
    else skip_step "torch SDPA rc=$rc (bench.log)"; fi
    jsons+=("$out/sdpa.json")
  else skip_step "torch SDPA (budget)"; fi
else
  note "torch SDPA: python3 cannot import torch here; no same-run SDPA reference"
fi
present=()
for j in "${jsons[@]}"; do [ -s "$j" ] && present+=("$j"); done
if [ ${#present[@]} -gt 0 ]; then
  echo "=== bench/render.py" >>"$out/bench.log"
  python3 bench/render.py "${present[@]}" --command "bash scripts/gpu_check.sh" >>"$out/bench.log" 2>&1 ||
    note "render.py failed (bench.log)"
  # The softmax rows beside SDPA's, in the summary: TFLOP/s at N = 16384.
  python3 - "${present[@]}" >>"$summary" 2>/dev/null <<'EOF'
import json, sys
rows = {}
for path in sys.argv[1:]:
    for b in json.load(open(path)).get("benchmarks", []):
        f = dict(p.split(":", 1) for p in b.get("run_name", b["name"]).split("/") if ":" in p)
        if f.get("N") == "16384" and "TFLOP/s" in b and (f["method"].startswith("softmax") or "sdpa" in f["method"]):
            rows[(f["shape"], f["type"], f["method"])] = b["TFLOP/s"]
if rows:
    print("TFLOP/s at N = 16384 (effattn softmax and torch SDPA, same run):")
    for (shape, type_, method), tf in sorted(rows.items()):
        print(f"  {shape:6} {type_:5} {method:24} {tf:7.1f}")
EOF
fi

# --- verdict -------------------------------------------------------------------------------------
if ((fails > 0)); then verdict="FAIL ($fails failed steps, $incomplete not run)"; status=1
elif ((incomplete > 0)); then verdict="INCOMPLETE (nothing failed; $incomplete steps not run)"; status=3
else verdict="PASS"; status=0; fi
note "verdict: $verdict; $(($(date +%s) - t0)) s; files in $out: $(find "$out" -maxdepth 1 -type f -printf '%f ')"
exit $status
