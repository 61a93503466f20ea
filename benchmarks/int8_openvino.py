"""CPU INT8 under ONNX Runtime's OpenVINO execution provider vs its default CPU provider (issue 6).

    make openvino-env            # .venv-openvino: onnxruntime-openvino + the torch-free runtime
    .venv-openvino/bin/python benchmarks/int8_openvino.py --bundle BUNDLE --data ELPV_DIR [--iters 40]

BUNDLE is a --target cpu bundle (model.fp32.onnx and model.int8-cpu.onnx); ELPV_DIR is made
by `edge-tl data elpv` (its test/ split gives the accuracy figures; images CC BY-NC-SA 4.0).
The same two ONNX files run on both providers, through the runtime's own runner (OpenVINO:
latency hint, one session compiled per static batch size). Latency is measured in
interleaved blocks (every model × provider once per block, ``--blocks`` blocks), so drift of
a noisy host falls on all of them alike; p50 over all calls. Ratios are to ONNX Runtime's
CPU-provider FP32 (the baseline of every other CPU figure here) and to the faster FP32 of
the two providers at that batch. Target (issue 6): INT8 <= 0.35x FP32 at batch 1 and 32,
accuracy drop <= 0.5 pt.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from edge_tl.fileio import write_json
from edge_tl.runtime.bench import machine, stats, time_calls
from edge_tl.runtime.bundle import Bundle
from edge_tl.runtime.check import labelled_images
from edge_tl.runtime.runners import OPENVINO, OnnxRuntimeRunner, import_onnxruntime

ROOT = Path(__file__).resolve().parent
MODELS = {"fp32": "model.fp32.onnx", "int8": "model.int8-cpu.onnx"}
PROVIDERS = {"cpu": "cpu", "openvino": "openvino"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", type=Path, required=True)
    ap.add_argument("--data", type=Path, required=True, help="ELPV folder with test/")
    ap.add_argument("--iters", type=int, default=40, help="calls per model per block at batch 1 (batch 32: a tenth)")
    ap.add_argument("--blocks", type=int, default=7)
    ap.add_argument("--results", type=Path, default=ROOT / "results" / "int8_openvino.json")
    args = ap.parse_args()
    if OPENVINO not in import_onnxruntime().get_available_providers():
        raise SystemExit("This ONNX Runtime has no OpenVINO provider: run it with .venv-openvino/bin/python "
                         "(`make openvino-env` makes it).")

    bundle = Bundle.load(args.bundle)
    pixels, labels, _, _ = labelled_images(args.data / "test", bundle.classes, bundle.spec)
    nchw = np.ascontiguousarray(pixels.transpose(0, 3, 1, 2), dtype=np.float32)
    runners = {(p, m): OnnxRuntimeRunner(args.bundle / f, device).activate()
               for p, device in PROVIDERS.items() for m, f in MODELS.items()}
    preds = {k: np.concatenate([r.infer(nchw[i:i + 32]) for i in range(0, len(nchw), 32)]).argmax(1)
             for k, r in runners.items()}
    reference = preds[("cpu", "fp32")]
    rows = {f"{p}/{m}": {"provider": runners[(p, m)].describe(),
                         "test_accuracy": float((pred == labels).mean()),
                         "agreement_with_cpu_fp32": float((pred == reference).mean())}
            for (p, m), pred in preds.items()}

    for batch in (1, 32):
        x = nchw[np.arange(batch) % len(nchw)]
        n = max(2, args.iters if batch == 1 else args.iters // 10)
        times = {k: [] for k in runners}
        for _ in range(args.blocks):
            for k, r in runners.items():
                times[k] += time_calls(lambda: r.infer(x), 2, n, None)
        for (p, m), t in times.items():
            rows[f"{p}/{m}"][f"b{batch}"] = stats(t, batch)

    summary = {}
    for batch in ("b1", "b32"):
        cpu_fp32 = rows["cpu/fp32"][batch]["p50_ms"]
        best_fp32 = min(rows["cpu/fp32"][batch]["p50_ms"], rows["openvino/fp32"][batch]["p50_ms"])
        for p in PROVIDERS:
            int8 = rows[f"{p}/int8"][batch]["p50_ms"]
            summary[f"{p}_int8_vs_cpu_fp32_{batch}"] = int8 / cpu_fp32
            summary[f"{p}_int8_vs_best_fp32_{batch}"] = int8 / best_fp32
            summary[f"{p}_int8_vs_own_fp32_{batch}"] = int8 / rows[f"{p}/fp32"][batch]["p50_ms"]
    for p in PROVIDERS:
        summary[f"{p}_int8_drop_pts"] = 100 * (rows[f"{p}/fp32"]["test_accuracy"] - rows[f"{p}/int8"]["test_accuracy"])
    result = {"benchmark": "int8_openvino", "bundle": str(args.bundle), "test_images": int(len(labels)),
              "blocks": args.blocks, "summary": summary, "rows": rows, "machine": machine()}
    write_json(args.results, result)

    print(f"{'provider/model':<18}{'test acc':>9}{'agree':>7}{'b1 p50 ms':>11}{'b32 p50 ms':>12}   runs on")
    for name, r in rows.items():
        print(f"{name:<18}{r['test_accuracy']:>9.4f}{r['agreement_with_cpu_fp32']:>7.3f}"
              f"{r['b1']['p50_ms']:>11.2f}{r['b32']['p50_ms']:>12.1f}   {r['provider']}")
    print(json.dumps(summary, indent=2))
    print(f"saved {args.results}")


if __name__ == "__main__":
    main()
