"""Transfer-learning evidence: ImageNet-pretrained vs scratch on ELPV, same recipe and budget.

    python benchmarks/transfer_curve.py --data ELPV_DIR [--seeds 0,1] [--fractions 0.1,0.25,0.5,1]
                                        [--img-size 128] [--epochs 8] [--out runs/transfer]

For each training-data fraction (stratified subset of the training split), each init and
seed: a fine-tune with the default recipe, with test-split accuracy measured after every
epoch (the test split is only measured, never used to select anything). Reports the three
effects per fraction, mean over seeds:
  start     = test accuracy after epoch 1
  slope     = epochs to reach 90 % of the run's own best test accuracy (fewer = steeper)
  asymptote = best test accuracy over the epochs
Saves benchmarks/results/transfer_curve.json and transfer_curve.png (curves at 100 % data
with the effects marked, and the data-size sweep). ELPV images: CC BY-NC-SA 4.0.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np
import torch

from edge_tl.fileio import write_json
from edge_tl.finetune.data import _decode, _scan_classes, stratified_split
from edge_tl.finetune.train import TrainConfig, finetune, predict_logits
from edge_tl.finetune.transfer import compare_effects, effects

ROOT = Path(__file__).resolve().parent


def subset_folder(data: Path, out: Path, fraction: float) -> Path:
    """``out/train/<class>/`` with symlinks to a stratified ``fraction`` of ``data/train`` (seed 0)."""
    if out.exists():
        return out
    files = _scan_classes(data / "train")
    items = [(c, p) for c in sorted(files) for p in files[c]]
    labels = [sorted(files).index(c) for c, _ in items]
    keep = range(len(items)) if fraction >= 1 else stratified_split(labels, 1 - fraction, 0)[0]
    tmp = out.with_name(out.name + ".tmp")
    for i in keep:
        c, p = items[i]
        (tmp / "train" / c).mkdir(parents=True, exist_ok=True)
        os.symlink(p.resolve(), tmp / "train" / c / p.name)
    tmp.rename(out)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--out", type=Path, default=Path("runs/transfer"))
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--fractions", default="0.1,0.25,0.5,1")
    ap.add_argument("--img-size", type=int, default=128)
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--results", type=Path, default=ROOT / "results" / "transfer_curve.json")
    args = ap.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    fractions = [float(f) for f in args.fractions.split(",")]
    runs = json.loads(args.results.read_text())["runs"] if args.results.is_file() else []
    done = {(r["fraction"], r["init"], r["seed"]) for r in runs}
    test = None
    for fraction in fractions:
        folder = subset_folder(args.data, args.out / f"data_{fraction:g}", fraction)
        for init in ("pretrained", "scratch"):
            for seed in seeds:
                if (fraction, init, seed) in done:
                    continue
                out = args.out / f"{init}_f{fraction:g}_s{seed}"
                cfg = TrainConfig(data=str(folder), out=str(out), scratch=init == "scratch", seed=seed,
                                  img_size=args.img_size, epochs=args.epochs)
                curve: list[float] = []

                def on_epoch(epoch: int, model: torch.nn.Module) -> None:
                    nonlocal test
                    from edge_tl.finetune.train import load_checkpoint
                    from edge_tl.runtime.spec import PreprocessSpec

                    spec = PreprocessSpec.from_dict(load_checkpoint(out / "last.pt")["preprocess"])
                    if test is None:
                        classes = sorted(_scan_classes(args.data / "train"))
                        test = _decode(_scan_classes(args.data / "test"), classes, spec, [], "decode test", False)
                    pred = predict_logits(model, test, spec, torch.device("cpu")).argmax(1).numpy()
                    curve.append(float((pred == np.asarray(test.labels)).mean()))

                if out.exists():
                    import shutil

                    shutil.rmtree(out)
                metrics = finetune(cfg, progress=False, log=lambda s: None, on_epoch=on_epoch)
                runs.append({"fraction": fraction, "init": init, "seed": seed, "num_train": metrics["num_train"],
                             "test_curve": curve, "val_best": metrics["best_val_accuracy"],
                             "seconds": metrics["seconds"], **effects(curve)})
                print(json.dumps({k: v for k, v in runs[-1].items() if k != "test_curve"}))
                write_json(args.results, {"benchmark": "transfer_curve", "img_size": args.img_size,
                                          "epochs": args.epochs, "runs": runs})
    summary = summarize(runs)
    write_json(args.results, {"benchmark": "transfer_curve", "img_size": args.img_size, "epochs": args.epochs,
                              "summary": summary, "runs": runs})
    plot(runs, summary, args.results.with_suffix(".png"))
    print(json.dumps(summary, indent=2))


def summarize(runs: list[dict]) -> list[dict]:
    rows = []
    for fraction in sorted({r["fraction"] for r in runs}):
        row = {"fraction": fraction}
        for init in ("pretrained", "scratch"):
            rs = [r for r in runs if r["fraction"] == fraction and r["init"] == init]
            for k in ("start", "slope_epochs_to_90pct_of_best", "asymptote"):
                row[f"{init}_{k}"] = float(np.mean([r[k] for r in rs]))
            row["num_train"] = rs[0]["num_train"]
        mean = {init: {k.removeprefix(f"{init}_"): v for k, v in row.items() if k.startswith(f"{init}_")}
                for init in ("pretrained", "scratch")}
        row["pretrained_wins_all_three"] = compare_effects(mean["pretrained"], mean["scratch"])["all_three"]
        rows.append(row)
    return rows


def plot(runs: list[dict], summary: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from edge_tl.finetune.plots import draw_transfer

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.2))
    full = max(r["fraction"] for r in runs)
    draw_transfer(ax1, {init: [r["test_curve"] for r in runs if r["fraction"] == full and r["init"] == init]
                        for init in ("pretrained", "scratch")}, "test accuracy (4-class)")
    ax1.set(title=f"ELPV, {int(full * 100)} % of training data")
    for init, color in (("pretrained", "C0"), ("scratch", "C3")):
        ax2.plot([s["num_train"] for s in summary], [s[f"{init}_asymptote"] for s in summary], "o-", color=color,
                 label=init)
    ax2.set(xscale="log", xlabel="training images", ylabel="best test accuracy", title="data-size sweep")
    ax2.grid(alpha=0.3)
    ax2.legend(loc="lower right")
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


if __name__ == "__main__":
    main()
