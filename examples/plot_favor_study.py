#!/usr/bin/env python3
"""Plot favor_error_study's CSV output: attention-matrix MSE against the number of random
features M, orthogonal vs iid and positive vs trig, one panel per CSV (e.g. one per input scale).

usage: plot_favor_study.py OUT.png STUDY.csv [STUDY.csv ...]

Plots only; not needed to build or test effattn. Installs matplotlib with pip if it is missing.
"""
import csv
import subprocess
import sys


def load_matplotlib():
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        subprocess.check_call([sys.executable, "-m", "pip", "install", "--quiet", "matplotlib"])
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


STYLE = {  # variant -> (label, colour, line style, marker)
    "positive-orthogonal": ("positive, orthogonal", "tab:blue", "-", "o"),
    "positive-iid": ("positive, iid", "tab:blue", "--", "s"),
    "trig-orthogonal": ("trig (sin/cos), orthogonal", "tab:red", "-", "o"),
    "trig-iid": ("trig (sin/cos), iid", "tab:red", "--", "s"),
}


def read(path):
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise SystemExit(f"{path}: no rows")
    return rows


def main(argv):
    if len(argv) < 3 or not argv[1].endswith(".png"):
        print(__doc__, file=sys.stderr)
        return 2
    out, paths = argv[1], argv[2:]
    studies = [read(p) for p in paths]
    plt = load_matplotlib()
    fig, axes = plt.subplots(1, len(studies), figsize=(6.2 * len(studies), 4.6), squeeze=False)
    for ax, rows in zip(axes[0], studies):
        for variant, (label, colour, style, marker) in STYLE.items():
            pts = sorted((int(r["features"]), float(r["mse_mean"]), float(r["mse_std"]))
                         for r in rows if r["variant"] == variant)
            if not pts:
                continue
            m, mean, sd = zip(*pts)
            ax.plot(m, mean, style, color=colour, marker=marker, label=label)
            lo = [max(a - b, a / 10) for a, b in zip(mean, sd)]  # log axis: clip the band at mean/10
            hi = [a + b for a, b in zip(mean, sd)]
            ax.fill_between(m, lo, hi, color=colour, alpha=0.12 if style == "-" else 0.06)
        r0 = rows[0]
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("random features M")
        ax.set_ylabel("MSE of the attention matrix")
        ax.set_title(f"L = {r0['L']}, d = {r0['d']}, q/k entry std {float(r0['input_std']):.2g}, "
                     f"{r0['samples']} samples", fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=9)
    fig.suptitle("FAVOR+ approximation of softmax attention (lines: mean; bands: ± 1 std, clipped at mean/10)")
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
