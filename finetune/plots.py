"""Learning-curve and confusion-matrix PNGs (matplotlib, headless)."""

from __future__ import annotations

import functools
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from edge_tl.fileio import atomic_write  # noqa: E402


@functools.lru_cache(maxsize=None)
def _charmap(font_file: str) -> frozenset[int]:
    from matplotlib.ft2font import FT2Font

    try:
        return frozenset(FT2Font(font_file).get_charmap())
    except (OSError, RuntimeError):  # a font FreeType cannot open covers nothing
        return frozenset()


def class_tick_labels(classes: list[str]) -> tuple[list[str], list[str], str]:
    """Tick labels for class names, the font families to draw them with, and a note.

    Matplotlib's default font lacks CJK, emoji and many scripts (each missing glyph drew a box
    and warned). Another installed font that has every character is added as a fallback; where
    none has, such names are drawn as ``class <index>`` and the note says so (labels.txt and
    the report's tables keep the real names). A ``$`` is drawn as itself, not as the start of
    matplotlib's mathtext (``$\\nocmd{x}$`` as a class name made the plot raise)."""
    from matplotlib import font_manager

    classes = [c.replace("$", r"\$") for c in classes]
    default = matplotlib.rcParams["font.family"]
    need = {ord(c) for name in classes for c in name if not c.isspace()}
    missing = need - _charmap(font_manager.findfont(font_manager.FontProperties(family=default)))
    if not missing:
        return list(classes), list(default), ""
    for font in sorted({(f.name, f.fname) for f in font_manager.fontManager.ttflist}):
        if not font[0].startswith("Last Resort") and missing <= _charmap(font[1]):  # its glyphs are boxes
            return list(classes), [*default, font[0]], ""
    unshown = [i for i, name in enumerate(classes) if any(ord(c) in missing for c in name)]
    labels = [f"class {i}" if i in unshown else name for i, name in enumerate(classes)]
    return labels, list(default), f"{len(unshown)} name(s) need a font missing here: shown as 'class <index>' (see labels.txt)"


def _save(fig, path: Path) -> None:
    atomic_write(path, lambda p: fig.savefig(p, format="png", dpi=110, bbox_inches="tight"))
    plt.close(fig)


def plot_history(history: list[dict], path: str | Path) -> None:
    """Train/val loss and val accuracy per epoch, the best epoch marked."""
    epochs = [h["epoch"] for h in history]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.6))
    ax1.plot(epochs, [h["train_loss"] for h in history], "o-", label="train")
    ax1.plot(epochs, [h["val_loss"] for h in history], "o-", label="val")
    ax1.set(xlabel="epoch", ylabel="loss", title="loss")
    ax1.legend()
    acc = [h["val_accuracy"] for h in history]
    ax2.plot(epochs, acc, "o-", color="C2", label="val accuracy")
    best = int(np.argmax(acc))
    ax2.annotate(f"best {acc[best]:.3f}", (epochs[best], acc[best]), textcoords="offset points", xytext=(0, -14),
                 ha="center")
    ax2.set(xlabel="epoch", ylabel="accuracy", title="validation accuracy")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
    _save(fig, Path(path))


def confusion_figure(cm: list[list[int]], classes: list[str], title: str = ""):
    """Counts with row-normalized colour (recall per true class); returns the figure."""
    m = np.asarray(cm, dtype=np.float64)
    norm = m / np.maximum(m.sum(1, keepdims=True), 1)
    n = len(classes)
    fig, ax = plt.subplots(figsize=(1.2 + 0.8 * n, 1 + 0.7 * n))
    ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    for i in range(n):
        for j in range(n):
            if m[i, j] or n <= 10:  # with many classes a grid of zeros hides the errors
                ax.text(j, i, int(m[i, j]), ha="center", va="center", color="white" if norm[i, j] > 0.6 else "black")
    labels, families, note = class_tick_labels(classes)
    ax.set_xticks(range(n), labels, rotation=45, ha="right", fontfamily=families)
    ax.set_yticks(range(n), labels, fontfamily=families)
    ax.set(xlabel="predicted" + (f"\n{note}" if note else ""), ylabel="true", title=title)
    return fig


def plot_confusion(cm: list[list[int]], classes: list[str], path: str | Path, title: str = "") -> None:
    _save(confusion_figure(cm, classes, title), Path(path))


def draw_transfer(ax, curves: dict[str, list[list[float]]], ylabel: str) -> None:
    """Pretrained vs scratch accuracy per epoch on ``ax`` (mean and min-max band over seeds),
    with the start, the epoch reaching 90 % of the best, and the asymptote marked."""
    for init, color in (("pretrained", "C0"), ("scratch", "C3")):
        runs = np.asarray(curves[init])
        epochs = np.arange(1, runs.shape[1] + 1)
        mean = runs.mean(0)
        seeds = f" (mean of {len(runs)} seeds)" if len(runs) > 1 else ""
        ax.plot(epochs, mean, "o-", color=color, label=init + seeds)
        if len(runs) > 1:
            ax.fill_between(epochs, runs.min(0), runs.max(0), color=color, alpha=0.15)
        best = mean.max()
        reach = int(np.argmax(mean >= 0.9 * best)) + 1
        ax.annotate(f"start {mean[0]:.2f}", (1, mean[0]), textcoords="offset points", xytext=(8, -4), color=color)
        ax.axvline(reach, color=color, ls=":", alpha=0.6)
        ax.axhline(best, color=color, ls="--", alpha=0.5)
        ax.annotate(f"asymptote {best:.2f}; 90 % of it by epoch {reach}", (epochs[-1], best),
                    textcoords="offset points", xytext=(-4, 4), ha="right", color=color)
    ax.set(xlabel="epoch", ylabel=ylabel)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
