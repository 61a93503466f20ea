"""Decode any common image file into correct 8-bit RGB (torch-free; shared by training and runtime).

Handles what real folders contain: EXIF-rotated JPEGs, grayscale, 16-bit and 32-bit
grayscale PNG/TIFF, float TIFF, palette images, CMYK, and alpha (composited onto white,
as a viewer shows it). Truncated or non-image files raise ``UnreadableImage``.
"""

from __future__ import annotations

import functools
import io
import math
import logging
import os
import re
import unicodedata
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image, ImageFile, JpegImagePlugin, UnidentifiedImageError

from edge_tl.errors import UserError

log = logging.getLogger("edge_tl")

# .jfif: Windows saves JPEGs so; .gif: its first frame; .ppm/.pgm: Netpbm, as many camera tools write;
# .avif: read where Pillow was built with AVIF support (elsewhere named with the fix)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif", ".ppm", ".pgm",
                    ".avif")
# the decoders tried on a file's bytes, whatever its name: those of IMAGE_EXTENSIONS (JPEG's also opens
# phones' MPO files, JPEGs with a second picture). Pillow alone would try some 40 more (EPS hands the bytes to Ghostscript, if
# installed; DDS, FITS, PSD ...), each parser more surface for an upload a service did not make
READ_FORMATS = ("JPEG", "PNG", "BMP", "TIFF", "WEBP", "GIF", "PPM", "AVIF")
# read too where the app registered their Pillow plugin (pillow-heif's register_heif_opener())
PLUGIN_FORMATS = ("HEIF",)
# photo formats Pillow does not read: listed as unreadable with the fix, never passed over in silence
CONVERT_FIRST = {**dict.fromkeys((".heic", ".heif"), "a HEIC/HEIF photo (iPhones' default format)"),
                 **dict.fromkeys((".dng", ".cr2", ".cr3", ".nef", ".arw", ".raf", ".orf", ".rw2"), "a camera RAW file"),
                 ".jxl": "a JPEG XL image", ".psd": "a Photoshop document"}


def to_input(pixels: np.ndarray) -> np.ndarray:
    """uint8 N×H×W×3 pixels -> the models' input: contiguous float32 N×3×H×W, values 0–255."""
    return np.ascontiguousarray(pixels.transpose(0, 3, 1, 2), dtype=np.float32)


def image_files(folder: Path) -> list[Path]:
    """A folder's image files (by extension, hidden ones left out, photos to convert first kept so
    that reading them names the fix), sorted."""
    return [f for f in visible_files(folder) if f.suffix.lower() in IMAGE_EXTENSIONS or f.suffix.lower() in CONVERT_FIRST]


def expand_images(paths) -> list[Path]:
    """Files as given and folders as their image files (sorted); a UserError when that leaves none.
    ``paths``: a list of them, or one path."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    try:
        files = [f for p in map(Path, paths) for f in (image_files(p) if p.is_dir() else [p])]
    except OSError as exc:
        raise UserError(f"{exc.filename}: cannot be listed ({exc.strerror or exc}).") from None
    if not files:
        raise UserError(f"{', '.join(map(str, paths))}: no image files ({' '.join(sorted(IMAGE_EXTENSIONS))}) found.")
    return files


class UnreadableImage(UserError, ValueError):
    """The file is not a decodable image (zero bytes, truncated, corrupt or another format), or
    not one a classifier's preprocessing can take (``check_aspect``)."""


MAX_ASPECT = 100  # longer side / shorter side: a 1×1500 strip scaled to a 256-px shorter side takes 295 MB


def check_aspect(size: tuple[int, int], name) -> None:
    """Refuse an image far longer than wide (a line-scan strip, a mis-set camera ROI): scaling its
    shorter side to the model's size makes it that many times a square image in memory (a 1×1500
    strip: ~300 MB), for a centre crop that keeps a sliver of it."""
    w, h = size
    if not w or not h:
        raise UnreadableImage(f"{name}: {w}×{h} pixels, no image.")
    if max(w, h) > MAX_ASPECT * min(w, h):
        raise UnreadableImage(f"{name}: {w}×{h} pixels, over {MAX_ASPECT} times longer than it is wide or tall "
                              f"({max(w, h) / min(w, h):.1f}:1): the model sees a square centre crop after its shorter "
                              "side is scaled to the input size, which would make this image that many times the "
                              "square in memory. Crop or tile it to the region of interest first.")


def _to_uint8(arr: np.ndarray, sixteen_bit: bool) -> np.ndarray:
    if arr.dtype == np.uint8:
        return arr
    if np.issubdtype(arr.dtype, np.floating):
        scale = 255.0 if float(np.nanmax(arr, initial=0.0)) <= 1.0 else 1.0
        return np.clip(np.nan_to_num(arr) * scale, 0, 255).round().astype(np.uint8)
    if arr.dtype.kind == "u" and arr.dtype.itemsize == 2:  # 65535 // 257 = 255: no 4-byte copies of a large image
        return (arr // 257).astype(np.uint8)
    if sixteen_bit or int(arr.max(initial=0)) > 255:
        return (arr.astype(np.uint32) // 257).clip(0, 255).astype(np.uint8)
    return arr.clip(0, 255).astype(np.uint8)


def to_rgb(img: Image.Image, keep_gray: bool = False) -> Image.Image:
    """Convert a decoded PIL image of any mode to RGB, EXIF orientation applied.

    ``keep_gray``: a grayscale image stays 8-bit mode "L" (the runtime resizes one channel
    instead of three, then repeats it: the same pixels, a third of the work).
    """
    img.load()  # an Image.open() image: a truncated file fails here, where callers catch it
    img = upright(img)
    mode = img.mode
    if mode in ("RGB", "L", "P", "1") and "transparency" in img.info:  # a PNG colour key (tRNS): that colour is transparent
        return _on_white(img)
    if mode == "RGB" or (keep_gray and mode == "L"):
        return img
    if mode.startswith("I;16") or mode in ("I", "F"):
        arr = np.asarray(img)
        gray = Image.fromarray(_to_uint8(arr, sixteen_bit=mode.startswith("I;16")), "L")
        if isinstance(key := img.info.get("transparency"), int):  # a 16-bit PNG's colour key: white there
            gray = Image.fromarray(np.where(arr == key, 255, np.asarray(gray)).astype(np.uint8), "L")
        return gray if keep_gray else gray.convert("RGB")
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        return _on_white(img)
    return img.convert("RGB")


_EXIF_TURNS = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
               5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
               8: Image.Transpose.ROTATE_90}  # by EXIF Orientation, as Pillow's exif_transpose turns them


def upright(img: Image.Image) -> Image.Image:
    """``img`` turned as its EXIF Orientation says: Pillow's ``exif_transpose`` without the copy it
    returns of an image that needs no turn (a full-size copy of every image) and without re-writing
    the EXIF, which raised on slightly malformed blocks whose orientation it had read (TypeError,
    struct.error: 22 of 4,000 phone JPEGs with 1–4 bytes of their EXIF changed). An EXIF block that
    cannot be parsed at all leaves the image as stored, as viewers show it."""
    try:
        orientation = img.getexif().get(0x0112, 1)
    except Exception:  # noqa: BLE001 - any parse failure of the metadata: the pixels are fine
        return img
    method = _EXIF_TURNS.get(orientation) if isinstance(orientation, int) else None
    if method is None:
        return img
    turned = img.transpose(method)  # a new image: the caller's keeps its metadata
    for key in ORIENTATION_KEYS:  # turned once: an image edge-tl decoded is not turned again
        turned.info.pop(key, None)
    return turned


ORIENTATION_KEYS = ("exif", "Raw profile type exif", "XML:com.adobe.xmp", "xmp")  # where Pillow reads orientation


BAND_PIXELS = 1 << 20  # pixels composited at a time by _on_white


def _on_white(img: Image.Image) -> Image.Image:
    """An image with alpha (or a colour key) composited onto opaque white, as a viewer shows it, in
    bands of rows: the same pixels as compositing it whole, which held four full-size copies
    (+1.9 GB for a 9000×9000 RGBA PNG of 300 KB); this holds the RGB result and one band."""
    w, h = img.size
    out = Image.new("RGB", img.size, (255, 255, 255))
    rows = max(1, BAND_PIXELS // w)
    for top in range(0, h, rows):
        band = img.crop((0, top, w, min(h, top + rows))).convert("RGBA")  # crop keeps a colour key
        white = Image.new("RGBA", band.size, (255, 255, 255, 255))
        out.paste(Image.alpha_composite(white, band).convert("RGB"), (0, top))
    return out


def load_rgb(path, keep_gray: bool = False, min_shorter: int | None = None) -> Image.Image:
    """Read an image fully into memory as RGB PIL (or "L" with ``keep_gray``), or raise ``UnreadableImage``.

    ``path``: a file path, encoded bytes (e.g. a JPEG from a camera) or a binary file object.
    ``min_shorter``: a JPEG is decoded at 1/2, 1/4 or 1/8 scale where its shorter side stays at
    least this (``draft_jpeg``: libjpeg's DCT scaling, several times faster for a camera's photo,
    in a fraction of the memory); other formats always at full size. ``PreprocessSpec.load``
    passes it.
    """
    if isinstance(path, (bytes, bytearray, memoryview)):
        if not len(path):
            raise UnreadableImage("<image bytes>: empty (0 bytes)")
        path = io.BytesIO(path)
    stream = hasattr(path, "read")
    if stream:  # an open file names itself; bytes and other streams cannot
        name = path.name if isinstance(getattr(path, "name", None), str) else "<image bytes>"
    else:
        name = Path(path)
    if isinstance(path, io.TextIOBase):
        raise UnreadableImage(f"{name}: a text-mode file object; open images in binary mode: open(path, 'rb')")
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        _warn_truncated_allowed()
    try:
        if not stream and name.stat().st_size == 0:
            raise UnreadableImage(f"{name}: empty file (0 bytes)")
        with _open_image(path if stream else name, min_shorter) as img:
            check_aspect(img.size, name)
            if min_shorter:
                draft_jpeg(img, min_shorter)
            img.load()
            return to_rgb(img, keep_gray)
    except UnreadableImage:
        raise
    except FileNotFoundError as exc:
        if not stream and name.is_symlink():
            raise UnreadableImage(f"{name}: broken symbolic link (to {os.readlink(name)}); "
                                  "point it at an existing image or remove it") from exc
        raise UnreadableImage(f"{name}: no such file") from exc
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:  # the warning: an app's -W error
        raise UnreadableImage(f"{name}: too large to decode safely ({exc}); downscale it first") from exc
    except MemoryError:
        raise
    except Exception as exc:  # noqa: BLE001 - a malformed file makes Pillow's parsers raise anything (bad EXIF: struct.error)
        suffix = Path(str(name)).suffix.lower()
        if isinstance(exc, UnidentifiedImageError):  # a photo renamed .jpg is still its format
            suffix = _sniffed_suffix(path if stream else name) or suffix
        if kind := CONVERT_FIRST.get(suffix, "an AVIF image" if suffix == ".avif" else None):
            fix = "pip install -U pillow (one built with AVIF), or convert it" if suffix == ".avif" else "convert it"
            raise UnreadableImage(f"{name}: {kind}, which this Pillow ({Image.__version__}) cannot decode: {fix} to "
                                  "JPEG or PNG") from exc
        why = re.sub(r"\s*<_io\.\w+ object at 0x[0-9a-f]+>", "", str(exc))  # no memory addresses in messages
        if isinstance(exc, UnidentifiedImageError):
            why += f"; formats read: {', '.join(READ_FORMATS)}"
        elif not isinstance(exc, (OSError, SyntaxError, ValueError)):
            kind = type(exc)
            why = f"{'' if kind.__module__ == 'builtins' else kind.__module__ + '.'}{kind.__name__}: {why}"
        raise UnreadableImage(f"{name}: not a readable image ({why})") from exc


HEIF_BRANDS = {b"heic", b"heix", b"heim", b"heis", b"hevc", b"hevx", b"hevm", b"hevs", b"mif1", b"msf1"}


def _sniffed_suffix(source) -> str | None:
    """".heic" or ".avif" for a file (path or seekable stream) whose first bytes are an ISO-BMFF
    ``ftyp`` box of that family (an iPhone's HEIC renamed .jpg), else None."""
    try:
        if hasattr(source, "read"):
            source.seek(0)
            head = source.read(12)
        else:
            with open(source, "rb") as f:
                head = f.read(12)
    except (OSError, ValueError, AttributeError):  # an unseekable or closed stream: no guess
        return None
    if len(head) < 12 or head[4:8] != b"ftyp":
        return None
    brand = head[8:12]
    return ".avif" if brand in (b"avif", b"avis") else ".heic" if brand in HEIF_BRANDS else None


@functools.lru_cache(maxsize=None)
def _warn_truncated_allowed() -> None:
    """Once per process: the app set Pillow's global ``LOAD_TRUNCATED_IMAGES`` (edge-tl leaves it
    alone), so a truncated file decodes as far as it goes, the rest grey, instead of raising."""
    log.warning("PIL.ImageFile.LOAD_TRUNCATED_IMAGES is True in this process, so truncated image files are "
                "classified from their partly decoded pixels instead of being refused as unreadable")


def _open_image(source, min_shorter: int | None) -> Image.Image:
    """``Image.open`` restricted to ``READ_FORMATS``; and a JPEG over Pillow's decompression-bomb
    limit (2 × ``MAX_IMAGE_PIXELS``: 179 Mpx, a 200-Mpx phone photo) opened all the same where its
    reduced decode (``draft_jpeg`` with ``min_shorter``) is within ``MAX_IMAGE_PIXELS``: then it is
    never decoded at the size the limit guards against."""
    try:
        return Image.open(source, formats=READ_FORMATS + tuple(f for f in PLUGIN_FORMATS if f in Image.OPEN))
    except Image.DecompressionBombError as too_large:
        if not min_shorter:
            raise
        try:
            if hasattr(source, "read"):
                source.seek(0)
            img = JpegImagePlugin.jpeg_factory(source if hasattr(source, "read") else os.fspath(source))
        except Exception:  # noqa: BLE001 - not a JPEG, or a broken one: the limit's error stands
            raise too_large from None
        draft_jpeg(img, min_shorter)
        if img.width * img.height > (Image.MAX_IMAGE_PIXELS or math.inf):
            img.close()
            raise
        return img


def draft_jpeg(img: Image.Image, min_shorter: int) -> None:
    """Have a not yet loaded JPEG decode at 1/s of its size, s the largest of 8, 4, 2 that divides
    both sides and keeps the shorter one >= ``min_shorter`` (a side s does not divide would end in
    a partial pixel, shifting the image by up to half an output pixel). A no-op for other formats
    (Pillow's ``draft`` acts on JPEGs only) and for an image already loaded."""
    w, h = img.size
    scale = next((s for s in (8, 4, 2) if w % s == 0 and h % s == 0 and min(w, h) // s >= min_shorter), 1)
    if scale > 1:
        img.draft(img.mode, (w // scale, h // scale))


def cpu_cores() -> int:
    """Cores this process may run on: its CPU affinity (a container or `taskset` may pin it to
    fewer than the machine has), else the machine's count."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


MAX_DECODE_THREADS = 8  # each holds one full-size decoded image at a time (a 5000×5000 JPEG: ~190 MB)


def in_order(fn: Callable, items: list, threads: int):
    """``fn(item)`` of each item, in order, computed by ``threads`` threads at most 4 × threads
    items ahead (so results waiting to be taken stay few). For decoding: Pillow lets go of the GIL
    while it decodes and resizes, so threads use every core."""
    if threads <= 1:
        yield from map(fn, items)
        return
    pool = ThreadPoolExecutor(threads)
    try:
        ahead = 4 * threads
        pending = deque(pool.submit(fn, item) for item in items[:ahead])
        for k in range(len(items)):
            result = pending.popleft().result()
            if k + ahead < len(items):
                pending.append(pool.submit(fn, items[k + ahead]))
            yield result
    finally:
        pool.shutdown(cancel_futures=True)


# folders that NAS boxes, operating systems and archivers put beside (or inside) any folder: their
# files are thumbnails or deleted copies of images, never images of their own (Synology's @eaDir holds
# a re-encoded thumbnail of each photo, which would leak validation images into training unseen)
SYSTEM_FOLDERS = frozenset(n.lower() for n in ("@eaDir", "#recycle", "#snapshot", "@Recycle", "@Recently-Snapshot",
                                                "$RECYCLE.BIN", "System Volume Information", "__MACOSX", "lost+found"))


# files Windows and macOS put into folders of images: thumbnail caches, folder settings, a folder's icon
SYSTEM_FILES = frozenset(("thumbs.db", "ehthumbs.db", "ehthumbs_vista.db", "desktop.ini", "icon\r"))


def hidden(name: str) -> bool:
    """A name no one means as an image or a class: dot files, NAS/OS system folders and files."""
    return name.startswith(".") or name.lower() in SYSTEM_FOLDERS or name.lower() in SYSTEM_FILES


def class_key(name: str) -> str:
    """A class name as compared: Unicode NFC (a Mac writes "é" as e + a combining accent in names it
    makes, zips and shares; Linux and Windows mostly as one character)."""
    return unicodedata.normalize("NFC", name)


def path_order(p: Path) -> tuple[str, ...]:
    """Sort key of paths, the same on every OS (Windows compares paths ignoring letter case, which
    would give another validation split than Linux and macOS from the same folder)."""
    return p.parts


def visible_files(folder: Path) -> list[Path]:
    """Files under ``folder``, sorted, none hidden at any level below it: no ``.DS_Store``,
    ``._x.png`` (macOS AppleDouble), ``.ipynb_checkpoints/`` copies of other images, or files in
    ``SYSTEM_FOLDERS`` (Synology's ``@eaDir/`` thumbnails, recycle bins).

    Linked folders are followed, so a class assembled from links keeps its images; a link to a
    folder above (or a loop) is not, as it would take in the folders beside it. Broken symbolic links are included, so that
    decoding lists them as skipped instead of a class silently losing images (a dataset of links
    copied without their targets)."""
    found, chains = [], {}
    for top, dirs, files in os.walk(folder, followlinks=True):
        chain = chains.pop(top, (os.path.realpath(folder),))  # the real folders from the walk's root down to here
        keep = []
        for d in sorted(dirs):
            real = os.path.realpath(os.path.join(top, d))
            # a loop, or a link up to a folder holding this one (it would take in its siblings: test/, other classes)
            if hidden(d) or any(_contains(real, c) for c in chain):
                continue
            chains[os.path.join(top, d)] = chain + (real,)
            keep.append(d)
        dirs[:] = keep
        found += [p for p in (Path(top) / f for f in files if not hidden(f))
                  if p.is_file() or (p.is_symlink() and not p.exists())]
    return sorted(found, key=path_order)


def _contains(folder: str, path: str) -> bool:
    try:
        return os.path.commonpath([folder, path]) == folder
    except ValueError:  # Windows: on different drives, neither holds the other
        return False


def class_folders(root: Path) -> list[Path]:
    """An ImageFolder's class folders, sorted, hidden ones left out. A broken link in their place
    is refused: its class would silently vanish from the class list."""
    entries = sorted((d for d in root.iterdir() if not hidden(d.name)), key=path_order)
    for d in entries:
        if d.is_symlink() and not d.exists():
            raise UserError(f"{d}: broken symbolic link (to {os.readlink(d)}) where a class folder is expected; "
                            "point it at the class's folder or remove it.")
    folders = [d for d in entries if d.is_dir()]
    for d in folders:
        if any(ord(c) < 32 or ord(c) == 127 for c in d.name):  # labels.txt holds one class per line
            raise UserError(f"{d}: a class folder whose name holds a control character ({d.name!r}: a newline or "
                            "tab?); labels are one per line, so rename the folder.")
    return folders

