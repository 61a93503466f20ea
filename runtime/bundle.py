"""The bundle: one folder whose ``manifest.json`` is the contract between export, runtime and apps.

Loading verifies it: every file the manifest lists must match its sha256, the manifest itself
must match the ``manifest_sha256`` it was saved with (schema 2; a hand-edited contract is
refused, not half-followed), its classes and input size must agree with the hashed
``labels.txt`` and golden outputs, and a manifest written by a newer edge-tl (higher
``schema``) is refused rather than misread.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edge_tl.errors import UserError
from edge_tl.fileio import sha256_file, unlink_links, write_json

from .spec import PreprocessSpec

SCHEMA_VERSION = 2  # 2: the manifest carries manifest_sha256
MANIFEST = "manifest.json"
GOLDEN = "golden.npz"
LABELS = "labels.txt"
SELF_DIGEST = "manifest_sha256"
RELEASE_DIGEST = "exported_manifest_sha256"  # set by `engine` and `slim`, which re-sign: see Bundle.release_id
GITATTRIBUTES = "# every file byte-exact: manifest.json holds their sha256\n* -text\n"  # git keeps them unchanged
READABLE = ("Every file of a bundle is checked against its manifest, so this user needs read access to all of "
            "them: chmod -R a+rX {}")


def _unreadable(f: Path, exc: OSError, bundle: Path) -> BundleError:
    """A bundle file that could not be read: gone since the bundle was checked, or not readable by this user."""
    if isinstance(exc, FileNotFoundError):
        return BundleError(f"{f}: missing, though listed and there when the bundle was checked: the folder changed "
                           "while it loaded (a copy or swap in progress?). Copy the whole bundle again, then load it.")
    return BundleError(f"{f}: cannot be read ({exc.strerror or exc}). {READABLE.format(bundle)}")


def manifest_digest(manifest: dict) -> str:
    """sha256 of the manifest's canonical JSON, its own digest field left out."""
    body = {k: v for k, v in manifest.items() if k != SELF_DIGEST}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


class BundleError(UserError):
    """A bundle that is missing, damaged, tampered with or too new for this code."""


# golden.npz unpacks to at most this many times its size (or 64 MiB): real pixels and logits compress
# 1-5x, while a crafted file of zeros unpacks ~1000x (a 6 MB file asking for 5.6 GB on every load)
NPZ_MAX_EXPANSION = 50
NPZ_MIN_LIMIT = 64 << 20


def _load_npz(data: bytes, where: Path) -> dict[str, np.ndarray]:
    """The arrays of an .npz file's bytes: no pickled objects, no decompression bomb, no array
    whose header claims more than its member holds."""
    def refuse(why: str) -> BundleError:
        return BundleError(f"{where}: {why}; it is not one edge-tl wrote. Re-export the bundle.")

    try:
        with zipfile.ZipFile(io.BytesIO(data)) as zf:
            members = zf.infolist()
            unpacked = sum(i.file_size for i in members)  # zipfile reads no more than this per member
            if unpacked > max(NPZ_MIN_LIMIT, NPZ_MAX_EXPANSION * len(data)):
                raise refuse(f"unpacks to {unpacked / 2**20:.0f} MiB from {len(data) / 2**20:.1f} MiB, far more than "
                             "golden outputs take")
            for info in members:
                with zf.open(info) as fh:
                    version = np.lib.format.read_magic(fh)
                    read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else \
                        np.lib.format.read_array_header_2_0
                    shape, _, dtype = read_header(fh)
                if dtype.hasobject or math.prod(shape) * dtype.itemsize > info.file_size:
                    raise refuse(f"member {info.filename} claims {shape} {dtype}, more than it holds or objects")
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except BundleError:
        raise
    except (zipfile.BadZipFile, zlib.error, ValueError, OSError, EOFError, KeyError, MemoryError) as exc:
        raise BundleError(f"{where}: not a readable .npz of arrays ({type(exc).__name__}: {exc}). "
                          "Re-export the bundle.") from None


def check_class_names(classes, where) -> None:
    """A list of distinct, non-empty names without control characters (labels.txt holds one per
    line; printed names must not carry terminal escape sequences), or a BundleError."""
    if not isinstance(classes, list) or not classes or not all(isinstance(c, str) and c.strip() for c in classes):
        raise BundleError(f"{where}: 'classes' must be a non-empty list of non-empty names. Re-export the bundle.")
    if len(set(classes)) != len(classes):
        raise BundleError(f"{where}: 'classes' must be distinct names, got {classes}. Re-export the bundle.")
    if bad := [c for c in classes if any(ord(ch) < 32 or 127 <= ord(ch) < 160 for ch in c)]:
        raise BundleError(f"{where}: class names with control characters ({', '.join(map(repr, bad))}). Re-export "
                          "the bundle from class folders without them.")


def _check_fields(manifest: dict, mpath: Path) -> None:
    """The fields the runtime reads have the types it reads them as: a manifest edited and re-signed
    by hand (its digest recipe is public) is refused with the field's name, not a traceback."""
    def bad(field: str, want: str) -> BundleError:
        return BundleError(f"{mpath}: '{field}' must be {want}. Re-export the bundle.")

    artifacts = manifest.get("artifacts")
    if not isinstance(artifacts, list) or not artifacts:
        raise bad("artifacts", "a non-empty list")
    for i, art in enumerate(artifacts):
        if not isinstance(art, dict) or not all(isinstance(art.get(k), str) for k in ("name", "file", "format", "precision")):
            raise bad(f"artifacts[{i}]", "an object with string name, file, format and precision")
        for k in ("fp32_agreement", "val_accuracy", "drop_pts"):
            if art.get(k) is not None and (not isinstance(art[k], (int, float)) or isinstance(art[k], bool)):
                raise bad(f"artifacts[{i}].{k}", "a number")
        if art.get("dla_core") is not None and (not isinstance(art["dla_core"], int) or art["dla_core"] < 0):
            raise bad(f"artifacts[{i}].dla_core", "a DLA core index (0, 1, ...) or null")
    names = [a["name"] for a in artifacts]
    if len(set(names)) < len(names):  # one would hide the other in every report keyed by name
        raise bad("artifacts", f"objects of distinct names, got {names}")
    files = manifest.get("files", {})
    if not isinstance(files, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in files.items()):
        raise bad("files", "an object of path: sha256 strings")
    output = manifest.get("output", {})
    temperature = output.get("temperature", 1.0) if isinstance(output, dict) else None
    if not isinstance(temperature, (int, float)) or isinstance(temperature, bool) or not 0 < temperature < float("inf"):
        raise bad("output", "an object whose 'temperature' (if any) is a positive number")
    batch = manifest.get("batch", {"min": 1, "opt": 1, "max": 32})
    sizes = [batch.get(k) for k in ("min", "opt", "max")] if isinstance(batch, dict) else [None]
    if not all(isinstance(b, int) and not isinstance(b, bool) for b in sizes) or not 1 <= sizes[0] <= sizes[1] <= sizes[2]:
        raise bad("batch", "an object of integers 1 <= min <= opt <= max")
    reference = manifest.get("reference")  # see runtime/monitor.py; none in bundles from before it
    if reference is not None:
        lists = [reference.get(k) if isinstance(reference, dict) else None
                 for k in ("predicted", "score", "brightness", "contrast")]
        if not all(isinstance(v, list) and len(v) == len(lists[0]) for v in lists) or not all(
                isinstance(k, int) and not isinstance(k, bool) and k >= 0 for k in lists[0]) or not all(isinstance(x, (int, float)) and not isinstance(x, bool)
                                             for v in lists[1:] for x in v):
            raise bad("reference", "an object of equal-length lists: predicted (class indices), score, brightness "
                      "and contrast (numbers)")
    validation = manifest.get("validation", {})
    images = validation.get("images") if isinstance(validation, dict) else "?"
    if images is not None and (not isinstance(images, int) or isinstance(images, bool)):
        raise bad("validation", "an object whose 'images' is an integer")


@dataclass
class Bundle:
    """A verified bundle folder and its manifest."""

    path: Path
    manifest: dict
    _golden: dict | None = field(default=None, repr=False, compare=False)  # golden.npz's arrays, once verified

    @classmethod
    def load(cls, path: str | Path, verify: bool = True) -> "Bundle":
        path = Path(path)
        if not path.exists():
            what = f"a symbolic link to {os.readlink(path)}, which" if path.is_symlink() else "it"
            raise BundleError(f"{path}: not found ({what} does not exist); pass the folder `edge-tl export` wrote "
                              "(or its copy on this machine).")
        path = path.resolve()  # one folder for every file, even if a link to it is re-pointed while it loads
        mpath = path / MANIFEST
        if not mpath.is_file():
            if (path / "best.pt").is_file():
                fix = f"it is a fine-tune run; export it first: `edge-tl export {path} --out BUNDLE`, then pass BUNDLE"
            elif path.is_file():
                fix = "it is a file; pass the bundle folder first (e.g. `edge-tl predict BUNDLE IMAGE`)"
            elif path.is_dir() and (inside := sorted(m.parent for m in path.glob(f"*/{MANIFEST}"))):
                fix = f"the bundle is inside it: pass {inside[0]}" + (f" (or {', '.join(map(str, inside[1:]))})"
                                                                       if len(inside) > 1 else "")
            else:
                fix = f"make one with `edge-tl export RUN --out {path}`"
            raise BundleError(f"{path}: not a bundle (no {MANIFEST}); {fix}.")
        try:
            manifest = json.loads(mpath.read_text(encoding="utf-8"))
        except OSError as exc:
            raise _unreadable(mpath, exc, path) from None
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise BundleError(f"{mpath}: unreadable manifest ({exc}): cut short or damaged (a copy still in "
                              "progress?). Copy the bundle again, or re-export it.") from None
        schema = manifest.get("schema") if isinstance(manifest, dict) else None
        if not isinstance(schema, int):
            raise BundleError(f"{mpath}: no integer 'schema' field; this is not an edge-tl manifest.")
        if schema > SCHEMA_VERSION:
            raise BundleError(f"{mpath}: schema {schema} is newer than this edge-tl understands ({SCHEMA_VERSION}). "
                              "Upgrade edge-tl (a newer checkout or wheel of it) on this machine.")
        _check_fields(manifest, mpath)
        bundle = cls(path, manifest)
        if verify:
            bundle.verify()
        return bundle

    def verify(self) -> None:
        """Refuse the bundle when the manifest was edited, a model or golden file is not listed, a listed
        file is missing or changed, or the manifest disagrees with the files it describes."""
        mpath = self.path / MANIFEST
        signed = self.manifest["schema"] >= 2 or SELF_DIGEST in self.manifest  # a lowered schema turns nothing off
        if signed and self.manifest.get(SELF_DIGEST) != manifest_digest(self.manifest):
            raise BundleError(f"{mpath}: changed since edge-tl wrote it (its content does not match "
                              f"{SELF_DIGEST}). It is the contract the models were checked against, so edge-tl "
                              "will not follow an edited one: copy the bundle again or re-export it.")
        files = self.manifest.get("files")
        if not isinstance(files, dict):
            raise BundleError(f"{self.path / MANIFEST}: no 'files' list of sha256 digests. Re-export the bundle.")
        for rel in [a.get("file") for a in self.manifest.get("artifacts", [])] + [GOLDEN]:
            if rel not in files:
                raise BundleError(f"{self.path / str(rel)}: not listed with a sha256 in {MANIFEST}, so it cannot be "
                                  "verified. Re-export the bundle (or rebuild its engines with `edge-tl engine`).")
        for rel, digest in files.items():
            if Path(rel).is_absolute() or ".." in Path(rel).parts:
                raise BundleError(f"{self.path / MANIFEST}: file entry '{rel}' points outside the bundle. Re-export it.")
            f = self.path / rel
            if rel == ".gitattributes" and not f.exists():
                continue  # hashed by bundles of before 188268c; copies that skip hidden files (CI artifact uploads) lose it
            if not f.is_file():
                raise BundleError(f"{f}: listed in the manifest but missing. Copy the whole bundle folder again.")
            try:
                data = f.read_bytes() if rel == GOLDEN else None  # hashed and unpacked from the same bytes
                actual = hashlib.sha256(data).hexdigest() if data is not None else sha256_file(f)
                if data is not None and actual == digest:
                    self._golden = _load_npz(data, f)
            except OSError as exc:
                raise _unreadable(f, exc, self.path) from None
            if actual != digest:
                if hashlib.sha256(f.read_bytes().replace(b"\r\n", b"\n")).hexdigest() == digest:
                    raise BundleError(f"{f}: its line endings were changed to CRLF (git's core.autocrlf on "
                                      "Windows?), so its sha256 differs from the manifest. Keep the bundle "
                                      "byte-exact: its .gitattributes (`* -text`) does that in git; restore the file.")
                with open(f, "rb") as fh:
                    if fh.read(64).startswith(b"version https://git-lfs"):
                        raise BundleError(f"{f}: a Git LFS pointer, not the file itself: run `git lfs pull` in the "
                                          "repository it came from (or copy the bundle from where it was exported).")
                raise BundleError(f"{f}: sha256 differs from the manifest (modified or corrupted). "
                                  "Copy the bundle again or re-export it; edge-tl will not run a changed file.")
        self._check_consistent()

    def _check_consistent(self) -> None:
        """The manifest's classes and preprocessing against the (hashed) labels.txt and golden outputs."""
        mpath = self.path / MANIFEST
        try:
            spec, classes = self.spec, self.classes
        except (KeyError, TypeError, ValueError) as exc:
            raise BundleError(f"{mpath}: invalid 'classes' or 'preprocess' ({type(exc).__name__}: {exc}). "
                              "Re-export the bundle.") from None
        check_class_names(self.manifest.get("classes"), mpath)
        labels = self.path / LABELS
        if labels.is_file() and labels.read_text(encoding="utf-8").split("\n") not in (classes, [*classes, ""]):
            raise BundleError(f"{mpath}: 'classes' {classes} differ from {labels}. Re-export the bundle.")
        if any(k >= len(classes) for k in (self.manifest.get("reference") or {}).get("predicted", [])):
            raise BundleError(f"{mpath}: 'reference' names classes beyond the {len(classes)} of 'classes'. "
                              "Re-export the bundle.")
        pixels, logits = self.golden()
        if pixels.shape[1:3] != tuple(spec.input_size) or logits.shape[1:] != (len(classes),):
            raise BundleError(f"{mpath}: input {list(spec.input_size)} / {len(classes)} classes disagree with the "
                              f"golden outputs ({pixels.shape[1]}x{pixels.shape[2]} pixels, {logits.shape[1]} "
                              "logits). Re-export the bundle.")
        labels_of_golden = self.golden_labels()
        if labels_of_golden is not None and not (labels_of_golden.shape == (len(pixels),) and
                                                 ((0 <= labels_of_golden) & (labels_of_golden < len(classes))).all()):
            raise BundleError(f"{self.path / GOLDEN}: 'labels' must be one class index (0..{len(classes) - 1}) per "
                              "golden image. Re-export the bundle.")

    @property
    def digest(self) -> str:
        """This manifest's sha256 (``manifest_sha256``; computed for a schema-1 bundle, which has none)."""
        return self.manifest.get(SELF_DIGEST) or manifest_digest(self.manifest)

    @property
    def release_id(self) -> str:
        """Which release this is: the ``manifest_sha256`` the bundle had as exported (before any engine).
        ``edge-tl engine`` and ``slim`` re-sign the manifest, so the digest differs from device to device
        of one release; this stays, for the logs of a fleet."""
        return self.manifest.get(RELEASE_DIGEST) or self.digest

    @property
    def spec(self) -> PreprocessSpec:
        return PreprocessSpec.from_dict(self.manifest["preprocess"])

    @property
    def classes(self) -> list[str]:
        return list(self.manifest["classes"])

    @property
    def artifacts(self) -> list[dict]:
        return list(self.manifest["artifacts"])

    def artifact(self, name: str) -> dict:
        for a in self.artifacts:
            if a["name"] == name:
                return a
        raise BundleError(f"{self.path}: no artifact '{name}' (has: {', '.join(a['name'] for a in self.artifacts)})"
                          f"{self.slim_note()}.")

    def slim_note(self) -> str:
        """Where the artifacts ``edge-tl slim`` dropped from this bundle are ("" for a bundle not slimmed)."""
        slimmed = self.manifest.get("slimmed") or {}
        if not slimmed.get("dropped"):
            return ""
        return (f"; `edge-tl slim` dropped {', '.join(slimmed['dropped'])}: use the bundle it was slimmed from, "
                f"{slimmed.get('from')}")

    def file(self, artifact: dict) -> Path:
        return self.path / artifact["file"]

    def read_verified(self, rel: str) -> bytes:
        """``rel``'s bytes, hashed again as they are read: what a runner loads is what was checked,
        even if the file is swapped between ``verify`` and the load."""
        f = self.path / rel
        try:
            data = f.read_bytes()
        except OSError as exc:
            raise _unreadable(f, exc, self.path) from None
        if hashlib.sha256(data).hexdigest() != self.manifest.get("files", {}).get(rel):
            raise BundleError(f"{f}: changed since the bundle was loaded, or not listed in its {MANIFEST}; "
                              "edge-tl runs only files that match the manifest. Copy the bundle again.")
        return data

    def _golden_arrays(self) -> dict[str, np.ndarray]:
        """golden.npz's arrays: read, checked against the manifest and unpacked once per Bundle."""
        if self._golden is None:
            f = self.path / GOLDEN
            if not f.is_file():
                raise BundleError(f"{f}: missing; re-export the bundle to get golden outputs.")
            self._golden = _load_npz(self.read_verified(GOLDEN), f)
        return self._golden

    def drop_golden(self) -> None:
        """Free golden.npz's arrays; a later call reads them again, verified."""
        self._golden = None

    @property
    def temperature(self) -> float:
        """T of the scores, softmax(logits / T): fitted at export (1 in bundles from before it)."""
        return float(self.manifest.get("output", {}).get("temperature", 1.0))

    def golden(self) -> tuple[np.ndarray, np.ndarray]:
        """(uint8 N×H×W×3 pixels, float32 N×classes reference logits of the fine-tuned model)."""
        f, z = self.path / GOLDEN, self._golden_arrays()
        pixels, logits = z.get("pixels"), z.get("logits")
        if not (isinstance(pixels, np.ndarray) and pixels.dtype == np.uint8 and pixels.ndim == 4 and len(pixels)
                and pixels.shape[3] == 3 and isinstance(logits, np.ndarray) and logits.ndim == 2
                and logits.dtype.kind == "f" and len(logits) == len(pixels)):
            raise BundleError(f"{f}: needs 'pixels' (uint8 N×H×W×3, N ≥ 1) and 'logits' (float N×classes). "
                              "Re-export the bundle.")
        if not np.isfinite(logits).all():
            raise BundleError(f"{f}: its reference logits are not all finite (inf or NaN), so nothing can be compared "
                              "with them; re-export the bundle.")
        return pixels, logits

    def golden_labels(self) -> np.ndarray | None:
        """The golden images' true class indices (None in bundles without them)."""
        labels = self._golden_arrays().get("labels")
        if labels is not None and labels.dtype.kind not in "iu":
            raise BundleError(f"{self.path / GOLDEN}: 'labels' must be integers, not {labels.dtype}. Re-export the bundle.")
        return labels

    def preprocess_vectors(self) -> list[tuple[np.ndarray, np.ndarray]]:
        """(uint8 RGB source image, its expected model input) pairs from golden.npz; none in bundles older than them."""
        z = self._golden_arrays()
        if "source_pixels" not in z:
            return []
        expected, (h, w) = z["source_pixels"], self.spec.input_size
        sources = [z.get(f"source_{i}") for i in range(len(expected))] if expected.ndim == 4 else []
        if (expected.shape[1:] != (h, w, 3) or expected.dtype != np.uint8 or
                not all(s is not None and s.dtype == np.uint8 and s.ndim in (2, 3) for s in sources)):
            raise BundleError(f"{self.path / GOLDEN}: 'source_pixels' must be uint8 N×{h}×{w}×3 with one uint8 image "
                              "'source_<i>' each. Re-export the bundle.")
        return list(zip(sources, expected))

    def jpeg_vector(self) -> tuple[bytes, np.ndarray] | None:
        """(a camera-sized JPEG's bytes, its expected model input) from golden.npz: the test of the
        reduced JPEG decode; None in bundles without one (no reducing gap, or older)."""
        z, (h, w) = self._golden_arrays(), self.spec.input_size
        if "jpeg_source" not in z or "jpeg_pixels" not in z:
            return None
        if z["jpeg_pixels"].shape != (h, w, 3) or z["jpeg_pixels"].dtype != np.uint8:
            raise BundleError(f"{self.path / GOLDEN}: 'jpeg_pixels' must be uint8 {h}×{w}×3. Re-export the bundle.")
        return z["jpeg_source"].tobytes(), z["jpeg_pixels"]

    def add_file(self, rel: str) -> None:
        """Record ``rel``'s sha256 in the manifest (in memory; call :meth:`save`)."""
        self.manifest.setdefault("files", {})[rel] = sha256_file(self.path / rel)

    def save(self) -> None:
        self.manifest["schema"] = SCHEMA_VERSION
        self.manifest[SELF_DIGEST] = manifest_digest(self.manifest)
        unlink_links(self.path / MANIFEST)
        write_json(self.path / MANIFEST, self.manifest)
