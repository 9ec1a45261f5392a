#!/usr/bin/env python3
"""Turns scripts/bench.sh's raw faultbench lines into results.json, results.tsv, a table
and plots (SVG and PNG).

Input: DIR/raw/OS-MODE-WORKERS-N.jsonl, one JSON line per worker plus one "run" line.
Per run: faults/s per worker (mean over workers = "per core", since each worker is
pinned to its own CPU), the total, and latency percentiles of the merged per-fault
histograms (exact merge: every worker reports its buckets).
"""

import json
import os
import sys


def load(out):
    """One summary per configuration: of its repeated boots, the complete run with the
    median faults/s per core (so its latencies come from the same run), with every
    boot's figure listed in `repeats`."""
    groups = {}
    for r in load_runs(out):
        groups.setdefault((r["os"], r["mode"], r["workers"], r["cpus"]), []).append(r)
    result = []
    for _, rs in sorted(groups.items()):
        good = sorted((r for r in rs if r["complete"]), key=lambda r: r["faults_per_sec_per_core"])
        pick = dict(good[(len(good) - 1) // 2] if good else rs[0])
        pick["repeats"] = [r["faults_per_sec_per_core"] for r in good]
        pick["boots"] = len(rs)
        pick["complete"] = bool(good)
        result.append(pick)
    return result


def load_runs(out):
    raw = os.path.join(out, "raw")
    runs = []
    for name in sorted(os.listdir(raw)):
        if not name.endswith(".jsonl"):
            continue
        parts = name[: -len(".jsonl")].split("-")
        if len(parts) == 5:
            parts = parts[:4]  # OS-MODE-WORKERS-N-rK: the repeat index
        osname, mode, workers, n = parts
        lines = []
        with open(os.path.join(raw, name)) as f:
            for line in f:
                try:
                    lines.append(json.loads(line))
                except json.JSONDecodeError:
                    pass  # a line cut by the console: the run is reported as incomplete
        failed = os.path.exists(os.path.join(raw, name[: -len(".jsonl")] + ".failed"))
        runs.append(summarise(osname, mode, workers, int(n), lines, failed))
    return runs


def percentile(buckets, total, q):
    if total == 0:
        return 0
    rank = min(int(total * q), total - 1)
    seen = 0
    for lower, count in buckets:
        seen += count
        if seen > rank:
            return lower
    return buckets[-1][0]


def summarise(osname, mode, workers, n, lines, failed):
    per_worker = [l for l in lines if isinstance(l.get("worker"), int)]
    run = next((l for l in lines if l.get("worker") == "run"), {})
    merged = {}
    hz = 1
    for w in per_worker:
        hz = w.get("tsc_hz", hz) or hz
        for lower, count in w.get("hist", []):
            merged[lower] = merged.get(lower, 0) + count
    buckets = sorted(merged.items())
    total = sum(c for _, c in buckets)
    ns = lambda cycles: round(cycles * 1e9 / hz)
    rates = [w["faults_per_sec"] for w in per_worker]
    complete = (not failed) and run.get("ok") is True and len(per_worker) == n
    return {
        "os": osname,
        "mode": mode,
        "workers": workers,
        "cpus": n,
        "complete": complete,
        "faults": sum(w["faults"] for w in per_worker),
        "faults_per_sec_total": round(sum(rates)),
        "faults_per_sec_per_core": round(sum(rates) / len(rates)) if rates else 0,
        "faults_per_sec_per_core_min": round(min(rates)) if rates else 0,
        "latency_ns": {
            "median": ns(percentile(buckets, total, 0.5)),
            "p99": ns(percentile(buckets, total, 0.99)),
            "max": ns(max((w["hist"][-1][0] for w in per_worker if w.get("hist")), default=0))
            if per_worker
            else 0,
        },
        "kernel": {k: run.get(k) for k in (
            "kernel_faults", "zero_pool_hits", "zero_pool_waits", "zeroed_inline",
            "shootdowns", "shootdown_ipis", "fault_profile") if run.get(k) is not None},
        "per_worker_faults_per_sec": [round(r) for r in rates],
    }


def key(r):
    return (r["mode"], r["workers"], r["cpus"], r["os"])


def table(runs):
    rows = []
    by = {key(r): r for r in runs}
    header = ["mode", "workers", "cpus", "os", "faults/s/core", "faults/s total",
              "median ns", "p99 ns", "panda/linux per core", "panda/linux p99", "boots ok",
              "faults/s/core of each boot"]
    for r in sorted(runs, key=key):
        ratio = ratio_p99 = ""
        if r["os"] == "panda":
            l = by.get((r["mode"], r["workers"], r["cpus"], "linux"))
            if l and l["faults_per_sec_per_core"]:
                ratio = "%.2f" % (r["faults_per_sec_per_core"] / l["faults_per_sec_per_core"])
            if l and l["latency_ns"]["p99"]:
                ratio_p99 = "%.2f" % (r["latency_ns"]["p99"] / l["latency_ns"]["p99"])
        rows.append([r["mode"], r["workers"], str(r["cpus"]), r["os"],
                     str(r["faults_per_sec_per_core"]), str(r["faults_per_sec_total"]),
                     str(r["latency_ns"]["median"]), str(r["latency_ns"]["p99"]),
                     ratio, ratio_p99, f"{len(r['repeats'])}/{r['boots']}",
                     " ".join(str(x) for x in r["repeats"]) or "-"])
    return header, rows


def plots(runs, out):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = sorted({(r["mode"], r["workers"]) for r in runs})
    made = []
    for mode, workers in groups:
        sel = [r for r in runs if r["mode"] == mode and r["workers"] == workers and r["complete"]]
        if not sel:
            continue
        fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
        for osname, style in (("panda", "o-"), ("linux", "s--")):
            pts = sorted((r["cpus"], r) for r in sel if r["os"] == osname)
            if not pts:
                continue
            xs = [p[0] for p in pts]
            axes[0].plot(xs, [p[1]["faults_per_sec_per_core"] for p in pts], style, label=osname)
            axes[1].plot(xs, [p[1]["faults_per_sec_total"] for p in pts], style, label=osname)
            axes[2].plot(xs, [p[1]["latency_ns"]["median"] / 1000 for p in pts], style,
                         label=f"{osname} median")
            axes[2].plot(xs, [p[1]["latency_ns"]["p99"] / 1000 for p in pts], style,
                         alpha=0.5, label=f"{osname} p99")
        axes[0].set_title(f"{mode}, {workers}: faults/s per core")
        axes[1].set_title("faults/s, all cores")
        axes[2].set_title("fault latency (µs)")
        axes[2].set_yscale("log")
        for ax in axes:
            ax.set_xlabel("CPUs (= workers)")
            ax.grid(True, alpha=0.3)
            ax.legend()
            ax.set_xticks(sorted({r["cpus"] for r in sel}))
        axes[0].set_ylim(bottom=0)
        axes[1].set_ylim(bottom=0)
        fig.tight_layout()
        base = os.path.join(out, f"faults-{mode}-{workers}")
        fig.savefig(base + ".svg")
        fig.savefig(base + ".png", dpi=110)
        plt.close(fig)
        made += [base + ".svg", base + ".png"]
    return made


def main():
    out = sys.argv[1]
    runs = load(out)
    meta = {}
    meta_path = os.path.join(out, "meta.txt")
    if os.path.exists(meta_path):
        with open(meta_path) as f:
            for line in f:
                k, _, v = line.rstrip("\n").partition(": ")
                meta[k] = v
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump({"meta": meta, "runs": runs}, f, indent=1)
    header, rows = table(runs)
    with open(os.path.join(out, "results.tsv"), "w") as f:
        f.write("\t".join(header) + "\n")
        for row in rows:
            f.write("\t".join(row) + "\n")
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    print("  ".join(h.ljust(w) for h, w in zip(header, widths)))
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)))
    made = plots(runs, out)
    print(f"\nresults: {os.path.join(out, 'results.json')}, results.tsv; plots: "
          + (", ".join(os.path.basename(m) for m in made) or "none (no complete run)"))
    incomplete = [r for r in runs if not r["complete"]]
    if incomplete:
        print("incomplete runs: " + ", ".join(
            f"{r['os']}-{r['mode']}-{r['workers']}-{r['cpus']}" for r in incomplete))


if __name__ == "__main__":
    main()
