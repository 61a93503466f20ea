"""Atomic file writes and hashing: a crash or Ctrl-C never leaves a half-written file."""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
from pathlib import Path
from typing import Any, Callable

from edge_tl.errors import UserError


def _fresh(parent: Path, prefix: str, make: Callable[[Path], None]) -> Path:
    """A new, uniquely named temp file or folder in ``parent``, made by ``make`` (which fails if it exists)."""
    for _ in range(100):
        path = parent / f".{prefix}.{secrets.token_hex(4)}.tmp"
        try:
            make(path)
            return path
        except FileExistsError:
            continue
    raise FileExistsError(f"{parent}: no free temporary name for {prefix}")


def temp_folder(beside: Path) -> Path:
    """A new empty folder next to ``beside`` with the permissions the umask gives (mkdtemp's are 0700:
    bundles are copied to devices and shared)."""
    try:
        beside.parent.mkdir(parents=True, exist_ok=True)
        return _fresh(beside.parent, beside.name, lambda p: os.mkdir(p, 0o777))
    except OSError as exc:
        raise UserError(f"{beside}: cannot create a folder beside it ({exc.strerror or exc}). Choose another --out.") from None


def replace_folder(new: Path, out: Path) -> None:
    """Give the finished folder ``new`` the name ``out``, replacing an old one with no moment when
    neither exists whole: the old one is renamed aside, and deleted only once ``new`` took its place."""
    old = out.with_name(f".{out.name}.old.{secrets.token_hex(4)}") if out.exists() else None
    if old is not None:
        out.rename(old)
    try:
        new.rename(out)
    except BaseException:
        if old is not None:
            old.rename(out)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp_path)`` then rename the temp file onto ``path`` in one step.

    A symbolic link is written through (its target replaced, the link kept); a FIFO or device
    (``/dev/stdout``) is written into directly: renaming onto it would replace the node itself.
    A file that cannot be written is a UserError naming it (exit 2), not a traceback.
    """
    path = Path(path)
    if path.is_symlink():
        path = path.resolve()
    if path.is_dir():
        raise UserError(f"{path}: is a folder; give a file path to write to.")
    try:
        if path.exists() and not path.is_file():
            write(path)
            return path
        path.parent.mkdir(parents=True, exist_ok=True)
        # made 0666 less the umask by the kernel (mkstemp's 0600 would keep a bundle from others on a device)
        tmp_path = _fresh(path.parent, path.name, lambda p: os.close(os.open(p, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)))
    except OSError as exc:
        raise UserError(f"{path}: cannot write it ({exc.strerror or exc}). Choose another path.") from None
    try:
        write(tmp_path)
        os.replace(tmp_path, path)
    except OSError as exc:
        raise UserError(f"{path}: cannot write it ({exc.strerror or exc}). Free space or choose another path.") from None
    finally:
        tmp_path.unlink(missing_ok=True)
    return path


def check_writable(path: str | Path) -> None:
    """Fail now, naming ``path``, if a file cannot be written there (before minutes of work that
    would then end in an error)."""
    path = Path(path).resolve() if Path(path).is_symlink() else Path(path)
    if path.is_dir():
        raise UserError(f"{path}: is a folder; give a file path to write to.")
    if path.exists() and not path.is_file():
        return  # a FIFO or device: written into
    probe = atomic_write(path.with_name(f".{path.name}.probe"), lambda p: p.write_bytes(b""))
    probe.unlink(missing_ok=True)


def write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda p: p.write_text(text, encoding="utf-8"))


def write_json(path: str | Path, obj: Any) -> Path:
    return write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()
