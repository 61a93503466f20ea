"""Where ONNX Runtime's CPU time goes, FP32 vs INT8, by kind of layer (issue 6).

    python benchmarks/int8_cpu_profile.py --bundle BUNDLE [--iters 40]

BUNDLE is a --target cpu bundle (model.fp32.onnx and model.int8-cpu.onnx). Both models run
under ONNX Runtime's profiler at batch 1 and 32; each kernel is attributed to the Conv it
came from in the FP32 graph (depthwise, pointwise 1×1, other convs such as the stem) or
to its op type. Printed per kind: FP32 ms, INT8 ms, their ratio and INT8's share; saved as
JSON and as a stacked-bar PNG beside it.

The ``floor`` line is the INT8/FP32 ratio the model could reach if every kernel except the
pointwise and depthwise convolutions took no time at all: the lowest ratio reachable with
these ONNX Runtime kernels without a faster convolution kernel. Kernel times are summed,
so run it on an otherwise idle machine (the profiler adds a few µs per node).
"""

from __future__ import annotations

import argparse
import collections
import json
import re
import tempfile
from pathlib import Path

import numpy as np
import onnx

from edge_tl.fileio import write_json
from edge_tl.runtime.bench import machine

ROOT = Path(__file__).resolve().parent
ACTIVATIONS = ("Clip", "Relu", "HardSwish", "Sigmoid")


def conv_kinds(fp32_path: Path) -> dict[str, str]:
    """Names ONNX Runtime may give a Conv's kernel (node name, its output, its fused activation's output) -> kind."""
    graph = onnx.load(str(fp32_path)).graph
    weights = {t.name: t.dims for t in graph.initializer}
    consumers = collections.defaultdict(list)
    for node in graph.node:
        for name in node.input:
            consumers[name].append(node)
    kinds = {}
    for node in graph.node:
        if node.op_type != "Conv" or node.input[1] not in weights:
            continue
        _, cin_per_group, *kernel = weights[node.input[1]]
        kind = ("pointwise 1x1" if int(np.prod(kernel)) == 1 else
                "depthwise" if cin_per_group == 1 else "other conv (stem)")
        names = [node.name, node.output[0]]
        names += [c.output[0] for c in consumers[node.output[0]] if c.op_type in ACTIVATIONS]
        kinds.update({n: kind for n in names})
    return kinds


def kind_of(kernel_name: str, op: str, kinds: dict[str, str]) -> str:
    name = re.sub(r"(_nchwc)?(_token_\d+)?$", "", kernel_name)
    return kinds.get(name, f"other: {op}")


def profile(paths: list[Path], batch: int, iters: int, kinds: dict[str, str],
            block: int = 5) -> list[tuple[dict[str, float], float]]:
    """Per model: mean kernel ms per run by kind, and mean model_run ms, over ``iters`` runs.

    The models take turns in blocks of ``block`` runs, so drift of a noisy machine hits all alike
    (blocks, not single runs: an idle session's spinning threads would slow the other's next run).
    """
    import onnxruntime as ort

    sessions = []
    for path in paths:
        options = ort.SessionOptions()
        options.enable_profiling = True
        options.profile_file_prefix = str(Path(tempfile.mkdtemp()) / "profile")
        sessions.append(ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"]))
    x = np.random.default_rng(0).uniform(0, 255, (batch, 3, 224, 224)).astype(np.float32)
    warmup = block
    for _ in range(-(-(warmup + iters) // block)):
        for session in sessions:
            for _ in range(block):
                session.run(None, {session.get_inputs()[0].name: x})
    results = []
    for session in sessions:
        events = json.loads(Path(session.end_profiling()).read_text())
        runs = [e for e in events if e.get("name") == "model_run"][warmup:]
        start = runs[0]["ts"]  # kernels of the warm-up runs are left out
        by_kind: dict[str, float] = collections.Counter()
        for e in events:
            if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and e["ts"] >= start:
                by_kind[kind_of(e["name"][:-len("_kernel_time")], e["args"]["op_name"], kinds)] += e["dur"]
        scale = 1e-3 / len(runs)
        results.append(({k: v * scale for k, v in by_kind.items()}, float(np.mean([r["dur"] for r in runs])) * 1e-3))
    return results


def draw(results: dict, path: Path) -> Path:
    """Stacked bars per batch: FP32 and INT8 kernel time by layer kind, the floor marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = ["pointwise 1x1", "depthwise", "other conv (stem)", "everything else"]
    colors = ["#4c72b0", "#dd8452", "#55a868", "#999999"]
    fig, axes = plt.subplots(1, len(results["batches"]), figsize=(10, 4))
    for ax, (batch, r) in zip(axes, results["batches"].items()):
        fp32 = {row["kind"]: row["fp32_ms"] for row in r["rows"]}
        int8 = {row["kind"]: row["int8_ms"] for row in r["rows"]}
        bottoms = [0.0, 0.0]
        for kind, color in zip(kinds, colors):
            vals = [sum(v for k, v in t.items() if k not in kinds[:3]) if kind == "everything else" else t.get(kind, 0.0)
                    for t in (fp32, int8)]
            vals = [v / r["fp32_kernel_ms"] for v in vals]
            ax.bar(["FP32", "INT8"], vals, bottom=bottoms, color=color, label=kind)
            bottoms = [b + v for b, v in zip(bottoms, vals)]
        ax.axhline(r["floor_pointwise_plus_depthwise"], color="k", ls="--", lw=1)
        ax.axhline(0.35, color="r", ls=":", lw=1)
        ax.set_title(f"batch {batch}: INT8 = {r['ratio']:.2f}x FP32, floor {r['floor_pointwise_plus_depthwise']:.2f}x")
        ax.set_ylabel("kernel time / FP32 total")
    axes[0].legend(fontsize=8)
    fig.text(0.5, 0.01, "dashed: INT8 pointwise + depthwise alone (floor); dotted red: the 0.35x target",
             ha="center", fontsize=8)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def input_size(fp32_path: Path) -> int:
    return onnx.load(str(fp32_path)).graph.input[0].type.tensor_type.shape.dim[2].dim_value


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", type=Path, required=True)
    ap.add_argument("--iters", type=int, default=40)
    ap.add_argument("--results", type=Path, default=ROOT / "results" / "int8_cpu_profile.json")
    args = ap.parse_args()
    fp32, int8 = args.bundle / "model.fp32.onnx", args.bundle / "model.int8-cpu.onnx"
    if input_size(fp32) != 224:
        raise SystemExit(f"{fp32}: this script feeds 224x224 images; export at 224 px.")
    kinds = conv_kinds(fp32)
    out = {"benchmark": "int8_cpu_profile", "bundle": str(args.bundle), "machine": machine(), "batches": {}}
    for batch in (1, 32):
        iters = args.iters if batch == 1 else max(5, args.iters // 4)
        (t32, run32), (t8, run8) = profile([fp32, int8], batch, iters, kinds)
        total32, total8 = sum(t32.values()), sum(t8.values())
        rows = [{"kind": k, "fp32_ms": t32.get(k, 0.0), "int8_ms": t8.get(k, 0.0),
                 "ratio": t8[k] / t32[k] if t32.get(k) and k in t8 else None, "int8_share": t8.get(k, 0.0) / total8}
                for k in sorted(set(t32) | set(t8), key=lambda k: -t8.get(k, 0.0))]
        floor = (t8.get("pointwise 1x1", 0.0) + t8.get("depthwise", 0.0)) / total32
        out["batches"][str(batch)] = {"rows": rows, "fp32_kernel_ms": total32, "int8_kernel_ms": total8,
                                      "fp32_run_ms": run32, "int8_run_ms": run8, "ratio": total8 / total32,
                                      "floor_pointwise_plus_depthwise": floor}
        print(f"\nbatch {batch}: kernel time FP32 {total32:.2f} ms, INT8 {total8:.2f} ms, ratio {total8 / total32:.3f} "
              f"(model_run {run32:.2f} / {run8:.2f} ms)")
        print(f"  {'kind':<34}{'FP32 ms':>9}{'INT8 ms':>9}{'ratio':>7}{'INT8 share':>12}")
        for r in rows:
            ratio = f"{r['ratio']:.2f}" if r["ratio"] is not None else "-"
            print(f"  {r['kind']:<34}{r['fp32_ms']:>9.3f}{r['int8_ms']:>9.3f}{ratio:>7}{100 * r['int8_share']:>11.1f}%")
        print(f"  floor (INT8 pointwise + depthwise only) / FP32 = {floor:.3f}")
    write_json(args.results, out)
    print(f"saved {args.results} and {draw(out, args.results.with_suffix('.png'))}")


if __name__ == "__main__":
    main()
