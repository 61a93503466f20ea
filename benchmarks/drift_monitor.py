"""How often the field monitor raises drift: on windows of test images as they are (false alarms),
and on the same images changed as a camera, light or product change would (brightness, contrast,
gamma, blur, noise, rotation, inversion), and on images of something else (skimage's photos).

The reference is the bundle's own (its validation split, stored at export); the windows come from
the test split, which the reference never saw. Nothing is tuned here: the false-alarm level is the
monitor's default (``FALSE_ALARM``, 0.001 per statistic).

    python benchmarks/drift_monitor.py --bundle BUNDLE --data ELPV [--window 50] [--windows 300]

``--calibration`` adds a check of the ranges themselves, with no image: references of 100, 200 (if
fewer than it holds) and all of the bundle's reference images drawn from it, and windows drawn from it too, so every window
is "like the reference" by construction; the share called unusual per statistic should be near the
asked 0.1 %.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance, ImageFilter

from edge_tl.fileio import write_json
from edge_tl.runtime import Predictor
from edge_tl.runtime.images import expand_images
from edge_tl.runtime.monitor import FALSE_ALARM, FieldMonitor, reference_of

ROOT = Path(__file__).resolve().parent


def _noise(im: Image.Image, sd: float) -> Image.Image:
    a = np.asarray(im, np.float32) + np.random.default_rng(1).normal(0, sd, (im.size[1], im.size[0], 1))
    return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))


DRIFTS = {
    "none (test images as they are)": lambda im: im,
    "brighter x1.5": lambda im: ImageEnhance.Brightness(im).enhance(1.5),
    "darker x0.7": lambda im: ImageEnhance.Brightness(im).enhance(0.7),
    "contrast x0.5": lambda im: ImageEnhance.Contrast(im).enhance(0.5),
    "contrast x1.5": lambda im: ImageEnhance.Contrast(im).enhance(1.5),
    "gamma 1.5": lambda im: Image.fromarray((255 * (np.asarray(im, np.float32) / 255) ** 1.5).round().astype(np.uint8)),
    "blur radius 2": lambda im: im.filter(ImageFilter.GaussianBlur(2)),
    "noise sd 15": lambda im: _noise(im, 15),
    "turned 90 degrees": lambda im: im.transpose(Image.Transpose.ROTATE_90),
    "turned 10 degrees": lambda im: im.rotate(10, resample=Image.Resampling.BICUBIC),
    "inverted": lambda im: Image.fromarray(255 - np.asarray(im)),
}
PHOTOS = ("camera", "astronaut", "coffee", "chelsea", "rocket", "coins", "moon", "page", "text", "brick", "grass",
          "gravel", "clock", "hubble_deep_field", "immunohistochemistry", "retina", "horse",
          "cell", "logo", "colorwheel")


def other_images(size: int = 300) -> list[Image.Image]:
    """skimage's bundled photos (no download), each whole and as grey crops of ``size`` px: not solar cells."""
    import skimage.data

    out = []
    for name in PHOTOS:
        a = getattr(skimage.data, name)()
        a = a.astype(np.uint8) * 255 if a.dtype == bool else a
        im = Image.fromarray(a[..., :3] if a.ndim == 3 else a).convert("RGB")
        out.append(im)
        grey = im.convert("L")
        for x in range(0, grey.size[0] - size + 1, size):
            for y in range(0, grey.size[1] - size + 1, size):
                out.append(grey.crop((x, y, x + size, y + size)).convert("RGB"))
    return out


def alarm_rates(monitor: FieldMonitor, predictions: list, windows: int, rng: np.random.Generator) -> dict:
    """Share of ``windows`` windows (the monitor's size, predictions drawn without replacement) that
    ``monitor`` calls drift, in all and per statistic."""
    window, hits = monitor.window, {"any": 0}
    for _ in range(windows):
        for i in rng.choice(len(predictions), window, replace=False):
            monitor.add(predictions[i])  # the window slides: these are its only predictions
        report = monitor.report()
        hits["any"] += report["drift"]
        for k, s in report["statistics"].items():
            hits[k] = hits.get(k, 0) + s["unusual"]
    return {k: round(v / windows, 3) for k, v in hits.items()}


def range_calibration(reference: dict, classes: list[str], window: int, references: int = 300,
                      windows: int = 200) -> dict:
    """Per reference size: the share of windows called unusual per statistic, where references (of that
    many images) and windows are both drawn from ``reference``'s images with replacement."""
    keys = ("predicted", "score", "brightness", "contrast")
    pool = np.array([reference[k] for k in keys], np.float64).T
    rng, out = np.random.default_rng(123), {}
    for size in sorted({100, len(pool)} | ({200} if len(pool) > 200 else set())):
        hits = dict.fromkeys(("class_mix", "low_scores", "brightness", "contrast"), 0)
        for _ in range(references):
            drawn = pool[rng.integers(0, len(pool), size)]
            monitor = FieldMonitor({k: (drawn[:, i].astype(int) if i == 0 else drawn[:, i]).tolist()
                                    for i, k in enumerate(keys)}, classes, window)
            for _ in range(windows):
                for row in pool[rng.integers(0, len(pool), window)]:
                    monitor.add({"index": int(row[0]), "score": row[1], "brightness": row[2], "contrast": row[3]})
                for k, stat in monitor.report()["statistics"].items():
                    hits[k] += stat["unusual"]
        out[size] = {k: round(v / (references * windows), 4) for k, v in hits.items()}
        print(f"reference of {size}: unusual per statistic {out[size]} (asked {FALSE_ALARM})")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", type=Path, required=True, help="A bundle exported with a validation reference.")
    ap.add_argument("--data", type=Path, required=True, help="ImageFolder with a test/ split (ELPV: edge-tl data elpv).")
    ap.add_argument("--window", type=int, default=50, help="Predictions per window.")
    ap.add_argument("--windows", type=int, default=300, help="Windows drawn per set.")
    ap.add_argument("--calibration", action="store_true", help="Also check the ranges on windows drawn from the "
                    "reference itself (no images; ~2 min).")
    ap.add_argument("--field-reference", action="store_true", help="Take the reference from every other test image "
                    "(as `edge-tl drift --reference` would from images known to be good) and draw the windows from "
                    "the rest, instead of the bundle's validation reference.")
    ap.add_argument("--results", type=Path, default=ROOT / "results" / "drift_monitor.json")
    args = ap.parse_args()

    rng = np.random.default_rng(0)
    files = expand_images([args.data / "test"])
    originals = [Image.open(f).convert("RGB") for f in files]
    good = originals[::2] if args.field_reference else []
    originals = originals[1::2] if args.field_reference else originals
    sets = {name: [change(im) for im in originals] for name, change in DRIFTS.items()}
    sets["other images (skimage photos and grey crops)"] = other_images()
    rows = {}
    with Predictor.from_bundle(args.bundle, device="cpu") as p:
        def predict(images: list) -> list:
            return [q for i in range(0, len(images), 32) for q in p.predict_batch(images[i:i + 32], topk=1)]

        reference = reference_of(predict(good), len(p.classes)) if good else p.bundle.manifest["reference"]
        print(f"{p.describe()}; reference: {reference['images']} "
              + ("test images (every other one)" if good else "validation images"))
        for name, images in sets.items():
            t0 = time.perf_counter()
            predictions = predict(images)
            whole = FieldMonitor(reference, p.classes, len(predictions))
            for q in predictions:
                whole.add(q)
            report = whole.report()
            rows[name] = {"images": len(predictions), "whole_set_drift": report["drift"],
                          "whole_set": {k: s["value"] for k, s in report["statistics"].items()},
                          "windows": alarm_rates(FieldMonitor(reference, p.classes, args.window), predictions,
                                                 args.windows, rng)}
            w = rows[name]["windows"]
            print(f"{name:<46} {len(predictions):4d} images  windows of {args.window} called drift {w['any']:6.1%} "
                  f"(mix {w['class_mix']:.0%}, low scores {w['low_scores']:.0%}, brightness {w['brightness']:.0%}, "
                  f"contrast {w['contrast']:.0%}); all {len(predictions)} together: "
                  f"{'drift' if report['drift'] else 'no drift'}   ({time.perf_counter() - t0:.0f} s)")
    calibration = range_calibration(reference, p.classes, args.window) if args.calibration else None
    write_json(args.results, {"bundle": str(args.bundle), "data": str(args.data), "window": args.window,
                              "reference": reference.get("source", "validation split") + f", {reference['images']} images",
                              "windows": args.windows, "false_alarm": FALSE_ALARM, "artifact": p.artifact["name"],
                              "sets": rows, "range_calibration": calibration})
    print(f"saved {args.results}")


if __name__ == "__main__":
    main()
