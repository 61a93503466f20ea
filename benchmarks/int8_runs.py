"""All saved OpenVINO INT8 runs together: is INT8 <= 0.35x CPU FP32 once the host's state is accounted for?

    python benchmarks/int8_runs.py [--runs benchmarks/results/int8_openvino*.json] [--results FILE]

Reads the JSON files `int8_openvino.py` wrote (no timing here, so it may run beside other work).
Each run's paired ratio (OpenVINO INT8 / CPU-provider FP32, median over its blocks) is listed,
and the block medians the newer files keep are pooled over every run: each block gives one
ratio and one CPU FP32 latency, the latter a reading of how loaded this shared host was then.
The blocks are cut into quartiles of that latency; the fastest quartile is the host at its
quietest, the figure to compare with the target. Its 90 % interval comes from resampling whole
runs (blocks of one run share a host state, so they are not independent). Saves JSON and a PNG
(block ratio against CPU FP32 latency, per batch size, the 0.35 target marked).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from edge_tl.fileio import write_json

ROOT = Path(__file__).resolve().parent
TARGET = 0.35
BATCHES = ("b1", "b32")


def run_figures(path: Path) -> dict:
    """One saved run: its paired ratio per batch size and, where saved, its per-block ratios and FP32 latencies."""
    data = json.loads(path.read_text())
    out = {"file": path.name, "cpu_fp32_b1_p50_ms": data["rows"]["cpu/fp32"]["b1"]["p50_ms"]}
    for batch in BATCHES:
        summary = data["summary"][f"openvino_int8_vs_cpu_fp32_{batch}"]
        # session 5's files predate the paired ratio and hold one pooled number
        out[f"paired_{batch}"] = summary["paired"] if isinstance(summary, dict) else summary
        fp32 = data["rows"]["cpu/fp32"][batch].get("block_medians_ms")
        int8 = data["rows"]["openvino/int8"][batch].get("block_medians_ms")
        if fp32 and int8:
            out[f"blocks_{batch}"] = {"fp32_ms": fp32, "ratio": (np.asarray(int8) / np.asarray(fp32)).tolist()}
    return out


def by_host_state(runs: list[dict], batch: str, n_boot: int = 2000, seed: int = 0) -> dict:
    """Median block ratio in each quartile of CPU FP32 block latency, and a run-resampled 90 % interval for each."""
    runs = [r[f"blocks_{batch}"] for r in runs if f"blocks_{batch}" in r]
    fp32 = np.concatenate([r["fp32_ms"] for r in runs])
    edges = np.percentile(fp32, [0, 25, 50, 75, 100])
    edges[-1] += 1e-9

    def quartile_medians(sample: list[dict]) -> list[float]:
        f = np.concatenate([r["fp32_ms"] for r in sample])
        q = np.concatenate([r["ratio"] for r in sample])
        return [float(np.median(q[m])) if (m := (f >= lo) & (f < hi)).any() else float("nan")
                for lo, hi in zip(edges[:-1], edges[1:])]

    rng = np.random.default_rng(seed)
    boot = np.array([quartile_medians([runs[i] for i in rng.integers(0, len(runs), len(runs))])
                     for _ in range(n_boot)])
    ratios = np.concatenate([r["ratio"] for r in runs])
    return {"runs": len(runs), "blocks": int(len(ratios)), "median_all_blocks": float(np.median(ratios)),
            "share_of_blocks_at_or_under_target": float((ratios <= TARGET).mean()),
            "quartiles": [{"cpu_fp32_ms": [float(lo), float(hi)], "median_ratio": med,
                           "interval90": [float(v) for v in np.nanpercentile(boot[:, i], [5, 95])]}
                          for i, (lo, hi, med) in enumerate(zip(edges[:-1], edges[1:], quartile_medians(runs)))]}


def draw(runs: list[dict], summary: dict, path: Path) -> Path:
    """Block ratio against CPU FP32 block latency, per batch size; quartile medians and the target marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(BATCHES), figsize=(11, 4.2))
    for ax, batch in zip(axes, BATCHES):
        for r in runs:
            if f"blocks_{batch}" in r:
                b = r[f"blocks_{batch}"]
                ax.scatter(b["fp32_ms"], b["ratio"], s=6, alpha=0.45)
        for q in summary[batch]["quartiles"]:
            lo, hi = q["cpu_fp32_ms"]
            ax.hlines(q["median_ratio"], lo, hi, color="k", lw=2)
            ax.fill_between([lo, hi], *q["interval90"], color="k", alpha=0.12, lw=0)
        ax.axhline(TARGET, color="r", ls=":", lw=1.2)
        ax.set_xscale("log")
        ax.set_xlabel(f"CPU-provider FP32 block median, batch {batch[1:]} (ms): host load →")
        ax.set_ylabel("OpenVINO INT8 / CPU FP32 (block)")
        ax.set_title(f"batch {batch[1:]}: {summary[batch]['blocks']} blocks of {summary[batch]['runs']} runs")
    fig.text(0.5, 0.01, "one colour a run; black: median per quartile of FP32 latency, grey its 90 % run-resampled "
             "interval; dotted red: the 0.35x target", ha="center", fontsize=8)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=Path, nargs="+",
                    default=sorted((ROOT / "results").glob("int8_openvino*.json")))
    ap.add_argument("--results", type=Path, default=ROOT / "results" / "int8_runs.json")
    args = ap.parse_args()
    runs = [run_figures(p) for p in args.runs]
    summary = {}
    print(f"{'run':<34}{'CPU FP32 b1 ms':>15}{'b1':>8}{'b32':>8}")
    for r in runs:
        print(f"{r['file']:<34}{r['cpu_fp32_b1_p50_ms']:>15.2f}{r['paired_b1']:>8.3f}{r['paired_b32']:>8.3f}")
    for batch in BATCHES:
        per_run = np.array([r[f"paired_{batch}"] for r in runs])
        summary[batch] = {"median_of_runs": float(np.median(per_run)), "range_of_runs": [float(per_run.min()), float(per_run.max())],
                          "runs_at_or_under_target": int((per_run <= TARGET).sum()), "runs_total": len(runs),
                          **by_host_state(runs, batch)}
        s = summary[batch]
        print(f"\n{batch}: median of {len(runs)} runs {s['median_of_runs']:.3f} "
              f"({s['runs_at_or_under_target']} at or under {TARGET}); {s['blocks']} blocks of {s['runs']} runs, "
              f"median {s['median_all_blocks']:.3f}")
        for i, q in enumerate(s["quartiles"]):
            lo, hi = q["cpu_fp32_ms"]
            print(f"  FP32 quartile {i + 1} ({lo:.1f}-{hi:.1f} ms): ratio {q['median_ratio']:.3f} "
                  f"(90 %: {q['interval90'][0]:.3f}-{q['interval90'][1]:.3f})")
    out = {"benchmark": "int8_runs", "target": TARGET, "summary": summary,
           "runs": [{k: v for k, v in r.items() if not k.startswith("blocks_")} for r in runs]}
    write_json(args.results, out)
    print(f"saved {args.results} and {draw(runs, summary, args.results.with_suffix('.png'))}")


if __name__ == "__main__":
    main()
