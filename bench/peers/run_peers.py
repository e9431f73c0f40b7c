#!/usr/bin/env python3
"""Peers of effattn's operators on the same device and shapes, in the same JSON and table format as
the bench binaries (bench/render.py reads both, so the rows sit side by side):

  torch-standard      softmax(s Q Kᵀ) V with the N×N scores in memory (PyTorch ops)
  torch-sdpa          torch.nn.functional.scaled_dot_product_attention (fused / flash kernels)
  nystrom-attention-M lucidrains nystrom-attention, NystromAttention core (M landmarks)
  performer-M         lucidrains performer-pytorch, FastAttention (M random features)

(a "-causal" suffix where it applies). Inputs are drawn from N(0, 1), as the bench binaries draw
theirs. --pass=forward,backward adds forward+backward rows (torch autograd; the rows are named
.../pass:backward and time one forward and one backward).

Side by side with effattn on a shared, noisy machine: --bench BINARY interleaves the two. For each
of --rounds rounds, for each shape and N, it runs the bench binary on that (shape, N) (the methods
of --bench-methods) and then the peers on the same (shape, N) (the order flips every round), so a
ratio effattn/peer is always between two measurements minutes apart at most; with --targets the
binary's per-issue target suite runs once per round as well. Every entry carries its round;
bench/render.py takes medians over the rounds and prints the per-round ratios.

Never part of the build or the tests; needs `pip install torch nystrom-attention performer-pytorch`
(see bench/peers/README.md). Examples:

  python3 bench/peers/run_peers.py --out out/bench/peers.json          # peers alone
  python3 bench/peers/run_peers.py --bench build/bench-cpu/bench/attention_cpu_bench --rounds 3 \\
      --out out/bench/side_by_side                                     # writes side_by_side{,.peers}.json
  python3 bench/render.py out/bench/side_by_side.json out/bench/side_by_side.peers.json
"""
import argparse
import datetime
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time

SHAPES = {"lra": (2, 32), "fa64": (32, 64), "fa128": (16, 128)}  # heads, head dim (as bench/harness.hpp)
MB = float(1 << 20)
PASSES = ("forward", "backward")


def flops(method, B, H, N, D):
    """Matrix-product FLOPs of one forward call, counted as bench/harness.hpp counts them."""
    family, size, causal = parse_method(method)
    if family in ("torch-standard", "torch-sdpa"):
        return 4.0 * B * H * N * N * D * (0.5 if causal else 1.0)
    M = size
    if N <= M:
        return 4.0 * B * H * N * N * D
    if family == "nystrom-attention":
        return B * H * (8.0 * N * M * D + 2.0 * M * M * D) + B * H * (2.0 * M * M * D + 6 * 8.0 * M ** 3)
    return 8.0 * B * H * N * M * D  # performer


def parse_method(name):
    causal = name.endswith("-causal")
    base = name[: -len("-causal")] if causal else name
    for family in ("torch-standard", "torch-sdpa", "nystrom-attention", "performer"):
        if base == family:
            return family, 0, causal
        if base.startswith(family + "-"):
            return family, int(base[len(family) + 1:]), causal
    raise SystemExit(f"run_peers.py: unknown method {name!r}")


def cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return f"{line.split(':', 1)[1].strip()}, {os.cpu_count()} threads"
    except OSError:
        pass
    return "cpu"


def load_average():
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


class CpuMemory:
    """Peak resident memory during a call: VmHWM after resetting it (/proc/self/clear_refs = 5)."""

    @staticmethod
    def _status(key):
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
        return 0

    def __enter__(self):
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        self.base = self._status("VmRSS")
        return self

    def __exit__(self, *exc):
        self.grown = max(0, self._status("VmHWM") - self.base)


def make_callable(torch, method, H, D, device, dtype):
    """(fn(q, k, v) -> out, parameter bytes). q, k, v are [B, H, N, D]."""
    import torch.nn.functional as F

    family, size, causal = parse_method(method)
    scale = 1.0 / math.sqrt(D)
    if family == "torch-standard":
        def standard(q, k, v):
            s = torch.matmul(q, k.transpose(-1, -2)) * scale
            if causal:
                n = s.shape[-1]
                s = s.masked_fill(torch.ones(n, n, dtype=torch.bool, device=s.device).triu(1), float("-inf"))
            return torch.matmul(s.softmax(dim=-1), v)
        return standard, 0
    if family == "torch-sdpa":
        return (lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=causal)), 0
    if family == "nystrom-attention":
        from nystrom_attention import NystromAttention
        # The attention core only: identity in place of the qkv and output projections, no
        # residual convolution, so that it computes what effattn's Nystrom computes.
        m = NystromAttention(dim=H * D, dim_head=D, heads=H, num_landmarks=size, pinv_iterations=6, residual=False)
        m.to_qkv = torch.nn.Identity()
        m.to_out = torch.nn.Identity()
        m = m.to(device=device, dtype=dtype).eval()

        def nystrom(q, k, v):  # its input is x = [q | k | v] per token, [B, N, 3·H·D]
            B, _, N, _ = q.shape
            x = torch.cat([t.transpose(1, 2).reshape(B, N, H * D) for t in (q, k, v)], dim=-1)
            return m(x)
        return nystrom, 0
    from performer_pytorch import FastAttention
    m = FastAttention(dim_heads=D, nb_features=size, causal=causal).to(device=device, dtype=dtype).eval()
    params = sum(b.numel() * b.element_size() for b in m.buffers())
    return (lambda q, k, v: m(q, k, v)), params


def tokens_for(args, shape):
    """--tokens: one number for every shape, or shape=number pairs (others: 16384)."""
    spec = str(args.tokens)
    if "=" not in spec:
        return int(spec)
    table = dict(item.split("=") for item in spec.split(","))
    return int(table.get(shape, 16384))


def case_name(method, device, dtype_name, shape, N, B, pass_):
    name = f"suite:table/method:{method}/backend:{device}/type:{dtype_name}/shape:{shape}/N:{N}/B:{B}"
    return name + ("/pass:backward" if pass_ == "backward" else "")


def run_case(torch, args, method, shape, N, dtype_name, pass_="forward"):
    H, D = SHAPES[shape]
    B = max(1, tokens_for(args, shape) // N)
    device = args.device
    dtype = {"float": torch.float32, "double": torch.float64, "half": torch.float16, "bf16": torch.bfloat16}[dtype_name]
    name = case_name(method, device, dtype_name, shape, N, B, pass_)
    entry = {"name": name, "run_name": name, "run_type": "iteration", "time_unit": "ms"}
    if method.startswith("torch-standard") and H * N * N * dtype.itemsize / MB > args.max_scores_mb:
        entry.update(error_occurred=True,
                     error_message=f"standard attention's scores need {H * N * N * dtype.itemsize / MB:.0f} MB (over --max-scores-mb)")
        return entry
    backward = pass_ == "backward"
    try:
        fn, params = make_callable(torch, method, H, D, device, dtype)
        gen = torch.Generator(device="cpu").manual_seed(1)
        q, k, v = (torch.randn(B, H, N, D, generator=gen).to(device=device, dtype=dtype) for _ in range(3))
        dout = torch.randn(B, H, N, D, generator=gen).to(device=device, dtype=dtype) if backward else None
        elt = q.element_size()
        io = 4 * H * N * D * elt * (2 if backward else 1)  # backward: dout, dq, dk, dv too

        def call(q, k, v, g):
            if not backward:
                return fn(q, k, v)
            q, k, v = (t.detach().requires_grad_(True) for t in (q, k, v))
            out = fn(q, k, v)
            out.backward(g if g.shape == out.shape else g.transpose(1, 2).reshape(out.shape))  # nystrom: [B, N, H·D]
            return out.detach(), q.grad, k.grad, v.grad

        def sync():
            if device == "cuda":
                torch.cuda.synchronize()

        ctx = torch.enable_grad() if backward else torch.inference_mode()
        with ctx:
            # Memory of one sequence (q, k, v already held; the output and scratch are what grows).
            one = [t[:1].contiguous() for t in (q, k, v)] + [dout[:1].contiguous() if backward else None]
            call(*one)  # first call: lazy initialization (thread pools, cuBLAS) is not the operator's
            if device == "cuda":
                sync()
                base = torch.cuda.memory_allocated()
                torch.cuda.reset_peak_memory_stats()
                out = call(*one)
                sync()
                grown = torch.cuda.max_memory_allocated() - base
            else:
                with CpuMemory() as mem:
                    out = call(*one)
                grown = mem.grown
            del out
            scratch = max(0, grown - H * N * D * elt * (4 if backward else 1))  # less out (and grads), counted in io
            # Timed: the batch, after a warm-up, until --min-time has passed and --min-calls ran; the
            # median call (one slow call, a collection or a page-in, must not decide a round).
            call(q, k, v, dout)
            times = []
            while sum(times) < args.min_time or len(times) < args.min_calls:
                if device == "cuda":
                    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    start.record()
                    call(q, k, v, dout)
                    stop.record()
                    stop.synchronize()
                    times.append(start.elapsed_time(stop) * 1e-3)
                else:
                    t0 = time.perf_counter()
                    call(q, k, v, dout)
                    times.append(time.perf_counter() - t0)
        t = statistics.median(times)
        entry.update(iterations=len(times), real_time=t * 1e3, cpu_time=t * 1e3)
        entry["seq/s"] = B / t
        entry["tok/s"] = B * N / t
        # Backward rows: forward + backward counted as 3.5 forwards (FlashAttention's convention).
        entry["TFLOP/s"] = flops(method, B, H, N, D) * (3.5 if backward else 1.0) / t * 1e-12
        entry["mem/seq"] = io + params + scratch
        entry.update(B=B, H=H, D=D)
    except Exception as e:  # an OOM or a missing package: a skipped cell, not a failed sweep
        entry.update(error_occurred=True, error_message=f"{type(e).__name__}: {str(e).splitlines()[0][:160]}")
    finally:
        if device == "cuda":
            torch.cuda.empty_cache()
    return entry


def run_bench(args, suite, shape=None, N=None, round_=0):
    """The effattn bench binary on one (shape, N) of the table suite (or its targets suite):
    its Google Benchmark JSON entries, each tagged with the round, and its context."""
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        path = f.name
    cmd = [args.bench, f"--suite={suite}", f"--device={args.device_name_resolved}", f"--benchmark_out={path}",
           "--benchmark_out_format=json", f"--benchmark_min_time={args.bench_min_time}"]
    if args.commit:
        cmd.append(f"--commit={args.commit}")
    if suite == "table":
        cmd += [f"--shapes={shape}", f"--seq={N}", f"--methods={args.bench_methods}", f"--types={args.types_resolved}",
                f"--tokens={tokens_for(args, shape)}", f"--max-scores-mb={args.max_scores_mb}",
                f"--pass={args.passes}"]
    cmd += args.bench_arg
    try:
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL if args.quiet else None)
        with open(path) as f:
            text = f.read()
        data = json.loads(text) if text.strip() else {}  # nothing matched (a --benchmark_filter): no file
    finally:
        os.unlink(path)
    for b in data.get("benchmarks", []):
        b["round"] = round_
    return data.get("benchmarks", []), data.get("context", {})


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda when torch sees a GPU")
    p.add_argument("--shapes", default="lra", help="lra, fa64, fa128 (comma-separated)")
    p.add_argument("--seq", default="512,1024,2048,4096,8192")
    p.add_argument("--methods", default="torch-standard,torch-sdpa,nystrom-attention-128,performer-256")
    p.add_argument("--types", default=None, help="float, double, half, bf16 (default: half on cuda, float on cpu)")
    p.add_argument("--pass", dest="passes", default="forward",
                   help="forward, backward (forward+backward rows, torch autograd), comma-separated")
    p.add_argument("--tokens", default="16384", help="batch B = max(1, tokens / N), as the bench; or per shape, "
                                                       "e.g. lra=16384,fa64=4096")
    p.add_argument("--max-scores-mb", type=float, default=4096)
    p.add_argument("--min-time", type=float, default=0.2, help="seconds of timed calls per case")
    p.add_argument("--min-calls", type=int, default=3, help="timed calls per case at least")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--device-name", help="name in the table header (default: the GPU's or CPU's name)")
    p.add_argument("--out", default="peers.json",
                   help="output JSON (with --bench: a prefix; writes PREFIX.json and PREFIX.peers.json)")
    p.add_argument("--render", action="store_true", help="print the table (bench/render.py) afterwards")
    g = p.add_argument_group("side by side with effattn (interleaved)")
    g.add_argument("--bench", help="effattn bench binary (attention_cpu_bench / attention_cuda_bench) to interleave")
    g.add_argument("--bench-methods", default="softmax,nystrom-128,proxy-128,favor-256",
                   help="the binary's --methods for the table cases")
    g.add_argument("--rounds", type=int, default=1, help="interleaved rounds (medians and per-round ratios)")
    g.add_argument("--targets", action="store_true", help="also run the binary's target suite once per round")
    g.add_argument("--bench-min-time", default="0.2", help="the binary's --benchmark_min_time")
    g.add_argument("--bench-arg", action="append", default=[], help="one more flag for the binary (repeatable)")
    g.add_argument("--commit", help="commit recorded in the effattn JSON")
    g.add_argument("--quiet", action="store_true", help="no Google Benchmark console output")
    a = p.parse_args()
    try:
        import torch
    except ImportError:
        sys.exit("run_peers.py needs torch: pip install torch nystrom-attention performer-pytorch (bench/peers/README.md)")
    if a.device is None:
        a.device = "cuda" if torch.cuda.is_available() else "cpu"
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.device == "cpu":
        # glibc serves large blocks from mmap and returns them on free, so that the peak RSS of a
        # call sees every large buffer it allocates (M_MMAP_THRESHOLD = -3, fixed at 64 KiB).
        try:
            import ctypes
            ctypes.CDLL("libc.so.6").mallopt(-3, 64 * 1024)
        except OSError:
            pass
    passes = a.passes.split(",")
    for pass_ in passes:
        if pass_ not in PASSES:
            sys.exit(f"run_peers.py: --pass takes {', '.join(PASSES)}, not {pass_!r}")
    a.types_resolved = a.types or ("half" if a.device == "cuda" else "float")
    types = a.types_resolved.split(",")
    name = a.device_name or (torch.cuda.get_device_name(0) if a.device == "cuda" else cpu_name())
    a.device_name_resolved = name
    versions = {"torch": torch.__version__}
    for mod in ("nystrom_attention", "performer_pytorch"):
        try:
            from importlib.metadata import version
            versions[mod] = version(mod.replace("_", "-"))
        except Exception:
            versions[mod] = "not installed"
    session = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    loads = []
    entries, bench_entries, bench_context = [], [], {}
    seqs = [int(s) for s in a.seq.split(",")]
    shapes = a.shapes.split(",")

    def peers(shape, N, round_):
        for method in a.methods.split(","):
            for dtype_name in types:
                for pass_ in passes:
                    e = run_case(torch, a, method, shape, N, dtype_name, pass_)
                    e["round"] = round_
                    entries.append(e)
                    shown = f"{e['real_time'] / e['B']:.3f} ms/seq, {e['mem/seq'] / MB:.2f} MB/seq" if "real_time" in e \
                        else "skipped: " + e["error_message"]
                    print(f"[round {round_}] {e['name']}: {shown}", flush=True)

    for round_ in range(1, max(1, a.rounds) + 1):
        loads.append(load_average())
        for shape in shapes:
            for N in seqs:
                steps = [lambda: peers(shape, N, round_)]
                if a.bench:
                    def effattn(shape=shape, N=N):
                        more, ctx = run_bench(a, "table", shape, N, round_)
                        bench_entries.extend(more)
                        bench_context.update(ctx)
                    steps = [effattn] + steps if round_ % 2 == 1 else steps + [effattn]
                for step in steps:
                    step()
        if a.bench and a.targets:
            more, ctx = run_bench(a, "targets", round_=round_)
            bench_entries.extend(more)
            bench_context.update(ctx)
    loads.append(load_average())

    load_note = "load average (1 min) at the rounds' starts and end: " + \
                ", ".join("—" if x is None else f"{x:.2f}" for x in loads)
    context = {
        "effattn_device": name, "peer": True, "date": session, "session": session, "rounds": a.rounds,
        "num_cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), **versions, "load_average": loads,
        "peer_note": ", ".join(f"{k} {v}" for k, v in versions.items()) + "; inputs N(0, 1); memory per sequence = "
                     "q, k, v, out + " + ("torch.cuda.max_memory_allocated growth" if a.device == "cuda"
                                         else "growth of the process's peak RSS (VmHWM, approximate)") +
                     " during a one-sequence call; time = median of the timed calls of a round (at least --min-calls).",
    }
    peers_path = a.out + ".peers.json" if a.bench else a.out
    with open(peers_path, "w") as f:
        json.dump({"context": context, "benchmarks": entries}, f, indent=1)
    print(f"run_peers.py: wrote {peers_path}")
    written = [peers_path]
    if a.bench:
        bench_context.update(session=session, rounds=a.rounds, load_average=loads, load_note=load_note,
                             interleaved_with="bench/peers/run_peers.py")
        bench_path = a.out + ".json"
        with open(bench_path, "w") as f:
            json.dump({"context": bench_context, "benchmarks": bench_entries}, f, indent=1)
        print(f"run_peers.py: wrote {bench_path}")
        written.insert(0, bench_path)
    print("run_peers.py: " + load_note)
    if a.render:
        subprocess.run([sys.executable, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "render.py"),
                        *written], check=True)


if __name__ == "__main__":
    main()
