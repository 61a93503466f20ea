"""INT8 by NNCF, OpenVINO's post-training quantizer, from a bundle's FP32 ONNX: does its Q/DQ
placement run faster on ONNX Runtime's OpenVINO provider than the bundle's INT8? (issue 6)

    python -m venv .venv-nncf
    .venv-nncf/bin/pip install onnxruntime-openvino nncf onnx numpy pillow typer tqdm
    .venv-nncf/bin/pip install --no-deps -e .
    .venv-nncf/bin/python benchmarks/int8_nncf.py --bundle BUNDLE --data ELPV_DIR --out DIR
    .venv-nncf/bin/python benchmarks/int8_openvino.py --bundle BUNDLE --data ELPV_DIR \\
        --extra-int8 nncf_performance=DIR/model.int8-nncf-performance.onnx \\
        --extra-int8 nncf_mixed=DIR/model.int8-nncf-mixed.onnx --results RESULTS.json

Why: the bundle's INT8 comes from ONNX Runtime's quantizer, which puts Q/DQ pairs on every
quantized tensor and drops ReLU6 into the quantization range; NNCF places them the way
OpenVINO's CPU plugin is tuned for (quantizers on Conv inputs, Clip kept, fast bias correction).
If OpenVINO ran NNCF's graph faster, `edge-tl export` should copy that placement. Its own
environment because NNCF pulls in scipy, scikit-learn and networkx, which the runtime must not.

Calibration: the images `edge-tl export` calibrates on (512 of the training split, stratified,
after carving validation with --val-fraction/--split-seed, the fine-tune's defaults); accuracy
and agreement with FP32 are measured on that validation split through the CPU provider.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from edge_tl.fileio import write_json
from edge_tl.finetune.data import discover, pixels_of, stratified_sample
from edge_tl.runtime.bundle import Bundle
from edge_tl.runtime.check import infer_all
from edge_tl.runtime.runners import OnnxRuntimeRunner

ROOT = Path(__file__).resolve().parent
PRESETS = ("performance", "mixed")  # NNCF: symmetric activations / asymmetric activations


def predictions(path: Path, pixels: np.ndarray) -> np.ndarray:
    runner = OnnxRuntimeRunner(path, "cpu").activate()
    try:
        return infer_all(runner, pixels).argmax(1)
    finally:
        runner.deactivate()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", type=Path, required=True, help="a --target cpu bundle")
    ap.add_argument("--data", type=Path, required=True, help="the ImageFolder the bundle's run was fine-tuned on")
    ap.add_argument("--out", type=Path, required=True, help="folder for the NNCF INT8 ONNX files")
    ap.add_argument("--calib-images", type=int, default=512)
    ap.add_argument("--val-fraction", type=float, default=0.15)
    ap.add_argument("--split-seed", type=int, default=0)
    ap.add_argument("--results", type=Path, default=ROOT / "results" / "int8_nncf.json")
    args = ap.parse_args()
    try:
        import nncf
        import onnx
    except ImportError as exc:
        raise SystemExit(f"{exc.name} is missing: make .venv-nncf as the top of this file says.") from exc

    bundle = Bundle.load(args.bundle)
    ds = discover(args.data, bundle.spec, args.val_fraction, args.split_seed)
    calib = pixels_of(ds.train, bundle.spec, stratified_sample(ds.train.labels, args.calib_images))
    calib = np.ascontiguousarray(calib.transpose(0, 3, 1, 2), dtype=np.float32)
    exported = bundle.manifest.get("validation", {}), bundle.manifest.get("calibration") or {}
    if (ds.val_source, len(calib)) != (exported[0].get("source"), exported[1].get("images")):
        raise SystemExit(f"{args.bundle}: its export validated on '{exported[0].get('source')}' and calibrated on "
                         f"{exported[1].get('images')} images; here '{ds.val_source}', {len(calib)}: pass the run's "
                         "--val-fraction/--split-seed and the export's --calib-images so both quantizers see the same images.")
    val, val_labels = pixels_of(ds.val, bundle.spec), np.asarray(ds.val.labels)
    fp32_path = args.bundle / "model.fp32.onnx"
    model = onnx.load(fp32_path)
    input_name = model.graph.input[0].name
    dataset = nncf.Dataset([calib[i:i + 1] for i in range(len(calib))], lambda x: {input_name: x})

    fp32 = predictions(fp32_path, val)
    rows = {"fp32": {"path": str(fp32_path), "val_accuracy": float((fp32 == val_labels).mean())},
            "bundle_int8": {"path": str(args.bundle / "model.int8-cpu.onnx")}}
    args.out.mkdir(parents=True, exist_ok=True)
    for preset in PRESETS:
        quantized = nncf.quantize(model, dataset, preset=getattr(nncf.QuantizationPreset, preset.upper()),
                                  subset_size=len(calib))
        path = args.out / f"model.int8-nncf-{preset}.onnx"
        onnx.save(quantized, path)
        rows[f"nncf_{preset}"] = {"path": str(path)}
    for name, row in rows.items():
        pred = predictions(Path(row["path"]), val)
        row.update(val_accuracy=float((pred == val_labels).mean()), val_agreement_with_fp32=float((pred == fp32).mean()))
        print(f"{name:<18} val accuracy {row['val_accuracy']:.4f}  agreement with FP32 {row['val_agreement_with_fp32']:.4f}"
              f"  {row['path']}")
    write_json(args.results, {"benchmark": "int8_nncf", "bundle": str(args.bundle), "nncf": nncf.__version__,
                              "calibration_images": len(calib), "validation_images": len(val_labels), "rows": rows})
    print(f"saved {args.results}; time them with benchmarks/int8_openvino.py --extra-int8 NAME=PATH")


if __name__ == "__main__":
    main()
