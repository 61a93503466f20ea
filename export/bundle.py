"""``edge-tl export``: a fine-tuned run -> a bundle (ONNX FP32/FP16/INT8, engines, golden outputs, manifest).

The bundle is written into a temporary folder next to ``out`` and renamed onto it at the
end, so an interrupted export never leaves a half bundle behind.
"""

from __future__ import annotations

import datetime as dt
import io
import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import timm
import torch
from PIL import Image

from edge_tl.errors import UserError
from edge_tl.fileio import replace_folder, sha256_file, temp_folder, write_text
from edge_tl.provenance import code_version, library_versions
from edge_tl.finetune.config import check_out_beside_data
from edge_tl.finetune.data import discover, pixels_of, stratified_sample
from edge_tl.finetune.train import load_model, predict_logits
from edge_tl.runtime import trt_support as ts
from edge_tl.runtime.bundle import GITATTRIBUTES, GOLDEN, LABELS, MANIFEST, SCHEMA_VERSION, Bundle
from edge_tl.runtime.check import accuracy
from edge_tl.runtime.images import SYSTEM_FILES
from edge_tl.runtime.monitor import reference_record
from edge_tl.runtime.scores import fit_temperature

from . import tensorrt as trt_build
from .device import ONNX_FILES, build_engines, bundle_readme
from .onnx_export import INPUT_NAME, OUTPUT_NAME, export_onnx, to_fp16
from .quantize import (BIAS_CORRECTION_ROUNDS, CALIB_METHODS, FLAVOURS, batch1_latency, histogram_image_limit,
                       onnx_logits, quantize_within_budget, slower_than_fp32)

TARGETS = {
    # target: default precisions, INT8 flavour, default batch profile, why
    "cpu": ("fp32,int8", "cpu", "1:1:32", "ONNX Runtime on a CPU (x86 with VNNI, or ARM)"),
    "gpu": ("fp32,fp16,int8", "tensorrt", "1:8:32", "an NVIDIA GPU: TensorRT engines, or ONNX Runtime's CUDA/TensorRT providers"),
    "jetson": ("fp32,fp16,int8", "tensorrt", "1:1:8", "a Jetson (Orin) with JetPack's TensorRT; engines built on the device"),
}


def versions() -> dict:
    trt = None
    try:
        import tensorrt

        trt = tensorrt.__version__
    except ImportError:
        pass
    return {**code_version(), **library_versions(), "torch": str(torch.__version__), "timm": timm.__version__,
            "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__, "tensorrt": trt}


def _junk(name: str) -> bool:
    """Files a replaced bundle may hold without anyone missing them: an interrupted write's temp file,
    what Finder and Explorer leave (.DS_Store, ._*, Thumbs.db, desktop.ini)."""
    return (name.lower() in SYSTEM_FILES or name in (".DS_Store",) or name.startswith("._")
            or (name.startswith(".") and name.endswith(".tmp")))


def _check_replaceable(out: Path, run: Path, data: Path) -> None:
    """--force replaces only an earlier bundle, never the run, its data or a folder holding them."""
    target = out.resolve()
    for kept, what in ((run, "the run being exported"), (data, "the run's data")):
        if target == kept.resolve() or target in kept.resolve().parents:
            raise UserError(f"{out}: holds {what} ({kept}); --force would delete it. Choose another --out.")
    if not (out / MANIFEST).is_file():
        raise UserError(f"{out}: exists and is not a bundle (no {MANIFEST}); --force only replaces a bundle. "
                        "Choose another --out, or remove the folder yourself.")
    try:
        manifest = json.loads((out / MANIFEST).read_text(encoding="utf-8"))
        listed = set(manifest["files"]) if isinstance(manifest["schema"], int) else None
    except (OSError, ValueError, KeyError, TypeError):
        listed = None
    if listed is None:
        raise UserError(f"{out}: its {MANIFEST} is not an edge-tl manifest; --force only replaces a bundle. Choose "
                        "another --out, or remove the folder yourself.")
    ours = listed | {MANIFEST, "README.md", ".gitattributes", LABELS, GOLDEN}
    others = sorted(str(f.relative_to(out)) for f in out.rglob("*") if not f.is_dir() and
                    f.relative_to(out).as_posix() not in ours and f.relative_to(out).parts[0] != "engines"
                    and not _junk(f.name))
    if others:
        raise UserError(f"{out}: holds files that are not the bundle's ({', '.join(others[:3])}"
                        f"{', ...' if len(others) > 3 else ''}), which --force would delete. Move them out, or "
                        "choose another --out.")


def export_bundle(run: str | Path, out: str | Path, target: str = "cpu", precisions: str | None = None,
                  calib_images: int = 512, calib_method: str = "auto", batch: str | None = None,
                  max_drop: float = 1.0, data: str | Path | None = None, golden_count: int = 32,
                  workspace_mb: int = 1024, force: bool = False, progress: bool = True, int8_default: str = "auto",
                  bias_correction: bool = True, log=print) -> Bundle:
    """Export ``run/best.pt`` as a bundle at ``out`` for ``target``; returns the loaded, verified bundle.

    ``int8_default``: whether apps get the CPU INT8 by default: "auto" where it ran faster than FP32
    here at batch 1 (a timing: two exports on a busy machine may decide differently), "yes" or "no"
    (the same bundle every time; its speed is still measured and recorded). ``bias_correction``: INT8
    biases corrected for the mean shift of int8 weights (:func:`correct_biases`), the default."""
    if int8_default not in ("auto", "yes", "no"):
        raise UserError(f"--int8-default {int8_default}: use auto, yes or no.")
    if target not in TARGETS:
        raise UserError(f"--target {target}: use one of {', '.join(TARGETS)}.")
    default_precisions, flavour, default_batch, _ = TARGETS[target]
    wanted = trt_build.parse_precisions(precisions or default_precisions)
    profile = trt_build.BatchProfile.parse(batch or default_batch)
    if max_drop < 0 or calib_images < 1 or golden_count < 1:
        raise UserError(f"--max-drop {max_drop} / --calib-images {calib_images} / --golden {golden_count}: must be "
                        ">= 0 / >= 1 / >= 1.")
    if calib_method not in ("auto", *CALIB_METHODS):
        raise UserError(f"--calib-method {calib_method}: use auto, {', '.join(CALIB_METHODS)}.")
    run, out = Path(run), Path(out)
    if not (run / "best.pt").is_file():
        raise UserError(f"{run}: no best.pt. Pass a run folder made by `edge-tl finetune --out RUN`.")
    if out.exists() and not force:
        raise UserError(f"{out}: already exists. Choose another --out, or add --force to replace it.")

    model, ckpt = load_model(run / "best.pt")
    spec = ckpt_spec(ckpt)
    cfg = ckpt["config"]
    data = Path(data or cfg["data"])
    if not data.exists():
        raise UserError(f"{data}: the run's data folder is gone; pass --data DIR with the same ImageFolder "
                        "(its training split calibrates INT8, its validation split measures accuracy).")
    check_out_beside_data(out, data)
    if out.exists():
        _check_replaceable(out, run, data)
    ds = discover(data, spec, cfg["val_fraction"], cfg["split_seed"], progress)
    if ds.classes != ckpt["classes"]:
        raise UserError(f"{data}: classes {ds.classes} differ from the run's {ckpt['classes']}; pass the run's data.")
    log(f"export {run} -> {out} (target {target}: {', '.join(wanted)}); validation {len(ds.val)} images ({ds.val_source})")
    if note := ds.memory_note("export"):
        log(note)
    trained_val = ckpt.get("val_split")  # runs from before it was recorded have none
    recorded = (ckpt.get("provenance") or {}).get("images_tsv_sha256")
    table = run / "images.tsv"
    data_note = None  # recorded in the manifest: the bundle says what its figures were measured on
    if changed := ds.changes_since(table):
        data_note = f"{data} changed since the fine-tune ({changed})"
        log(f"warning: {data_note}, so the validation figures below may not be the ones the run was selected on, "
            "or may include images the model trained on. Export with the run's data for figures you can trust.")
    elif trained_val and trained_val["sha256"] != ds.val.signature(ds.root):
        data_note = (f"{data} changed since the fine-tune: its validation split is not the one the run was selected "
                     f"on ({trained_val['images']} images then, {len(ds.val)} now)")
        log(f"warning: {data_note}, so it may hold images the model trained on and the validation figures below "
            "may read high. Export with the run's data for figures you can trust.")
    elif recorded and (not table.is_file() or sha256_file(table) != recorded):
        data_note = (f"{table} is {'missing' if not table.is_file() else 'not the one best.pt was trained with'}, "
                     "so the data cannot be compared with the run's")
        log(f"warning: {data_note}; the validation figures below are as good as the data passed.")
    history = run / "history.jsonl"
    epochs_done = len(history.read_text().splitlines()) if history.is_file() else None
    finished = (run / "metrics.json").is_file()
    if not finished:
        log(f"warning: {run} has not finished (no metrics.json; {epochs_done or 'an unknown number of'} of "
            f"{cfg['epochs']} epochs ran): this exports its best epoch so far, epoch {ckpt.get('epoch')}. "
            f"`edge-tl finetune --data {data} --out {run} --resume` finishes it.")

    tmp = temp_folder(out)
    try:
        manifest = _write_bundle(tmp, model, ckpt, spec, ds, target, flavour, wanted, profile, calib_images,
                                 calib_method, max_drop, golden_count, int8_default,
                                 BIAS_CORRECTION_ROUNDS if bias_correction else 0, log)
        manifest["run"]["path"], manifest["data"] = str(Path(run).resolve()), str(Path(data).resolve())
        manifest["run"].update(finished=finished, epochs_done=epochs_done, epochs_planned=cfg["epochs"],
                               best_sha256=sha256_file(run / "best.pt"), config=cfg,
                               provenance=ckpt.get("provenance"), data_changed=data_note)
        bundle = Bundle(tmp, manifest)
        for f in sorted(p for p in tmp.rglob("*") if p.is_file()):
            bundle.add_file(f.relative_to(tmp).as_posix())
        bundle.save()
        # not hashed (a copy without dotfiles still loads): git on Windows (core.autocrlf) would otherwise
        # turn labels.txt's line endings into CRLF, which verification then names
        write_text(tmp / ".gitattributes", GITATTRIBUTES)
        if wanted != ["fp32"] and target in ("gpu", "jetson"):
            reason = ts.missing_reason()
            if reason is None and target == "jetson" and not ts.on_jetson():  # its engines would be for this GPU
                reason = f"this is not a Jetson: engines run only on the GPU model that built them ({ts.gpu_name()} here)"
            if reason is None:
                build_engines(bundle, wanted, workspace_mb=workspace_mb, log=log)
            else:
                log(f"TensorRT engines not built here ({reason.rstrip('.')}). "
                    f"On the device: edge-tl engine {out}   (see {out / 'README.md'})")
        write_text(tmp / "README.md", bundle_readme(bundle, out))  # notes for people: not hashed, rewritten by each export
        replace_folder(tmp, out)  # an interrupted --force keeps the old bundle whole (renamed aside at worst)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return Bundle.load(out)


def ckpt_spec(ckpt: dict):
    from edge_tl.runtime.spec import PreprocessSpec

    try:
        return PreprocessSpec.from_dict(ckpt["preprocess"])
    except (KeyError, TypeError, ValueError) as exc:
        raise UserError(f"checkpoint of {ckpt.get('model_name')}: invalid preprocessing record ({exc}); "
                        "re-run the fine-tune.") from None


def _write_bundle(tmp: Path, model, ckpt, spec, ds, target, flavour, wanted, profile, calib_images, calib_method,
                  max_drop, golden_count, int8_default, bias_correction_rounds, log) -> dict:
    classes = ckpt["classes"]
    val_labels = np.asarray(ds.val.labels)
    val_pixels = pixels_of(ds.val, spec)
    torch_logits = predict_logits(model, ds.val, spec, torch.device("cpu")).numpy()
    torch_acc = accuracy(torch_logits, val_labels)

    fp32 = export_onnx(model, spec, tmp / ONNX_FILES["fp32"])
    fp32_logits = onnx_logits(fp32, val_pixels)
    fp32_acc = accuracy(fp32_logits, val_labels)
    parity = {"images": len(val_labels), "max_abs_logit_diff": float(np.abs(fp32_logits - torch_logits).max()),
              "top1_agreement": float((fp32_logits.argmax(1) == torch_logits.argmax(1)).mean()),
              "torch_val_accuracy": torch_acc}
    log(f"fp32 ONNX: val accuracy {fp32_acc:.4f} (PyTorch {torch_acc:.4f}), max |logit diff| "
        f"{parity['max_abs_logit_diff']:.2e}, top-1 agreement {parity['top1_agreement']:.4f}")
    artifacts = [_artifact("fp32", "fp32", "any", fp32_acc, fp32_acc)]

    if "fp16" in wanted:
        to_fp16(fp32, tmp / ONNX_FILES["fp16"])
        acc = accuracy(onnx_logits(tmp / ONNX_FILES["fp16"], val_pixels), val_labels)
        log(f"fp16 ONNX: val accuracy {acc:.4f} (ONNX Runtime CPU)")
        artifacts.append(_artifact("fp16", "fp16", "tensorrt", acc, fp32_acc))

    calibration = None
    if "int8" in wanted:
        if calib_method == "auto":  # chosen on ELPV validation: see benchmarks/README.md
            calib_method = FLAVOURS[flavour].calib_method
        n = calib_images
        if calib_method != "minmax" and n > (limit := histogram_image_limit(fp32)):
            log(f"  {calib_method} calibration keeps all activations in memory (ONNX Runtime): "
                f"using {limit} of {n} calibration images")
            n = limit
        idx = stratified_sample(ds.train.labels, n)
        calib = pixels_of(ds.train, spec, idx)
        calibration = {"images": len(idx), "source": "training split (stratified)", "method": calib_method,
                       "bias_correction_rounds": bias_correction_rounds,
                       "class_counts": np.bincount([ds.train.labels[i] for i in idx], minlength=len(classes)).tolist(),
                       "preprocessing": "eval (resize + center crop)"}
        name = FLAVOURS[flavour].artifact
        log(f"int8 ({flavour} flavour): calibrating on {len(idx)} training images ({calib_method})")
        record = quantize_within_budget(fp32, tmp / ONNX_FILES[name], calib, val_pixels, val_labels, fp32_logits,
                                        flavour, calib_method, max_drop, bias_correction_rounds, log)
        art = _artifact(name, "int8", FLAVOURS[flavour].backend, record["val_accuracy"], fp32_acc)
        art.update(flavour=flavour, why=record["why"], float_nodes=record["float_nodes"], accepted=record["accepted"],
                   noise_pts=record["noise_pts"], noise_allowance_pts=record["noise_allowance_pts"],
                   max_drop=record["max_drop"], fp32_agreement=record["fp32_agreement"], tries=record["tries"])
        if flavour == "cpu":  # this flavour runs on ONNX Runtime CPU, as here: is it worth running?
            art["speed"] = batch1_latency(fp32, tmp / ONNX_FILES[name], val_pixels)
            log(f"int8 speed here: {art['speed']['int8_ms']:.2f} ms vs fp32 {art['speed']['fp32_ms']:.2f} ms at batch 1 "
                f"(paired ratio {art['speed']['ratio']:.2f}x, ONNX Runtime CPU)")
            if int8_default == "no" or (int8_default == "auto" and not art["speed"]["faster"]):
                # still accepted (its accuracy holds) and checked, only not picked
                art.update(default=False, not_default="not the default: --int8-default no" if int8_default == "no"
                           else slower_than_fp32(art["speed"]))
                log(f"note: {name} is {art['not_default']}")
        if not record["accepted"]:
            art["rejected"] = record["rejected"]
            log(f"warning: {name} not accepted: {record['rejected']}. Predictor uses it only when asked for "
                f"(--precision int8); `edge-tl check BUNDLE --data TEST_DIR` measures it on more images.")
        artifacts.append(art)

    scores = fit_temperature(torch_logits, val_labels)  # argmax unchanged: only the scores apps threshold
    log(f"scores: temperature {scores['temperature']}" + (f" ({scores['skipped']})" if "skipped" in scores else
        f", validation ECE {scores['ece'][0]:.3f} -> {scores['ece'][1]:.3f}, NLL {scores['nll'][0]:.3f} -> {scores['nll'][1]:.3f}"))
    gidx = np.linspace(0, len(ds.val) - 1, min(golden_count, len(ds.val))).round().astype(int)
    sources = preprocess_sources(spec, [ds.val.array(i) for i in gidx[:len(SOURCE_SHAPES)]])
    jpeg = {}
    if spec.jpeg_min_shorter:
        data = camera_jpeg(spec, ds.val.array(gidx[0]))
        jpeg = {"jpeg_source": np.frombuffer(data, np.uint8), "jpeg_pixels": spec.to_pixels(spec.load(data))}
    np.savez_compressed(tmp / GOLDEN, pixels=val_pixels[gidx], logits=torch_logits[gidx].astype(np.float32),
                        labels=val_labels[gidx], source_pixels=np.stack([spec.to_pixels(Image.fromarray(a)) for a in sources]),
                        **{f"source_{i}": a for i, a in enumerate(sources)}, **jpeg)
    write_text(tmp / LABELS, "".join(c + "\n" for c in classes))
    h, w = spec.input_size
    return {
        "schema": SCHEMA_VERSION, "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "model": ckpt["model_name"], "pretrained": ckpt.get("pretrained"), "classes": classes, "target": target,
        "preprocess": {**spec.to_dict(), "steps": spec.steps()},
        "input": {"name": INPUT_NAME, "shape": ["batch", 3, h, w], "dtype": "float32", "layout": "NCHW",
                  "channel_order": "RGB", "value_range": [0, 255], "normalized_in_graph": True,
                  "range": "RGB pixels 0-255 after resize + center crop; mean/std are inside the graph"},
        "output": {"name": OUTPUT_NAME, "shape": ["batch", len(classes)], "dtype": "float32", "meaning": "logits",
                   "temperature": scores["temperature"], "scores": "softmax(logits / temperature)"},
        "scores": scores,
        "reference": reference_record(val_pixels, fp32_logits, scores["temperature"]),
        "batch": profile.to_dict(),
        "run": {"best_val_accuracy": ckpt.get("val_accuracy"), "best_epoch": ckpt.get("epoch")},
        "validation": {"images": len(val_labels), "source": ds.val_source},
        "parity": parity, "calibration": calibration, "artifacts": artifacts,
        "golden": {"file": GOLDEN, "count": int(len(gidx)), "reference": "PyTorch FP32 logits of best.pt",
                   "keys": {"pixels": "uint8 N×H×W×3 model inputs (validation images)", "logits": "their float32 logits",
                            "labels": "their int64 labels", "source_<i>": "uint8 H×W×3 RGB images of other sizes",
                            "source_pixels": "uint8 N×H×W×3: source_<i> after preprocess.steps (a port's test vectors)",
                            **({"jpeg_source": "uint8 bytes of a camera-sized JPEG of golden image 0",
                                "jpeg_pixels": "uint8 H×W×3: jpeg_source decoded (reduced) and preprocessed"} if jpeg
                               else {})}},
        "versions": versions(), "files": {},
    }


# (width, height) of the preprocessing test sources, from the shorter-side size R and the input (h, w):
# landscape and portrait downscales whose crops land on half pixels, and an upscale
SOURCE_SHAPES = (lambda r, h, w: (r + 37, r + 11), lambda r, h, w: (r + 3, 2 * r + 1), lambda r, h, w: (w // 2 + 1, h // 2 + 7))


def preprocess_sources(spec, arrays: list[np.ndarray]) -> list[np.ndarray]:
    """Real images resized to the odd shapes of ``SOURCE_SHAPES``: inputs whose expected pixels test a preprocessing port."""
    h, w = spec.input_size
    return [np.asarray(Image.fromarray(a).convert("RGB").resize(shape(spec.resize_size, h, w), Image.Resampling.BILINEAR))
            for a, shape in zip(arrays, SOURCE_SHAPES)]


def camera_jpeg(spec, array: np.ndarray) -> bytes:
    """A real image as a camera's JPEG, the test vector of the decode step: 4:3, its shorter side the
    first multiple of 16 from 2 × ``jpeg_min_shorter`` (so decoded at 1/2), EXIF orientation 6 (the
    turn comes after the reduced decode)."""
    short = -(-2 * spec.jpeg_min_shorter // 16) * 16
    img = Image.fromarray(array).convert("RGB").resize((short * 4 // 3 // 16 * 16, short), Image.Resampling.LANCZOS)
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90, exif=exif)
    return buf.getvalue()


def _artifact(name: str, precision: str, backend: str, acc: float, fp32_acc: float) -> dict:
    return {"name": name, "file": ONNX_FILES[name], "format": "onnx", "precision": precision, "backend": backend,
            "val_accuracy": acc, "drop_pts": round((fp32_acc - acc) * 100, 3), "float_nodes": [], "accepted": True}
