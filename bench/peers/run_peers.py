#!/usr/bin/env python3
"""Peers of effattn's operators on the same device and shapes, in the same JSON and table format as
the bench binaries (bench/render.py reads both, so the rows sit side by side):

  torch-standard      softmax(s Q Kᵀ) V with the N×N scores in memory (PyTorch ops)
  torch-sdpa          torch.nn.functional.scaled_dot_product_attention (fused / flash kernels)
  nystrom-attention-M lucidrains nystrom-attention, NystromAttention core (M landmarks)
  performer-M         lucidrains performer-pytorch, FastAttention (M random features)

Never part of the build or the tests; needs `pip install torch nystrom-attention performer-pytorch`
(see bench/peers/README.md). Example, next to scripts/bench.sh's output on the same machine:

  python3 bench/peers/run_peers.py --out out/bench/peers.json
  python3 bench/render.py out/bench/<device>.json out/bench/peers.json
"""
import argparse
import datetime
import json
import math
import os
import sys
import time

SHAPES = {"lra": (2, 32), "fa64": (32, 64), "fa128": (16, 128)}  # heads, head dim (as bench/harness.hpp)
MB = float(1 << 20)


def flops(method, B, H, N, D):
    """Matrix-product FLOPs of one call, counted as bench/harness.hpp counts them."""
    family, size, causal = parse_method(method)
    if family in ("torch-standard", "torch-sdpa"):
        return 4.0 * B * H * N * N * D * (0.5 if causal else 1.0)
    M = size
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


def run_case(torch, args, method, shape, N, dtype_name):
    H, D = SHAPES[shape]
    B = max(1, args.tokens // N)
    device = args.device
    dtype = {"float": torch.float32, "half": torch.float16, "bf16": torch.bfloat16}[dtype_name]
    name = f"suite:table/method:{method}/backend:{device}/type:{dtype_name}/shape:{shape}/N:{N}/B:{B}"
    entry = {"name": name, "run_name": name, "run_type": "iteration", "time_unit": "ms"}
    if method.startswith("torch-standard") and H * N * N * dtype.itemsize / MB > args.max_scores_mb:
        entry.update(error_occurred=True,
                     error_message=f"standard attention's scores need {H * N * N * dtype.itemsize / MB:.0f} MB (over --max-scores-mb)")
        return entry
    try:
        fn, params = make_callable(torch, method, H, D, device, dtype)
        gen = torch.Generator(device="cpu").manual_seed(1)
        q, k, v = (torch.randn(B, H, N, D, generator=gen).to(device=device, dtype=dtype) for _ in range(3))
        elt = q.element_size()
        io = 4 * H * N * D * elt
        with torch.inference_mode():
            # Memory of one sequence (q, k, v already held; the output and scratch are what grows).
            q1, k1, v1 = q[:1].contiguous(), k[:1].contiguous(), v[:1].contiguous()
            fn(q1, k1, v1)  # first call: lazy initialization (thread pools, cuBLAS) is not the operator's
            if device == "cuda":
                torch.cuda.synchronize()
                base = torch.cuda.memory_allocated()
                torch.cuda.reset_peak_memory_stats()
                out = fn(q1, k1, v1)
                torch.cuda.synchronize()
                grown = torch.cuda.max_memory_allocated() - base
            else:
                with CpuMemory() as mem:
                    out = fn(q1, k1, v1)
                grown = mem.grown
            del out
            scratch = max(0, grown - H * N * D * elt)  # less the output, counted in io
            # Timed: the batch, after a warm-up, until --min-time has passed.
            fn(q, k, v)
            times = []
            while sum(times) < args.min_time or len(times) < 2:
                if device == "cuda":
                    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    start.record()
                    fn(q, k, v)
                    stop.record()
                    stop.synchronize()
                    times.append(start.elapsed_time(stop) * 1e-3)
                else:
                    t0 = time.perf_counter()
                    fn(q, k, v)
                    times.append(time.perf_counter() - t0)
        t = sum(times) / len(times)
        entry.update(iterations=len(times), real_time=t * 1e3, cpu_time=t * 1e3)
        entry["seq/s"] = B / t
        entry["tok/s"] = B * N / t
        entry["TFLOP/s"] = flops(method, B, H, N, D) / t * 1e-12
        entry["mem/seq"] = io + params + scratch
        entry.update(B=B, H=H, D=D)
    except Exception as e:  # an OOM or a missing package: a skipped cell, not a failed sweep
        entry.update(error_occurred=True, error_message=f"{type(e).__name__}: {str(e).splitlines()[0][:160]}")
    finally:
        if device == "cuda":
            torch.cuda.empty_cache()
    return entry


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda when torch sees a GPU")
    p.add_argument("--shapes", default="lra", help="lra, fa64, fa128 (comma-separated)")
    p.add_argument("--seq", default="512,1024,2048,4096,8192")
    p.add_argument("--methods", default="torch-standard,torch-sdpa,nystrom-attention-128,performer-256")
    p.add_argument("--types", default=None, help="float, half, bf16 (default: half on cuda, float on cpu)")
    p.add_argument("--tokens", type=int, default=16384, help="batch B = max(1, tokens / N), as the bench")
    p.add_argument("--max-scores-mb", type=float, default=4096)
    p.add_argument("--min-time", type=float, default=0.2, help="seconds of timed calls per case")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--device-name", help="name in the table header (default: the GPU's or CPU's name)")
    p.add_argument("--out", default="peers.json")
    p.add_argument("--render", action="store_true", help="print the table (bench/render.py) afterwards")
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
    types = (a.types or ("half" if a.device == "cuda" else "float")).split(",")
    name = a.device_name or (torch.cuda.get_device_name(0) if a.device == "cuda" else cpu_name())
    versions = {"torch": torch.__version__}
    for mod in ("nystrom_attention", "performer_pytorch"):
        try:
            from importlib.metadata import version
            versions[mod] = version(mod.replace("_", "-"))
        except Exception:
            versions[mod] = "not installed"
    entries = []
    for shape in a.shapes.split(","):
        for method in a.methods.split(","):
            for dtype_name in types:
                for N in (int(s) for s in a.seq.split(",")):
                    e = run_case(torch, a, method, shape, N, dtype_name)
                    entries.append(e)
                    shown = f"{e['real_time'] / e['B']:.3f} ms/seq, {e['mem/seq'] / MB:.2f} MB/seq" if "real_time" in e \
                        else "skipped: " + e["error_message"]
                    print(f"{e['name']}: {shown}", flush=True)
    context = {
        "effattn_device": name, "peer": True, "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "num_cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), **versions,
        "peer_note": ", ".join(f"{k} {v}" for k, v in versions.items()) + "; memory per sequence = q, k, v, out + "
                     + ("torch.cuda.max_memory_allocated growth" if a.device == "cuda"
                        else "growth of the process's peak RSS (VmHWM, approximate)") + " during a one-sequence call.",
    }
    with open(a.out, "w") as f:
        json.dump({"context": context, "benchmarks": entries}, f, indent=1)
    print(f"run_peers.py: wrote {a.out}")
    if a.render:
        import subprocess
        subprocess.run([sys.executable, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "render.py"), a.out],
                       check=True)


if __name__ == "__main__":
    main()
