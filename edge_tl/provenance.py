"""What produced a run or a bundle: edge-tl's code (version and git commit, dirty or not) and the
libraries that change its numbers. Recorded in checkpoints, metrics.json and manifests."""

from __future__ import annotations

import functools
import os
import platform
import subprocess
from pathlib import Path

from edge_tl import __version__


@functools.lru_cache(maxsize=1)
def code_version() -> dict:
    """{"edge_tl": version, "git": commit (+ "-dirty" with uncommitted changes) or None}: the version
    alone names no change (every commit so far is 0.1.0); None where edge-tl is not a git checkout
    (a wheel) or git is missing."""
    root = Path(__file__).resolve().parents[1]
    if not (root / ".git").exists() or not (root / "pyproject.toml").is_file():
        return {"edge_tl": __version__, "git": None}
    # git follows GIT_DIR/GIT_WORK_TREE from the environment (a hook, `git rebase -x`): not edge-tl's repo
    env = {k: v for k, v in os.environ.items() if not k.startswith("GIT_")} | {"GIT_OPTIONAL_LOCKS": "0"}

    def git(*args: str) -> str | None:
        try:
            res = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=10,
                                 check=False, env=env)
        except (OSError, subprocess.SubprocessError):
            return None
        return res.stdout.strip() if res.returncode == 0 else None

    top = git("rev-parse", "--show-toplevel")
    if top is None or Path(top).resolve() != root:  # edge-tl's files inside someone else's repository
        return {"edge_tl": __version__, "git": None}
    commit = git("rev-parse", "--short=12", "HEAD")
    # changed or new (untracked, not ignored) files of edge-tl's code make the commit not the code that ran
    changed = git("status", "--porcelain", "--", "edge_tl", "finetune", "export", "runtime", "pyproject.toml")
    return {"edge_tl": __version__, "git": None if commit is None else commit + ("-dirty" if changed else "")}


def library_versions() -> dict:
    """Versions of what decodes, resizes and computes (Pillow's resize defines the pixels)."""
    import numpy
    import PIL

    return {"python": platform.python_version(), "numpy": numpy.__version__, "pillow": PIL.__version__}
