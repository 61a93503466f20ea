"""How well a bundle's scores match how often they are right, on labelled images (a test split).

For every artifact runnable here: accuracy, and the ECE and NLL of its plain softmax and of its
softmax with the temperature export fitted on the validation split (``output.temperature``),
plus a reliability diagram. The temperature was chosen on validation only; these images just
measure it.

    python benchmarks/score_calibration.py --bundle demo/bundle --data demo/data/test
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from edge_tl.runtime import Bundle
from edge_tl.runtime.check import infer_all, labelled_images
from edge_tl.runtime.predictor import make_runner, runnable
from edge_tl.runtime.scores import BINS, ece, nll, softmax

RESULTS = Path(__file__).parent / "results"


def reliability(probs: np.ndarray, labels: np.ndarray, bins: int = BINS) -> list[dict]:
    """Per score bin: images, mean top-1 score, accuracy."""
    score, right = probs.max(1), probs.argmax(1) == labels
    which = np.minimum((score * bins).astype(int), bins - 1)
    return [{"bin": [b / bins, (b + 1) / bins], "images": int((which == b).sum()),
             "mean_score": float(score[which == b].mean()), "accuracy": float(right[which == b].mean())}
            for b in range(bins) if (which == b).any()]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bundle", type=Path, required=True)
    ap.add_argument("--data", type=Path, required=True, help="labelled images DIR/<class>/* (e.g. a test split)")
    ap.add_argument("--results", type=Path, default=RESULTS / "score_calibration.json")
    args = ap.parse_args()

    bundle = Bundle.load(args.bundle)
    t = bundle.temperature
    pixels, labels, _, skipped = labelled_images(args.data, bundle.classes, bundle.spec)
    out = {"bundle": str(args.bundle.resolve()), "data": str(args.data), "images": int(len(labels)),
           "unreadable": len(skipped), "temperature": t, "fit": bundle.manifest.get("scores"), "artifacts": {}}
    for art in bundle.artifacts:
        if art["format"] == "engine" or not runnable(art, "onnxruntime"):
            continue
        with make_runner(bundle, art, "onnxruntime", "cpu") as runner:
            logits = infer_all(runner, pixels)
        row = {"accuracy": float((logits.argmax(1) == labels).mean()),
               "ece": [ece(softmax(logits), labels), ece(softmax(logits, t), labels)],
               "nll": [nll(logits, labels), nll(logits, labels, t)],
               "reliability": [reliability(softmax(logits), labels), reliability(softmax(logits, t), labels)]}
        out["artifacts"][art["name"]] = row
        print(f"{art['name']:>10}: accuracy {row['accuracy']:.4f}  ECE {row['ece'][0]:.4f} -> {row['ece'][1]:.4f}  "
              f"NLL {row['nll'][0]:.4f} -> {row['nll'][1]:.4f}  (T = 1 -> {t})")
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps(out, indent=2) + "\n")
    _plot(out, args.results.with_suffix(".png"))
    print(f"saved {args.results} and {args.results.with_suffix('.png')}")


def _plot(out: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(out["artifacts"])
    fig, axes = plt.subplots(1, len(names), figsize=(4.2 * len(names), 4), squeeze=False)
    for ax, name in zip(axes[0], names):
        row = out["artifacts"][name]
        ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls="--")
        for bins, label in zip(row["reliability"], (f"T = 1 (ECE {row['ece'][0]:.3f})",
                                                    f"T = {out['temperature']} (ECE {row['ece'][1]:.3f})")):
            ax.plot([b["mean_score"] for b in bins], [b["accuracy"] for b in bins], marker="o", label=label)
        ax.set(title=f"{name}, {out['images']} images", xlabel="top-1 score", ylabel="accuracy", xlim=(0, 1), ylim=(0, 1))
        ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
