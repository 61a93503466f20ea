"""Camera-sized JPEGs decoded at a reduced DCT scale vs at full size: time, pixels, predictions.

    python benchmarks/jpeg_draft.py --bundle BUNDLE --data TEST_DIR [--shorter 3000] [--limit N]

Phone and camera photos are 9-12 megapixels; the model sees 224 px. The preprocessing spec's
``jpeg_reducing_gap`` (default 2) has libjpeg decode such a JPEG at 1/2, 1/4 or 1/8 scale, keeping
its shorter side at least twice the resize size, before the usual resize and crop. This measures
what that costs and gains, in one process:

* ``data``: each image of --data (an ImageFolder with the bundle's classes; real images) written as
  a JPEG (quality 92) upscaled with Lanczos so its shorter side is --shorter, plus Gaussian noise
  of sigma 3 grey levels (a sensor's; an upscaled image alone is smoother than a photo and decodes
  faster). Each is decoded and preprocessed both ways, interleaved (the order alternating image by
  image), timed, its pixels compared, and both classified by the bundle's FP32 ONNX model (ONNX
  Runtime CPU): top-1 agreement, accuracy each way, the largest change of a softmax score.
* ``photos``: scikit-image's colour photos (coffee, chelsea, astronaut, rocket, Hubble deep field,
  retina, immunohistochemistry) at 4032 x 3024 (a 12-megapixel phone photo), the same noise: time and
  pixels only (no labels).

The bundle's own spec is used with the reducing gap set to --gap (bundles exported before the gap
existed record none and decode at full size). Prints and saves results/jpeg_draft.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import tempfile
import time
from itertools import zip_longest
from pathlib import Path

import numpy as np
import skimage.data
from PIL import Image

from edge_tl.fileio import write_json
from edge_tl.runtime import Predictor
from edge_tl.runtime.bench import machine
from edge_tl.runtime.images import image_files
from edge_tl.runtime.scores import softmax

ROOT = Path(__file__).resolve().parent
PHOTOS = ("coffee", "chelsea", "astronaut", "rocket", "hubble_deep_field", "retina", "immunohistochemistry")


def camera_jpeg(img: Image.Image, size: tuple[int, int], path: Path, rng: np.random.Generator) -> Path:
    """``img`` resized (Lanczos) to ``size`` with sigma-3 noise, saved as a quality-92 JPEG."""
    big = np.asarray(img.convert("RGB").resize(size, Image.Resampling.LANCZOS), np.int16)
    noisy = big + rng.normal(0, 3, big.shape).astype(np.int16)
    Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)).save(path, quality=92)
    return path


def both_ways(path: Path, full_spec, reduced_spec, reduced_first: bool) -> dict:
    """Pixels and seconds of ``path`` decoded + preprocessed at full size and at the reduced scale."""
    out = {}
    for name, spec in ((("reduced", reduced_spec), ("full", full_spec)) if reduced_first
                       else (("full", full_spec), ("reduced", reduced_spec))):
        t0 = time.perf_counter()
        out[name] = spec.to_pixels(spec.load(path))
        out[f"{name}_s"] = time.perf_counter() - t0
    return out


def summary(rows: list[dict]) -> dict:
    full, reduced = sum(r["full_s"] for r in rows), sum(r["reduced_s"] for r in rows)
    diffs = [np.abs(r["full"].astype(np.int16) - r["reduced"]) for r in rows]
    return {"images": len(rows), "full_ms_per_image": 1e3 * full / len(rows),
            "reduced_ms_per_image": 1e3 * reduced / len(rows), "ratio_reduced_to_full": reduced / full,
            "median_image_ratio": statistics.median(r["reduced_s"] / r["full_s"] for r in rows),
            "pixel_diff_mean": float(np.mean([d.mean() for d in diffs])),
            "pixel_diff_p99": float(np.percentile(np.concatenate([d.ravel() for d in diffs]), 99)),
            "pixel_diff_max": int(max(d.max() for d in diffs))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", type=Path, required=True)
    ap.add_argument("--data", type=Path, required=True, help="labelled ImageFolder with the bundle's classes")
    ap.add_argument("--shorter", type=int, default=3000, help="shorter side of the camera-sized JPEGs (px)")
    ap.add_argument("--gap", type=float, default=2.0, help="jpeg_reducing_gap of the reduced decode")
    ap.add_argument("--limit", type=int, default=None, help="at most this many images of --data (classes in turn)")
    ap.add_argument("--results", type=Path, default=ROOT / "results" / "jpeg_draft.json")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    with Predictor.from_bundle(args.bundle, backend="onnxruntime", precision="fp32", device="cpu", threads=1) as p:
        reduced_spec = dataclasses.replace(p.spec, jpeg_reducing_gap=args.gap)
        full_spec = dataclasses.replace(p.spec, jpeg_reducing_gap=None)
        per_class = [[(f, p.classes.index(d.name)) for f in image_files(d)] for d in sorted(args.data.iterdir())
                     if d.is_dir()]
        files = [x for group in zip_longest(*per_class) for x in group if x is not None][:args.limit]  # round-robin
        result = {"benchmark": "jpeg_draft", "machine": machine(), "bundle": str(args.bundle), "data": str(args.data),
                  "shorter": args.shorter, "gap": args.gap, "min_shorter": reduced_spec.jpeg_min_shorter}
        with tempfile.TemporaryDirectory() as tmp:
            rows, labels, originals = [], [], []
            for k, (f, y) in enumerate(files):
                img = Image.open(f)
                scale = args.shorter / min(img.size)
                size = (round(img.width * scale), round(img.height * scale))
                big = camera_jpeg(img, size, Path(tmp) / f"{k}.jpg", rng)
                rows.append(both_ways(big, full_spec, reduced_spec, reduced_first=k % 2 == 1))
                originals.append(full_spec.to_pixels(full_spec.load(f)))
                labels.append(y)
                if k % 100 == 0:
                    print(f"  {k + 1}/{len(files)}", flush=True)
            labels = np.asarray(labels)
            logits = {name: np.concatenate([p.infer(np.stack([r[name] for r in rows[i:i + 32]]))
                                            for i in range(0, len(rows), 32)]) for name in ("full", "reduced")}
            original = np.concatenate([p.infer(np.stack(originals[i:i + 32])) for i in range(0, len(rows), 32)])
            top = {name: v.argmax(1) for name, v in logits.items()}
            result["data_group"] = {**summary(rows), "size_example": list(size),
                                    "accuracy_original_files": float((original.argmax(1) == labels).mean()),
                                    "accuracy_full": float((top["full"] == labels).mean()),
                                    "accuracy_reduced": float((top["reduced"] == labels).mean()),
                                    "top1_agreement": float((top["full"] == top["reduced"]).mean()),
                                    "disagreements": int((top["full"] != top["reduced"]).sum()),
                                    "max_score_change": float(np.abs(softmax(logits["full"]) -
                                                                     softmax(logits["reduced"])).max())}
            photo_rows = []
            for k, name in enumerate(PHOTOS):
                big = camera_jpeg(Image.fromarray(getattr(skimage.data, name)()), (4032, 3024), Path(tmp) / f"{name}.jpg", rng)
                for rep in range(3):
                    photo_rows.append(both_ways(big, full_spec, reduced_spec, reduced_first=(k + rep) % 2 == 1))
            result["photos_group"] = {**summary(photo_rows), "photos": list(PHOTOS), "size": [4032, 3024], "repeats": 3}
    for group in ("data_group", "photos_group"):
        g = result[group]
        print(f"{group}: {g['images']} images, full {g['full_ms_per_image']:.1f} ms vs reduced "
              f"{g['reduced_ms_per_image']:.1f} ms per image ({g['ratio_reduced_to_full']:.2f}x); pixels differ by "
              f"{g['pixel_diff_mean']:.2f} grey levels on average (p99 {g['pixel_diff_p99']:.0f}, max {g['pixel_diff_max']})")
    g = result["data_group"]
    print(f"accuracy: original files {g['accuracy_original_files']:.4f}, camera-sized full {g['accuracy_full']:.4f}, "
          f"reduced {g['accuracy_reduced']:.4f}; top-1 agreement {g['top1_agreement']:.4f} "
          f"({g['disagreements']} differ); largest score change {g['max_score_change']:.4f}")
    write_json(args.results, result)


if __name__ == "__main__":
    main()
