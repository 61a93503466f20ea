"""INT8 bias correction (export.quantize.correct_biases) off and on, both flavours, several calibration draws.

    python benchmarks/int8_bias_correction.py --bundle BUNDLE --data ELPV [--draws 0,1] [--rounds 0,1]

BUNDLE's model.fp32.onnx is quantized on 512 training images (draw 0: the export's stratified
sample; draw k: a random one, seed k) with 0, 1, ... rounds of bias correction. Judged without
the test split, like int8_tensorrt_explore.py: top-1 disagreements and mean |logit error| against
FP32 on the validation split plus the training images not used for calibration (agreement needs
no labels, and ~5x more images than validation alone resolve smaller differences). Seconds: the
quantization's wall time, correction included (nothing else should run meanwhile).
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from edge_tl.export.quantize import onnx_logits, prepare, quantize_int8
from edge_tl.finetune.data import discover, pixels_of, stratified_sample
from edge_tl.fileio import write_json
from edge_tl.runtime.bench import machine
from edge_tl.runtime.bundle import Bundle

ROOT = Path(__file__).resolve().parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", type=Path, required=True)
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--draws", default="0,1")
    ap.add_argument("--flavours", default="cpu,tensorrt")
    ap.add_argument("--rounds", default="0,1")
    ap.add_argument("--calib", type=int, default=512)
    ap.add_argument("--results", type=Path, default=ROOT / "results" / "int8_bias_correction.json")
    args = ap.parse_args()
    bundle = Bundle.load(args.bundle)
    spec = bundle.spec
    ds = discover(args.data, spec, progress=False)
    fp32 = bundle.path / "model.fp32.onnx"
    val = pixels_of(ds.val, spec)
    n_val, val_labels = len(ds.val), np.asarray(ds.val.labels)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        prepared = prepare(fp32, tmp / "prepared.onnx")
        for draw in map(int, args.draws.split(",")):
            idx = (stratified_sample(ds.train.labels, args.calib) if draw == 0 else
                   sorted(np.random.default_rng(draw).choice(len(ds.train), args.calib, replace=False).tolist()))
            calib = pixels_of(ds.train, spec, idx)
            held = sorted(set(range(len(ds.train))) - set(idx))
            pool = np.concatenate([val, pixels_of(ds.train, spec, held)])
            ref = onnx_logits(fp32, pool)
            for flavour in args.flavours.split(","):
                for rounds in map(int, args.rounds.split(",")):
                    t0 = time.perf_counter()
                    path = quantize_int8(prepared, tmp / "q.onnx", calib, flavour, "minmax", bias_correction=rounds)
                    secs = time.perf_counter() - t0
                    logits = onnx_logits(path, pool)
                    pred = logits.argmax(1)
                    row = {"draw": draw, "flavour": flavour, "rounds": rounds, "seconds": round(secs, 1),
                           "pool": len(pool), "disagree": int((pred != ref.argmax(1)).sum()),
                           "disagree_val": int((pred[:n_val] != ref[:n_val].argmax(1)).sum()),
                           "val_acc": float((pred[:n_val] == val_labels).mean()),
                           "fp32_val_acc": float((ref[:n_val].argmax(1) == val_labels).mean()),
                           "mean_abs_logit_error": round(float(np.abs(logits - ref).mean()), 4)}
                    rows.append(row)
                    print(row, flush=True)
    write_json(args.results, {"bundle": str(args.bundle), "machine": machine(), "calib_images": args.calib,
                              "rows": rows})
    print(f"saved {args.results}")


if __name__ == "__main__":
    main()
