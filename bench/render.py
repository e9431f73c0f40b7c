#!/usr/bin/env python3
"""Renders bench JSON (Google Benchmark --benchmark_out, or bench/peers/run_peers.py output) as the
papers' tables: rows = method, columns = sequence length, cells = ms or MB per sequence with the
ratio to standard (materialized N x N) attention measured in the same run; plus the per-issue
targets and, when matplotlib is present, a log-log PNG of throughput and memory vs N.

    python3 bench/render.py results.json [peers.json ...] [--out table.md] [--png plot.png]

The markdown needs only the Python standard library; --png needs matplotlib.

Entries that carry a "round" (bench/peers/run_peers.py --bench ... --rounds R interleaves the
effattn binary and the peers) are medians over their rounds in the tables; the table "effattn vs
peers" pairs each effattn method with its peer in the same session, round by round, and prints
the median of the per-round ratios with the rounds' own ratios beside it.
"""
import argparse
import json
import math
import sys

MB = float(1 << 20)
TIME_UNIT_MS = {"ns": 1e-6, "us": 1e-3, "ms": 1.0, "s": 1e3}
SHAPES = {
    "lra": "LRA attention: 2 heads, head dim 32",
    "fa64": "FlashAttention shape: 32 heads, head dim 64 (H·D = 2048)",
    "fa128": "FlashAttention shape: 16 heads, head dim 128 (H·D = 2048)",
    "targets": "target shape: B·H = 4, head dim 64",
}
# Reference column, first found: effattn's materialized baseline, else the peers' own.
REFERENCES = ("standard", "torch-standard")
# The issue's goal at N = 4096 for these methods vs standard attention in the same run.
PAPER_GOAL = {"speedup": 3.8, "memory": 0.08, "seq": 4096}
# effattn method -> its peer (bench/peers/run_peers.py), compared in the same session and round.
PEER_OF = (("softmax", "torch-sdpa"), ("softmax-causal", "torch-sdpa-causal"), ("standard", "torch-standard"),
           ("nystrom-{M}", "nystrom-attention-{M}"), ("proxy-{M}", "nystrom-attention-{M}"), ("favor-{M}", "performer-{M}"),
           ("favor-{M}-causal", "performer-{M}-causal"))
# Issue 13: effattn softmax >= 1.2x torch SDPA's throughput at every point, causal too.
SDPA_GOAL = 1.2
BACKWARD_GOAL = 3.0  # issue 11: effattn's backward takes at most 3x its forward's time


def peer_of(method):
    """The peer method name of an effattn method, or None."""
    for mine, theirs in PEER_OF:
        if "{M}" not in mine:
            if method == mine:
                return theirs
            continue
        head, tail = mine.split("{M}")
        if not (method.startswith(head) and method.endswith(tail)):
            continue
        size = method[len(head):len(method) - len(tail)]
        if size.isdigit():
            return theirs.replace("{M}", size)
    return None


def median(xs):
    xs = sorted(xs)
    n = len(xs)
    return None if n == 0 else xs[n // 2] if n % 2 else 0.5 * (xs[n // 2 - 1] + xs[n // 2])


def method_order(name):
    order = ["standard", "softmax", "softmax-causal", "nystrom", "proxy", "favor"]
    base = name.split("-")[0]
    for i, prefix in enumerate(order):
        if name == prefix or (base == prefix and prefix in ("nystrom", "proxy", "favor")):
            return (0, i, name)
    return (1, 0, name)  # peers after effattn's rows


def parse_name(name):
    fields = {}
    for part in name.split("/"):
        if ":" in part:
            key, value = part.split(":", 1)
            fields[key] = value
    return fields


def load(paths):
    """Rows of {suite, method, backend, type, shape, N, B, pass, ms_per_seq, mb_per_seq, tflops, error};
    entries of several rounds are one row (the medians) with the rounds' own rows in per_round."""
    rows, contexts = [], []
    for source, path in enumerate(paths):
        with open(path) as f:
            data = json.load(f)
        contexts.append(data.get("context", {}))
        peer = bool(contexts[-1].get("peer"))  # written by bench/peers/run_peers.py
        benches = data.get("benchmarks", [])
        # With --benchmark_repetitions, the median of the repetitions stands for the case.
        medians = {b["run_name"] for b in benches if b.get("aggregate_name") == "median"}
        for b in benches:
            if b.get("run_type") == "aggregate" and b.get("aggregate_name") != "median":
                continue
            if b.get("run_type") != "aggregate" and b.get("run_name") in medians:
                continue
            f = parse_name(b.get("run_name", b["name"]))
            if "suite" not in f:
                continue
            row = dict(source=source, peer=peer, suite=f["suite"], method=f["method"], backend=f["backend"], type=f["type"],
                       shape=f["shape"], N=int(f["N"]), B=int(f.get("B", 1)), error=None, pass_=f.get("pass", "forward"),
                       ms_per_seq=None, mb_per_seq=None, tflops=None, round=b.get("round"),
                       session=contexts[-1].get("session"))
            if b.get("error_occurred"):
                row["error"] = b.get("error_message", "skipped")
            else:
                per_iter_ms = b["real_time"] * TIME_UNIT_MS[b.get("time_unit", "ns")]
                row["ms_per_seq"] = per_iter_ms / row["B"]
                if "mem/seq" in b:
                    row["mb_per_seq"] = b["mem/seq"] / MB
                if "TFLOP/s" in b:
                    row["tflops"] = b["TFLOP/s"]
            rows.append(row)
    return collapse_rounds(rows), contexts


def collapse_rounds(rows):
    """One row per case and file: the median over its rounds (errors only when every round failed)."""
    groups = {}
    for r in rows:
        key = (r["source"], r["suite"], r["method"], r["backend"], r["type"], r["shape"], r["N"], r["B"], r["pass_"])
        groups.setdefault(key, []).append(r)
    out = []
    for group in groups.values():
        ok = [r for r in group if r["error"] is None]
        row = dict(group[0])
        row["per_round"] = {r["round"]: r for r in ok if r["round"] is not None}
        if ok:
            row["error"] = None
            for field in ("ms_per_seq", "mb_per_seq", "tflops"):
                row[field] = median([r[field] for r in ok if r[field] is not None])
        out.append(row)
    return out


def fmt(x):
    if x is None:
        return "—"
    if x >= 100:
        return f"{x:.0f}"
    if x >= 10:
        return f"{x:.1f}"
    if x >= 1:
        return f"{x:.2f}"
    return f"{x:.3g}"


def fmt_ratio(x):
    return f"{x:.2f}×" if x < 10 else f"{x:.0f}×" if x >= 100 else f"{x:.1f}×"


def groups_of(rows, suite):
    groups = {}
    for r in rows:
        if r["suite"] == suite:
            groups.setdefault((r["shape"], r["backend"], r["type"], r["pass_"]), []).append(r)
    return groups


def reference_rows(group, source=None):
    """The materialized baseline's rows by N, from the same run (JSON file) as `source`."""
    for ref in REFERENCES:
        cells = {r["N"]: r for r in group
                 if r["method"] == ref and r["error"] is None and source in (None, r["source"])}
        if cells:
            return ref, cells
    return None, {}


def table(group, value, ratio, title):
    """One markdown table: rows = method, columns = N, cell = value (ratio to the materialized
    baseline of the same run, when `ratio` is given)."""
    seqs = sorted({r["N"] for r in group})
    methods = sorted({r["method"] for r in group}, key=method_order)
    cell = {(r["method"], r["N"]): r for r in group}
    refs = {src: reference_rows(group, src) for src in {r["source"] for r in group}}
    lines = [f"**{title}**", "", "| method | " + " | ".join(f"N = {n}" for n in seqs) + " |",
             "|---|" + "---:|" * len(seqs)]
    notes = []
    for m in methods:
        cells = []
        for n in seqs:
            r = cell.get((m, n))
            if r is None:
                cells.append("")
            elif r["error"] is not None:
                if r["error"] not in notes:
                    notes.append(r["error"])
                cells.append(f"— ({notes.index(r['error']) + 1})")
            else:
                v = value(r)
                text = fmt(v)
                ref_name, ref = refs[r["source"]]
                base = ref.get(n)
                if ratio and v is not None and base is not None and m != ref_name and value(base):
                    text += f" ({fmt_ratio(ratio(v, value(base)))})"
                cells.append(text)
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    for i, note in enumerate(notes):
        lines.append(f"\n({i + 1}) {note}")
    return "\n".join(lines)


def render_tables(rows):
    out = []
    for (shape, backend, type_, pass_), group in sorted(groups_of(rows, "table").items()):
        batches = {}
        for r in group:
            batches.setdefault(r["N"], set()).add(r["B"])
        refs = sorted({reference_rows(group, src)[0] or "—" for src in {r["source"] for r in group}})
        out.append(f"### {SHAPES.get(shape, shape)} — {backend}, {type_}" + (", forward + backward" if pass_ == "backward" else ""))
        out.append("")
        out.append("Batch per call: " + ", ".join(f"B = {'/'.join(map(str, sorted(b)))} at N = {n}"
                                                  for n, b in sorted(batches.items())) + ".")
        out.append("")
        out += [table(group, lambda r: r["ms_per_seq"], lambda v, b: b / v,
                      f"Time per sequence, ms (throughput relative to {' / '.join(refs)} of the same run)"), ""]
        out += [table(group, lambda r: r["mb_per_seq"], lambda v, b: v / b,
                      f"Memory per sequence, MB (relative to {' / '.join(refs)} of the same run)"), ""]
        out += [table(group, lambda r: r["tflops"], None, "Matrix-product TFLOP/s"), ""]
        out += paper_goals(group)
        out += peer_table(group, issue13_goal=pass_ != "backward")
        if pass_ == "backward":
            forward = groups_of(rows, "table").get((shape, backend, type_, "forward"), [])
            out += backward_table(group, forward)
    return out


def backward_table(group, forward):
    """Backward time alone = (forward + backward) − forward, both from the same run and round:
    its ratio to the forward per method (goal ≤ 3 for effattn), and effattn's backward speed over
    its peers' (autograd) backward, each the median over the rounds."""
    fwd = {(r["source"], r["session"], r["method"], r["N"]): r for r in forward if r["error"] is None}
    seqs = sorted({r["N"] for r in group})

    def backward_ms(r):
        """Per round (or the one value): backward ms per sequence, None without its forward."""
        f = fwd.get((r["source"], r["session"], r["method"], r["N"]))
        if f is None or r["error"] is not None:
            return None
        rounds = sorted(set(r["per_round"]) & set(f["per_round"]))
        if rounds:
            return {k: r["per_round"][k]["ms_per_seq"] - f["per_round"][k]["ms_per_seq"] for k in rounds}
        return {None: r["ms_per_seq"] - f["ms_per_seq"]}

    lines = ["**Backward alone: time / forward time (median of rounds; effattn goal ≤ "
             f"{BACKWARD_GOAL:.0f})**", "", "| method | " + " | ".join(f"N = {n}" for n in seqs) + " |",
             "|---|" + "---:|" * len(seqs)]
    worst = None
    for m in sorted({r["method"] for r in group}, key=method_order):
        cells = []
        for n in seqs:
            r = next((x for x in group if x["method"] == m and x["N"] == n and x["error"] is None), None)
            b = backward_ms(r) if r is not None else None
            if not b:
                cells.append("")
                continue
            f = fwd[(r["source"], r["session"], m, n)]
            ratios = [b[k] / (f["per_round"][k]["ms_per_seq"] if k is not None else f["ms_per_seq"]) for k in b]
            x = median(ratios)
            if not r["peer"]:
                worst = x if worst is None else max(worst, x)
            cells.append(f"{x:.2f}")
        if any(cells):
            lines.append(f"| {m} | " + " | ".join(cells) + " |")
    if worst is not None:
        lines += ["", f"Largest effattn backward/forward ratio: {worst:.2f} (goal ≤ {BACKWARD_GOAL:.0f}: "
                  f"{'met' if worst <= BACKWARD_GOAL else 'NOT met'})."]
    # effattn's backward against the peers' backward, same session and round.
    by = {(r["session"], r["method"], r["N"]): r for r in group if r["error"] is None}
    pair_lines = []
    for session, mine, theirs in sorted({(r["session"], r["method"], peer_of(r["method"])) for r in group
                                         if not r["peer"] and peer_of(r["method"])}, key=lambda x: (str(x[0]), method_order(x[1]))):
        cells = []
        for n in seqs:
            a, b = by.get((session, mine, n)), by.get((session, theirs, n))
            ba, bb = (backward_ms(a) if a else None), (backward_ms(b) if b else None)
            common = sorted(set(ba or {}) & set(bb or {}), key=str)
            if not common:
                cells.append("")
                continue
            ratios = [bb[k] / ba[k] for k in common if ba[k] > 0]
            cells.append(f"**{median(ratios):.2f}×**" + (" (" + ", ".join(f"{x:.2f}" for x in ratios) + ")"
                                                          if len(ratios) > 1 else "") if ratios else "")
        if any(cells):
            pair_lines.append(f"| {mine} / {theirs} | " + " | ".join(cells) + " |")
    if pair_lines:
        lines += ["", "**Backward alone, effattn vs peers: speed ratio effattn / peer (goals: ≥ 1 vs torch SDPA, "
                  "≥ 3 vs the lucidrains packages)**", "", "| pair | " + " | ".join(f"N = {n}" for n in seqs) + " |",
                  "|---|" + "---:|" * len(seqs)] + pair_lines
    return lines + [""]


def peer_table(group, issue13_goal=True):
    """effattn vs its peers (same session), throughput ratio effattn/peer: the median of the
    per-round ratios, and the rounds' ratios in brackets (entries without rounds: the one ratio).
    issue13_goal: check issue 13's forward goal (not for forward + backward rows)."""
    seqs = sorted({r["N"] for r in group})
    by = {(r["session"], r["method"], r["N"]): r for r in group if r["error"] is None}
    lines, goal_cells = [], []
    pairs = sorted({(r["session"], r["method"], peer_of(r["method"])) for r in group
                    if not r["peer"] and peer_of(r["method"]) and r["session"] is not None},
                   key=lambda x: (str(x[0]), method_order(x[1])))
    for session, mine, theirs in pairs:
        cells = []
        for n in seqs:
            a, b = by.get((session, mine, n)), by.get((session, theirs, n))
            if a is None or b is None:
                cells.append("")
                continue
            rounds = sorted(set(a["per_round"]) & set(b["per_round"]))
            ratios = [b["per_round"][k]["ms_per_seq"] / a["per_round"][k]["ms_per_seq"] for k in rounds]
            if not ratios:
                ratios = [b["ms_per_seq"] / a["ms_per_seq"]]
            m = median(ratios)
            cells.append(f"**{m:.2f}×**" + (" (" + ", ".join(f"{x:.2f}" for x in ratios) + ")" if len(ratios) > 1 else ""))
            if issue13_goal and mine in ("softmax", "softmax-causal"):  # a forward goal
                goal_cells.append((mine, n, m))
        if any(cells):
            lines.append(f"| {mine} / {theirs} | " + " | ".join(cells) + " |")
    if not lines:
        return []
    out = ["**effattn vs peers: throughput ratio effattn / peer, median of the interleaved rounds (each round's "
           "ratio in brackets)**", "", "| pair | " + " | ".join(f"N = {n}" for n in seqs) + " |",
           "|---|" + "---:|" * len(seqs)] + lines + [""]
    if goal_cells:
        worst = min(goal_cells, key=lambda x: x[2])
        met = all(m >= SDPA_GOAL for _, _, m in goal_cells)
        out += [f"Goal (issue 13): softmax ≥ {SDPA_GOAL}× torch SDPA at every N, causal too: "
                f"{'met' if met else 'not met'} (lowest {worst[2]:.2f}× for {worst[0]} at N = {worst[1]}).", ""]
    return out


def paper_goals(group):
    """The issue's goal at N = 4096: >= 3.8x throughput and <= 0.08x memory vs standard, for the
    effattn rows of each run that measured standard attention there."""
    n = PAPER_GOAL["seq"]
    lines = []
    for source in sorted({r["source"] for r in group}):
        ref_name, ref = reference_rows(group, source)
        base = ref.get(n)
        if base is None or ref_name != "standard":
            continue
        lines += [f"**Goal at N = {n}: ≥ {PAPER_GOAL['speedup']}× the throughput and ≤ {PAPER_GOAL['memory']}× "
                  f"the memory per sequence of standard**", "",
                  "| method | throughput ratio | memory ratio | met |", "|---|---:|---:|:---:|"]
        for r in sorted(group, key=lambda r: method_order(r["method"])):
            if r["N"] != n or r["error"] is not None or r["source"] != source or \
                    r["method"].split("-")[0] not in ("nystrom", "proxy", "favor"):
                continue
            speed = base["ms_per_seq"] / r["ms_per_seq"]
            mem = r["mb_per_seq"] / base["mb_per_seq"] if r["mb_per_seq"] and base["mb_per_seq"] else None
            met = speed >= PAPER_GOAL["speedup"] and mem is not None and mem <= PAPER_GOAL["memory"]
            lines.append(f"| {r['method']} | {fmt_ratio(speed)} | {fmt_ratio(mem) if mem else '—'} | "
                         f"{'yes' if met else 'no'} |")
        lines.append("")
    return lines


def render_targets(rows):
    """Per-issue speed targets, each a ratio of two benches of the same run."""
    by = {}
    for r in rows:
        if r["suite"] == "targets" and r["error"] is None:
            by[(r["method"], r["backend"], r["type"], r["N"])] = r
    out = []
    for backend, type_ in sorted({(k[1], k[2]) for k in by}):
        def get(method, n):
            return by.get((method, backend, type_, n))

        checks = []
        gemm, sm = get("eigen-gemm", 2048), get("softmax", 4096)
        if gemm and sm:
            rounds = sorted(set(gemm["per_round"]) & set(sm["per_round"]))
            ratios = [sm["per_round"][k]["tflops"] / gemm["per_round"][k]["tflops"] for k in rounds]
            value = median(ratios) if ratios else sm["tflops"] / gemm["tflops"]
            per_round = f"; rounds: {', '.join(f'{x:.2f}' for x in ratios)}" if len(ratios) > 1 else ""
            checks.append(("softmax (B·H = 4, N = 4096, D = 64) FLOP rate / Eigen SGEMM 2048³ FLOP rate"
                           + (" (median of rounds)" if len(ratios) > 1 else ""), value, ">=", 0.9,
                           f"{sm['tflops'] * 1e3:.1f} / {gemm['tflops'] * 1e3:.1f} GFLOP/s{per_round} (goal: issue 13; was 0.5)"))
        smc = get("softmax-causal", 4096)
        if sm and smc:
            checks.append(("causal softmax FLOP rate / softmax FLOP rate (N = 4096)", smc["tflops"] / sm["tflops"],
                           "info", None, f"{smc['tflops'] * 1e3:.1f} / {sm['tflops'] * 1e3:.1f} GFLOP/s"))
        sm16 = get("softmax", 16384)
        for method, goal in (("nystrom-64", 10.0), ("favor-256", 10.0)):
            r = get(method, 16384)
            if sm16 and r:
                checks.append((f"{method} speed-up over softmax (B·H = 4, N = 16384, D = 64)",
                               sm16["ms_per_seq"] / r["ms_per_seq"], ">=", goal,
                               f"{sm16['ms_per_seq']:.1f} ms / {r['ms_per_seq']:.2f} ms"))
        fb, fc = get("favor-256", 16384), get("favor-256-causal", 16384)
        if fb and fc:
            checks.append(("favor-256 causal time / bidirectional time (N = 16384)",
                           fc["ms_per_seq"] / fb["ms_per_seq"], "<=", 2.0,
                           f"{fc['ms_per_seq']:.2f} ms / {fb['ms_per_seq']:.2f} ms"))
        if not checks:
            continue
        out += [f"### Per-issue targets — {backend}, {type_}", "",
                "| target | measured | goal | met | from |", "|---|---:|---:|:---:|---|"]
        for what, value, op, goal, detail in checks:
            if op == "info":
                out.append(f"| {what} | {value:.2f} | — | — | {detail} |")
            else:
                met = value >= goal if op == ">=" else value <= goal
                out.append(f"| {what} | {value:.2f} | {op} {goal:g} | {'yes' if met else 'no'} | {detail} |")
        out.append("")
    return out


def render(rows, contexts, command=None):
    ctx = contexts[0] if contexts else {}
    device = ctx.get("effattn_device") or ctx.get("host_name", "unknown device")
    out = [f"## effattn bench — {device}", ""]
    out += render_tables(rows)
    out += render_targets(rows)
    notes = [
        "Time per sequence = wall time of one call over a batch of B sequences, divided by B "
        "(CPU: real time; CUDA: CUDA-event time). The ratio in brackets is throughput relative to "
        "the reference row, measured in the same run (higher is faster).",
        "Memory per sequence = bytes of q, k, v and out of one sequence, plus the method's "
        "parameters (proxy tokens, random features), plus the operator's scratch measured during a "
        "call on that one sequence: on CPU the high-water mark of effattn's own allocations "
        "(effattn::allocation_stats), on CUDA the stream-ordered pool's high-water mark. "
        "The standard baseline allocates its H·N² score matrix through the same counter. MB = 2^20 bytes.",
        "TFLOP/s counts matrix-product FLOPs as FlashAttention does (4·N²·D per head for softmax, "
        "causal halved); Nyström, Proxy and FAVOR+ count their own products (O(N·M·D)).",
        "standard = softmax(s·Q·Kᵀ)·V with every head's N×N scores in memory (Eigen GEMMs on CPU, "
        "cuBLAS on CUDA): the papers' reference column.",
    ]
    peers = [c for c in contexts if c.get("peer")]
    if peers:
        notes.append("torch-*, nystrom-attention-* and performer-* rows come from bench/peers/run_peers.py: " + peers[0].get("peer_note", ""))
    meta = []
    for c in contexts:
        bits = [c.get("effattn_device") or c.get("host_name", "")]
        if c.get("num_cpus"):
            bits.append(f"{c['num_cpus']} CPUs")
        if c.get("date"):
            bits.append(c["date"])
        if c.get("effattn_commit"):
            bits.append(f"commit {c['effattn_commit']}")
        if c.get("rounds") and c.get("rounds") > 1:
            bits.append(f"{c['rounds']} interleaved rounds")
        loads = [x for x in c.get("load_average") or [] if x is not None]
        if loads:
            bits.append("load average " + " → ".join(f"{x:.1f}" for x in loads))
        meta.append(", ".join(b for b in bits if b))
    out += ["---", ""] + [f"- {n}" for n in notes] + [f"- Run: {m}" for m in meta]
    if command:
        out.append(f"- Command: `{command}`")
    return "\n".join(out) + "\n"


# A method and its peer share a colour (the peer's line is dashed).
COLORS = {"standard": "C0", "torch-standard": "C0", "softmax": "C1", "torch-sdpa": "C1", "nystrom": "C2",
          "nystrom-attention": "C2", "proxy": "C3", "favor": "C4", "performer": "C4"}


def color_of(method, index):
    base = method[: -len("-causal")] if method.endswith("-causal") else method
    family = base.rstrip("0123456789").rstrip("-")
    return COLORS.get(family, f"C{5 + index % 5}")


def plot(rows, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("render.py: matplotlib not found; no PNG (pip install matplotlib, or apt-get install "
              "python3-matplotlib)", file=sys.stderr)
        return False
    groups = sorted(groups_of(rows, "table").items())
    if not groups:
        return False
    fig, axes = plt.subplots(len(groups), 2, figsize=(12, 4.6 * len(groups)), squeeze=False)
    for (key, group), (ax_t, ax_m) in zip(groups, axes):
        shape, backend, type_, pass_ = key
        if pass_ == "backward":
            type_ += ", fwd+bwd"
        methods = sorted({r["method"] for r in group}, key=method_order)
        for i, m in enumerate(methods):
            first = {}  # one point per N (two sessions may both measure a method at an N)
            for r in group:
                if r["method"] == m and r["error"] is None:
                    first.setdefault(r["N"], r)
            pts = sorted(first.items(), key=lambda x: x[0])
            if not pts:
                continue
            peer = any(r["peer"] for _, r in pts)  # peers' lines are dashed
            style = dict(marker="o", linestyle="--" if peer else "-", color=color_of(m, i), label=m)
            ax_t.plot([n for n, _ in pts], [1e3 / r["ms_per_seq"] for _, r in pts], **style)
            mem = [(n, r["mb_per_seq"]) for n, r in pts if r["mb_per_seq"]]
            if mem:
                ax_m.plot([n for n, _ in mem], [v for _, v in mem], **style)
        seqs = sorted({r["N"] for r in group})
        for ax, label in ((ax_t, "throughput, sequences / s"), (ax_m, "memory per sequence, MB")):
            ax.set_xscale("log", base=2)
            ax.set_xticks(seqs, [str(n) for n in seqs])
            ax.minorticks_off() if len(seqs) > 1 else None
            ax.set_yscale("log")
            ax.set_xlabel("sequence length N")
            ax.set_ylabel(label)
            ax.grid(True, which="both", alpha=0.3)
            short = {"lra": "LRA, H=2 D=32", "fa64": "FA, H=32 D=64", "fa128": "FA, H=16 D=128"}.get(shape, shape)
            ax.set_title(f"{short} ({backend}, {type_}): {label.split(',')[0]}")
        ax_t.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("json", nargs="+", help="bench JSON files (effattn binaries and/or run_peers.py)")
    p.add_argument("--out", help="write the markdown here (default: stdout only)")
    p.add_argument("--png", help="write the log-log plot here (needs matplotlib)")
    p.add_argument("--command", help="the command that produced the JSON, for the footer")
    a = p.parse_args()
    rows, contexts = load(a.json)
    if not rows:
        sys.exit("render.py: no effattn bench entries in " + ", ".join(a.json))
    text = render(rows, contexts, a.command)
    if a.out:
        with open(a.out, "w") as f:
            f.write(text)
    print(text)
    if a.png and plot(rows, a.png):
        print(f"render.py: wrote {a.png}", file=sys.stderr)


if __name__ == "__main__":
    main()
