"""What produced a run or a bundle: edge-tl's code (version and git commit, dirty or not) and the
libraries that change its numbers. Recorded in checkpoints, metrics.json and manifests."""

from __future__ import annotations

import functools
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
    commit = None
    if (root / ".git").exists():
        try:
            res = subprocess.run(["git", "-C", str(root), "describe", "--always", "--dirty", "--abbrev=12"],
                                 capture_output=True, text=True, timeout=10, check=False)
            commit = res.stdout.strip() or None if res.returncode == 0 else None
        except (OSError, subprocess.SubprocessError):
            commit = None
    return {"edge_tl": __version__, "git": commit}


def library_versions() -> dict:
    """Versions of what decodes, resizes and computes (Pillow's resize defines the pixels)."""
    import numpy
    import PIL

    return {"python": platform.python_version(), "numpy": numpy.__version__, "pillow": PIL.__version__}
