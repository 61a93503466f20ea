"""CPU INT8 under ONNX Runtime's OpenVINO execution provider vs its default CPU provider (issue 6).

    make openvino-env            # .venv-openvino: onnxruntime-openvino + the torch-free runtime
    .venv-openvino/bin/python benchmarks/int8_openvino.py --bundle BUNDLE --data ELPV_DIR [--blocks 30] [--iters 10]
        [--extra-int8 NAME=PATH ...]

BUNDLE is a --target cpu bundle (model.fp32.onnx and model.int8-cpu.onnx); ELPV_DIR is made
by `edge-tl data elpv` (its test/ split gives the accuracy figures; images CC BY-NC-SA 4.0).
The same two ONNX files run on both providers, through the runtime's own runner (OpenVINO:
latency hint, one session compiled per static batch size). Latency is measured in short
interleaved blocks (every model × provider once per block: 0.25 s of untimed calls, so the
previous session's spinning threads are gone, then ``--iters`` timed calls at batch 1, one at
batch 32). Two ratios come of them: ``pooled`` = p50 of all of one model's calls over
p50 of all of the other's; ``paired`` = median over blocks of the ratio of the two models'
medians within the block — a neighbour's burst of load on this shared host slows both sides
of a block's ratio alike, so the paired figure is the robust one. It still depends on the
host's state (benchmarks/README.md): each block's medians are saved, so a run's state can be
read off its JSON. Ratios are to ONNX
Runtime's CPU-provider FP32 (the baseline of every other CPU figure here) and to the faster
FP32 of the two providers at that batch. ``--extra-int8`` adds other INT8 files of the same
model (benchmarks/int8_nncf.py makes some), each timed on OpenVINO in the same blocks and
also paired with the bundle's INT8 there. Target (issue 6): INT8 <= 0.35x FP32 at batch 1 and 32,
accuracy drop <= 0.5 pt.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from edge_tl.fileio import write_json
from edge_tl.runtime.bench import interleaved_blocks, machine, paired_ratio, stats, time_calls
from edge_tl.runtime.bundle import Bundle
from edge_tl.runtime.check import labelled_images
from edge_tl.runtime.runners import OPENVINO, OnnxRuntimeRunner, import_onnxruntime

ROOT = Path(__file__).resolve().parent
MODELS = {"fp32": "model.fp32.onnx", "int8": "model.int8-cpu.onnx"}
PROVIDERS = {"cpu": "cpu", "openvino": "openvino"}


def int8_ratios(rows: dict, block_medians: dict, batch: str) -> dict:
    """Each provider's INT8 over CPU-provider FP32, over the faster FP32 and over its own: pooled and paired."""
    fp32 = {p: block_medians[(p, "fp32")] for p in PROVIDERS}
    # the faster FP32 is chosen on pooled p50s, then paired block by block like the others
    best = "cpu" if rows["cpu/fp32"][batch]["p50_ms"] <= rows["openvino/fp32"][batch]["p50_ms"] else "openvino"
    out = {}
    for p in PROVIDERS:
        int8 = block_medians[(p, "int8")]
        for name, ref in (("cpu_fp32", "cpu"), ("best_fp32", best), ("own_fp32", p)):
            out[f"{p}_int8_vs_{name}_{batch}"] = {
                "pooled": rows[f"{p}/int8"][batch]["p50_ms"] / rows[f"{ref}/fp32"][batch]["p50_ms"],
                **paired_ratio(int8, fp32[ref])}
    return out


def extra_int8(spec: str) -> tuple[str, Path]:
    name, sep, path = spec.partition("=")
    if not sep or not name or name in MODELS or not Path(path).is_file():
        raise argparse.ArgumentTypeError(f"{spec!r}: want NAME=PATH to an existing INT8 ONNX file, NAME not fp32/int8")
    return name, Path(path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", type=Path, required=True)
    ap.add_argument("--data", type=Path, required=True, help="ELPV folder with test/")
    ap.add_argument("--iters", type=int, default=10, help="calls per model per block at batch 1 (batch 32: one)")
    ap.add_argument("--blocks", type=int, default=30)
    ap.add_argument("--extra-int8", type=extra_int8, action="append", default=[], metavar="NAME=PATH",
                    help="another INT8 ONNX of the bundle's model to time on OpenVINO beside it (repeatable)")
    ap.add_argument("--results", type=Path, default=ROOT / "results" / "int8_openvino.json")
    args = ap.parse_args()
    if len({name for name, _ in args.extra_int8}) < len(args.extra_int8):
        ap.error("--extra-int8: each NAME once")
    if OPENVINO not in import_onnxruntime().get_available_providers():
        raise SystemExit("This ONNX Runtime has no OpenVINO provider: run it with .venv-openvino/bin/python "
                         "(`make openvino-env` makes it).")

    bundle = Bundle.load(args.bundle)
    pixels, labels, _, _ = labelled_images(args.data / "test", bundle.classes, bundle.spec)
    nchw = np.ascontiguousarray(pixels.transpose(0, 3, 1, 2), dtype=np.float32)
    runners = {(p, m): OnnxRuntimeRunner(args.bundle / f, device).activate()
               for p, device in PROVIDERS.items() for m, f in MODELS.items()}
    runners.update({("openvino", name): OnnxRuntimeRunner(path, "openvino").activate() for name, path in args.extra_int8})
    preds = {k: np.concatenate([r.infer(nchw[i:i + 32]) for i in range(0, len(nchw), 32)]).argmax(1)
             for k, r in runners.items()}
    reference = preds[("cpu", "fp32")]
    rows = {f"{p}/{m}": {"provider": runners[(p, m)].describe(),
                         "test_accuracy": float((pred == labels).mean()),
                         "agreement_with_cpu_fp32": float((pred == reference).mean())}
            for (p, m), pred in preds.items()}

    summary = {}
    for batch in (1, 32):
        x = nchw[np.arange(batch) % len(nchw)]
        for r in runners.values():  # compile OpenVINO's static-shape session before timing
            time_calls(lambda: r.infer(x), 3, 1, None)
        calls = {k: (lambda r=r: r.infer(x)) for k, r in runners.items()}
        times, block_medians = interleaved_blocks(calls, args.blocks, args.iters if batch == 1 else 1)
        for (p, m), t in times.items():
            rows[f"{p}/{m}"][f"b{batch}"] = dict(stats(t, batch), block_medians_ms=block_medians[(p, m)].tolist())
        summary.update(int8_ratios(rows, block_medians, f"b{batch}"))
        for name, _ in args.extra_int8:
            for ref in (("cpu", "fp32"), ("openvino", "int8")):
                summary[f"openvino_{name}_vs_{'_'.join(ref)}_b{batch}"] = {
                    "pooled": rows[f"openvino/{name}"][f"b{batch}"]["p50_ms"] / rows["/".join(ref)][f"b{batch}"]["p50_ms"],
                    **paired_ratio(block_medians[("openvino", name)], block_medians[ref])}
    for p in PROVIDERS:
        summary[f"{p}_int8_drop_pts"] = 100 * (rows[f"{p}/fp32"]["test_accuracy"] - rows[f"{p}/int8"]["test_accuracy"])
    for name, _ in args.extra_int8:
        summary[f"openvino_{name}_drop_pts"] = 100 * (rows["openvino/fp32"]["test_accuracy"]
                                                      - rows[f"openvino/{name}"]["test_accuracy"])
    result = {"benchmark": "int8_openvino", "bundle": str(args.bundle), "test_images": int(len(labels)),
              "blocks": args.blocks, "iters_b1": args.iters,
              "extra_int8": {name: str(path) for name, path in args.extra_int8}, "summary": summary, "rows": rows,
              "machine": machine()}
    write_json(args.results, result)

    width = max(18, *(len(name) + 2 for name in rows))
    print(f"{'provider/model':<{width}}{'test acc':>9}{'agree':>7}{'b1 p50 ms':>11}{'b32 p50 ms':>12}   runs on")
    for name, r in rows.items():
        print(f"{name:<{width}}{r['test_accuracy']:>9.4f}{r['agreement_with_cpu_fp32']:>7.3f}"
              f"{r['b1']['p50_ms']:>11.2f}{r['b32']['p50_ms']:>12.1f}   {r['provider']}")
    for key, r in summary.items():
        if isinstance(r, dict):
            print(f"{key:<{width + 24}} paired {r['paired']:.3f} (IQR {r['paired_iqr'][0]:.3f}-{r['paired_iqr'][1]:.3f})"
                  f"   pooled {r['pooled']:.3f}")
        else:
            print(f"{key:<{width + 24}} {r:+.2f}")
    print(f"saved {args.results}")


if __name__ == "__main__":
    main()
