"""The three effects of transfer learning, measured on two accuracy-per-epoch curves.

start     = accuracy after epoch 1 (higher start)
slope     = epochs to reach 90 % of the curve's own best (fewer = steeper); none for a curve
            whose best never rises above chance (the majority class's share): it never learned,
            and reaching 90 % of a flat curve in one epoch is no slope
asymptote = best accuracy over the epochs (higher asymptote)

A difference within the noise of the validation split's size is no verdict ("within noise"), and
under ``MIN_IMAGES`` validation images none is given ("too few images").
"""

from __future__ import annotations

import json
from pathlib import Path


def effects(curve: list[float], chance: float | None = None) -> dict:
    best = max(curve)
    # accuracies are float32 (0.6666667 for 2 of 3): a model stuck at the majority share is not above it
    learned = chance is None or best > chance + 1e-6
    slope = next(i + 1 for i, a in enumerate(curve) if a >= 0.9 * best) if learned else None
    return {"start": curve[0], "slope_epochs_to_90pct_of_best": slope, "asymptote": best}


MIN_IMAGES = 30  # validation images below which no effect is judged (one image is over 3 points)


def _better(a: float, b: float, higher_is_better: bool = True, noise: float = 0.0) -> str:
    if a == b:
        return "tie"
    if abs(a - b) <= noise:
        return "within noise"
    return "pretrained" if (a > b) == higher_is_better else "scratch"


def accuracy_noise(a: float, b: float, images: int) -> float:
    """Two standard errors of the difference of two accuracies measured on ``images`` images each (as if
    independent, so on the safe side for two models on the same images)."""
    return 2 * ((a * (1 - a) + b * (1 - b)) / images) ** 0.5


def compare_effects(pretrained: dict, scratch: dict, images: int | None = None) -> dict:
    """Which curve is better on each effect ("pretrained", "scratch", "tie", "within noise", or "too
    few images" under ``MIN_IMAGES``; ``effects`` dicts), and whether pretrained wins all three (a tie
    in slope counts: both reach it in one epoch). ``images``: how many images the accuracies were
    measured on; None judges the numbers as they are."""
    if images is not None and images < MIN_IMAGES:
        return {"start": "too few images", "slope": "too few images", "asymptote": "too few images", "all_three": False}
    noise = (lambda k: 0.0) if images is None else (lambda k: accuracy_noise(pretrained[k], scratch[k], images))
    better = {"start": _better(pretrained["start"], scratch["start"], noise=noise("start")),
              "slope": _better(*(float("inf") if e["slope_epochs_to_90pct_of_best"] is None  # never learned: slowest
                                 else e["slope_epochs_to_90pct_of_best"] for e in (pretrained, scratch)),
                               higher_is_better=False),
              "asymptote": _better(pretrained["asymptote"], scratch["asymptote"], noise=noise("asymptote"))}
    return {**better, "all_three": better["start"] == better["asymptote"] == "pretrained"
            and better["slope"] in ("pretrained", "tie")}


def compare_runs(pretrained_history: list[dict], scratch_history: list[dict], chance: float | None = None,
                 images: int | None = None) -> dict:
    """Effects of two fine-tunes' validation curves (``history.jsonl`` rows); ``chance``: the
    validation split's majority-class share; ``images``: its size (for the noise)."""
    curves = {"pretrained": [h["val_accuracy"] for h in pretrained_history],
              "scratch": [h["val_accuracy"] for h in scratch_history]}
    eff = {k: effects(v, chance) for k, v in curves.items()}
    return {"curves": curves, "effects": eff, "better": compare_effects(eff["pretrained"], eff["scratch"], images)}


def compare_run_folders(run: str | Path, scratch_run: str | Path) -> dict | None:
    """``compare_runs`` of two finished run folders, or None unless ``scratch_run`` is the
    scratch twin of ``run`` (same recipe and data, random init, all epochs done)."""
    paths = [Path(r) / "metrics.json" for r in (run, scratch_run)]
    if not all(p.is_file() and (p.parent / "history.jsonl").is_file() for p in paths):
        return None
    metrics = [json.loads(p.read_text()) for p in paths]
    configs = [m["config"] for m in metrics]
    same = {k: v for k, v in configs[0].items() if k not in ("scratch", "weights", "out", "workers", "device")}
    if not configs[1]["scratch"] or any(configs[1].get(k) != v for k, v in same.items()):
        return None
    histories = [[json.loads(line) for line in (Path(r) / "history.jsonl").read_text().splitlines() if line]
                 for r in (run, scratch_run)]
    if not all(histories):
        return None
    counts = metrics[0].get("val_class_counts")
    chance = max(counts) / sum(counts) if counts else None
    return {**compare_runs(*histories, chance=chance, images=sum(counts) if counts else None),
            "epochs": configs[0]["epochs"], "metric": "validation accuracy", "chance": chance,
            "validation_images": sum(counts) if counts else None}
