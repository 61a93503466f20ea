"""The runtime's own cost: ``Predictor.predict`` end to end vs raw ``infer`` on CPU at batch 1.

    python benchmarks/runtime_overhead.py --bundle BUNDLE --images DIR [--iters 300]

Times, interleaved in one process on the same images: ``infer`` on preprocessed pixels
(the model alone), ``predict`` on an in-memory RGB image (resize + crop + layout + softmax
+ top-k around the same inference), and ``predict`` on a file path (adds decoding). Target
(issue 4): predict(image) - infer <= 30 % of infer. Prints and saves JSON.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from edge_tl.fileio import write_json
from edge_tl.runtime import Predictor
from edge_tl.runtime.bench import machine
from edge_tl.runtime.images import IMAGE_EXTENSIONS

ROOT = Path(__file__).resolve().parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", type=Path, required=True)
    ap.add_argument("--images", type=Path, required=True)
    ap.add_argument("--precision", default=None)
    ap.add_argument("--iters", type=int, default=300)
    ap.add_argument("--results", type=Path, default=ROOT / "results" / "runtime_overhead.json")
    args = ap.parse_args()
    paths = sorted(p for p in args.images.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)[:32]
    result = {"benchmark": "runtime_overhead", "machine": machine(), "cases": []}
    precisions = [args.precision] if args.precision else ["fp32", "int8"]
    for precision in precisions:
        with Predictor.from_bundle(args.bundle, precision=precision, device="cpu") as p:
            images = [p.spec.load(f) for f in paths]  # as predict(path) decodes them
            pixels = [p.preprocess(im)[None] for im in images]
            cases = {"infer": lambda i: p.infer(pixels[i]), "predict_image": lambda i: p.predict(images[i]),
                     "predict_path": lambda i: p.predict(paths[i])}
            times = {k: [] for k in cases}
            for i in range(20):  # warm-up
                for fn in cases.values():
                    fn(i % len(paths))
            for i in range(args.iters):  # interleaved so drift hits all three alike
                for k, fn in cases.items():
                    t0 = time.perf_counter()
                    fn(i % len(paths))
                    times[k].append((time.perf_counter() - t0) * 1000)
            med = {k: float(np.median(v)) for k, v in times.items()}
            case = {"artifact": p.artifact["name"], "runner": p.runner.describe(), **{f"{k}_p50_ms": v for k, v in med.items()},
                    "overhead_pct_of_infer": 100 * (med["predict_image"] - med["infer"]) / med["infer"],
                    "overhead_with_decode_pct": 100 * (med["predict_path"] - med["infer"]) / med["infer"]}
            result["cases"].append(case)
            print(json.dumps(case, indent=2))
    write_json(args.results, result)
    print(f"saved {args.results}")


if __name__ == "__main__":
    main()
