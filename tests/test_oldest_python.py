"""The device-side runtime on Python 3.8, the oldest it supports (JetPack 5, Ubuntu 20.04), for real.

.venv-py38 (`make py38-env`, run by `make test`) holds Python 3.8 with the runtime's dependencies only
(numpy, Pillow, ONNX Runtime, typer: the newest releases that still support 3.8). A wheel of this
checkout, built as the device steps build it, goes into a folder of its own there (pip checks the
wheel's Requires-Python), and the device commands run on a bundle exported here.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import edge_tl
from edge_tl.runtime.bundle import Bundle

ROOT = Path(edge_tl.__file__).resolve().parent.parent
PY38_ENV = ROOT / ".venv-py38"


@pytest.fixture(scope="module")
def py38(tmp_path_factory) -> tuple[Path, dict]:
    """(Python 3.8, its environment variables) with a wheel of this checkout importable."""
    if not (PY38_ENV / ".complete").is_file():
        pytest.skip(f"no complete {PY38_ENV}: `make py38-env` makes it where a Python 3.8 exists "
                    "(pyenv install 3.8 adds one)")
    tmp = tmp_path_factory.mktemp("py38")
    src = tmp / "src"  # a copy, so the build's own folders (build/, *.egg-info) stay out of the checkout
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".git", ".venv*", "build", "*.egg-info", "__pycache__",
                                                             "runs", "demo", "tests", "benchmarks", "examples"))
    res = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(tmp / "wheel"), str(src)],
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    python = PY38_ENV / "bin" / "python"
    site = tmp / "site"
    res = subprocess.run([str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", "--no-deps",
                          "--target", str(site), *map(str, (tmp / "wheel").glob("edge_tl-*.whl"))],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]  # a Requires-Python above 3.8 fails here
    return python, {"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin", "PYTHONUNBUFFERED": "1"}


def _run(py38, *args: str) -> subprocess.CompletedProcess:
    """Python 3.8 with ``args``, away from the checkout (whose edge_tl/ folder would shadow the wheel's)."""
    python, env = py38
    return subprocess.run([str(python), *args], capture_output=True, text=True, env=env, timeout=300,
                          cwd=Path(env["PYTHONPATH"]).parent)


def _edge_tl(py38, *args: str) -> subprocess.CompletedProcess:
    return _run(py38, "-m", "edge_tl", *args)


def test_device_commands_run_on_python_38(py38, cpu_bundle, elpv_small, tmp_path):
    image = sorted((elpv_small / "test" / "p100").iterdir())[0]
    classes = Bundle.load(cpu_bundle).classes
    res = _edge_tl(py38, "predict", str(cpu_bundle), str(image), "--json")
    assert res.returncode == 0, res.stderr[-2000:]
    assert json.loads(res.stdout.splitlines()[0])["label"] in classes
    res = _edge_tl(py38, "check", str(cpu_bundle), "--data", str(elpv_small / "test"), "--max-drop", "100",
                   "--min-agreement", "0", "--json")
    assert res.returncode == 0, res.stderr[-2000:]
    report = json.loads(res.stdout)
    assert report["passed"] and {"fp32", "int8-cpu"} <= set(report["artifacts"])
    fp32 = report["artifacts"]["fp32"]
    assert fp32["runs_on"].startswith("onnxruntime 1.19") and fp32["agreement"] == 1.0 and fp32["max_abs_diff"] < 1e-3
    res = _edge_tl(py38, "bench", str(cpu_bundle), "--batch", "1", "--iters", "3")
    assert res.returncode == 0 and "batch   1" in res.stdout, res.stderr[-2000:]
    res = _edge_tl(py38, "slim", str(cpu_bundle), "--keep", "int8-cpu", "--out", str(tmp_path / "slim"))
    assert res.returncode == 0, res.stderr[-2000:]
    tampered = shutil.copytree(cpu_bundle, tmp_path / "tampered")
    (tampered / "labels.txt").write_text("\n".join(reversed(classes)) + "\n")
    res = _edge_tl(py38, "predict", str(tampered), str(image))
    assert res.returncode == 2 and "labels.txt" in res.stderr and "Traceback" not in res.stderr, res.stderr[-2000:]
    res = _edge_tl(py38, "finetune", "--data", str(elpv_small), "--out", str(tmp_path / "run"))
    assert res.returncode == 2 and "needs Python 3.10 or newer (this is 3.8." in res.stderr, res.stderr[-2000:]


def test_the_predictor_api_runs_on_python_38(py38, cpu_bundle, elpv_small):
    image = sorted((elpv_small / "test" / "p000").iterdir())[0]
    script = textwrap.dedent(f"""
        import json, sys
        import numpy as np
        from PIL import Image
        from edge_tl.runtime import Predictor, UnreadableImage
        assert sys.version_info[:2] == (3, 8), sys.version
        with Predictor.from_bundle({str(cpu_bundle)!r}, device="cpu") as p:
            path = {str(image)!r}
            data = open(path, "rb").read()
            labels = [p.predict(path).label, p.predict(data).label, p.predict(Image.open(path)).label,
                      p.predict(np.asarray(Image.open(path).convert("RGB"))).label]
            batch = [r.label for r in p.predict_batch([path, data])]
            try:
                p.predict(b"not an image")
                unreadable = None
            except UnreadableImage as exc:
                unreadable = str(exc)
        print(json.dumps({{"labels": labels, "batch": batch, "unreadable": unreadable}}))
    """)
    res = _run(py38, "-c", script)
    assert res.returncode == 0, res.stderr[-2000:]
    out = json.loads(res.stdout)
    assert len(set(out["labels"])) == 1 and out["batch"] == out["labels"][:2]
    assert out["unreadable"]
