"""Atomic file writes and hashing: a crash or Ctrl-C never leaves a half-written file."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import re
import secrets
import shutil
import socket
import time
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
        try:
            out.rename(old)
        except PermissionError as exc:  # Windows: a file in it is open, or a shell or Explorer is inside it
            raise UserError(f"{out}: cannot be replaced ({exc.strerror or exc}); close the programs using it (a "
                            "shell or file browser inside it, an app with a file of it open) and run again. The "
                            "old folder is unchanged.") from None
    try:
        new.rename(out)
    except BaseException:
        if old is not None:
            old.rename(out)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# errors that say the destination cannot take the file; others (a missing input the writer reads,
# a bug) propagate as they are
_WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM}


def _cannot_write(path: Path, exc: OSError) -> UserError:
    advice = "Free space or choose" if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG) else "Choose"
    return UserError(f"{path}: cannot write it ({exc.strerror or exc}). {advice} another path.")


def _destination(path: str | Path) -> Path:
    """The file a write to ``path`` lands in (a symbolic link's target), or a UserError naming why none can."""
    path = Path(path)
    if path.is_symlink():
        path = path.resolve()
    if path.is_dir():
        raise UserError(f"{path}: is a folder; give a file path to write to.")
    ancestor = next((p for p in path.parents if p.exists()), None)
    if ancestor is not None and not ancestor.is_dir():
        raise UserError(f"{path}: {ancestor} is a file, not a folder; choose another path.")
    return path


def _temp_beside(path: Path) -> Path:
    """A new empty file next to ``path``, made 0666 less the umask by the kernel (mkstemp's 0600
    would keep a bundle from others on a device)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        return _fresh(path.parent, path.name, lambda p: os.close(os.open(p, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)))
    except OSError as exc:
        raise _cannot_write(path, exc) from exc


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp_path)`` then rename the temp file onto ``path`` in one step.

    A symbolic link is written through (its target replaced, the link kept); a FIFO or device
    (``/dev/stdout``) is written into directly: renaming onto it would replace the node itself.
    A destination that cannot take the file (no space, read-only, no permission) is a UserError
    naming it (exit 2); any other error of ``write`` propagates unchanged.
    """
    path = _destination(path)
    direct = path.exists() and not path.is_file()
    tmp_path = path if direct else _temp_beside(path)
    try:
        write(tmp_path)
        if not direct:
            _flush_to_disk(tmp_path)
            os.replace(tmp_path, path)
    except OSError as exc:
        if exc.errno in _WRITE_ERRNOS and exc.filename in (None, str(tmp_path), str(path)):
            raise _cannot_write(path, exc) from exc
        raise
    finally:
        if not direct:
            tmp_path.unlink(missing_ok=True)
    return path


def _flush_to_disk(path: Path) -> None:
    """Have the file's bytes on disk before it is renamed into place: after a power cut the name
    then holds the old file or the new one, not an empty one (ext4 and XFS may write the rename first)."""
    with contextlib.suppress(OSError):  # a file system without fsync (some network and FUSE ones): the rename stands
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def refused_write(path: Path) -> OSError | None:
    """The error the file system gives for more bytes appended to ``path`` (no space, over quota or
    the file-size limit), or None when it takes them: for writers that report a full disk as
    something else (``torch.save``: "RuntimeError: ... unexpected pos")."""
    try:
        with open(path, "ab") as f:
            f.write(bytes(1 << 20))
            f.flush()
            os.fsync(f.fileno())
    except OSError as exc:
        return exc
    return None


def make_folder(path: Path, option: str = "--out") -> None:
    """``path`` and its missing parents, or a UserError naming why not (a read-only file system, no permission)."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"{path}: cannot create the folder ({exc.strerror or exc}). Choose another {option}.") from None


LOCK_NAME = ".edge-tl.lock"


@contextlib.contextmanager
def folder_lock(folder: Path, command: str):
    """Hold ``folder`` for one edge-tl command at a time: a second build or fine-tune writing the
    same folder (a rerun started while one still runs) would interleave stages or train into the
    same run. An OS lock on ``folder/.edge-tl.lock`` (flock; Windows: msvcrt, not tested here),
    released however the process ends, even killed; the file stays, naming the last holder."""
    path = folder / LOCK_NAME
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as exc:  # a read-only folder, or another user's
        raise _cannot_write(path, exc) from None
    try:
        locked = _try_lock(fd, folder, path)
        if locked:
            os.ftruncate(fd, 0)
            os.lseek(fd, 0, os.SEEK_SET)
            os.write(fd, f"{command}, process {os.getpid()} on {socket.gethostname()}, since "
                         f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode())
        try:
            yield
        finally:  # released outright: a DataLoader worker forked meanwhile shares the lock while it lives
            if locked:
                _lock(fd, unlock=True)
    finally:
        os.close(fd)


def _try_lock(fd: int, folder: Path, path: Path) -> bool:
    """Lock ``fd``: True; False (with a warning) on a file system that has no locks; a UserError
    naming the holder when another process holds it."""
    try:
        _lock(fd)
        return True
    except OSError as exc:
        if exc.errno not in HELD_ERRNOS:  # NFS without lockd, some FUSE and SMB mounts
            logging.getLogger("edge_tl").warning("%s: cannot be locked (%s); nothing stops a second edge-tl command "
                                                 "writing it at the same time", folder, exc.strerror or exc)
            return False
    holder = ""
    with contextlib.suppress(OSError):
        holder = os.read(fd, 200).decode(errors="replace").strip()
    raise UserError(f"{folder}: another edge-tl command is writing it ({holder or 'see ' + str(path)}); "
                    "wait for it to end, or choose another --out.")


HELD_ERRNOS = {errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES, errno.EDEADLK}  # flock's, and msvcrt's after its retries


def _lock(fd: int, unlock: bool = False) -> None:
    try:
        import fcntl
    except ImportError:  # Windows
        import msvcrt

        os.lseek(fd, 0, os.SEEK_SET)
        msvcrt.locking(fd, msvcrt.LK_UNLCK if unlock else msvcrt.LK_NBLCK, 1)
    else:
        fcntl.flock(fd, fcntl.LOCK_UN if unlock else fcntl.LOCK_EX | fcntl.LOCK_NB)


STALE_TEMP = re.compile(r"^\..+\.([0-9a-f]{8}\.tmp|old\.[0-9a-f]{8})$")


def remove_stale_temps(folder: Path) -> list[str]:
    """Remove the temp files and folders edge-tl's atomic writes left in ``folder`` when a process was
    killed mid-write (SIGKILL, a power cut: nothing ran to clean up); call it holding the folder's lock."""
    removed = []
    for p in folder.iterdir() if folder.is_dir() else ():
        if STALE_TEMP.match(p.name):
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() and not p.is_symlink() else p.unlink(missing_ok=True)
            removed.append(p.name)
    return removed


def unlink_links(*paths: Path) -> None:
    """Remove those of ``paths`` that are symbolic links, so that a write replaces the link itself:
    inside a bundle (copied from elsewhere, maybe made by someone else) a link may point anywhere."""
    for p in paths:
        if p.is_symlink():
            p.unlink()


def check_writable(path: str | Path) -> None:
    """Fail now, naming ``path``, if a file cannot be written there (before minutes of work that
    would then end in an error). Makes its missing parent folders, as the write would."""
    path = _destination(path)
    if not (path.exists() and not path.is_file()):  # a FIFO or device is written into
        _temp_beside(path).unlink()


def write_text(path: str | Path, text: str) -> Path:
    def write(tmp: Path) -> None:
        with open(tmp, "w", encoding="utf-8", newline="\n") as f:  # LF on Windows too (Path.write_text: 3.10+)
            f.write(text)

    return atomic_write(path, write)


def write_json(path: str | Path, obj: Any) -> Path:
    return write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()
