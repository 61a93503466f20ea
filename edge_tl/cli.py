"""The ``edge-tl`` command: a thin typer layer over the library; user mistakes exit 2."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer

from edge_tl import __version__
from edge_tl.errors import UserError
from edge_tl.finetune.config import DEFAULTS as D
from edge_tl.finetune.config import TrainConfig

app = typer.Typer(
    help="edge-tl: fine-tune a pretrained backbone on your images and take it to an edge device.\n\n"
    "Example: edge-tl data elpv --out demo && edge-tl finetune --data demo --out runs/elpv",
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


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="Print the version and exit.")) -> None:
    pass


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
    model: str = typer.Option(D["model"], help="timm model name."),
    weights: Optional[Path] = typer.Option(None, help="Local pretrained weights (.pth/.safetensors) for --model."),
    scratch: bool = typer.Option(False, help="Random init instead of pretrained weights (same recipe)."),
    epochs: int = typer.Option(D["epochs"], help="Training epochs."),
    img_size: int = typer.Option(D["img_size"], help="Network input size (square)."),
    crop_pct: Optional[float] = typer.Option(None, help="Eval center-crop fraction (default: the model's pretrained_cfg)."),
    batch_size: int = typer.Option(D["batch_size"], help="Batch size."),
    lr: float = typer.Option(D["lr"], help="Peak learning rate (AdamW, warmup + cosine)."),
    freeze_stages: int = typer.Option(D["freeze_stages"], help="Keep the stem and this many early stages frozen (faster; 0 = none)."),
    low_res_epochs: float = typer.Option(D["low_res_epochs"], help="Fraction of epochs trained at 3/4 resolution (faster)."),
    scale_min: float = typer.Option(D["scale_min"], help="Smallest random-resized-crop area (keep high when small details decide the class)."),
    ema: bool = typer.Option(D["ema"], help="Keep an exponential moving average of the weights and select on it."),
    class_weights: str = typer.Option(D["class_weights"], help="Loss weight per class from its frequency: none, sqrt or inverse."),
    vflip: float = typer.Option(D["vflip"], help="Vertical-flip probability (for data without an 'up', e.g. cells, slides)."),
    seed: int = typer.Option(D["seed"], help="Training seed (the validation split always uses seed 0)."),
    workers: int = typer.Option(D["workers"], help="Data-loader worker processes (0: in the training process)."),
    device: str = typer.Option(D["device"], help="auto, cpu or cuda."),
    resume: bool = typer.Option(False, help="Continue OUT/last.pt with its saved settings."),
    json_out: bool = typer.Option(False, "--json", help="Print metrics.json at the end."),
) -> None:
    """Fine-tune a pretrained timm backbone on a folder of labelled images.

    Writes OUT/best.pt, last.pt, history.jsonl, metrics.json, learning_curve.png and
    confusion_matrix.png. Ctrl-C saves last.pt; --resume continues exactly.

    Example: edge-tl finetune --data demo --out runs/elpv --epochs 10
    """
    from edge_tl.finetune.train import finetune as run

    cfg = TrainConfig(data=str(data), out=str(out), model=model, weights=str(weights) if weights else None,
                      scratch=scratch, epochs=epochs, img_size=img_size, crop_pct=crop_pct, batch_size=batch_size,
                      lr=lr, freeze_stages=freeze_stages, low_res_epochs=low_res_epochs, scale_min=scale_min, ema=ema,
                      class_weights=class_weights, vflip=vflip, seed=seed, workers=workers, device=device)
    log = (lambda s: typer.echo(s, err=True)) if json_out else typer.echo
    try:
        metrics = run(cfg, resume=resume, log=log)
    except KeyboardInterrupt:
        typer.echo(f"\ninterrupted: progress saved to {out / 'last.pt'}; continue with the same command plus --resume",
                   err=True)
        raise typer.Exit(130)
    if json_out:
        typer.echo(json.dumps(metrics, indent=2))
    else:
        typer.echo(f"best val accuracy {metrics['best_val_accuracy']:.4f} at epoch {metrics['best_epoch']} "
                   f"({metrics['seconds']:.0f}s); run folder {out}")


def main() -> None:
    """Entry point: user errors print one line and exit 2, never a traceback."""
    try:
        app()
    except UserError as exc:
        typer.echo(f"error: {exc}", err=True)
        sys.exit(2)
