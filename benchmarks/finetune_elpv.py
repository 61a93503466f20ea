"""ELPV 4-class fine-tune with the default recipe on this machine; test-split accuracy at the end.

    python benchmarks/finetune_elpv.py [--data ELPV_DIR] [--out runs/bench_elpv] [--set KEY=VALUE ...] [--results FILE]

--set overrides fields of the fine-tune's TrainConfig (e.g. --set seed=1 img_size=288).
--decode-at-each-use keeps no image in memory (as for a dataset larger than memory): each is
decoded again from its file at each use, by the default DataLoader workers.

Writes the ELPV demo split (75/25, stratified, seed 0) if missing, fine-tunes with the
defaults (model selection on the validation split carved from train), then evaluates
best.pt once on the test split: 4-class accuracy and accuracy collapsed to
functional (p < 0.5) / defective. Prints and saves benchmarks/results/finetune_elpv.json.
ELPV images: CC BY-NC-SA 4.0 (see the dataset's LICENSE.txt).
Published on the same data: fine-tuned VGG-19 88.42 % (Deitsch et al. 2019); a
lightweight CNN 83.5 % 4-class (2023).
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from edge_tl.fileio import write_json
from edge_tl.finetune import data as data_module
from edge_tl.finetune.data import _decode, _scan_classes, discover
from edge_tl.finetune.elpv import write_elpv
from edge_tl.finetune.train import TrainConfig, confusion_matrix, finetune, load_model, predict_logits
from edge_tl.runtime.spec import PreprocessSpec

ROOT = Path(__file__).resolve().parent


def val_test_logits(run: Path, data: Path, splits: tuple[str, ...] = ("val", "test")) -> dict:
    """Logits of ``run/best.pt`` (its own preprocessing) on the validation split it was selected
    on and/or on ``data/test``, with labels, image paths and class names."""
    model, ckpt = load_model(run / "best.pt")
    spec = PreprocessSpec.from_dict(ckpt["preprocess"])
    cfg = ckpt["config"]
    images = {}
    if "val" in splits:
        images["val"] = discover(data, spec, cfg["val_fraction"], cfg["split_seed"], progress=False).val
    if "test" in splits:
        images["test"] = _decode(_scan_classes(data / "test"), ckpt["classes"], spec, [], "decode test", True)
    return {"classes": ckpt["classes"], "checkpoint_val_accuracy": ckpt.get("val_accuracy"),
            "logits": {s: predict_logits(model, split, spec, torch.device("cpu")).numpy() for s, split in images.items()},
            "labels": {s: np.asarray(split.labels) for s, split in images.items()},
            "paths": {s: [str(p) for p in split.paths] for s, split in images.items()}}


def binary_accuracy(preds, labels, classes: list[str]) -> float:
    """Accuracy with ELPV's classes collapsed to functional (p < 0.5) / defective."""
    defective = [int(c[1:]) >= 50 for c in classes]
    return sum(defective[p] == defective[y] for p, y in zip(preds, labels)) / len(labels)


def test_accuracy(run: Path, data: Path) -> dict:
    """Accuracy of ``run/best.pt`` on ``data/test`` (4-class and collapsed to binary)."""
    out = val_test_logits(run, data, ("test",))
    preds, labels = out["logits"]["test"].argmax(1).tolist(), out["labels"]["test"].tolist()
    acc4 = sum(p == y for p, y in zip(preds, labels)) / len(labels)
    return {"num_test": len(labels), "test_accuracy_4class": acc4,
            "test_accuracy_binary": binary_accuracy(preds, labels, out["classes"]),
            "test_confusion": confusion_matrix(labels, preds, len(out["classes"]))}


def set_value(current, text: str):
    """``text`` of --set KEY=VALUE as the type of the field's current value (``null``: None; a field
    that defaults to None takes JSON, else the text itself, e.g. a path or an augment string)."""
    if text == "null":
        return None
    if isinstance(current, bool):  # bool("false") is True
        words = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}
        if text.lower() not in words:
            raise SystemExit(f"--set {text!r}: a boolean field takes true or false")
        return words[text.lower()]
    if current is None:
        try:
            return json.loads(text)
        except json.JSONDecodeError:
            return text
    return type(current)(text)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=Path("runs/elpv_data"))
    ap.add_argument("--out", type=Path, default=Path("runs/bench_elpv"))
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="override TrainConfig fields")
    ap.add_argument("--results", type=Path, default=ROOT / "results" / "finetune_elpv.json")
    ap.add_argument("--decode-at-each-use", action="store_true", help="hold no image in memory")
    args = ap.parse_args()
    if args.decode_at_each_use:
        data_module.available_memory = lambda: 0  # a budget of 0 bytes: every image is decoded at each use
    if not (args.data / "train").is_dir():
        write_elpv(args.data, "4class", 0.25, seed=0)
    shutil.rmtree(args.out, ignore_errors=True)
    cfg = TrainConfig(data=str(args.data.resolve()), out=str(args.out.resolve()), device="cpu")
    for item in args.set:
        key, value = item.split("=", 1)
        setattr(cfg, key, set_value(getattr(cfg, key), value))
    t0 = time.perf_counter()
    metrics = finetune(cfg)
    wall = time.perf_counter() - t0
    result = {
        "benchmark": "finetune_elpv", "recipe": metrics["config"], "decoded_at_each_use": metrics["decoded_at_each_use"], "best_epoch": metrics["best_epoch"],
        "best_val_accuracy": metrics["best_val_accuracy"], "train_seconds": metrics["seconds"],
        "wall_seconds_incl_decode": round(wall, 1), **test_accuracy(args.out, args.data),
        "machine": {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads()},
        "targets": {"test_accuracy_4class": 0.85, "test_accuracy_binary": 0.90, "wall_minutes": 15},
    }
    write_json(args.results, result)
    print(json.dumps({k: v for k, v in result.items() if k != "recipe"}, indent=2))


if __name__ == "__main__":
    main()
