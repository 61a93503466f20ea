"""Fine-tune settings (torch-free, so the CLI's --help stays fast)."""

from __future__ import annotations

from dataclasses import dataclass, fields

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
    img_size: int | None = 224
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
    workers: int = 0
    device: str = "auto"
    compile: bool = False  # torch.compile the training model (CUDA; on CPU it needs a C++ compiler)
    tune_depthwise: bool = True  # CPU: depthwise backward timed per shape, fastest exact form kept (depthwise.py)
    amp: str = "auto"  # auto | off | bf16 | fp16: bf16 on CUDA or CPUs with native bf16 (1.25x here), fp16 on older GPUs

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


DEFAULTS = {f.name: f.default for f in fields(TrainConfig)}
