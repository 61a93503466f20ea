"""The bundle: one folder whose ``manifest.json`` is the contract between export, runtime and apps.

Loading verifies it: every file the manifest lists must match its sha256, and a manifest
written by a newer edge-tl (higher ``schema``) is refused rather than misread.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edge_tl.errors import UserError
from edge_tl.fileio import sha256_file, write_json

from .spec import PreprocessSpec

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
GOLDEN = "golden.npz"


class BundleError(UserError):
    """A bundle that is missing, damaged, tampered with or too new for this code."""


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
            raise BundleError(f"{path}: not a bundle (no {MANIFEST}). Make one with `edge-tl export RUN --out {path}`.")
        try:
            manifest = json.loads(mpath.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise BundleError(f"{mpath}: unreadable manifest ({exc}). Re-export the bundle.") from None
        schema = manifest.get("schema")
        if not isinstance(schema, int):
            raise BundleError(f"{mpath}: no integer 'schema' field; this is not an edge-tl manifest.")
        if schema > SCHEMA_VERSION:
            raise BundleError(f"{mpath}: schema {schema} is newer than this edge-tl understands ({SCHEMA_VERSION}). "
                              "Upgrade: pip install -U edge-tl.")
        bundle = cls(path, manifest)
        if verify:
            bundle.verify()
        return bundle

    def verify(self) -> None:
        """Refuse the bundle when a model or golden file is not listed, or a listed file is missing or changed."""
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
            if not f.is_file():
                raise BundleError(f"{f}: listed in the manifest but missing. Copy the whole bundle folder again.")
            if sha256_file(f) != digest:
                raise BundleError(f"{f}: sha256 differs from the manifest (modified or corrupted). "
                                  "Copy the bundle again or re-export it; edge-tl will not run a changed file.")

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
        raise BundleError(f"{self.path}: no artifact '{name}' (has: {', '.join(a['name'] for a in self.artifacts)}).")

    def file(self, artifact: dict) -> Path:
        return self.path / artifact["file"]

    def golden(self) -> tuple[np.ndarray, np.ndarray]:
        """(uint8 N×H×W×3 pixels, float32 N×classes reference logits of the fine-tuned model)."""
        f = self.path / GOLDEN
        if not f.is_file():
            raise BundleError(f"{f}: missing; re-export the bundle to get golden outputs.")
        with np.load(f) as z:
            return z["pixels"], z["logits"]

    def add_file(self, rel: str) -> None:
        """Record ``rel``'s sha256 in the manifest (in memory; call :meth:`save`)."""
        self.manifest.setdefault("files", {})[rel] = sha256_file(self.path / rel)

    def save(self) -> None:
        write_json(self.path / MANIFEST, self.manifest)
