"""Search for the fastest ONNX Runtime CPU INT8 flavour that keeps accuracy (issue 6).

    python benchmarks/int8_cpu_explore.py --bundle BUNDLE --data ELPV_DIR [--calib 256] [--blocks 20]

BUNDLE is a --target cpu bundle of an ELPV run (its model.fp32.onnx is quantized). Each
variant (Q/DQ vs QOperator, per-channel or not, which ops stay float, calibration) is
timed at batch 1 and 32 in interleaved blocks with FP32 in one process (the ratio is the median
of the blocks' INT8/FP32 ratios; see ``interleaved_blocks``), and its accuracy measured on
the run's *validation* split (the choice is made there; the test split is not read).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
from pathlib import Path

import numpy as np
import onnx

from edge_tl.export.quantize import FLAVOURS, onnx_logits, prepare, quantize_int8
from edge_tl.runtime.check import accuracy
from edge_tl.fileio import write_json
from edge_tl.finetune.data import discover, pixels_of, stratified_sample
from edge_tl.runtime.bench import interleaved_blocks, machine, paired_ratio, stats
from edge_tl.runtime.bundle import Bundle
from edge_tl.runtime.runners import OnnxRuntimeRunner

ROOT = Path(__file__).resolve().parent
CPU = FLAVOURS["cpu"]
VARIANTS = {
    "qdq-all-ops-per-channel (current)": (CPU, "minmax", "none"),
    "qoperator-all-ops-per-channel": (dataclasses.replace(CPU, quant_format="qoperator"), "minmax", "none"),
    "qdq-per-tensor": (dataclasses.replace(CPU, per_channel=False), "minmax", "none"),
    "qoperator-per-tensor": (dataclasses.replace(CPU, quant_format="qoperator", per_channel=False), "minmax", "none"),
    "qdq-conv-gemm-only": (dataclasses.replace(CPU, op_types=("Conv", "Gemm")), "minmax", "none"),
    "qdq-conv-only": (dataclasses.replace(CPU, op_types=("Conv",)), "minmax", "none"),
    "qdq-depthwise-float": (CPU, "minmax", "depthwise"),
    "qdq-pointwise-only-conv": (dataclasses.replace(CPU, op_types=("Conv",)), "minmax", "depthwise"),
    "qdq-classifier-float": (dataclasses.replace(CPU, float_op_types=("Gemm",)), "minmax", "none"),
    "qdq-percentile": (CPU, "percentile", "none"),
}


def depthwise_nodes(prepared: Path) -> tuple[str, ...]:
    graph = onnx.load(str(prepared)).graph
    return tuple(n.name for n in graph.node if n.op_type == "Conv"
                 and any(a.name == "group" and a.i > 1 for a in n.attribute))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", type=Path, required=True)
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--calib", type=int, default=256)
    ap.add_argument("--blocks", type=int, default=20,
                    help="interleaved FP32/INT8 blocks per batch size (10 calls each at batch 1, one at 32)")
    ap.add_argument("--only", default=None, help="comma list of variant names")
    ap.add_argument("--results", type=Path, default=ROOT / "results" / "int8_cpu_explore.json")
    args = ap.parse_args()
    bundle = Bundle.load(args.bundle)
    spec = bundle.spec
    ds = discover(args.data, spec, progress=False)
    calib = pixels_of(ds.train, spec, stratified_sample(ds.train.labels, args.calib))
    val_pixels, val_labels = pixels_of(ds.val, spec), np.asarray(ds.val.labels)
    fp32 = bundle.path / "model.fp32.onnx"
    fp32_acc = accuracy(onnx_logits(fp32, val_pixels), val_labels)
    rows = []
    x = {b: np.ascontiguousarray(val_pixels[:b].transpose(0, 3, 1, 2), dtype=np.float32) for b in (1, 32)}
    ref = OnnxRuntimeRunner(fp32, "cpu").activate()
    with tempfile.TemporaryDirectory() as tmp:
        prepared = prepare(fp32, Path(tmp) / "prepared.onnx")
        dw = depthwise_nodes(prepared)
        names = args.only.split(",") if args.only else list(VARIANTS)
        for name in names:
            flavour, method, exclude = VARIANTS[name]
            path = Path(tmp) / f"{len(rows)}.onnx"
            quantize_int8(prepared, path, calib, flavour, method, dw if exclude == "depthwise" else ())
            acc = accuracy(onnx_logits(path, val_pixels), val_labels)
            runner = OnnxRuntimeRunner(path, "cpu").activate()
            row = {"variant": name, "val_accuracy": acc, "drop_pts": 100 * (fp32_acc - acc)}
            for b in (1, 32):
                calls = {"fp32": lambda: ref.infer(x[b]), "int8": lambda: runner.infer(x[b])}
                times, medians = interleaved_blocks(calls, args.blocks, 10 if b == 1 else 1)
                row[f"b{b}_p50_ms"] = stats(times["int8"], b)["p50_ms"]
                row[f"b{b}_fp32_p50_ms"] = stats(times["fp32"], b)["p50_ms"]
                ratio = paired_ratio(medians["int8"], medians["fp32"])
                row[f"b{b}_ratio"], row[f"b{b}_ratio_iqr"] = ratio["paired"], ratio["paired_iqr"]
            rows.append(row)
            print(f"{name:<38} val {acc:.4f} (drop {row['drop_pts']:+.2f})  b1 {row['b1_ratio']:.3f}x  "
                  f"b32 {row['b32_ratio']:.3f}x  ({row['b1_p50_ms']:.2f} / {row['b32_p50_ms']:.1f} ms)", flush=True)
    write_json(args.results, {"benchmark": "int8_cpu_explore", "fp32_val_accuracy": fp32_acc, "rows": rows,
                              "machine": machine()})
    print(json.dumps({"fp32_val_accuracy": fp32_acc}))


if __name__ == "__main__":
    main()
