"""How far finished ELPV fine-tunes can go together: ensembles, an any-run-right oracle and an
ordinal decision rule, from runs already trained (issue 6's >= 85 % 4-class target).

    python benchmarks/elpv_ceiling.py --data ELPV_DIR --runs RUN [RUN ...] [--results FILE]

Each run's best.pt predicts the validation split it was selected on and the test split, with
its own preprocessing (runs of different backbones and sizes mix). Reported, each on test with
every choice made on validation:
- each run alone, and the mean of the softmax of all runs (an ensemble of every recipe tried);
- the oracle: images at least one run gets right, and images every run gets right — errors
  that no run fixes are beyond any ensemble or distillation of these runs;
- an ordinal rule: ELPV's classes are defect probabilities (p000, p033, p067, p100), so the
  expected probability under the softmax, cut at three thresholds fitted on validation, tests
  whether the rare middle classes are recoverable as "in between".
ELPV images: CC BY-NC-SA 4.0 (see the dataset's LICENSE.txt).
"""

from __future__ import annotations

import argparse
import itertools
from pathlib import Path

import numpy as np

from edge_tl.fileio import write_json
from finetune_elpv import binary_accuracy, val_test_logits

ROOT = Path(__file__).resolve().parent


def softmax(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits - logits.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def fit_ordinal_thresholds(expected: np.ndarray, labels: np.ndarray, grid: np.ndarray) -> tuple[float, ...]:
    """The three increasing cuts on the expected defect probability that classify best."""
    best, cuts = -1.0, ()
    for t in itertools.combinations(grid, 3):
        acc = float((np.digitize(expected, t) == labels).mean())
        if acc > best:
            best, cuts = acc, t
    return tuple(round(float(c), 4) for c in cuts)


def scores(probs: dict, labels: dict, classes: list[str]) -> dict:
    """4-class and binary accuracy of the argmax on val and test, and per-class test recall."""
    out = {}
    for split in ("val", "test"):
        pred = probs[split].argmax(1)
        out[f"{split}_4class"] = float((pred == labels[split]).mean())
        out[f"{split}_binary"] = binary_accuracy(pred.tolist(), labels[split].tolist(), classes)
    pred = probs["test"].argmax(1)
    out["test_recall"] = {c: float((pred[labels["test"] == i] == i).mean()) for i, c in enumerate(classes)}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, required=True, help="ELPV folder (train/ and test/) the runs were trained on")
    ap.add_argument("--runs", type=Path, nargs="+", required=True, help="run folders with best.pt")
    ap.add_argument("--results", type=Path, default=ROOT / "results" / "elpv_ceiling.json")
    args = ap.parse_args()

    runs = {str(r): val_test_logits(r, args.data) for r in args.runs}
    first = next(iter(runs.values()))
    classes, labels, paths = first["classes"], first["labels"], first["paths"]
    for name, r in runs.items():
        if r["classes"] != classes or r["paths"] != paths:
            raise SystemExit(f"{name}: other classes or another validation split than {args.runs[0]}; "
                             "compare runs of one data folder, --val-fraction and --split-seed.")
        recomputed = float((r["logits"]["val"].argmax(1) == labels["val"]).mean())
        if abs(recomputed - r["checkpoint_val_accuracy"]) > 2.5 / len(labels["val"]):  # bf16 eval in training may flip one or two
            raise SystemExit(f"{name}: validation accuracy {recomputed:.4f} here, {r['checkpoint_val_accuracy']:.4f} in "
                             f"best.pt: was it trained on {args.data}?")
    probs = {name: {s: softmax(r["logits"][s]) for s in labels} for name, r in runs.items()}
    result = {"data": str(args.data), "classes": classes, "val_images": len(labels["val"]),
              "test_images": len(labels["test"]), "runs": {n: scores(p, labels, classes) for n, p in probs.items()}}
    mean = {s: np.mean([p[s] for p in probs.values()], axis=0) for s in labels}
    result["ensemble_all"] = scores(mean, labels, classes)

    right = np.stack([p["test"].argmax(1) == labels["test"] for p in probs.values()])
    result["oracle_test"] = {"any_run_right": float(right.any(0).mean()), "every_run_right": float(right.all(0).mean()),
                             "no_run_right_per_class": {c: int((~right.any(0))[labels["test"] == i].sum())
                                                        for i, c in enumerate(classes)}}

    values = np.array([int(c[1:]) / 100 for c in classes])  # p000 .. p100 -> defect probability
    cuts = fit_ordinal_thresholds(mean["val"] @ values, labels["val"], np.linspace(0.02, 0.98, 49))
    result["ordinal_ensemble_all"] = {"thresholds": cuts, **{
        f"{s}_4class": float((np.digitize(mean[s] @ values, cuts) == labels[s]).mean()) for s in labels}}
    write_json(args.results, result)

    print(f"{'run':<40}{'val':>8}{'test':>8}{'binary':>8}")
    for name, r in [*result["runs"].items(), ("ensemble of all", result["ensemble_all"])]:
        print(f"{name:<40}{r['val_4class']:>8.3f}{r['test_4class']:>8.3f}{r['test_binary']:>8.3f}")
    o, d = result["oracle_test"], result["ordinal_ensemble_all"]
    print(f"test images some run gets right {o['any_run_right']:.3f}, every run {o['every_run_right']:.3f}; "
          f"none per class {o['no_run_right_per_class']}")
    print(f"ordinal rule on the ensemble (cuts {np.round(d['thresholds'], 2).tolist()} fitted on val): "
          f"val {d['val_4class']:.3f}, test {d['test_4class']:.3f}")
    print(f"saved {args.results}")


if __name__ == "__main__":
    main()
