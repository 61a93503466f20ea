"""Find, check and split an ImageFolder; decode every image once into a memory cache (the
images that do not fit in memory are decoded again at each use).

Layouts: ``DIR/<class>/*`` or ``DIR/train/<class>/*`` with optional ``DIR/val/<class>/*``.
A ``DIR/test/`` folder is never read here: the test split is for the final figure only.
"""

from __future__ import annotations

import hashlib
import os
import random
import re
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image
from tqdm import tqdm

from edge_tl.errors import UserError
from edge_tl.fileio import sha256_file
from edge_tl.runtime.images import (CONVERT_FIRST, IMAGE_EXTENSIONS, MAX_DECODE_THREADS, UnreadableImage,
                                    class_folders, class_key, cpu_cores, hidden, image_files, in_order, path_order,
                                    visible_files)
from edge_tl.runtime.spec import PreprocessSpec

from .config import VAL_FOLDERS, split_folder


def decode_resized(spec: PreprocessSpec, image) -> np.ndarray:
    """RGB uint8 pixels of ``image`` (a path or the file's bytes), shorter side resized per
    ``spec``: what the memory cache holds."""
    return np.asarray(spec.resize_shorter(spec.load(image, keep_gray=False)))


_MUST_STAY = ("It is decoded again at each use (the images did not all fit in memory), so it must stay as it was "
              "when the data was scanned: restore it, or remove it, and run again (a fine-tune with --resume keeps "
              "the steps done).")


@dataclass
class Split:
    """Images of one split, decoded once (RGB uint8, shorter side resized per the spec).

    ``arrays[i]`` is None for an image that did not fit in memory: ``decode`` (picklable, so
    DataLoader workers can use it) decodes it again at each use, from the file.
    """

    paths: list[Path]
    labels: list[int]
    arrays: list[np.ndarray | None]
    digests: list[str]  # sha256 of each file's bytes: byte-identical copies share one
    decode: Callable[[Path], np.ndarray] | None = None

    def __len__(self) -> int:
        return len(self.paths)

    def counts(self, num_classes: int) -> list[int]:
        return np.bincount(np.asarray(self.labels, dtype=np.int64), minlength=num_classes).tolist()

    def signature(self, root: Path) -> str:
        """sha256 of the split's (path relative to ``root``, label) pairs: which images it holds, not their pixels."""
        rows = sorted(f"{Path(p).relative_to(root).as_posix()}\t{y}" for p, y in zip(self.paths, self.labels))
        return hashlib.sha256("\n".join(rows).encode()).hexdigest()

    @property
    def on_demand(self) -> int:
        """How many images are decoded at each use (not held in memory)."""
        return sum(a is None for a in self.arrays)

    def array(self, i: int) -> np.ndarray:
        """Image ``i``'s pixels: from memory, or decoded from its file, which must hold the bytes it
        held at the scan (a file replaced by another image would train under the wrong label)."""
        if self.arrays[i] is not None:
            return self.arrays[i]
        try:
            data = Path(self.paths[i]).read_bytes()
        except OSError as exc:
            raise UserError(f"{self.paths[i]}: can no longer be read ({exc.strerror or exc}). {_MUST_STAY}") from None
        if hashlib.sha256(data).hexdigest() != self.digests[i]:
            raise UserError(f"{self.paths[i]}: its content changed since the data was scanned. {_MUST_STAY}")
        return self.decode(data)

    def image(self, i: int) -> Image.Image:
        return Image.fromarray(self.array(i))

    def subset(self, idx: list[int]) -> "Split":
        return Split([self.paths[i] for i in idx], [self.labels[i] for i in idx], [self.arrays[i] for i in idx],
                     [self.digests[i] for i in idx], self.decode)


IMAGES_COLUMNS = ("split", "class", "sha256", "path")
_ESCAPES = {"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"}  # a file name may hold any of them


def escape_field(text: str) -> str:
    """``text`` as one TSV field on one line: backslash, tab, newline and CR backslash-escaped."""
    return "".join(_ESCAPES.get(c, c) for c in text)


def _unescape_field(text: str) -> str:
    plain = {v[1]: k for k, v in _ESCAPES.items()}
    return re.sub(r"\\(.)", lambda m: plain.get(m.group(1), m.group(0)), text)


# what each count of byte-identical images means, for the log, the summary and the report
DUPLICATE_NOTES = {
    "label_conflicts": "{} images filed under several classes (labelling errors: fix or remove the wrong copy)",
    "val_in_train": "{} validation images with a copy in train (validation accuracy reads high)",
    "moved_to_train": "{} carved validation images moved to train, where their copies are",
    "test_in_training": "{} test images with a copy of the same class among the training or validation images (the "
                        "test accuracy reads high)",
    "test_label_conflicts": "{} test images with a copy under another class among the training or validation images "
                            "(labelling conflicts: the test accuracy reads low)",
}


def describe_duplicates(counts: dict) -> list[str]:
    """One phrase per nonzero count of ``DUPLICATE_NOTES``."""
    return [DUPLICATE_NOTES[k].format(n) for k, n in counts.items() if n and k in DUPLICATE_NOTES]


DARK_MAX = 16  # no grey level at or above it: what 12-bit data in a 16-bit file becomes (0-4095 -> 0-15)


@dataclass
class OddImages:
    """Images the model will see poorly, found by the one-time scan; they are trained on all the same.

    Flat: one colour after decoding (a blank frame, or a 16-bit file holding 8-bit values, which the
    fixed 16-to-8-bit mapping turns black). Dark: no grey level above 15 (12-bit data in a 16-bit
    file, or a frame shot far too dark). Upscaled: the shorter side under half
    the resize size, so the model sees interpolated blur. Cropped: so long that the centre crop
    keeps under a quarter of the image (over ~3:1 at timm's usual crop_pct 0.875).
    """

    flat: list[Path] = field(default_factory=list)
    dark: list[Path] = field(default_factory=list)
    upscaled: list[tuple[Path, tuple[int, int]]] = field(default_factory=list)
    cropped: list[tuple[Path, tuple[int, int]]] = field(default_factory=list)

    def add(self, path: Path, array: np.ndarray, size: tuple[int, int], spec: PreprocessSpec) -> None:
        if (array == array.reshape(-1, array.shape[-1])[0]).all():  # one colour: every pixel the first one's
            self.flat.append(path)
        elif array.max() < DARK_MAX:
            self.dark.append(path)
        if 2 * min(size) < spec.resize_size:
            self.upscaled.append((path, size))
        h, w = spec.input_size
        if 4 * h * w < array.shape[0] * array.shape[1]:  # the centre crop keeps under a quarter of the resized image
            self.cropped.append((path, size))

    def counts(self) -> dict[str, int]:
        return {"flat": len(self.flat), "dark": len(self.dark), "upscaled": len(self.upscaled),
                "cropped": len(self.cropped)}

    def lines(self) -> list[str]:
        """run/odd_images.txt: a header, then one line per image: kind, path, its decoded size (fields
        escaped as in images.tsv)."""
        e = lambda p: escape_field(str(p))  # noqa: E731 - one image per line, whatever the file names
        rows = ([("flat", p, "") for p in self.flat] + [("dark", p, "") for p in self.dark]
                + [(k, p, f"{w}x{h}") for k, found in (("upscaled", self.upscaled), ("cropped", self.cropped))
                   for p, (w, h) in found])
        return ["kind\tpath\tsize"] + [f"{k}\t{e(p)}\t{size}" for k, p, size in rows] if rows else []

    def notes(self, spec: PreprocessSpec) -> list[str]:
        """One warning per kind found, for the fine-tune's log."""
        notes = []
        if self.flat:
            notes.append(f"warning: {len(self.flat)} images decode to one flat colour, e.g. {self.flat[0]}: blank "
                         "frames, or 16-bit files holding 8-bit values (16-bit data maps 0-65535 onto 0-255, so such "
                         "values turn black: stretch them to the full range first). They train as their class.")
        if self.dark:
            notes.append(f"warning: {len(self.dark)} images decode nearly black (no grey level above {DARK_MAX - 1}), "
                         f"e.g. {self.dark[0]}: 12-bit data in 16-bit files keeps only 16 grey levels (stretch it to "
                         "the full range first), or frames shot too dark. They train as their class.")
        if self.upscaled:
            (path, (w, h)), low = min(self.upscaled, key=lambda r: min(r[1])), min(min(r[1]) for r in self.upscaled)
            notes.append(f"note: {len(self.upscaled)} images are under half the {spec.resize_size}-px resize size on "
                         f"their shorter side (the smallest {w}×{h}: {path}), so they are upscaled up to "
                         f"{spec.resize_size / low:.0f} times and the model sees interpolated blur; a smaller --img-size "
                         "is faster for such data (compare the validation accuracy of both).")
        if self.cropped:
            (path, (w, h)) = max(self.cropped, key=lambda r: max(r[1]) / min(r[1]))
            notes.append(f"note: {len(self.cropped)} images are so long that the centre crop the model sees keeps under "
                         f"a quarter of each (the longest {w}×{h}: {path}): cut them into squares (tiles) if what "
                         "matters can be outside the centre.")
        return notes


@dataclass
class ImageFolderData:
    """The classes and the train/val splits of a dataset folder, plus what was skipped."""

    root: Path
    classes: list[str]
    train: Split
    val: Split
    val_source: str  # "val/ folder" or "carved from train (...)"
    skipped: list[str] = field(default_factory=list)
    moved_to_train: list[Path] = field(default_factory=list)  # carved validation images that have a copy in train
    budget: DecodeBudget | None = None  # what the decoding kept in memory
    odd: "OddImages" = field(default_factory=lambda: OddImages())  # images the model will see poorly

    def memory_note(self, command: str = "finetune") -> str | None:
        """A warning for ``command``'s log when some images are decoded at each use; None when all fit."""
        return self.budget and self.budget.note(self.train.on_demand + self.val.on_demand,
                                                len(self.train) + len(self.val), command)

    def duplicates(self) -> "Duplicates":
        return find_duplicates(self.train, self.val, self.classes, self.moved_to_train)

    def rows(self) -> list[tuple[str, str, str, str]]:
        """(split, class, sha256 of the file, path relative to the data folder) of every image."""
        return [(name, self.classes[y], h, Path(p).relative_to(self.root).as_posix())
                for name, split in (("train", self.train), ("val", self.val))
                for p, y, h in zip(split.paths, split.labels, split.digests)]

    def images_table(self) -> str:
        """``rows()`` as the run's images.tsv (fields escaped by ``escape_field``): its data lineage."""
        return "".join("\t".join(map(escape_field, r)) + "\n" for r in [IMAGES_COLUMNS, *self.rows()])

    def changes_since(self, table: Path) -> str | None:
        """What differs from an images.tsv written earlier (files added, removed, relabelled, moved
        between splits or with new content); None when nothing does or there is no table."""
        if not table.is_file():
            return None
        before = {r[3]: r[:3] for r in read_images_table(table)}
        now = {r[3]: r[:3] for r in self.rows()}
        counts = {"added": len(now.keys() - before.keys()), "removed": len(before.keys() - now.keys()),
                  "with new content": sum(before[k][2] != now[k][2] for k in now.keys() & before.keys()),
                  "relabelled or moved between splits": sum(before[k][:2] != now[k][:2] and before[k][2] == now[k][2]
                                                            for k in now.keys() & before.keys())}
        return ", ".join(f"{n} images {what}" for what, n in counts.items() if n) or None


@dataclass
class Duplicates:
    """Byte-identical image files (the same sha256) in the training data.

    A validation image with a copy in train makes validation accuracy, and so the best-epoch
    choice, read high; one image filed under two classes is a labelling error that no model can
    get right both times. Scraped or merged datasets have both more often than one expects.
    """

    conflicts: list[list[tuple[Path, str]]]  # the copies (path, class) of each image filed under several classes
    val_in_train: list[tuple[Path, Path]]  # (validation image, a training copy of it)
    moved_to_train: list[Path]  # carved validation images moved to train to join their copy

    def counts(self) -> dict:
        return {"label_conflicts": len(self.conflicts), "val_in_train": len(self.val_in_train),
                "moved_to_train": len(self.moved_to_train)}

    def lines(self) -> list[str]:
        """One line per finding, for the log and duplicates.txt."""
        e = lambda p: escape_field(str(p))  # noqa: E731 - one finding per line, whatever the file names
        out = [" = ".join(f"{e(p)} ({e(c)})" for p, c in copies) + ": one image, several classes" for copies in self.conflicts]
        out += [f"{e(v)} = {e(t)}: validation image also in train" for v, t in self.val_in_train]
        out += [f"{e(p)}: moved from the carved validation split to train, where a copy of it is" for p in self.moved_to_train]
        return out


def find_duplicates(train: Split, val: Split, classes: list[str], moved_to_train: list[Path] = ()) -> Duplicates:
    """Byte-identical files across classes, and validation images with a copy in train."""
    copies: dict[str, list[tuple[Path, int, str]]] = {}
    for name, split in (("train", train), ("val", val)):
        for p, y, h in zip(split.paths, split.labels, split.digests):
            copies.setdefault(h, []).append((p, y, name))
    conflicts = [[(p, classes[y]) for p, y, _ in group] for group in copies.values() if len({y for _, y, _ in group}) > 1]
    val_in_train = []
    for group in copies.values():
        in_train = [p for p, _, name in group if name == "train"]
        val_in_train += [(p, in_train[0]) for p, _, name in group if name == "val" and in_train]
    return Duplicates(conflicts, val_in_train, list(moved_to_train))


def copies_in(files: list[Path], digests: dict[str, tuple[Path, str]]) -> list[tuple[Path, Path, str]]:
    """(file, its copy, the copy's class) for each of ``files`` whose bytes equal a file in
    ``digests`` (sha256 → (path, class), as ``run_images`` gives them)."""
    found = []
    for f in files:
        if f.is_file() and (copy := digests.get(sha256_file(f))) is not None:
            found.append((f, *copy))
    return found


def run_images(run_dir: Path, root: Path) -> dict[str, tuple[Path, str]]:
    """sha256 → (path, class) of the images a run trained and validated on (its images.tsv; empty
    for runs made before edge-tl wrote it)."""
    table = Path(run_dir) / "images.tsv"
    return {r[2]: (Path(root) / r[3], r[1]) for r in read_images_table(table)} if table.is_file() else {}


def read_images_table(table: Path) -> list[tuple[str, ...]]:
    """The rows of an images.tsv (its header left out), as ``ImageFolderData.rows()`` gives them."""
    with open(table, encoding="utf-8", newline="") as f:  # lines end at \n only: fields hold no raw one
        lines = [line.removesuffix("\r") for line in f.read().split("\n")[1:] if line]
    rows = (tuple(map(_unescape_field, line.split("\t"))) for line in lines)
    return [r for r in rows if len(r) == len(IMAGES_COLUMNS)]


def _scan_classes(folder: Path) -> dict[str, list[Path]]:
    if not folder.is_dir():
        raise UserError(f"{folder}: no such folder. Pass --data DIR with one sub-folder of images per class.")
    classes = {d.name: visible_files(d) for d in class_folders(folder)}
    if not classes:
        raise UserError(f"{folder}: no class sub-folders. Put each class's images in DIR/<class>/ (or DIR/train/<class>/).")
    return classes


def available_memory() -> int | None:
    """Bytes that can still be allocated without swapping: Linux's MemAvailable; Windows' available
    physical memory; elsewhere (macOS) half the physical memory, a guess on the safe side (neither
    run here); None where even that is unknown."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 2
    except (AttributeError, OSError, ValueError):  # Windows has no sysconf
        pass
    if os.name == "nt":
        import ctypes

        class MemoryStatus(ctypes.Structure):
            _fields_ = [("length", ctypes.c_ulong), ("load", ctypes.c_ulong)] + [
                (name, ctypes.c_ulonglong) for name in ("total", "available", "page_total", "page_available",
                                                         "virtual_total", "virtual_available", "extended")]

        status = MemoryStatus(length=ctypes.sizeof(MemoryStatus))
        if ctypes.windll.kernel32.GlobalMemoryStatusEx(ctypes.byref(status)):
            return int(status.available)
    return None


class DecodeBudget:
    """How many decoded images this process may keep in memory; the rest are decoded again at
    each use (slower, but a dataset larger than memory still trains)."""

    SHARE = 0.7  # of the memory available at the start; training needs the rest

    def __init__(self, available: int | None):
        # under torchrun every process on this machine decodes the whole dataset
        self.copies = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
        self.limit = None if available is None else available * self.SHARE / self.copies
        self.available, self.kept, self.dropped = available, 0, 0

    def keep(self, array: np.ndarray) -> bool:
        """Whether ``array`` still fits; counts it either way."""
        if self.limit is None or self.kept + array.nbytes <= self.limit:
            self.kept += array.nbytes
            return True
        self.dropped += array.nbytes
        return False

    def note(self, on_demand: int, total: int, command: str = "finetune") -> str | None:
        """One line for ``command``'s log when some images are decoded at each use; None when all fit."""
        if not on_demand:
            return None
        share = (f"each of the {self.copies} processes on this machine can keep {self.limit / 1e9:.1f} GB"
                 if self.copies > 1 else f"this process can keep {self.limit / 1e9:.1f} GB")
        advice = ("slower epochs, less so with DataLoader workers decoding them beside the training step; a "
                  "smaller --img-size or more memory keeps them all." if command == "finetune"
                  else f"{command} takes longer.")
        return (f"warning: {on_demand} of {total} images do not fit in memory (decoded they take "
                f"{(self.kept + self.dropped) / 1e9:.2f} GB; {share}: {self.SHARE:.0%} of the "
                f"{self.available / 1e9:.1f} GB available), so they are decoded again from their files at each use: "
                f"{advice}")


def decode_threads() -> int:
    """Threads for the one-time decoding: Pillow lets go of the GIL while it decodes and resizes,
    so threads use the cores (at most MAX_DECODE_THREADS: each holds a full-size image); torchrun's
    processes on one machine share them."""
    copies = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return max(1, min(MAX_DECODE_THREADS, cpu_cores() // copies))


def _read_image(spec: PreprocessSpec, path: Path) -> tuple[np.ndarray, str, tuple[int, int]] | str:
    """(pixels as ``decode_resized`` gives them, sha256 of the file, its decoded size) of ``path``, or
    why it is skipped."""
    suffix = path.suffix.lower()
    if suffix not in IMAGE_EXTENSIONS and suffix not in CONVERT_FIRST and path.exists():  # broken links: load_rgb
        return f"{path}: not an image file (expected {', '.join(IMAGE_EXTENSIONS)})"
    try:
        img = spec.load(path, keep_gray=False)
    except UnreadableImage as exc:
        return str(exc)
    # read again from the page cache: far cheaper than the decode
    return np.asarray(spec.resize_shorter(img)), sha256_file(path), img.size


def _decode(files: dict[str, list[Path]], classes: list[str], spec: PreprocessSpec, skipped: list[str],
            desc: str, progress: bool, budget: DecodeBudget | None = None, odd: "OddImages | None" = None) -> Split:
    """Decode every file once (this is also the check), on every core; unreadable ones go to ``skipped``.

    Decoding a JPEG every epoch costs more CPU than a small model on small images; a
    dataset of a few thousand images, resized, fits in a few hundred MB. What ``budget``
    cannot keep is decoded again at each use (no budget: all are kept). Images the model will see
    poorly (flat, much upscaled, mostly cropped away) go to ``odd`` too, and are still used.
    """
    decode, budget = partial(decode_resized, spec), budget or DecodeBudget(None)
    todo = [(p, ci) for ci, name in enumerate(classes) for p in files.get(name, [])]
    paths, labels, arrays, digests = [], [], [], []
    results = in_order(partial(_read_image, spec), [p for p, _ in todo], decode_threads())
    for (p, ci), result in zip(todo, tqdm(results, desc=desc, total=len(todo), unit="img", disable=None if progress else True,
                                          leave=False)):
        if isinstance(result, str):
            skipped.append(result)
            continue
        array, digest, size = result
        if odd is not None:
            odd.add(p, array, size, spec)
        arrays.append(array if budget.keep(array) else None)
        paths.append(p)
        labels.append(ci)
        digests.append(digest)
    return Split(paths, labels, arrays, digests, decode)


def stratified_split(labels: list[int], fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Indices (keep, held_out): ``fraction`` of each class held out, at least one, never all."""
    rng = random.Random(seed)
    keep, held = [], []
    by_class: dict[int, list[int]] = {}
    for i, y in enumerate(labels):
        by_class.setdefault(y, []).append(i)
    for y in sorted(by_class):
        idx = by_class[y][:]
        rng.shuffle(idx)
        n_held = min(max(1, round(len(idx) * fraction)), len(idx) - 1)
        held += idx[:n_held]
        keep += idx[n_held:]
    return sorted(keep), sorted(held)


def keep_copies_together(digests: list[str], labels: list[int], keep: list[int], held: list[int]
                         ) -> tuple[list[int], list[int], list[int]]:
    """Move held-out indices whose file has a byte-identical copy in ``keep`` over to ``keep``
    (a validation image seen in training measures memory, not generalization), never a class's
    last held-out one. Returns (keep, held, moved); unchanged where there are no copies."""
    kept = {digests[i] for i in keep}
    left = {y: sum(labels[i] == y for i in held) for y in set(labels)}
    moved = []
    for i in held:
        if digests[i] in kept and left[labels[i]] > 1:
            moved.append(i)
            left[labels[i]] -= 1
    gone = set(moved)
    return sorted(keep + moved), [i for i in held if i not in gone], moved


def pixels_of(split: Split, spec, idx: list[int] | None = None) -> np.ndarray:
    """uint8 N×H×W×3 eval-preprocessed pixels of ``split`` (the ONNX graph's input, before the float cast)."""
    idx = range(len(split)) if idx is None else idx
    return np.stack([spec.to_pixels(split.image(i)) for i in idx]) if len(idx) else np.zeros((0, *spec.input_size, 3), np.uint8)


def stratified_sample(labels: list[int], n: int, seed: int = 0) -> list[int]:
    """``n`` indices with the classes in their proportions (all when there are fewer): each class's
    share rounded, at least one image each, then topped up or cut back by the largest rounding
    differences to exactly ``n``; with fewer than one per class, one each of the ``n`` largest classes."""
    if n >= len(labels):
        return list(range(len(labels)))
    rng = random.Random(seed)
    by_class: dict[int, list[int]] = {}
    for i, y in enumerate(labels):
        by_class.setdefault(y, []).append(i)
    exact = {y: n * len(idx) / len(labels) for y, idx in by_class.items()}
    if n < len(by_class):
        largest = sorted(by_class, key=lambda y: (-len(by_class[y]), y))[:n]
        quota = {y: int(y in largest) for y in by_class}
    else:
        quota = {y: max(1, round(share)) for y, share in exact.items()}
    while (gap := n - sum(quota.values())) != 0:
        if gap > 0:
            y = max((y for y in by_class if quota[y] < len(by_class[y])), key=lambda y: (exact[y] - quota[y], -y))
            quota[y] += 1
        else:
            y = max((y for y in by_class if quota[y] > 1), key=lambda y: (quota[y] - exact[y], -y))
            quota[y] -= 1
    picked = []
    for y, idx in sorted(by_class.items()):
        rng.shuffle(idx)
        picked += idx[:quota[y]]
    return sorted(picked)


def _loose_images(folder: Path, root: Path, train_dir: Path) -> list[str]:
    """A line for ``skipped.txt`` naming the image files directly in ``folder`` (the data folder or a
    split folder), outside any class folder, which nothing reads (a photo dropped beside the class
    folders); none if there are none."""
    loose = [f for f in sorted(folder.iterdir(), key=path_order) if not hidden(f.name) and f.is_file()
             and (f.suffix.lower() in IMAGE_EXTENSIONS or f.suffix.lower() in CONVERT_FIRST)]
    if not loose:
        return []
    into = ("a class folder" if folder == train_dir == root else
            f"{(train_dir if folder == root else folder).name}/<class>/")
    return [f"{folder}: {len(loose)} image files directly in it, outside the class folders, not read "
            f"(e.g. {loose[0].name}): move them into {into} to use them"]


def discover(root: str | Path, spec: PreprocessSpec, val_fraction: float = 0.15, split_seed: int = 0,
             progress: bool = True) -> ImageFolderData:
    """Read the folder layout, decode every image once, and make the train/val splits."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"{root}: {'is a file, not a folder' if root.exists() else 'no such folder'}. Pass --data DIR "
                        "(an ImageFolder), or run `edge-tl data elpv --out DIR` for the demo data.")
    train_dir = split_folder(root, "train") or root
    val_dir = split_folder(root, *VAL_FOLDERS) if train_dir != root else None
    skipped: list[str] = []
    if train_dir != root:  # a class folder left beside train/ would vanish from the classes unseen
        read = {d.name for d in (train_dir, val_dir, split_folder(root, "test")) if d is not None}
        for d in class_folders(root):  # edge-tl's own output (an --out beside train/, its plots) is no class
            ours = any((d / f).is_file() for f in ("build.json", "metrics.json", "manifest.json", "last.pt"))
            if d.name not in read and not ours and (n := len(image_files(d))):
                skipped.append(f"{d}: {n} image files beside {train_dir.name}/, not read (a fine-tune reads "
                               f"{train_dir.name}/<class>/ and the validation folder): move it into {train_dir.name}/ "
                               "if it is a class")
    for folder in dict.fromkeys(d for d in (root, train_dir, val_dir) if d is not None):
        skipped += _loose_images(folder, root, train_dir)
    train_files = _scan_classes(train_dir)
    for name in train_files if train_dir == root else ():
        subdirs = {d.name for d in (root / name).iterdir() if d.is_dir() and not d.name.startswith(".")}
        like_classes = sorted(subdirs & set(train_files) - {name})
        if name.lower() in ("test", "val") or like_classes:
            inside = f" (it holds {', '.join(like_classes)}/ like the class folders)" if like_classes else ""
            raise UserError(f"{root / name}: a '{name}' folder beside the class folders{inside} would be trained on as a "
                            f"class. Use the layout DIR/train/<class>/ + DIR/{name}/<class>/, or move {name}/ out of DIR.")
    classes = sorted(train_files)
    if len(classes) < 2:
        raise UserError(f"{train_dir}: only one class ({classes[0]}); a classifier needs at least two class sub-folders.")
    val_files = _scan_classes(val_dir) if val_dir is not None else {}
    budget, odd = DecodeBudget(available_memory()), OddImages()
    full = _decode(train_files, classes, spec, skipped, "decode train", progress, budget, odd)
    for ci, n in enumerate(full.counts(len(classes))):
        where = train_dir / classes[ci]
        if n == 0:
            mine = [line for line in skipped if line.startswith(f"{where}{os.sep}")]
            found = f"{len(mine)} unreadable files, e.g. {mine[0]}" if mine else "the folder is empty"
            raise UserError(f"{where}: no readable images ({found}). Add images or remove the folder.")
        if n < 2 and val_dir is None:
            raise UserError(f"{where}: only 1 readable image; each class needs at least 2 (one to train, one to "
                            "validate), or use the layout DIR/train/<class>/ + DIR/val/<class>/, which validates on "
                            "val/'s images.")
    if val_dir is not None:
        same = {class_key(c): c for c in classes}  # one class, whichever Unicode form each folder's name has
        val_files = {same.get(class_key(k), k): v for k, v in val_files.items()}
        unknown = sorted(set(val_files) - set(classes))
        if unknown:
            raise UserError(f"{val_dir}: classes {unknown} are not in {train_dir}; {val_dir.name}/ must use the train classes.")
        val = _decode(val_files, classes, spec, skipped, "decode val", progress, budget, odd)
        if len(val) == 0:
            raise UserError(f"{val_dir}: no readable images. Add images or remove {val_dir.name}/ to carve a split from train.")
        absent = [c for c, n in zip(classes, val.counts(len(classes))) if n == 0]
        if absent:
            raise UserError(f"{val_dir}: no readable images of {', '.join(absent)}, so validation (which picks the best "
                            f"epoch) would never see {'that class' if len(absent) == 1 else 'those classes'}. Add some to "
                            f"{val_dir.name}/<class>/, or remove {val_dir.name}/ to carve a stratified split from train.")
        return ImageFolderData(root, classes, full, val, f"{val_dir.name}/ folder", skipped, budget=budget, odd=odd)
    keep, held = stratified_split(full.labels, val_fraction, split_seed)
    keep, held, moved = keep_copies_together(full.digests, full.labels, keep, held)
    source = f"carved from train: stratified {val_fraction:.0%}, seed {split_seed}"
    return ImageFolderData(root, classes, full.subset(keep), full.subset(held), source, skipped,
                           [full.paths[i] for i in moved], budget, odd)
