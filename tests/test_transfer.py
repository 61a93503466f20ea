"""The transfer-learning effects, the pretrained/scratch pairing of run folders, and the effects on real digits."""

from __future__ import annotations

import json

import numpy as np

from edge_tl.finetune.train import TrainConfig, finetune
from edge_tl.finetune.transfer import compare_effects, compare_run_folders, effects


def test_effects_of_a_curve():
    e = effects([0.5, 0.7, 0.9, 0.85, 1.0])
    assert e == {"start": 0.5, "slope_epochs_to_90pct_of_best": 3, "asymptote": 1.0}


def test_compare_effects_judges_each_effect_separately():
    pre, scr = effects([0.6, 0.8, 0.8]), effects([0.3, 0.5, 0.7])
    assert compare_effects(pre, scr) == {"start": "pretrained", "slope": "pretrained", "asymptote": "pretrained",
                                         "all_three": True}
    same_slope = compare_effects(effects([0.6, 0.8]), effects([0.3, 0.5]))  # both reach 90 % at epoch 2
    assert same_slope["slope"] == "tie" and same_slope["all_three"]
    worse = compare_effects(effects([0.2, 0.25, 0.3, 0.9]), scr)
    assert worse == {"start": "scratch", "slope": "scratch", "asymptote": "pretrained", "all_three": False}
    assert compare_effects(pre, pre)["start"] == "tie" and not compare_effects(pre, pre)["all_three"]


def test_a_curve_that_never_beats_chance_has_no_slope():
    """Scratch stuck at the majority share reaches "90 % of its own best" at epoch 1: that is no slope."""
    flat, learned = effects([0.5, 0.5, 0.5], chance=0.5), effects([0.5, 0.65, 0.6], chance=0.5)
    assert flat["slope_epochs_to_90pct_of_best"] is None and learned["slope_epochs_to_90pct_of_best"] == 2
    two_thirds = float(np.float32(2 / 3))  # a float32 accuracy of 2 of 3 images, as history.jsonl holds it
    assert effects([two_thirds] * 3, chance=2 / 3)["slope_epochs_to_90pct_of_best"] is None
    assert compare_effects(learned, flat)["slope"] == "pretrained"
    assert compare_effects(flat, flat)["slope"] == "tie"


def _run(folder, curve, **config):
    folder.mkdir()
    cfg = {"epochs": len(curve), "lr": 0.002, "scratch": False, "out": str(folder), "device": "cpu", **config}
    (folder / "metrics.json").write_text(json.dumps({"config": cfg}))
    (folder / "history.jsonl").write_text("".join(json.dumps({"epoch": i + 1, "val_accuracy": a}) + "\n"
                                                  for i, a in enumerate(curve)))


def test_compare_run_folders_pairs_only_a_scratch_twin(tmp_path):
    _run(tmp_path / "run", [0.6, 0.8])
    assert compare_run_folders(tmp_path / "run", tmp_path / "none") is None
    _run(tmp_path / "twin", [0.3, 0.5], scratch=True, device="cuda")
    t = compare_run_folders(tmp_path / "run", tmp_path / "twin")
    assert t["curves"] == {"pretrained": [0.6, 0.8], "scratch": [0.3, 0.5]} and t["better"]["all_three"]
    _run(tmp_path / "other_recipe", [0.3, 0.5], scratch=True, lr=0.01)
    assert compare_run_folders(tmp_path / "run", tmp_path / "other_recipe") is None
    _run(tmp_path / "not_scratch", [0.3, 0.5])
    assert compare_run_folders(tmp_path / "run", tmp_path / "not_scratch") is None
    (tmp_path / "twin" / "history.jsonl").write_text("")  # a damaged run is no comparison, not a crash
    assert compare_run_folders(tmp_path / "run", tmp_path / "twin") is None


def test_pretrained_beats_scratch_on_real_digits(digits_folder, tmp_path):
    """The core claim on real data the defaults were not chosen on: 210 training images of 10
    classes, the default recipe at 64 px for 8 epochs (no flips: digits have a handedness).
    The assertions held for seeds 0-4 when written (pretrained best 0.91-0.93, scratch 0.31-0.51
    on seeds 0-3)."""
    runs = {}
    for name, scratch in (("pretrained", False), ("scratch", True)):
        cfg = TrainConfig(data=str(digits_folder), out=str(tmp_path / name), img_size=64, epochs=8, hflip=0.0,
                          val_fraction=0.3, scratch=scratch)
        finetune(cfg, progress=False, log=lambda s: None)
        runs[name] = tmp_path / name
    t = compare_run_folders(runs["pretrained"], runs["scratch"])
    pre, scr = t["effects"]["pretrained"], t["effects"]["scratch"]
    assert pre["asymptote"] >= 0.8, t["curves"]
    assert pre["asymptote"] - scr["asymptote"] >= 0.2 and t["better"]["asymptote"] == "pretrained", t["curves"]
    # one epoch at 64 px starts both low: pretrained above, though on 90 images possibly within noise
    assert pre["start"] > scr["start"] and t["better"]["start"] in ("pretrained", "within noise"), t["curves"]


def test_differences_within_the_validation_noise_are_no_verdict():
    """On 2 validation images one image is 50 points: no verdict. On 40, 0.8 vs 0.7 is within two
    standard errors (0.19); 0.6 vs 0.3 is not. On 1000 every difference here counts."""
    pre, scr = effects([0.6, 0.8, 0.8]), effects([0.3, 0.5, 0.7])
    assert compare_effects(pre, scr, images=2) == {"start": "too few images", "slope": "too few images",
                                                   "asymptote": "too few images", "all_three": False}
    forty = compare_effects(pre, scr, images=40)
    assert forty == {"start": "pretrained", "slope": "pretrained", "asymptote": "within noise", "all_three": False}
    assert compare_effects(pre, scr, images=1000) == compare_effects(pre, scr)
