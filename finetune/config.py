"""Fine-tune settings (torch-free, so the CLI's --help stays fast)."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, fields
from pathlib import Path

from edge_tl.errors import UserError
from edge_tl.runtime.spec import MAX_INPUT_SIDE, MIN_CROP_PCT

DEFAULT_MODEL = "tf_efficientnet_lite0"


@dataclass
class TrainConfig:
    """Every knob of a fine-tune; written into each checkpoint so ``--resume`` needs none again."""

    data: str
    out: str
    model: str = DEFAULT_MODEL
    weights: str | None = None
    scratch: bool = False
    epochs: int = 10
    img_size: int | None = None  # None: the model's pretrained size (224 for the default backbone)
    crop_pct: float | None = None
    batch_size: int = 32
    lr: float = 2e-3
    layer_decay: float | None = None  # LR x decay**depth from the head down (timm's layer-wise decay); None: one LR
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0
    label_smoothing: float = 0.1
    mixup: float = 0.0  # Beta(alpha, alpha) of mixup (each batch blended with itself reversed); 0: off
    class_weights: str = "none"  # none | sqrt | inverse (of class frequency)
    ema: bool = False
    ema_decay: float = 0.995
    freeze_stages: int = 0  # stem + this many early stages stay at their pretrained values
    low_res_epochs: float = 0.6  # fraction of epochs trained at 3/4 of img_size
    scale_min: float = 0.8  # RandomResizedCrop lower scale: small defects must stay in the crop
    hflip: float = 0.5
    vflip: float = 0.0
    rot90: float = 0.0  # probability of a random turn by k*90 deg (orientation-free data: cells, slides, aerial tiles)
    color_jitter: float = 0.2
    auto_augment: str | None = None
    val_fraction: float = 0.15
    split_seed: int = 0
    seed: int = 0
    workers: int | None = None  # None: 0 when every image is held in memory, else auto_workers()
    device: str = "auto"
    compile: bool = False  # torch.compile the training model (CUDA; on CPU it needs a C++ compiler)
    tune_depthwise: bool = True  # CPU: depthwise backward timed per shape, fastest exact form kept (depthwise.py)
    amp: str = "auto"  # auto | off | bf16 | fp16: bf16 on CUDA or CPUs with native bf16 (1.25x here), fp16 on older GPUs
    channels_last: bool = True  # NHWC activations and weights; off works around kernels that fail with it

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


DEFAULTS = {f.name: f.default for f in fields(TrainConfig)}

VAL_FOLDERS = ("val", "valid", "validation")  # the validation split's names in common dataset exports
AMP_MODES = ("auto", "off", "bf16", "fp16")
CLASS_WEIGHT_POWERS = {"none": 0.0, "sqrt": 0.5, "inverse": 1.0}
MIN_IMG_SIZE = 32  # EfficientNet-Lite's total stride: smaller inputs leave nothing to classify


def check_config(cfg: TrainConfig, out: Path) -> None:
    """Every setting a fine-tune can reject, checked before any image is decoded."""
    def positive(x) -> bool:
        return math.isfinite(x) and x > 0

    if cfg.epochs < 1 or cfg.batch_size < 1 or not positive(cfg.lr):
        raise UserError(f"--epochs {cfg.epochs} / --batch-size {cfg.batch_size} / --lr {cfg.lr}: all must be positive.")
    if cfg.img_size is not None and not MIN_IMG_SIZE <= cfg.img_size <= MAX_INPUT_SIDE:
        raise UserError(f"--img-size {cfg.img_size}: use {MIN_IMG_SIZE} (the network downsamples 32x) to "
                        f"{MAX_INPUT_SIDE}; the model's pretrained size (224 for tf_efficientnet_lite0) is a good start.")
    if cfg.crop_pct is not None and not MIN_CROP_PCT <= cfg.crop_pct <= 1:
        raise UserError(f"--crop-pct {cfg.crop_pct}: the eval center crop is a fraction in [{MIN_CROP_PCT}, 1], e.g. "
                        "0.875 or 1.")
    if not 0 < cfg.scale_min <= 1:
        raise UserError(f"--scale-min {cfg.scale_min}: the smallest crop area is a fraction in (0, 1], e.g. 0.8.")
    if not 0 <= cfg.low_res_epochs <= 1:
        raise UserError(f"--low-res-epochs {cfg.low_res_epochs}: a fraction of the epochs in [0, 1].")
    if (cfg.workers is not None and cfg.workers < 0) or cfg.freeze_stages < 0:
        raise UserError(f"--workers {cfg.workers} / --freeze-stages {cfg.freeze_stages}: neither can be negative.")
    if cfg.layer_decay is not None and not (positive(cfg.layer_decay) and cfg.layer_decay <= 1):
        raise UserError(f"--layer-decay {cfg.layer_decay}: use a factor in (0, 1], e.g. 0.85, or leave it out for one LR.")
    if not (math.isfinite(cfg.mixup) and cfg.mixup >= 0):
        raise UserError(f"--mixup {cfg.mixup}: use a Beta alpha > 0 (e.g. 0.2), or 0 for no mixup.")
    if cfg.weights and cfg.scratch:
        raise UserError(f"--weights {cfg.weights} and --scratch: pick one (pretrained from a file, or random init).")
    if cfg.amp not in AMP_MODES:
        raise UserError(f"--amp {cfg.amp}: use {', '.join(AMP_MODES[:-1])} or {AMP_MODES[-1]}.")
    if cfg.class_weights not in CLASS_WEIGHT_POWERS:
        raise UserError(f"--class-weights {cfg.class_weights}: use none, sqrt or inverse.")
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: is a file; --out takes a folder for the run.")
    ancestor = next((p for p in (out, *out.absolute().parents) if p.exists()), None)
    if ancestor is not None and not os.access(ancestor, os.W_OK):  # before minutes of decoding, not after
        raise UserError(f"{out}: cannot be written ({ancestor} is read-only, or not yours). Choose another --out.")
    check_out_beside_data(out, Path(cfg.data))


SPLIT_NAMES = ("train", "test", *VAL_FOLDERS)


def split_folder(data: Path, *names: str) -> Path | None:
    """``data``'s sub-folder named one of ``names`` (the first found, in their order); None when
    there is none. Spelled in another letter case (Windows' Train/ and Test/, a dataset export's
    Validation/), it is a split where another split folder is beside it, or nothing else is: among
    flat class folders Bus/ Car/ Train/, Train/ is a class. Two spelled alike but for case are refused."""
    from edge_tl.runtime.images import class_folders

    dirs = class_folders(data) if data.is_dir() else []  # hidden and NAS/system folders left out
    splits = {d.name.lower() for d in dirs} & set(SPLIT_NAMES)
    looks_split = len(splits) >= 2 or len(splits) == len(dirs)  # Train/ + Test/ (+ GTSRB's Meta/), or Train/ alone
    for name in names:
        same = [d for d in dirs if d.name.lower() == name]
        if len(same) > 1:
            raise UserError(f"{data}: {' and '.join(f'{d.name}/' for d in same)} differ only in letter case; "
                            f"merge them into one {name}/ folder.")
        if same and (same[0].name == name or looks_split):
            return same[0]
    return None


def training_roots(data: Path) -> list[Path]:
    """The folders a fine-tune reads images from: DIR, or DIR/train and its validation folder."""
    if (train := split_folder(data, "train")) is None:
        return [data]
    return [train, *[v for v in [split_folder(data, *VAL_FOLDERS)] if v is not None]]


def _inside(path: Path, folder: Path) -> bool:
    """``path`` is ``folder`` or below it, also where the names differ only in letter case on a disk
    that ignores it (macOS, Windows) or by a link: compared by file identity."""
    if path == folder or folder in path.parents:
        return True
    if not folder.exists():
        return False
    return any(a.exists() and os.path.samefile(a, folder) for a in (path, *path.parents))


def check_out_beside_data(out: Path, data: Path, with_test: bool = False) -> None:
    """Refuse an output folder where the data's images are read from (it would become a class);
    ``with_test``: DIR/test/ too (build's check reads it)."""
    target, data = out.resolve(), data.resolve()
    roots = training_roots(data) + ([split_folder(data, "test") or data / "test"] if with_test else [])  # made by
    # the --out itself, it still is
    for root in roots:
        if _inside(target, root):
            raise UserError(f"{out}: is inside {root}, where the {'test' if root.name.lower() == 'test' else 'training'} "
                            "images are read from, so its files would become images or a class. Choose an --out "
                            "outside it.")
    if target.parent == data and target.name.lower() in SPLIT_NAMES:
        raise UserError(f"{out}: a folder named {target.name}/ in {data} would be read as its {target.name.lower()} "
                        "split. Choose an --out outside the data folder.")
