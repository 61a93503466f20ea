"""Backbones side by side: test accuracy and CPU latency of several exported bundles, in one process.

    python benchmarks/backbones.py --bundles LITE0_BUNDLE LITE2_BUNDLE ... --data ELPV [--blocks 12]

Each bundle is a `--target cpu` export (model.fp32.onnx + model.int8-cpu.onnx). For each:
4-class test accuracy of FP32 and INT8 on DATA/test (the runtime's own check), FLOPs per image,
and batch-1 latency on ONNX Runtime's CPU provider. Latencies are timed in interleaved blocks
(every model once per block, untimed settle calls first) and reported as paired ratios to the
first bundle's FP32 and, for INT8, to the bundle's own FP32: load that comes and goes on a
shared host hits every model of a block alike.
Saves benchmarks/results/backbones.json unless --results says otherwise.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from latency import model_flops  # benchmarks/ is the script's folder, so on sys.path

from edge_tl.fileio import write_json
from edge_tl.runtime.bench import interleaved_blocks, machine, paired_ratio
from edge_tl.runtime.bundle import Bundle
from edge_tl.runtime.check import check_bundle
from edge_tl.runtime.runners import OnnxRuntimeRunner

ROOT = Path(__file__).resolve().parent
PRECISIONS = ("fp32", "int8-cpu")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundles", type=Path, nargs="+", required=True, help="cpu-target bundles; the first is the reference")
    ap.add_argument("--data", type=Path, required=True, help="dataset folder with a test/ split")
    ap.add_argument("--blocks", type=int, default=12)
    ap.add_argument("--iters", type=int, default=20, help="timed calls per model per block")
    ap.add_argument("--results", type=Path, default=ROOT / "results" / "backbones.json")
    args = ap.parse_args()

    models, calls = [], {}
    for i, path in enumerate(args.bundles):
        bundle = Bundle.load(path)
        check = check_bundle(path, args.data / "test", log=lambda *_: None)["artifacts"]
        x = np.random.default_rng(0).integers(0, 256, (1, 3, *bundle.spec.input_size)).astype(np.float32)
        for precision in PRECISIONS:  # keyed by position: two bundles of one model stay apart
            runner = OnnxRuntimeRunner(bundle.file(bundle.artifact(precision)), "cpu").activate()
            calls[(i, precision)] = lambda r=runner, x=x: r.infer(x)
        models.append({"name": f"{bundle.manifest['model']}@{bundle.spec.input_size[0]}", "bundle": str(path),
                       "run": bundle.manifest.get("run"),
                       "gflops_per_image": model_flops(bundle.file(bundle.artifact("fp32"))) / 1e9,
                       **{f"test_accuracy_{p}": check[p]["accuracy"] for p in PRECISIONS},
                       "int8_check": {k: check["int8-cpu"][k] for k in ("drop", "passed", "reason")}})
    times, medians = interleaved_blocks(calls, args.blocks, args.iters)
    for i, m in enumerate(models):
        for p in PRECISIONS:
            m[f"b1_p50_ms_{p}"] = float(np.median(times[(i, p)]))
            m[f"b1_ratio_to_reference_fp32_{p}"] = paired_ratio(medians[(i, p)], medians[(0, "fp32")])
        m["b1_ratio_int8_to_own_fp32"] = paired_ratio(medians[(i, "int8-cpu")], medians[(i, "fp32")])
    write_json(args.results, {"benchmark": "backbones", "data": str(args.data / "test"), "blocks": args.blocks,
                              "iters": args.iters, "models": models, "machine": machine()})
    print(f"{'model':<30}{'GFLOP':>7}{'FP32 acc':>10}{'INT8 acc':>10}{'FP32 ms':>9}{'INT8 ms':>9}"
          f"{'FP32 x ref':>11}{'INT8 x ref':>11}{'INT8 x own':>11}")
    for m in models:
        print(f"{m['name']:<30}{m['gflops_per_image']:>7.2f}{m['test_accuracy_fp32']:>10.2%}"
              f"{m['test_accuracy_int8-cpu']:>10.2%}{m['b1_p50_ms_fp32']:>9.2f}{m['b1_p50_ms_int8-cpu']:>9.2f}"
              f"{m['b1_ratio_to_reference_fp32_fp32']['paired']:>11.2f}"
              f"{m['b1_ratio_to_reference_fp32_int8-cpu']['paired']:>11.2f}"
              f"{m['b1_ratio_int8_to_own_fp32']['paired']:>11.2f}")
    print(f"saved {args.results}")


if __name__ == "__main__":
    main()
