"""Export benchmark on ELPV: test accuracy and ONNX Runtime CPU latency of FP32 and both INT8 flavours,
side by side with PyTorch eager in one process.

    python benchmarks/export_elpv.py --run RUN --data ELPV_DIR [--out DIR] [--iters 200]

RUN is an `edge-tl finetune` run on ELPV_DIR (made by `edge-tl data elpv --out ELPV_DIR`);
its test split is used only here, for the final figures. Calibration uses the training
split and float fallback the validation split, as in `edge-tl export`.
Targets (issue 3): INT8 within 0.5 pt of FP32; ONNX Runtime FP32 >= 5x faster than PyTorch
eager at batch 1; the CPU INT8 flavour <= 0.5x FP32 latency at batch 1.
ELPV images: CC BY-NC-SA 4.0.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from edge_tl.export.bundle import export_bundle
from edge_tl.fileio import write_json
from edge_tl.export.onnx_export import PixelInput
from edge_tl.finetune.train import load_model
from edge_tl.runtime.bench import machine, stats, time_calls
from edge_tl.runtime.check import labelled_images
from edge_tl.runtime.runners import OnnxRuntimeRunner

ROOT = Path(__file__).resolve().parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", type=Path, required=True)
    ap.add_argument("--data", type=Path, required=True, help="ELPV folder with train/ and test/")
    ap.add_argument("--out", type=Path, default=Path("bench_export"))
    ap.add_argument("--iters", type=int, default=200)
    ap.add_argument("--calib-method", default="auto")
    ap.add_argument("--results", type=Path, default=ROOT / "results" / "export_elpv.json")
    args = ap.parse_args()

    bundles = {}
    for target in ("cpu", "gpu"):  # cpu: the u8/s8 ONNX Runtime flavour; gpu: the TensorRT Q/DQ flavour
        out = args.out / target
        if not (out / "manifest.json").is_file():
            export_bundle(args.run, out, target, "fp32,int8", calib_method=args.calib_method, force=True,
                          data=args.data, progress=False)
        bundles[target] = json.loads((out / "manifest.json").read_text())
    files = {"fp32": args.out / "cpu" / "model.fp32.onnx", "int8-cpu": args.out / "cpu" / "model.int8-cpu.onnx",
             "int8-tensorrt": args.out / "gpu" / "model.int8.onnx"}
    model, ckpt = load_model(args.run / "best.pt")
    from edge_tl.runtime.spec import PreprocessSpec

    spec = PreprocessSpec.from_dict(ckpt["preprocess"])
    pixels, labels, _, _ = labelled_images(args.data / "test", ckpt["classes"], spec)
    torch_model = PixelInput(model, spec).eval()

    def to_nchw(p: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(p.transpose(0, 3, 1, 2), dtype=np.float32)

    with torch.inference_mode():
        torch_logits = np.concatenate([torch_model(torch.from_numpy(to_nchw(pixels[i:i + 64]))).numpy()
                                       for i in range(0, len(pixels), 64)])
    binary = np.asarray([c >= len(ckpt["classes"]) // 2 for c in range(len(ckpt["classes"]))])
    rows = {"torch-eager": {"test_accuracy": float((torch_logits.argmax(1) == labels).mean())}}
    runners = {name: OnnxRuntimeRunner(f, "cpu").activate() for name, f in files.items()}
    for name, runner in runners.items():
        logits = np.concatenate([runner.infer(to_nchw(pixels[i:i + 64])) for i in range(0, len(pixels), 64)])
        rows[name] = {"test_accuracy": float((logits.argmax(1) == labels).mean()),
                      "test_accuracy_binary": float((binary[logits.argmax(1)] == binary[labels]).mean()),
                      "agreement_with_torch": float((logits.argmax(1) == torch_logits.argmax(1)).mean())}
    rows["torch-eager"]["test_accuracy_binary"] = float((binary[torch_logits.argmax(1)] == binary[labels]).mean())

    cl_model = PixelInput(load_model(args.run / "best.pt")[0], spec).eval().to(memory_format=torch.channels_last)
    for batch in (1, 32):
        x = to_nchw(np.stack([pixels[i % len(pixels)] for i in range(batch)]))
        xt = torch.from_numpy(x)
        xcl = xt.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode():
            rows["torch-eager"][f"b{batch}"] = stats(time_calls(lambda: torch_model(xt), 5, args.iters // 4, None), batch)
            rows.setdefault("torch-eager-channels-last", {})[f"b{batch}"] = stats(
                time_calls(lambda: cl_model(xcl), 5, args.iters // 4, None), batch)
        for name, runner in runners.items():
            rows[name][f"b{batch}"] = stats(time_calls(lambda: runner.infer(x), 10, args.iters, None), batch)
    fp32 = rows["fp32"]
    summary = {
        "ort_fp32_speedup_vs_torch_eager_b1": rows["torch-eager"]["b1"]["p50_ms"] / fp32["b1"]["p50_ms"],
        "int8_cpu_latency_ratio_b1": rows["int8-cpu"]["b1"]["p50_ms"] / fp32["b1"]["p50_ms"],
        "int8_cpu_latency_ratio_b32": rows["int8-cpu"]["b32"]["p50_ms"] / fp32["b32"]["p50_ms"],
        "int8_tensorrt_flavour_latency_ratio_b1": rows["int8-tensorrt"]["b1"]["p50_ms"] / fp32["b1"]["p50_ms"],
        "int8_cpu_drop_pts": 100 * (fp32["test_accuracy"] - rows["int8-cpu"]["test_accuracy"]),
        "int8_tensorrt_drop_pts": 100 * (fp32["test_accuracy"] - rows["int8-tensorrt"]["test_accuracy"]),
        "int8_cpu_test_agreement_with_torch": rows["int8-cpu"]["agreement_with_torch"],
        "int8_tensorrt_test_agreement_with_torch": rows["int8-tensorrt"]["agreement_with_torch"],
    }
    result = {"benchmark": "export_elpv", "run": str(args.run), "test_images": int(len(labels)),
              "float_nodes": {"int8-cpu": bundles["cpu"]["artifacts"][-1]["float_nodes"],
                              "int8-tensorrt": bundles["gpu"]["artifacts"][-1]["float_nodes"]},
              "summary": summary, "rows": rows, "machine": machine(), "torch_threads": torch.get_num_threads()}
    write_json(args.results, result)
    print(f"{'model':<26}{'test acc':>9}{'binary':>8}{'b1 p50 ms':>11}{'b32 p50 ms':>12}")
    for name, r in rows.items():
        acc = f"{r['test_accuracy']:.4f}" if "test_accuracy" in r else "-"
        binacc = f"{r['test_accuracy_binary']:.4f}" if "test_accuracy_binary" in r else "-"
        print(f"{name:<26}{acc:>9}{binacc:>8}{r['b1']['p50_ms']:>11.2f}{r['b32']['p50_ms']:>12.1f}")
    print(json.dumps(summary, indent=2))
    print(f"saved {args.results}")


if __name__ == "__main__":
    main()
