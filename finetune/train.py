"""The fine-tune recipe and loop: timm transforms, AdamW + warmup/cosine, label smoothing,
class weighting, optional EMA, frozen early stages, lower-resolution first epochs.

Every random draw is a function of (seed, epoch, step or sample), so a run resumed from
any step, with any number of workers, ends exactly where an uninterrupted run ends.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import platform
import random
import signal
import threading
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Callable

import numpy as np
import timm
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision import transforms
from timm.data import create_transform
from timm.models import group_modules
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.utils import ModelEmaV3
from tqdm import tqdm

from edge_tl import __version__
from edge_tl.errors import Terminated, UserError
from edge_tl.fileio import (atomic_write, folder_lock, make_folder, refused_write, remove_stale_temps, write_json,
                            write_text)
from edge_tl.provenance import code_version, library_versions
from edge_tl.runtime.cpu import cpu_info
from edge_tl.runtime.images import cpu_cores
from edge_tl.runtime.spec import PreprocessSpec

from . import distributed
from .backbones import create_backbone, crop_mode_note, preprocess_spec, weights_identity
from .config import CLASS_WEIGHT_POWERS, DEFAULTS, TrainConfig, check_config
from .data import Split, describe_duplicates, discover
from .depthwise import clear_plans, load_plans, plan_training, saved_plans, tune_depthwise

CHECKPOINT_FORMAT = "edge-tl-checkpoint/1"


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {name}: no CUDA device is visible to torch "
                        f"(torch {torch.__version__}, CUDA build: {torch.version.cuda}). Use --device cpu or auto.")
    if name not in ("cpu", "cuda") and not name.startswith("cuda:"):
        raise UserError(f"--device {name}: use auto, cpu or cuda.")
    return torch.device(name)


def _mix(*xs: int) -> int:
    """A stable 63-bit seed from integers (no Python hash randomization)."""
    h = 1469598103934665603
    for x in xs:
        h = ((h ^ (int(x) & 0xFFFFFFFFFFFF)) * 1099511628211) % (1 << 63)
    return h


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (1 << 32))
    torch.manual_seed(seed)


class _TrainStep:
    """One optimisation step: forward under autocast, the class-weighted, label-smoothed (and mixup)
    loss, backward through the gradient scaler, then the per-step LR and EMA updates."""

    def __init__(self, cfg: TrainConfig, model, train_model, optimizer, scheduler, ema, loss_weight, device, dtype,
                 num_classes: int):
        self.cfg, self.model, self.train_model, self.optimizer = cfg, model, train_model, optimizer
        self.scheduler, self.ema, self.loss_weight, self.device, self.dtype = scheduler, ema, loss_weight, device, dtype
        self.num_classes = num_classes
        self.scaler = torch.amp.GradScaler("cuda", enabled=dtype == torch.float16)

    def __call__(self, x: torch.Tensor, y: torch.Tensor, update: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Train on one batch; ``update`` counts steps over the run. Returns (loss, logits, the labels
        accuracy is counted against)."""
        cfg = self.cfg
        x = x.to(self.device, non_blocking=True, memory_format=memory_format(cfg))
        y = y.to(self.device, non_blocking=True)
        target = y
        if cfg.mixup > 0 and len(y) > 1:
            x, target = mixup_batch(x, y, self.num_classes, cfg.mixup)
        with _autocast(self.device, self.dtype):
            logits = self.train_model(x)
            loss = F.cross_entropy(logits.float(), target, weight=self.loss_weight, label_smoothing=cfg.label_smoothing)
        if target is not y:  # soft targets: torch averages over N, class indices over the weights
            loss = loss / (target @ self.loss_weight).mean()
            y = target.argmax(1)  # train accuracy against each blend's larger part
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step_update(update)
        if self.ema is not None:
            self.ema.update(self.model, step=update)
        return loss, logits, y


class _EpochView(torch.utils.data.Dataset):
    """One epoch's ordered samples; each sample's augmentation is seeded by its position."""

    def __init__(self, split: Split, order: list[int], offset: int, transform, seed: int):
        self.split, self.order, self.offset, self.transform, self.seed = split, order, offset, transform, seed

    def __len__(self) -> int:
        return max(0, len(self.order) - self.offset)  # 0: resumed after the epoch's last step, before validation

    def __getitem__(self, k: int):
        i = self.order[self.offset + k]
        _seed_all(_mix(self.seed, self.offset + k))
        return self.transform(self.split.image(i)), self.split.labels[i]


class _EvalView(torch.utils.data.Dataset):
    def __init__(self, split: Split, transform):
        self.split, self.transform = split, transform

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, i: int):
        return self.transform(self.split.image(i)), self.split.labels[i]


def eval_transform(spec: PreprocessSpec):
    """timm's eval transform for ``spec`` (resize shorter side, center crop, normalize)."""
    return create_transform(input_size=(3, *spec.input_size), is_training=False, interpolation=spec.interpolation,
                            mean=spec.mean, std=spec.std, crop_pct=spec.crop_pct)


class RandomQuarterTurn:
    """With probability ``p``, turn by 0, 90, 180 or 270 degrees, each equally likely (``p=1``:
    uniform over the four orientations). Lossless, unlike timm's arbitrary-angle rotate, which
    blurs and pads; with both flips it covers all 8 symmetries of a square."""

    TURNS = (None, Image.Transpose.ROTATE_90, Image.Transpose.ROTATE_180, Image.Transpose.ROTATE_270)

    def __init__(self, p: float):
        self.p = p

    def __call__(self, img):
        if random.random() >= self.p:
            return img
        turn = random.choice(self.TURNS)
        return img if turn is None else img.transpose(turn)


def train_transform(cfg: TrainConfig, spec: PreprocessSpec, size: int):
    timm_transform = create_transform(input_size=(3, size, size), is_training=True, scale=(cfg.scale_min, 1.0),
                            hflip=cfg.hflip, vflip=cfg.vflip, color_jitter=cfg.color_jitter,
                            auto_augment=cfg.auto_augment, interpolation=spec.interpolation,
                            mean=spec.mean, std=spec.std)
    if cfg.rot90 <= 0:
        return timm_transform
    return transforms.Compose([RandomQuarterTurn(cfg.rot90), timm_transform])


def amp_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """Autocast dtype for ``--amp``: auto = bf16 on CUDA where supported else fp16, bf16 on CPUs
    with native bf16 (AVX512-BF16/AMX), else off."""
    if amp == "off":
        return None
    if amp not in ("auto", "bf16", "fp16"):
        raise UserError(f"--amp {amp}: use auto, off, bf16 or fp16.")
    if device.type == "cuda":
        return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(
            amp, torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16)
    if amp == "fp16":
        raise UserError("--amp fp16 needs CUDA; on CPU use --amp bf16 or off.")
    # auto: x86 CPUs with native bf16 (AVX512-BF16, AMX) only; an Arm CPU's bf16 (Apple M2+) is unmeasured here
    if amp == "bf16" or (platform.machine().lower() in ("x86_64", "amd64") and _native_bf16()):
        return torch.bfloat16
    return None


def _keep_aside(table: Path) -> Path:
    """Rename a run's earlier images.tsv to the first free images.before-resume-<k>.tsv."""
    k = 1
    while (kept := table.with_name(f"images.before-resume-{k}.tsv")).exists():
        k += 1
    table.rename(kept)
    return kept


def _native_bf16() -> bool:
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a PyTorch built without oneDNN
        return False


def _autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def _raise_any_rank_error(found: list, mine) -> None:
    """Raise this rank's data error, else another rank's (``found``: one entry per rank, a UserError
    or None/a result), so that every rank stops at the same point."""
    errors = [(rank, e) for rank, e in enumerate(found) if isinstance(e, UserError)]
    if isinstance(mine, UserError):
        raise mine
    if errors:
        rank, error = errors[0]
        raise UserError(f"rank {rank} of {len(found)} (torchrun) found: {error}")


def _agreed_batches(loader, d: distributed.Dist, check: bool):
    """``loader``'s batches; with ``check`` (torchrun, images decoded at each use, which can fail
    to load), the ranks tell each other before every step whether their batch loaded, so one
    rank's data error stops all of them at the same step instead of leaving them waiting."""
    batches = iter(loader)
    while True:
        try:
            batch, error = next(batches), None
        except StopIteration:
            return
        except UserError as exc:
            if not check:
                raise
            batch, error = None, worker_error(exc)
        if check:
            _raise_any_rank_error(d.gather(error), error)
        yield batch


def auto_workers() -> int:
    """DataLoader workers when images are decoded at each use: min(4, cores - 1) per process on a
    machine (torchrun's share of the cores this process may use), at least 1, so decoding overlaps
    the training step; 0 where workers are spawned, not forked (--workers N still sets them)."""
    method = torch.multiprocessing.get_start_method(allow_none=True) or torch.multiprocessing.get_all_start_methods()[0]
    if method != "fork":  # spawn, forkserver (Python 3.14's Linux default): the dataset is pickled to each worker
        return 0  # each worker would get its own copy of the images held in memory (macOS, Windows)
    cores = cpu_cores() // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return max(1, min(4, cores - 1))


def memory_format(cfg: TrainConfig) -> torch.memory_format:
    """The layout of the training model and its batches: channels_last (NHWC: faster convolutions on
    CPUs and tensor cores) unless --no-channels-last (some models' kernels fail with it: PyTorch's CPU
    fastvit_t8 aborts from 96 px)."""
    return torch.channels_last if cfg.channels_last else torch.contiguous_format


@torch.no_grad()
def predict_logits(model: torch.nn.Module, split: Split, spec: PreprocessSpec, device: torch.device,
                   batch_size: int = 64, workers: int = 0,
                   layout: torch.memory_format = torch.contiguous_format) -> torch.Tensor:
    """Float32 logits of ``model`` for every image of ``split`` with the eval transform (in float32:
    validation picks the best epoch and export compares against it); batches in ``layout``."""
    model.eval()
    loader = torch.utils.data.DataLoader(_EvalView(split, eval_transform(spec)), batch_size=batch_size,
                                         num_workers=workers)
    out = []
    try:
        for x, _ in loader:
            x = x.to(device, memory_format=layout)
            out.append(model(x).float().cpu())
    except UserError as exc:  # an image decoded at each use that changed since the scan
        raise worker_error(exc) from None
    return torch.cat(out) if out else torch.zeros(0)


def worker_error(exc: UserError) -> UserError:
    """``exc`` with its own message: a DataLoader worker's error comes back with the worker's traceback
    in its message, which ends in the original ("edge_tl.errors.UserError: <message>")."""
    text, cls = str(exc), type(exc)
    marker = f"{cls.__module__}.{cls.__qualname__}: "
    if "Original Traceback" not in text or marker not in text:
        return exc
    return cls(text[text.rindex(marker) + len(marker):].rstrip("\n"))


def confusion_matrix(labels: list[int], preds: list[int], num_classes: int) -> list[list[int]]:
    cm = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(cm, (np.asarray(labels), np.asarray(preds)), 1)
    return cm.tolist()


def mixup_batch(x: torch.Tensor, y: torch.Tensor, num_classes: int, alpha: float):
    """Mixup (Zhang et al. 2018): the batch blended with itself reversed, lam ~ Beta(alpha, alpha)
    once per batch from torch's global RNG (the training loop reseeds it every step, so a resumed
    run draws the same); returns the images and soft targets."""
    lam = float(torch.distributions.Beta(alpha, alpha).sample())
    target = F.one_hot(y, num_classes).float()
    return lam * x + (1 - lam) * x.flip(0), lam * target + (1 - lam) * target.flip(0)


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters; with ``layer_decay`` each param group carries an
    ``lr_scale`` (1 for the head, ``layer_decay**k`` k groups below), which timm's scheduler applies."""
    return create_optimizer_v2(model, "adamw", lr=cfg.lr, weight_decay=cfg.weight_decay, layer_decay=cfg.layer_decay)


def _frozen_modules(model: torch.nn.Module, stages: int) -> list[torch.nn.Module]:
    """The stem and the first ``stages`` stages (timm's coarse groups), to keep frozen."""
    if stages <= 0:
        return []
    groups = group_modules(model, model.group_matcher(coarse=True))
    if stages > len(groups) - 2:  # the last group holds the classifier: it always trains
        raise UserError(f"--freeze-stages {stages}: {type(model).__name__} has {len(groups) - 2} stages that can be "
                        f"frozen (stem + stages; the last group holds the classifier). Use 0..{len(groups) - 2}.")
    names = [n for gid in sorted(groups)[: stages + 1] for n in groups[gid]]
    mods = [model.get_submodule(n) for n in names]
    for m in mods:
        m.requires_grad_(False)
    return mods


class _StepBoundaryInterrupt:
    """Ctrl-C (or SIGTERM: `docker stop`, Kubernetes, Slurm) inside a training step takes effect at
    the step's end, so last.pt never holds half an update (weights stepped but not counted, EMA
    behind); a second one stops at once, ``forced``, and then nothing is saved over the last.pt of
    an earlier boundary (its resume would not be bit-identical)."""

    SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM") if hasattr(signal, name))

    def __enter__(self) -> "_StepBoundaryInterrupt":
        self.pending, self.forced, self.previous = None, False, {}
        if threading.current_thread() is threading.main_thread():  # signal handlers live in the main thread
            self.previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}
        return self

    def _handle(self, signum, frame) -> None:
        if self.pending is not None:
            self.forced = True
            raise self.exception()
        self.pending = signum

    def exception(self) -> KeyboardInterrupt:
        """What the pending signal raises: Terminated for SIGTERM (exit 143), else KeyboardInterrupt (130)."""
        return Terminated() if self.pending == getattr(signal, "SIGTERM", None) else KeyboardInterrupt()

    def check(self) -> None:
        if self.pending is not None:
            raise self.exception()

    def __exit__(self, *exc) -> None:
        for sig, previous in self.previous.items():
            if previous is not None:  # None: a handler not set from Python (an embedding host's), left as it is
                signal.signal(sig, previous)


def _train_sizes(cfg: TrainConfig, spec: PreprocessSpec) -> list[int]:
    full = spec.input_size[0]
    low = max(32, int(round(full * 0.75 / 32)) * 32)
    n_low = min(int(round(cfg.epochs * cfg.low_res_epochs)), cfg.epochs - 1)  # the last epoch is always at full size
    return [low if e < n_low else full for e in range(cfg.epochs)]


def _sizes_the_model_takes(probe: torch.nn.Module, cfg: TrainConfig, spec: PreprocessSpec, log) -> TrainConfig:
    """``cfg``, without its low-resolution epochs where the model does not run at that size (ViT,
    DeiT, LeViT: a fixed input size); a UserError naming the size it takes where it does not run
    at ``--img-size`` itself. One batch-1 forward per size, before any image is decoded."""
    def fails(h: int, w: int) -> str | None:
        try:
            with torch.no_grad():
                probe.eval()(torch.zeros(1, 3, h, w))
        except Exception as exc:  # noqa: BLE001 - timm's asserts and shape errors alike: the size does not fit
            return str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        return None

    h, w = spec.input_size
    if why := fails(h, w):
        native = tuple(probe.pretrained_cfg.get("input_size", (3, h, w))[1:])
        fix = (f"it takes {native[0]}x{native[1]}: pass --img-size {native[0]}" if native != (h, w) else
               "pass another --img-size")
        raise UserError(f"{cfg.model} does not run on {h}x{w} input ({why}); {fix}.")
    low = _train_sizes(cfg, spec)[0]
    if low != h and (why := fails(low, low)):
        log(f"note: {cfg.model} does not run at {low} px ({why}): every epoch at {h} px (--low-res-epochs 0)")
        cfg = replace(cfg, low_res_epochs=0.0)
    return cfg


def _save_checkpoint(path: Path, payload: dict) -> None:
    def save(tmp: Path) -> None:
        try:
            torch.save(payload, tmp)
        except RuntimeError as exc:  # torch reports a full disk as "unexpected pos": say what it was
            raise refused_write(tmp) or exc

    atomic_write(path, save)


def load_checkpoint(path: str | Path) -> dict:
    """A run checkpoint, loaded with ``weights_only=True`` (no code from the file runs)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no checkpoint. Run `edge-tl finetune --out {path.parent}` first.")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001
        first = (str(exc).strip().splitlines() or [""])[0]  # torch's later lines suggest weights_only=False: never
        raise UserError(f"{path}: unreadable checkpoint ({type(exc).__name__}: {first}). Delete it and re-run.") from exc
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise UserError(f"{path}: not an edge-tl checkpoint (format {ckpt.get('format') if isinstance(ckpt, dict) else '?'}).")
    return ckpt


def load_model(path: str | Path) -> tuple[torch.nn.Module, dict]:
    """Rebuild the fine-tuned timm model from ``best.pt``/``last.pt`` for inference (``for_inference``);
    returns ``(model, checkpoint)``."""
    ckpt = load_checkpoint(path)
    model = timm.create_model(ckpt["model_name"], num_classes=len(ckpt["classes"]))
    model.load_state_dict(ckpt["state_dict"])
    return for_inference(model), ckpt


def for_inference(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` in eval mode with its re-parameterizable blocks fused, as timm does for deployment:
    MobileOne, FastViT, RepVGG and the like train several branches per layer and run as one conv
    (mobileone_s0's ONNX: 191 -> 43 Conv nodes, 13x faster); a no-op for other models."""
    from timm.utils.model import reparameterize_model

    return reparameterize_model(model.eval(), inplace=True)


def finetune(cfg: TrainConfig, resume: bool = False, progress: bool = True,
             on_step: Callable[[int], None] | None = None, log: Callable[[str], None] = print,
             on_epoch: Callable[[int, torch.nn.Module], None] | None = None) -> dict:
    """Fine-tune per ``cfg``; writes the run folder and returns ``metrics.json``'s content.

    ``resume`` continues from ``out/last.pt`` with its saved config. ``on_step(global_step)``
    is called after every optimizer step (tests use it to interrupt a run), ``on_epoch(epoch,
    eval_model)`` after each epoch's validation (benchmarks use it for learning curves).
    """
    out = Path(cfg.out)
    d = distributed.setup(cfg.device)
    if not d.is_main:  # only rank 0 talks and writes
        log, progress = (lambda s: None), False
    try:
        with contextlib.ExitStack() as held:  # the run folder's lock, taken where it is first written
            return _finetune(cfg, d, out, resume, progress, on_step, log, on_epoch, held)
    finally:
        d.close()


def _resume_state(given: TrainConfig, out: Path, log) -> tuple[TrainConfig, dict]:
    """The run's saved config (with this call's device, workers and data) and its last.pt state."""
    state = load_checkpoint(out / "last.pt")
    cfg = TrainConfig.from_dict(state["config"])
    cfg.device, cfg.workers, cfg.data = given.device, given.workers, given.data  # the data may have moved
    cfg.tune_depthwise = state["config"].get("tune_depthwise", False)  # runs from before it existed: off
    ignored = [f"{k}={getattr(given, k)!r} (run: {v!r})" for k, v in asdict(cfg).items()
               if k not in ("device", "workers", "data", "out") and getattr(given, k) != DEFAULTS.get(k)
               and getattr(given, k) != v]
    if ignored:
        log(f"--resume keeps the run's saved settings; ignored: {', '.join(ignored)}")
    if not (out / "best.pt").is_file() and state["best"]["epoch"] > 0:  # deleted, or lost in a partial copy
        if state["epoch"] >= cfg.epochs:
            raise UserError(f"{out / 'best.pt'}: missing, and the run is complete, so its best epoch "
                            f"({state['best']['epoch']}) is lost. Train afresh into a new --out "
                            "(`edge-tl build` does that by itself).")
        log(f"warning: {out / 'best.pt'} is missing (best epoch {state['best']['epoch']} lost): the best of the "
            "epochs still to train takes its place")
        state["best"] = {"val_accuracy": -1.0, "epoch": -1}
    if state["epoch"] >= cfg.epochs:
        log(f"{out}: already complete ({cfg.epochs}/{cfg.epochs} epochs); nothing left to train")
    else:
        log(f"resuming {out} at epoch {state['epoch'] + 1}, step {state['step']} (config from last.pt)")
    return cfg, state


def _better(val_acc: float, val_loss: float, best: dict, history: list[dict]) -> bool:
    """Whether this epoch beats ``best``: higher validation accuracy, or the same with a lower
    validation loss. On a small validation split many epochs tie on accuracy (all at 100 %), and
    the first of them is often a warm-up or low-resolution epoch, less sure of what it gets right."""
    if val_acc != best["val_accuracy"]:
        return val_acc > best["val_accuracy"]
    best_loss = best.get("val_loss",  # a run resumed from before it was kept: its history has it
                         next((h["val_loss"] for h in history if h["epoch"] == best["epoch"]), math.inf))
    return val_loss < best_loss


def _log_first(lines: list[str], header: str, listing: Path, log, n: int = 20) -> None:
    """``header`` and the first ``n`` of ``lines`` (all of them go to ``listing``)."""
    if lines:
        log(header)
        for line in lines[:n]:
            log(f"  {line}")
        if len(lines) > n:
            log(f"  ... and {len(lines) - n} more (all listed in {listing})")


IMBALANCE_RATIO = 10  # largest / smallest class: past it, the rare classes' recall is worth watching


def imbalance_note(counts: list[int], classes: list[str], class_weights: str) -> str | None:
    """A line for the log when the training classes are far apart in size; None when they are not."""
    small, large = min(range(len(counts)), key=counts.__getitem__), max(range(len(counts)), key=counts.__getitem__)
    if counts[large] < IMBALANCE_RATIO * counts[small]:
        return None
    advice = ("--class-weights sqrt (or inverse) weighs the rare classes up" if class_weights == "none"
              else f"--class-weights {class_weights} weighs the rare classes up")
    return (f"note: classes differ {counts[large] / counts[small]:.0f}-fold in size ({classes[small]!r}: "
            f"{counts[small]} training image{'s' * (counts[small] != 1)}, {classes[large]!r}: {counts[large]}); "
            "accuracy can stay high while "
            f"a rare class is never right: watch the per-class recall in the report; {advice}.")


def _class_loss_weight(counts: list[int], class_weights: str, device) -> torch.Tensor:
    """Cross-entropy class weights ∝ frequency^-power, scaled so the training set's mean weight is 1."""
    counts = np.asarray(counts, dtype=np.float64)
    power = CLASS_WEIGHT_POWERS[class_weights]
    weights = (counts.sum() / (len(counts) * counts)) ** power
    return torch.tensor(weights / (weights * counts).sum() * counts.sum(), dtype=torch.float32, device=device)


def _validation_logits(eval_model, val: Split, spec: PreprocessSpec, device, cfg: TrainConfig, d: distributed.Dist,
                       num_classes: int) -> torch.Tensor:
    """Logits of every validation image; under DDP each rank scores a shard, gathered in order."""
    if d.world > 1:  # shard validation and gather it
        d.sync_buffers(eval_model)  # every shard scored by the model best.pt would hold (rank 0's)
        shard = list(range(d.rank, len(val), d.world))
        try:
            part = predict_logits(eval_model, val.subset(shard), spec, device, cfg.batch_size * 2, cfg.workers,
                                  memory_format(cfg))
        except UserError as exc:  # an image decoded at each use changed: every rank must stop, not wait
            part = exc
        parts = d.gather(part)
        _raise_any_rank_error(parts, part)
        logits = torch.zeros(len(val), num_classes)
        for r, part in enumerate(parts):
            logits[r::d.world] = part
    else:
        logits = predict_logits(eval_model, val, spec, device, cfg.batch_size * 2, cfg.workers, memory_format(cfg))
    return logits


def _finetune(cfg: TrainConfig, d: distributed.Dist, out: Path, resume: bool, progress: bool, on_step, log,
              on_epoch, held: contextlib.ExitStack) -> dict:
    cfg, state = _resume_state(cfg, out, log) if resume else (cfg, None)
    if state is None and (out / "last.pt").exists():
        raise UserError(f"{out}: already holds a run (last.pt). Add --resume to continue it, or choose another --out.")
    device = resolve_device(cfg.device)
    if d.world > 1 and device.type == "cuda":
        device = torch.device("cuda", d.local_rank)
    check_config(cfg, out)
    dtype = amp_dtype(cfg.amp, device)

    probe, _ = create_backbone(cfg.model, 2, scratch=True)  # cheap: resolves name and pretrained_cfg
    spec = preprocess_spec(probe, cfg.img_size, cfg.crop_pct)
    cfg = replace(cfg, img_size=spec.input_size[0])  # the checkpoint records the size, not "the model's"
    if note := crop_mode_note(probe):
        log(note)
    cfg = _sizes_the_model_takes(probe, cfg, spec, log)
    if state is not None:  # a run keeps the decode it started with (runs from before the reduced JPEG decode: none)
        spec = replace(spec, jpeg_reducing_gap=state.get("preprocess", {}).get("jpeg_reducing_gap"))
    _frozen_modules(probe, 0 if cfg.scratch else cfg.freeze_stages)  # a bad --freeze-stages fails before decoding
    data = discover(cfg.data, spec, cfg.val_fraction, cfg.split_seed, progress)
    if state is not None and data.classes != state["classes"]:
        raise UserError(f"{cfg.data}: classes {data.classes} differ from the run's {state['classes']} in "
                        f"{out / 'last.pt'}; resume with the run's data.")
    _log_first(data.skipped, f"skipped {len(data.skipped)} files or folders (unreadable, not images, or where "
               "training does not read):", out / "skipped.txt", log)
    if cfg.workers is None:
        cfg = replace(cfg, workers=auto_workers() if data.train.on_demand + data.val.on_demand else 0)
    if note := data.memory_note():
        log(f"{note} DataLoader workers: {cfg.workers} (--workers).")
    duplicates = data.duplicates()
    _log_first(duplicates.lines(), f"warning: byte-identical image files: {'; '.join(describe_duplicates(duplicates.counts()))}:",
               out / "duplicates.txt", log)
    num_classes = len(data.classes)
    _seed_all(cfg.seed)  # the new head's init
    model, pretrained = create_backbone(cfg.model, num_classes, cfg.weights, cfg.scratch)
    log(f"data {data.root}: {num_classes} classes, {len(data.train)} train / {len(data.val)} val ({data.val_source})")
    for note in data.odd.notes(spec):
        log(note)
    if note := imbalance_note(data.train.counts(num_classes), data.classes, cfg.class_weights):
        log(note)
    log(f"model {cfg.model}, weights: {pretrained}, device {device}, input {spec.input_size[0]}x{spec.input_size[1]}"
        + (f", {d.world} processes (DistributedDataParallel, batch {cfg.batch_size} each)" if d.world > 1 else ""))

    frozen = _frozen_modules(model, 0 if cfg.scratch else cfg.freeze_stages)
    model = model.to(device, memory_format=memory_format(cfg))
    # same parameters and state_dict; only the backward of depthwise convs changes
    tuned = device.type == "cpu" and cfg.tune_depthwise and not cfg.compile and tune_depthwise(model) > 0
    optimizer = make_optimizer(model, cfg)
    train_model = model
    if d.world > 1:
        train_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[d.local_rank] if device.type == "cuda" else None)
    if cfg.compile:
        train_model = torch.compile(train_model)
    global_batch = cfg.batch_size * d.world
    steps_per_epoch = max(1, len(data.train) // global_batch)
    scheduler, _ = create_scheduler_v2(optimizer, "cosine", num_epochs=cfg.epochs, warmup_epochs=cfg.warmup_epochs,
                                       warmup_lr=cfg.lr * 0.01, min_lr=cfg.lr * 0.01, step_on_epochs=False,
                                       updates_per_epoch=steps_per_epoch)
    ema = ModelEmaV3(model, decay=cfg.ema_decay, use_warmup=True) if cfg.ema else None
    loss_weight = _class_loss_weight(data.train.counts(num_classes), cfg.class_weights, device)
    train_step = _TrainStep(cfg, model, train_model, optimizer, scheduler, ema, loss_weight, device, dtype, num_classes)

    history: list[dict] = []
    best = {"val_accuracy": -1.0, "epoch": -1}
    start_epoch, start_step, seconds = 0, 0, 0.0
    partial = (0.0, 0, 0)  # loss sum, correct, seen of an epoch interrupted mid-way
    if state is not None:
        model.load_state_dict(state["state_dict"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if ema is not None:
            ema.module.load_state_dict(state["ema"])
        history, best = state["history"], state["best"]
        start_epoch, start_step, seconds = state["epoch"], state["step"], state["seconds"]
        partial = tuple(state.get("partial_epoch", partial))  # summed over ranks: the same on every rank

    sizes = _train_sizes(cfg, spec)
    if tuned:
        if state is None:  # a new run times its own plans: none inherited from an earlier run in this process
            clear_plans()
        load_plans((state or {}).get("depthwise_plans") or {})  # a resumed run replays its plans
        if d.is_main:  # the other ranks take rank 0's plans (and leave it the CPU while it times them)
            plan_training(model, [(cfg.batch_size, len(spec.mean), s, s) for s in sorted(set(sizes))], dtype,
                          memory_format(cfg))
        load_plans(d.gather(saved_plans())[0])

    val_split = {"source": data.val_source, "images": len(data.val), "sha256": data.val.signature(data.root)}
    complete = state is not None and state["epoch"] >= cfg.epochs
    if state is not None:
        split_moved = state.get("val_split", val_split)["sha256"] != val_split["sha256"]
        split_differs = (f"; the validation split differs ({state['val_split']['images']} images then, "
                         f"{len(data.val)} now)") if split_moved else ""
        new_split = f"{split_differs}, so best-epoch selection now uses the new one" if split_moved else ""
        if (changed := data.changes_since(out / "images.tsv")) and complete:
            log(f"warning: the data changed since this run ({changed}){split_differs}; the run is complete, so "
                "nothing trains on it and the run's record of its images stays as it was")
        elif changed:
            log(f"warning: the data changed since this run started ({changed}){new_split}; training goes on with it")
            if d.is_main:  # the images the epochs so far trained on stay on record beside the new ones
                kept = _keep_aside(out / "images.tsv")
                log(f"  the earlier image list is kept as {kept.name}")
        elif split_moved:
            log(f"warning: the data folder changed since this run started{new_split}")
    keep_record = complete and (out / "images.tsv").is_file()  # a finished run's record is of what it trained on
    images_table = (out / "images.tsv").read_text(encoding="utf-8") if keep_record else data.images_table()
    provenance = {**code_version(), **library_versions(), "torch": str(torch.__version__), "timm": timm.__version__,
                  "pretrained": ((state or {}).get("provenance") or {}).get("pretrained")  # what it started from
                  or weights_identity(cfg.model, cfg.weights, cfg.scratch),
                  "images_tsv_sha256": hashlib.sha256(images_table.encode()).hexdigest(),
                  "torch_threads": torch.get_num_threads(), "autocast": str(dtype).replace("torch.", "") if dtype else "off",
                  "depthwise_tuned": tuned, "cpu": cpu_info()["cpu"]}
    if complete and state.get("provenance"):
        provenance = state["provenance"]
    elif state is not None and (before := state.get("provenance")):
        # each changes the rounding of every step: the resumed run then differs from an uninterrupted one
        differ = [f"{k} {before.get(k)} -> {provenance[k]}" for k in ("torch_threads", "autocast", "cpu", "torch")
                  if before.get(k) != provenance[k]]
        if differ:
            log(f"warning: resumed with other settings ({'; '.join(differ)}): the result will not be bit-identical "
                "to an uninterrupted run")
    meta = {"format": CHECKPOINT_FORMAT, "edge_tl": __version__, "model_name": cfg.model, "classes": data.classes,
            "val_split": val_split, "provenance": provenance,
            "preprocess": spec.to_dict(), "pretrained": pretrained, "config": asdict(cfg)}

    def checkpoint(epoch: int, step: int, partial_epoch=(0.0, 0, 0)) -> dict:
        return {**meta, "epoch": epoch, "step": step, "seconds": seconds, "history": history, "best": best,
                "partial_epoch": list(partial_epoch), "depthwise_plans": saved_plans() if tuned else {},
                "state_dict": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "ema": ema.module.state_dict() if ema is not None else None}

    if d.is_main:
        make_folder(out)
        held.enter_context(folder_lock(out, "edge-tl finetune"))  # a second fine-tune into it is refused
        if removed := remove_stale_temps(out):
            log(f"removed what a killed run left half-written: {', '.join(removed)}")
        write_text(out / "skipped.txt", "".join(f"{s}\n" for s in data.skipped))
        write_text(out / "duplicates.txt", "".join(f"{s}\n" for s in duplicates.lines()))
        write_text(out / "odd_images.txt", "".join(f"{s}\n" for s in data.odd.lines()))
        write_text(out / "images.tsv", images_table)
    transforms = {s: train_transform(cfg, spec, s) for s in set(sizes)}

    def keep_steps_done(exc: UserError):
        """Save the epoch's steps so far (a data error: --resume goes on from them), then raise ``exc``."""
        nonlocal seconds
        seconds += time.perf_counter() - t0
        if d.is_main:
            _save_checkpoint(out / "last.pt", checkpoint(epoch, step, (loss_sum, correct, seen)))
        d.barrier()  # every rank is here (the error was agreed on): torchrun stops them all once one exits
        raise worker_error(exc) from None

    # decided once for all ranks (each one's memory budget is its own): a rank that checks waits for the others
    agree_on_data_errors = d.world > 1 and d.sum((float(data.train.on_demand),), device)[0] > 0

    eval_model = ema.module if ema is not None else model
    step = start_step
    for epoch in range(start_epoch, cfg.epochs):
        t0 = time.perf_counter()
        epoch_seed = _mix(cfg.seed, epoch)
        order = torch.randperm(len(data.train), generator=torch.Generator().manual_seed(epoch_seed)).tolist()
        order = order[: steps_per_epoch * global_batch] if len(order) >= global_batch else order
        order = order[d.rank::d.world]  # this rank's shard
        view_seed = _mix(epoch_seed, d.rank) if d.world > 1 else epoch_seed
        view = _EpochView(data.train, order, start_step * cfg.batch_size, transforms[sizes[epoch]], view_seed)
        loader = torch.utils.data.DataLoader(view, batch_size=cfg.batch_size, num_workers=cfg.workers,
                                             pin_memory=device.type == "cuda")
        model.train()
        for m in frozen:
            m.eval()
        loss_sum, correct, seen = partial if start_step else (0.0, 0, 0)
        batches = _agreed_batches(loader, d, check=agree_on_data_errors)
        bar = tqdm(batches, desc=f"epoch {epoch + 1}/{cfg.epochs} @{sizes[epoch]}px", unit="batch",
                   initial=start_step, total=steps_per_epoch, disable=None if progress else True, leave=False)
        step = start_step
        interrupt = _StepBoundaryInterrupt()
        try:
            with interrupt:
                for x, y in bar:
                    torch.manual_seed(_mix(epoch_seed, step, 7))
                    loss, logits, y = train_step(x, y, epoch * steps_per_epoch + step + 1)
                    step += 1  # after the step: a checkpoint never counts one that did not finish
                    # summed over ranks every step, so a checkpoint taken mid-epoch holds the whole epoch so far
                    step_loss, step_correct, step_seen = d.sum(
                        (loss.item() * len(y), (logits.argmax(1) == y).sum().item(), len(y)), device)
                    loss_sum += step_loss
                    correct += int(step_correct)
                    seen += int(step_seen)
                    bar.set_postfix(loss=f"{loss_sum / seen:.3f}", acc=f"{correct / seen:.3f}")
                    if on_step is not None:
                        on_step(epoch * steps_per_epoch + step)
                    interrupt.check()
        except (KeyboardInterrupt, RuntimeError) as exc:
            if isinstance(exc, RuntimeError) and interrupt.pending is None:
                raise  # a real error, not a data-loader worker stopped by the same Ctrl-C
            seconds += time.perf_counter() - t0
            bar.close()
            if interrupt.forced:  # mid-step: the last.pt of an earlier boundary stays what --resume continues
                log("stopped at once (interrupted twice): last.pt keeps the last step boundary it saved")
            elif d.is_main:
                _save_checkpoint(out / "last.pt", checkpoint(epoch, step, (loss_sum, correct, seen)))
            raise (exc if isinstance(exc, KeyboardInterrupt) else interrupt.exception()) from None
        except UserError as exc:  # an image decoded at each use changed since the scan: keep the steps done
            bar.close()
            keep_steps_done(exc)
        start_step = 0
        try:
            logits = _validation_logits(eval_model, data.val, spec, device, cfg, d, num_classes)
        except UserError as exc:
            keep_steps_done(exc)
        yv = torch.tensor(data.val.labels)
        val_loss = F.cross_entropy(logits, yv).item()
        val_acc = (logits.argmax(1) == yv).float().mean().item()
        seconds += time.perf_counter() - t0
        history.append({"epoch": epoch + 1, "train_loss": loss_sum / max(seen, 1), "train_accuracy": correct / max(seen, 1),
                        "val_loss": val_loss, "val_accuracy": val_acc, "lr": max(g["lr"] for g in optimizer.param_groups),
                        "img_size": sizes[epoch], "seconds": round(seconds, 2)})
        log(f"epoch {epoch + 1}/{cfg.epochs}: train_loss {history[-1]['train_loss']:.4f} val_loss {val_loss:.4f} "
            f"val_acc {val_acc:.4f} ({seconds:.0f}s elapsed)")
        if _better(val_acc, val_loss, best, history):
            best = {"val_accuracy": val_acc, "val_loss": val_loss, "epoch": epoch + 1,
                    "confusion": confusion_matrix(data.val.labels, logits.argmax(1).tolist(), num_classes)}
            if d.is_main:
                _save_checkpoint(out / "best.pt", {**meta, "epoch": epoch + 1, "val_accuracy": val_acc,
                                                  "state_dict": eval_model.state_dict()})
        if d.is_main:
            _save_checkpoint(out / "last.pt", checkpoint(epoch + 1, 0))
            write_text(out / "history.jsonl", "".join(json.dumps(h) + "\n" for h in history))
        if on_epoch is not None:
            on_epoch(epoch + 1, eval_model)

    metrics = {
        "best_val_accuracy": best["val_accuracy"], "best_epoch": best["epoch"], "classes": data.classes,
        "num_train": len(data.train), "num_val": len(data.val), "val_source": data.val_source,
        "train_class_counts": data.train.counts(num_classes), "val_class_counts": data.val.counts(num_classes),
        "val_confusion": best["confusion"], "model": cfg.model, "pretrained": pretrained,
        "seconds": round(seconds, 2), "epochs": cfg.epochs, "device": str(device), "preprocess": spec.to_dict(),
        "skipped_files": len(data.skipped), "decoded_at_each_use": data.train.on_demand + data.val.on_demand,
        "odd_images": data.odd.counts(),
        "duplicates": duplicates.counts(), "config": asdict(cfg), "edge_tl": __version__,
        "torch": torch.__version__, "timm": timm.__version__, "processes": d.world, "provenance": provenance,
    }
    if d.is_main:
        write_json(out / "metrics.json", metrics)
        from .plots import plot_confusion, plot_history

        plot_history(history, out / "learning_curve.png")
        plot_confusion(best["confusion"], data.classes, out / "confusion_matrix.png",
                       title=f"validation, epoch {best['epoch']} (acc {best['val_accuracy']:.3f})")
    d.barrier()  # other ranks leave once rank 0's files are complete
    return metrics
