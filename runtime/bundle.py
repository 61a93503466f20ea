"""The bundle: one folder whose ``manifest.json`` is the contract between export, runtime and apps.

Loading verifies it: every file the manifest lists must match its sha256, the manifest itself
must match the ``manifest_sha256`` it was saved with (schema 2; a hand-edited contract is
refused, not half-followed), its classes and input size must agree with the hashed
``labels.txt`` and golden outputs, and a manifest written by a newer edge-tl (higher
``schema``) is refused rather than misread.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edge_tl.errors import UserError
from edge_tl.fileio import sha256_file, write_json

from .spec import PreprocessSpec

SCHEMA_VERSION = 2  # 2: the manifest carries manifest_sha256
MANIFEST = "manifest.json"
GOLDEN = "golden.npz"
LABELS = "labels.txt"
SELF_DIGEST = "manifest_sha256"
READABLE = ("Every file of a bundle is checked against its manifest, so this user needs read access to all of "
            "them: chmod -R a+rX {}")


def manifest_digest(manifest: dict) -> str:
    """sha256 of the manifest's canonical JSON, its own digest field left out."""
    body = {k: v for k, v in manifest.items() if k != SELF_DIGEST}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


class BundleError(UserError):
    """A bundle that is missing, damaged, tampered with or too new for this code."""


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
    files = manifest.get("files", {})
    if not isinstance(files, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in files.items()):
        raise bad("files", "an object of path: sha256 strings")
    output = manifest.get("output", {})
    temperature = output.get("temperature", 1.0) if isinstance(output, dict) else None
    if not isinstance(temperature, (int, float)) or isinstance(temperature, bool) or not 0 < temperature < float("inf"):
        raise bad("output", "an object whose 'temperature' (if any) is a positive number")
    validation = manifest.get("validation") or {}
    images = validation.get("images") if isinstance(validation, dict) else "?"
    if images is not None and (not isinstance(images, int) or isinstance(images, bool)):
        raise bad("validation", "an object whose 'images' is an integer")


@dataclass
class Bundle:
    """A verified bundle folder and its manifest."""

    path: Path
    manifest: dict

    @classmethod
    def load(cls, path: str | Path, verify: bool = True) -> "Bundle":
        path = Path(path)
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
            raise BundleError(f"{mpath}: cannot be read ({exc.strerror or exc}). {READABLE.format(path)}") from None
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise BundleError(f"{mpath}: unreadable manifest ({exc}). Re-export the bundle.") from None
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
        if self.manifest["schema"] >= 2 and self.manifest.get(SELF_DIGEST) != manifest_digest(self.manifest):
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
                actual = sha256_file(f)
            except OSError as exc:
                raise BundleError(f"{f}: cannot be read ({exc.strerror or exc}). {READABLE.format(self.path)}") from None
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
        if not classes or len(set(classes)) != len(classes):
            raise BundleError(f"{mpath}: 'classes' must be distinct names, got {classes}. Re-export the bundle.")
        labels = self.path / LABELS
        if labels.is_file() and labels.read_text(encoding="utf-8").removesuffix("\n").split("\n") != classes:
            raise BundleError(f"{mpath}: 'classes' {classes} differ from {labels}. Re-export the bundle.")
        pixels, logits = self.golden()
        if pixels.shape[1:3] != tuple(spec.input_size) or logits.shape[1:] != (len(classes),):
            raise BundleError(f"{mpath}: input {list(spec.input_size)} / {len(classes)} classes disagree with the "
                              f"golden outputs ({pixels.shape[1]}x{pixels.shape[2]} pixels, {logits.shape[1]} "
                              "logits). Re-export the bundle.")

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

    @property
    def temperature(self) -> float:
        """T of the scores, softmax(logits / T): fitted at export (1 in bundles from before it)."""
        return float(self.manifest.get("output", {}).get("temperature", 1.0))

    def golden(self) -> tuple[np.ndarray, np.ndarray]:
        """(uint8 N×H×W×3 pixels, float32 N×classes reference logits of the fine-tuned model)."""
        f = self.path / GOLDEN
        if not f.is_file():
            raise BundleError(f"{f}: missing; re-export the bundle to get golden outputs.")
        with np.load(f) as z:
            pixels, logits = z["pixels"], z["logits"]
        if not np.isfinite(logits).all():
            raise BundleError(f"{f}: its reference logits are not all finite (inf or NaN), so nothing can be compared "
                              "with them; re-export the bundle.")
        return pixels, logits

    def preprocess_vectors(self) -> list[tuple[np.ndarray, np.ndarray]]:
        """(uint8 RGB source image, its expected model input) pairs from golden.npz; none in bundles older than them."""
        with np.load(self.path / GOLDEN) as z:
            if "source_pixels" not in z.files:
                return []
            expected = z["source_pixels"]
            return [(z[f"source_{i}"], expected[i]) for i in range(len(expected))]

    def jpeg_vector(self) -> tuple[bytes, np.ndarray] | None:
        """(a camera-sized JPEG's bytes, its expected model input) from golden.npz: the test of the
        reduced JPEG decode; None in bundles without one (no reducing gap, or older)."""
        with np.load(self.path / GOLDEN) as z:
            return (z["jpeg_source"].tobytes(), z["jpeg_pixels"]) if "jpeg_source" in z.files else None

    def add_file(self, rel: str) -> None:
        """Record ``rel``'s sha256 in the manifest (in memory; call :meth:`save`)."""
        self.manifest.setdefault("files", {})[rel] = sha256_file(self.path / rel)

    def save(self) -> None:
        self.manifest["schema"] = SCHEMA_VERSION
        self.manifest[SELF_DIGEST] = manifest_digest(self.manifest)
        write_json(self.path / MANIFEST, self.manifest)
