#!/usr/bin/env python3
"""Same-machine reference for effattn's CUDA softmax: torch SDPA's FlashAttention-2 ("flash") and
cuDNN backends at the CUDA bench's shapes, types and batch rule, in the bench JSON format, so that
bench/render.py puts the rows beside attention_cuda_bench's:

  torch-sdpa-flash[-causal]   scaled_dot_product_attention under SDPBackend.FLASH_ATTENTION
  torch-sdpa-cudnn[-causal]   scaled_dot_product_attention under SDPBackend.CUDNN_ATTENTION

A backend that torch cannot run for a case (not built in, unsupported shape) is a skipped cell.
Times only (CUDA events, the mean of --iterations calls after 3 warm-up calls); for memory per
sequence see run_peers.py.
scripts/gpu_check.sh calls it when torch is importable; by hand:

  python3 bench/peers/sdpa_cuda_ref.py --shapes=lra,fa64 --seq=512,1024,4096 --out sdpa.json
"""
import argparse
import datetime
import json
import sys

SHAPES = {"lra": (2, 32), "fa64": (32, 64), "fa128": (16, 128)}  # heads, head dim (as bench/harness.hpp)


def run_case(torch, F, backend, causal, shape, N, type_name, a):
    from torch.nn.attention import sdpa_kernel
    H, D = SHAPES[shape]
    B = max(1, a.tokens // N)  # as the bench: tokens per call
    method = f"torch-sdpa-{backend.lower()}" + ("-causal" if causal else "")
    name = f"suite:table/method:{method}/backend:cuda/type:{type_name}/shape:{shape}/N:{N}/B:{B}"
    entry = {"name": name, "run_name": name, "run_type": "iteration", "time_unit": "ms"}
    dtype = {"half": torch.float16, "bf16": torch.bfloat16, "float": torch.float32}[type_name]
    try:
        be = {"flash": torch.nn.attention.SDPBackend.FLASH_ATTENTION,
              "cudnn": torch.nn.attention.SDPBackend.CUDNN_ATTENTION}[backend]
        gen = torch.Generator(device="cuda").manual_seed(1)
        q, k, v = (torch.randn(B, H, N, D, device="cuda", dtype=dtype, generator=gen) for _ in range(3))
        with torch.inference_mode(), sdpa_kernel(be):
            call = lambda x, y, z: F.scaled_dot_product_attention(x, y, z, is_causal=causal)  # noqa: E731
            for _ in range(3):
                call(q, k, v)  # warm-up
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(a.iterations):
                call(q, k, v)
            stop.record()
            stop.synchronize()
        ms = start.elapsed_time(stop) / a.iterations
        entry.update(iterations=a.iterations, real_time=ms, cpu_time=ms, B=B, H=H, D=D)
        entry["seq/s"] = B / (ms * 1e-3)
        entry["tok/s"] = B * N / (ms * 1e-3)
        entry["TFLOP/s"] = 4.0 * B * H * N * N * D * (0.5 if causal else 1.0) / (ms * 1e-3) * 1e-12
    except Exception as e:  # backend unavailable for this case, or out of memory: a skipped cell
        entry.update(error_occurred=True, error_message=f"{type(e).__name__}: {str(e).splitlines()[0][:160]}")
    finally:
        torch.cuda.empty_cache()
    return entry


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default="lra,fa64", help="lra, fa64, fa128 (comma-separated)")
    p.add_argument("--seq", default="512,1024,2048,4096,8192,16384")
    p.add_argument("--types", default="half", help="half, bf16, float")
    p.add_argument("--backends", default="flash,cudnn")
    p.add_argument("--causal", default="0,1", help="0, 1 or both")
    p.add_argument("--tokens", type=int, default=16384, help="batch B = max(1, tokens / N), as the bench")
    p.add_argument("--iterations", type=int, default=10, help="timed calls per case (after 3 warm-up calls)")
    p.add_argument("--out", help="JSON in the bench format (bench/render.py)")
    a = p.parse_args()
    try:
        import torch
        import torch.nn.functional as F
        from torch.nn.attention import sdpa_kernel  # noqa: F401 (torch >= 2.3)
    except ImportError as e:
        sys.exit(f"sdpa_cuda_ref.py needs torch >= 2.3 with CUDA: {e}")
    if not torch.cuda.is_available():
        sys.exit("sdpa_cuda_ref.py: torch sees no CUDA device")
    device = torch.cuda.get_device_name(0)
    print(f"sdpa_cuda_ref.py: torch {torch.__version__}, CUDA {torch.version.cuda}, "
          f"cuDNN {torch.backends.cudnn.version()}, {device}", flush=True)
    entries = []
    for shape in a.shapes.split(","):
        for type_name in a.types.split(","):
            for causal in (c == "1" for c in a.causal.split(",")):
                for backend in a.backends.split(","):
                    for N in (int(s) for s in a.seq.split(",")):
                        e = run_case(torch, F, backend, causal, shape, N, type_name, a)
                        entries.append(e)
                        shown = (f"{e['real_time']:.3f} ms/call, {e['TFLOP/s']:.1f} TFLOP/s" if "real_time" in e
                                 else "skipped: " + e["error_message"])
                        print(f"{e['name']}: {shown}", flush=True)
    if a.out:
        context = {"effattn_device": device, "peer": True,
                   "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"), "torch": torch.__version__,
                   "peer_note": f"torch {torch.__version__} SDPA (flash, cudnn backends), times only."}
        with open(a.out, "w") as f:
            json.dump({"context": context, "benchmarks": entries}, f, indent=1)
        print(f"sdpa_cuda_ref.py: wrote {a.out}")


if __name__ == "__main__":
    main()
