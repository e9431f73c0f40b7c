#!/usr/bin/env python3
"""Plot train_proxies' CSV output: held-out error against training step (one panel per M, up to
three) and held-out error against M for every method.

usage: plot_train_proxies.py PREFIX     (reads PREFIX_curves.csv, PREFIX_summary.csv; writes PREFIX.png)

Plots only; not needed to build or test effattn. Exits 3 with a message when matplotlib is missing.
"""
import csv
import sys

LABELS = {  # method -> (label, colour, line style)
    "nystrom": ("Nyström (segment means per sequence)", "black", "-"),
    "nystrom-20it": ("Nyström, 20 pinv iterations", "black", ":"),
    "uniform": ("uniform attention (mean of v)", "grey", "--"),
    "init-seg": ("proxies = segment means, untrained", "tab:brown", "--"),
    "init-rand": ("proxies = random, untrained", "tab:pink", "--"),
}
TRAINED = ["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:olive", "tab:cyan"]


def read(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def main(argv):
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    prefix = argv[1]
    try:
        import matplotlib
    except ImportError:
        print("plot_train_proxies.py: no matplotlib (apt-get install python3-matplotlib, or pip install "
              "matplotlib)", file=sys.stderr)
        return 3
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves, summary = read(prefix + "_curves.csv"), read(prefix + "_summary.csv")
    ms = sorted({int(r["M"]) for r in summary})
    methods = list(dict.fromkeys(r["method"] for r in summary))
    trained = [m for m in methods if m not in LABELS]
    style = dict(LABELS)
    for i, m in enumerate(trained):
        style[m] = ("trained: " + m, TRAINED[i % len(TRAINED)], "-")
    error = {(r["method"], int(r["M"])): float(r["heldout_error"]) for r in summary}

    # Curves for at most three M: the smallest, 32 (the default) when present, the largest.
    shown = sorted({ms[0], 32 if 32 in ms else ms[len(ms) // 2], ms[-1]})
    fig, axes = plt.subplots(1, len(shown) + 1, figsize=(5.2 * (len(shown) + 1), 4.6), squeeze=False)
    for ax, m in zip(axes[0], shown):
        for v in trained:
            pts = [(int(r["step"]), float(r["heldout_error"])) for r in curves if r["variant"] == v and int(r["M"]) == m]
            if pts:
                label, colour, line = style[v]
                ax.plot(*zip(*pts), line, color=colour, label=label)
        for ref in ("nystrom", "nystrom-20it"):
            if (ref, m) in error:
                label, colour, line = style[ref]
                ax.axhline(error[(ref, m)], color=colour, linestyle=line, label=label)
        ax.set_yscale("log")
        ax.set_xlabel("training step")
        ax.set_ylabel("held-out relative error")
        ax.set_title(f"M = {m}: error during training", fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].legend(fontsize=8)

    ax = axes[0][-1]
    for method in methods:
        pts = [(m, error[(method, m)]) for m in ms if (method, m) in error]
        label, colour, line = style[method]
        ax.plot(*zip(*pts), line, color=colour, marker="o", markersize=4, label=label)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("landmarks / proxies M")
    ax.set_ylabel("held-out relative error")
    ax.set_title("after training, against M", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.suptitle("Proxy attention with trained proxies vs Nyström segment means (error against exact softmax)")
    fig.tight_layout()
    fig.savefig(prefix + ".png", dpi=110)
    print(f"wrote {prefix}.png")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
