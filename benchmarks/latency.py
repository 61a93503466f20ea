"""CPU latency side by side in one process, with the physical limit beside it.

    python benchmarks/latency.py --run RUN --bundles DIR [--iters 100]

DIR holds the bundles written by benchmarks/export_elpv.py (DIR/cpu, DIR/gpu). Times PyTorch
eager (NCHW and channels_last), ONNX Runtime FP32 and each INT8 flavour at batch 1 and 32,
and prints the limit: model FLOPs (counted from the ONNX graph) / this CPU's measured dense
GEMM rate (fp32 MatMul, and u8×s8 MatMulInteger for int8) on ONNX Runtime with all threads.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper, shape_inference

from edge_tl.export.onnx_export import PixelInput
from edge_tl.fileio import write_json
from edge_tl.finetune.train import load_model
from edge_tl.runtime.bench import machine, stats, time_calls
from edge_tl.runtime.runners import OnnxRuntimeRunner

ROOT = Path(__file__).resolve().parent


def model_flops(path: Path) -> float:
    """Multiply-add FLOPs (2 per MAC) per image of Conv, Gemm and MatMul nodes, batch 1."""
    model = onnx.load(str(path))
    dim = model.graph.input[0].type.tensor_type.shape.dim[0]
    dim.ClearField("dim_param")
    dim.dim_value = 1
    model = shape_inference.infer_shapes(model)
    shapes = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim]
              for v in list(model.graph.value_info) + list(model.graph.input) + list(model.graph.output)}
    inits = {t.name: list(t.dims) for t in model.graph.initializer}
    flops = 0.0
    for n in model.graph.node:
        if n.op_type == "Conv":
            w = inits[n.input[1]]  # Cout, Cin/groups, kh, kw
            out = shapes[n.output[0]]
            flops += 2.0 * np.prod(out[1:]) * np.prod(w[1:])
        elif n.op_type in ("Gemm", "MatMul"):
            w = inits.get(n.input[1]) or shapes[n.input[1]]
            flops += 2.0 * np.prod(w)
    return flops


def gemm_rate(int8: bool, n: int = 2048, reps: int = 5) -> float:
    """Dense GEMM FLOP/s (2·n³ per product) on ONNX Runtime CPU, fp32 MatMul or u8×s8 MatMulInteger."""
    if int8:
        node = helper.make_node("MatMulInteger", ["a", "b"], ["y"])
        types, a, b = (TensorProto.UINT8, TensorProto.INT8), np.random.randint(0, 255, (n, n), np.uint8), None
        b = numpy_helper.from_array(np.random.randint(-127, 127, (n, n), np.int8), "b")
        out = TensorProto.INT32
    else:
        node = helper.make_node("MatMul", ["a", "b"], ["y"])
        types, a = (TensorProto.FLOAT, TensorProto.FLOAT), np.random.rand(n, n).astype(np.float32)
        b = numpy_helper.from_array(np.random.rand(n, n).astype(np.float32), "b")
        out = TensorProto.FLOAT
    graph = helper.make_graph([node], "gemm", [helper.make_tensor_value_info("a", types[0], [n, n])],
                              [helper.make_tensor_value_info("y", out, [n, n])], [b])
    import onnxruntime as ort

    sess = ort.InferenceSession(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString(),
                                providers=["CPUExecutionProvider"])
    sess.run(None, {"a": a})
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        sess.run(None, {"a": a})
        best = min(best, time.perf_counter() - t0)
    return 2.0 * n ** 3 / best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", type=Path, required=True)
    ap.add_argument("--bundles", type=Path, required=True)
    ap.add_argument("--iters", type=int, default=100)
    ap.add_argument("--results", type=Path, default=ROOT / "results" / "latency.json")
    args = ap.parse_args()

    files = {"ort-fp32": args.bundles / "cpu" / "model.fp32.onnx",
             "ort-int8-cpu": args.bundles / "cpu" / "model.int8-cpu.onnx",
             "ort-int8-tensorrt-flavour": args.bundles / "gpu" / "model.int8.onnx"}
    model, ckpt = load_model(args.run / "best.pt")
    from edge_tl.runtime.spec import PreprocessSpec

    spec = PreprocessSpec.from_dict(ckpt["preprocess"])
    eager = PixelInput(model, spec).eval()
    eager_cl = PixelInput(load_model(args.run / "best.pt")[0], spec).eval().to(memory_format=torch.channels_last)
    runners = {k: OnnxRuntimeRunner(f, "cpu").activate() for k, f in files.items()}
    flops = model_flops(files["ort-fp32"])
    peak = {"fp32": gemm_rate(False), "int8": gemm_rate(True)}
    rows = []
    for batch in (1, 32):
        x = np.random.default_rng(0).integers(0, 256, (batch, 3, *spec.input_size)).astype(np.float32)
        xt, xcl = torch.from_numpy(x), torch.from_numpy(x).contiguous(memory_format=torch.channels_last)
        cases = {"torch-eager": lambda: eager(xt), "torch-eager-channels-last": lambda: eager_cl(xcl),
                 **{k: (lambda r=r: r.infer(x)) for k, r in runners.items()}}
        with torch.inference_mode():
            for name, fn in cases.items():
                n = args.iters if name.startswith("ort") else max(10, args.iters // 4)
                rows.append({"case": name, "batch": batch, **stats(time_calls(fn, 5, n, None), batch)})
    limit = {k: 1000.0 * flops / v for k, v in peak.items()}  # ms per image at the GEMM rate
    result = {"benchmark": "latency", "model_gflops_per_image": flops / 1e9,
              "gemm_gflops": {k: v / 1e9 for k, v in peak.items()}, "limit_ms_per_image": limit,
              "rows": rows, "machine": machine(), "torch_threads": torch.get_num_threads()}
    fp32 = {r["batch"]: r["p50_ms"] for r in rows if r["case"] == "ort-fp32"}
    print(f"model {flops / 1e9:.3f} GFLOP/image; dense GEMM fp32 {peak['fp32'] / 1e9:.0f} GFLOP/s, "
          f"int8 {peak['int8'] / 1e9:.0f} GOP/s -> limit {limit['fp32']:.2f} ms (fp32), {limit['int8']:.2f} ms (int8) per image")
    print(f"{'case':<28}{'batch':>6}{'p50 ms':>10}{'ms/img':>9}{'x ORT fp32':>11}{'x limit':>9}")
    for r in rows:
        per_img = r["p50_ms"] / r["batch"]
        lim = limit["int8" if "int8" in r["case"] else "fp32"]
        r["ratio_to_ort_fp32"] = r["p50_ms"] / fp32[r["batch"]]
        r["ratio_to_limit"] = per_img / lim
        print(f"{r['case']:<28}{r['batch']:>6}{r['p50_ms']:>10.2f}{per_img:>9.2f}{r['ratio_to_ort_fp32']:>11.2f}"
              f"{r['ratio_to_limit']:>9.2f}")
    write_json(args.results, result)
    print(f"saved {args.results}")
    print(json.dumps({"int8_cpu_ratio": {b: next(r["ratio_to_ort_fp32"] for r in rows if r["case"] == "ort-int8-cpu"
                                               and r["batch"] == b) for b in (1, 32)}}))


if __name__ == "__main__":
    main()
