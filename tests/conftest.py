"""Shared fixtures: a tiny generated ImageFolder, a small real ELPV subset and real handwritten digits."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

PATTERNS = ("hstripes", "vstripes", "checker")


def pattern_image(kind: str, rng: np.random.Generator, size: int = 40) -> Image.Image:
    """A noisy RGB image whose class is visible in its structure (stripes or checker)."""
    yy, xx = np.mgrid[0:size, 0:size]
    period = int(rng.integers(4, 9))
    base = {"hstripes": (yy // period) % 2, "vstripes": (xx // period) % 2}.get(
        kind, ((yy // period) + (xx // period)) % 2)
    tint = rng.integers(60, 255, size=3)
    img = base[..., None] * tint[None, None, :] + rng.normal(0, 20, size=(size, size, 3))
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), "RGB")


def make_image_folder(root: Path, per_class: int = 8, classes=PATTERNS, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    for kind in classes:
        (root / kind).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            ext = ("png", "jpg")[i % 2]
            pattern_image(kind, rng).save(root / kind / f"{i:03d}.{ext}")
    return root


@pytest.fixture
def tiny_folder(tmp_path: Path) -> Path:
    return make_image_folder(tmp_path / "tiny")


@pytest.fixture(scope="session")
def elpv_small(tmp_path_factory) -> Path:
    """Real ELPV images (CC BY-NC-SA 4.0): 6 per class in train and in test."""
    from edge_tl.finetune.elpv import write_elpv

    out = tmp_path_factory.mktemp("elpv") / "elpv"
    write_elpv(out, "4class", limit_per_class=6, progress=False)
    return out


@pytest.fixture(scope="session")
def digits_folder(tmp_path_factory) -> Path:
    """Real handwritten digits (scikit-learn's bundled copy of the UCI set, 8x8, 17 grey levels):
    30 per class, as DIR/digit<k>/*.png."""
    from sklearn.datasets import load_digits

    digits, rng = load_digits(), np.random.default_rng(0)
    root = tmp_path_factory.mktemp("digits") / "digits"
    for k in range(10):
        (root / f"digit{k}").mkdir(parents=True)
        for i in rng.choice(np.flatnonzero(digits.target == k), 30, replace=False):
            Image.fromarray((digits.images[i] * (255 / 16)).round().astype(np.uint8), "L").save(
                root / f"digit{k}" / f"{i:04d}.png")
    return root


@pytest.fixture(scope="session")
def elpv_run(elpv_small, tmp_path_factory) -> Path:
    """A 1-epoch fine-tune on the ELPV subset at 96 px (real weights, real images)."""
    from edge_tl.finetune.train import TrainConfig, finetune

    out = tmp_path_factory.mktemp("run") / "run"
    finetune(TrainConfig(data=str(elpv_small), out=str(out), img_size=96, batch_size=8, epochs=1),
             progress=False, log=lambda s: None)
    return out


@pytest.fixture(scope="session")
def cpu_bundle(elpv_run, tmp_path_factory) -> Path:
    """Bundle for --target cpu with fp32, fp16 and the CPU INT8 flavour."""
    from edge_tl.export.bundle import export_bundle

    out = tmp_path_factory.mktemp("bundles") / "cpu"  # INT8 the default whatever this (busy) machine's timing says
    export_bundle(elpv_run, out, "cpu", "fp32,fp16,int8", progress=False, int8_default="yes", log=lambda s: None)
    return out


@pytest.fixture(scope="session")
def pattern_bundle(tmp_path_factory) -> tuple[Path, Path]:
    """(bundle, labelled test folder) of a model that separates stripes from checkers confidently."""
    from edge_tl.export.bundle import export_bundle
    from edge_tl.finetune.train import TrainConfig, finetune

    root = tmp_path_factory.mktemp("patterns")
    data = make_image_folder(root / "train", per_class=16, seed=0)
    test = make_image_folder(root / "test", per_class=8, seed=1)
    finetune(TrainConfig(data=str(data), out=str(root / "run"), img_size=64, batch_size=8, epochs=3),
             progress=False, log=lambda s: None)
    export_bundle(root / "run", root / "bundle", "cpu", "fp32,int8", progress=False, log=lambda s: None)
    return root / "bundle", test
