"""How to quantize for TensorRT without losing accuracy: Q/DQ placement and calibration (issue 3).

    python benchmarks/int8_tensorrt_explore.py --bundle BUNDLE --data ELPV_DIR [--calib 512]

BUNDLE is an ELPV bundle (its model.fp32.onnx is quantized). Each variant of the TensorRT
flavour (symmetric int8, per-channel weights) is judged without the test split: accuracy
on the run's validation split, and top-1 agreement and mean |logit error| against FP32 on
the validation split plus the training images not used for calibration (~5x more images
than validation alone, and agreement needs no labels). Latency is not measured: TensorRT
runs this flavour, ONNX Runtime CPU only simulates its numerics.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
from pathlib import Path

import numpy as np

from edge_tl.export.quantize import FLAVOURS, histogram_image_limit, onnx_logits, prepare, quantize_int8
from edge_tl.fileio import write_json
from edge_tl.finetune.data import discover, pixels_of, stratified_sample
from edge_tl.runtime.bench import machine
from edge_tl.runtime.bundle import Bundle

ROOT = Path(__file__).resolve().parent
TRT = FLAVOURS["tensorrt"]
# before the fix: ONNX Runtime's default placement (Q/DQ on inputs *and* outputs) with Adds quantized
OUTPUTS_TOO = dataclasses.replace(TRT, op_types=("Conv", "Gemm", "MatMul", "Add"), quantize_outputs=True)
VARIANTS = {
    "inputs-only (current), minmax": (TRT, "minmax"),
    "inputs-only, entropy": (TRT, "entropy"),
    "inputs-only, percentile": (TRT, "percentile"),
    "inputs-only + Add, minmax": (dataclasses.replace(TRT, op_types=("Conv", "Gemm", "MatMul", "Add")), "minmax"),
    "inputs+outputs + Add, minmax": (OUTPUTS_TOO, "minmax"),
    "inputs+outputs + Add, entropy": (OUTPUTS_TOO, "entropy"),
    "inputs+outputs + Add, percentile": (OUTPUTS_TOO, "percentile"),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", type=Path, required=True)
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--calib", type=int, default=512)
    ap.add_argument("--results", type=Path, default=ROOT / "results" / "int8_tensorrt_explore.json")
    args = ap.parse_args()
    bundle = Bundle.load(args.bundle)
    spec = bundle.spec
    ds = discover(args.data, spec, progress=False)
    calib_idx = stratified_sample(ds.train.labels, args.calib)
    calib = pixels_of(ds.train, spec, calib_idx)
    held_out = sorted(set(range(len(ds.train))) - set(calib_idx))
    pool = np.concatenate([pixels_of(ds.val, spec), pixels_of(ds.train, spec, held_out)])
    n_val, val_labels = len(ds.val), np.asarray(ds.val.labels)
    fp32 = bundle.path / "model.fp32.onnx"
    ref = onnx_logits(fp32, pool)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        prepared = prepare(fp32, Path(tmp) / "prepared.onnx")
        limit = histogram_image_limit(prepared)
        for name, (flavour, method) in VARIANTS.items():
            path = Path(tmp) / f"{len(rows)}.onnx"
            images = calib if method == "minmax" else calib[:limit]
            quantize_int8(prepared, path, images, flavour, method)
            logits = onnx_logits(path, pool)
            pred = logits.argmax(1)
            rows.append({"variant": name, "calib_images": len(images),
                         "val_accuracy": float((pred[:n_val] == val_labels).mean()),
                         "drop_pts": 100 * float((ref[:n_val].argmax(1) == val_labels).mean()
                                                 - (pred[:n_val] == val_labels).mean()),
                         "agreement_val": float((pred[:n_val] == ref[:n_val].argmax(1)).mean()),
                         "agreement_all": float((pred == ref.argmax(1)).mean()),
                         "mean_abs_logit_error": float(np.abs(logits - ref).mean())})
            r = rows[-1]
            print(f"{name:<36} val {r['val_accuracy']:.4f} (drop {r['drop_pts']:+.2f})  agreement val "
                  f"{r['agreement_val']:.4f}, all {len(pool)} {r['agreement_all']:.4f}  "
                  f"mean |logit err| {r['mean_abs_logit_error']:.3f}", flush=True)
    write_json(args.results, {"benchmark": "int8_tensorrt_explore", "images_judged": len(pool), "rows": rows,
                              "machine": machine()})
    print(json.dumps({"saved": str(args.results)}))


if __name__ == "__main__":
    main()
