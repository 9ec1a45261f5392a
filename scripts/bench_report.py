#!/usr/bin/env python3
"""Turns scripts/bench.sh's raw faultbench lines into results.json, results.tsv, a table
and plots (SVG and PNG).

Input: DIR/raw/OS-VARIANT-MODE-WORKERS-N-iIDLE-rK.jsonl, one JSON line per worker plus
one "run" line (older runs: OS-MODE-WORKERS-N[-rK]). VARIANT is Panda's prezero (zeroed
pools on) or noprezero (booted with mm.prezero=off), "default" for Linux; IDLE the CPUs
booted beyond the workers. Per run: faults/s per worker (mean over workers = "per
core", since each worker is pinned to its own CPU), the total, latency percentiles of
the merged per-fault histograms (exact merge: every worker reports its buckets), and
the null system call's round trip timed in the same boot (the floor).
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
        groups.setdefault((r["os"], r["variant"], r["mode"], r["workers"], r["cpus"], r["idle_cpus"]), []).append(r)
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
        if len(parts) == 7:
            osname, variant, mode, workers, n, idle = parts[:6]
            idle = int(idle.lstrip("i"))
        else:
            if len(parts) == 5:
                parts = parts[:4]  # OS-MODE-WORKERS-N-rK: the repeat index
            osname, mode, workers, n = parts
            variant, idle = ("prezero" if osname == "panda" else "default"), 0
        lines = []
        with open(os.path.join(raw, name)) as f:
            for line in f:
                try:
                    lines.append(json.loads(line))
                except json.JSONDecodeError:
                    pass  # a line cut by the console: the run is reported as incomplete
        failed = os.path.exists(os.path.join(raw, name[: -len(".jsonl")] + ".failed"))
        runs.append(summarise(osname, variant, mode, workers, int(n), idle, lines, failed))
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


def summarise(osname, variant, mode, workers, n, idle, lines, failed):
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
    floor = run.get("null_call_ns") or {}
    median = ns(percentile(buckets, total, 0.5))
    return {
        "os": osname,
        "variant": variant,
        "mode": mode,
        "workers": workers,
        "cpus": n,
        "idle_cpus": idle,
        "cpus_online": run.get("cpus_online"),
        "complete": complete,
        "null_call_ns": {"median": floor.get("median"), "p99": floor.get("p99")},
        "median_over_null_call": round(median / floor["median"], 2) if floor.get("median") else None,
        "faults": sum(w["faults"] for w in per_worker),
        "faults_per_sec_total": round(sum(rates)),
        "faults_per_sec_per_core": round(sum(rates) / len(rates)) if rates else 0,
        "faults_per_sec_per_core_min": round(min(rates)) if rates else 0,
        "latency_ns": {
            "median": median,
            "p99": ns(percentile(buckets, total, 0.99)),
            "max": ns(max((w["hist"][-1][0] for w in per_worker if w.get("hist")), default=0))
            if per_worker
            else 0,
        },
        "kernel": {k: run.get(k) for k in (
            "zero_pools_on", "kernel_faults", "zero_pool_hits", "zero_pool_waits", "zeroed_inline",
            "zeroed_ahead", "zeroed_for_other_cpus", "shootdowns", "shootdown_ipis", "fault_profile",
            "zeroing_inline_ms", "zeroing_ahead_ms", "zero_ahead_ns_per_frame") if run.get(k) is not None},
        "bursty": {"burst": run.get("burst"), "gap_ms": run.get("gap_ms")} if mode == "bursty" else None,
        "per_worker_faults_per_sec": [round(r) for r in rates],
    }


def key(r):
    return (r["mode"], r["workers"], r["cpus"], r["idle_cpus"], r["os"], r["variant"])


def ratio(a, b):
    return "%.2f" % (a / b) if a and b else ""


def pool_hit_share(r):
    k = r["kernel"]
    if k.get("kernel_faults"):
        return "%.0f%%" % (100 * k.get("zero_pool_hits", 0) / k["kernel_faults"])
    return ""


def table(runs):
    """One row per configuration (median boot). Panda rows compare with Linux on the
    same configuration, and prezero rows with noprezero (throughput per core and
    median latency); every row gives its median fault latency over the null system
    call of the same boot."""
    rows = []
    by = {key(r): r for r in runs}
    header = ["mode", "workers", "cpus", "idle cpus", "os", "variant", "faults/s/core",
              "faults/s total", "median ns", "p99 ns", "null call ns", "median/null call",
              "panda/linux per core", "panda/linux median", "panda/linux p99", "prezero/noprezero per core",
              "prezero/noprezero median", "pool hits", "zeroing inline ms", "zeroing ahead ms",
              "boots ok", "faults/s/core of each boot"]
    for r in sorted(runs, key=key):
        vs_linux = vs_linux_median = vs_linux_p99 = vs_off = vs_off_median = ""
        # Bursty runs sleep between bursts: their faults/s measures the gaps (and the
        # sleep's granularity), so only their latencies are compared.
        bursty = r["mode"] == "bursty"
        cfg = (r["mode"], r["workers"], r["cpus"], r["idle_cpus"])
        if r["os"] == "panda":
            l = by.get(cfg + ("linux", "default"))
            if l:
                if not bursty:
                    vs_linux = ratio(r["faults_per_sec_per_core"], l["faults_per_sec_per_core"])
                vs_linux_median = ratio(r["latency_ns"]["median"], l["latency_ns"]["median"])
                vs_linux_p99 = ratio(r["latency_ns"]["p99"], l["latency_ns"]["p99"])
            off = by.get(cfg + ("panda", "noprezero"))
            if r["variant"] == "prezero" and off:
                if not bursty:
                    vs_off = ratio(r["faults_per_sec_per_core"], off["faults_per_sec_per_core"])
                vs_off_median = ratio(r["latency_ns"]["median"], off["latency_ns"]["median"])
        rows.append([r["mode"], r["workers"], str(r["cpus"]), str(r["idle_cpus"]), r["os"],
                     r["variant"], str(r["faults_per_sec_per_core"]), str(r["faults_per_sec_total"]),
                     str(r["latency_ns"]["median"]), str(r["latency_ns"]["p99"]),
                     str(r["null_call_ns"]["median"] or ""),
                     "%.2f" % r["median_over_null_call"] if r["median_over_null_call"] else "",
                     vs_linux, vs_linux_median, vs_linux_p99, vs_off, vs_off_median, pool_hit_share(r),
                     str(r["kernel"].get("zeroing_inline_ms", "")), str(r["kernel"].get("zeroing_ahead_ms", "")),
                     f"{len(r['repeats'])}/{r['boots']}",
                     " ".join(str(x) for x in r["repeats"]) or "-"])
    return header, rows


# One colour per kernel and variant, one line style per metric, in every plot.
COLOURS = {("panda", "prezero"): "tab:blue", ("panda", "noprezero"): "tab:green",
           ("linux", "default"): "tab:red"}
LABELS = {("panda", "prezero"): "Panda, zeroed pools", ("panda", "noprezero"): "Panda, mm.prezero=off",
          ("linux", "default"): "Linux"}


def plots(runs, out, meta):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, LogLocator

    caption = "; ".join(x for x in (
        meta.get("accel", ""), "CPU model " + meta.get("cpu model", "?"),
        "host: " + meta.get("host", "?"), "build " + meta.get("build", "?"),
        meta.get("linux", "").split(",")[0]) if x)
    groups = sorted({(r["mode"], r["workers"], r["idle_cpus"]) for r in runs})
    made = []
    for mode, workers, idle in groups:
        sel = [r for r in runs if (r["mode"], r["workers"], r["idle_cpus"]) == (mode, workers, idle)
               and r["complete"]]
        if not sel:
            continue
        fig, axes = plt.subplots(1, 3, figsize=(16, 5))
        for series in sorted({(r["os"], r["variant"]) for r in sel}):
            pts = sorted((r["cpus"], r) for r in sel if (r["os"], r["variant"]) == series)
            colour = COLOURS.get(series)
            label = LABELS.get(series, "%s %s" % series)
            xs = [p[0] for p in pts]
            axes[0].plot(xs, [p[1]["faults_per_sec_per_core"] for p in pts], "o-", color=colour, label=label)
            axes[1].plot(xs, [p[1]["faults_per_sec_total"] for p in pts], "o-", color=colour, label=label)
            axes[2].plot(xs, [p[1]["latency_ns"]["median"] / 1000 for p in pts], "o-", color=colour,
                         label=f"{label}: median")
            axes[2].plot(xs, [p[1]["latency_ns"]["p99"] / 1000 for p in pts], "s--", color=colour,
                         label=f"{label}: p99")
            floor = [(x, p["null_call_ns"]["median"] / 1000) for x, p in pts if p["null_call_ns"]["median"]]
            if floor:
                axes[2].plot([f[0] for f in floor], [f[1] for f in floor], "^:", color=colour,
                             label=f"{label}: null system call")
        idle_text = f", {idle} idle CPU{'s' if idle != 1 else ''}" if idle else ""
        axes[0].set_title(f"{mode}, {workers}{idle_text}: faults/s per core")
        axes[1].set_title("faults/s, all cores")
        axes[2].set_title("latency per fault (and the null system call)")
        axes[0].set_ylabel("faults per second per core")
        axes[1].set_ylabel("faults per second")
        axes[2].set_ylabel("latency (µs, log scale)")
        axes[2].set_yscale("log")
        axes[2].yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        axes[2].yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        axes[2].yaxis.set_minor_formatter(FuncFormatter(lambda v, _: ""))
        for ax in axes:
            ax.set_xlabel("workers (one per CPU)")
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize="small")
            ax.set_xticks(sorted({r["cpus"] for r in sel}))
        axes[0].set_ylim(bottom=0)
        axes[1].set_ylim(bottom=0)
        fig.text(0.5, 0.01, caption, ha="center", fontsize="small")
        fig.tight_layout(rect=(0, 0.04, 1, 1))
        base = os.path.join(out, f"faults-{mode}-{workers}" + (f"-idle{idle}" if idle else ""))
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
    for k in ("accel", "cpu model", "linux", "build"):
        if k in meta:
            print(f"{k}: {meta[k]}")
    print()
    header, rows = table(runs)
    with open(os.path.join(out, "results.tsv"), "w") as f:
        f.write("\t".join(header) + "\n")
        for row in rows:
            f.write("\t".join(row) + "\n")
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    print("  ".join(h.ljust(w) for h, w in zip(header, widths)))
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)))
    made = plots(runs, out, meta)
    print(f"\nresults: {os.path.join(out, 'results.json')}, results.tsv; plots: "
          + (", ".join(os.path.basename(m) for m in made) or "none (no complete run)"))
    # A run without pools that still took frames from them would mean the switch did
    # not work: say so rather than compare the wrong things.
    for r in runs:
        k = r["kernel"]
        if r["variant"] == "noprezero" and (k.get("zero_pool_hits") or k.get("zero_pools_on")):
            print(f"WARNING: {r['mode']}-{r['workers']}-{r['cpus']} ran with mm.prezero=off but the kernel "
                  f"reports pools on={k.get('zero_pools_on')}, {k.get('zero_pool_hits')} pool hits")
    incomplete = [r for r in runs if not r["complete"]]
    if incomplete:
        print("incomplete runs: " + ", ".join(
            f"{r['os']}-{r['variant']}-{r['mode']}-{r['workers']}-{r['cpus']}-i{r['idle_cpus']}" for r in incomplete))


if __name__ == "__main__":
    main()
