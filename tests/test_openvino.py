"""ONNX Runtime's OpenVINO execution provider: the runtime and the check gate on it, for real.

onnxruntime-openvino provides the same `onnxruntime` module as onnxruntime, so it lives in
its own environment, .venv-openvino (`make openvino-env`, run by `make test`), with the
torch-free runtime only; these tests drive it there as a device app would.
"""

from __future__ import annotations

import json
import subprocess
import textwrap
from pathlib import Path

import pytest

import edge_tl
from edge_tl.errors import UserError
from edge_tl.runtime.runners import OPENVINO, OnnxRuntimeRunner, import_onnxruntime

ROOT = Path(edge_tl.__file__).resolve().parent.parent
OV_PYTHON = ROOT / ".venv-openvino" / "bin" / "python"


def _openvino_python() -> Path:
    if not (OV_PYTHON.parent.parent / ".complete").is_file():
        pytest.skip(f"no complete {OV_PYTHON.parent.parent}: `make openvino-env` makes it (onnxruntime-openvino has "
                    "wheels for x86-64 Linux and Windows only)")
    return OV_PYTHON


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(_openvino_python()), *args], capture_output=True, text=True, timeout=300, cwd=ROOT)


@pytest.mark.skipif(OPENVINO in import_onnxruntime().get_available_providers(),
                    reason="this environment's ONNX Runtime has the OpenVINO provider")
def test_openvino_device_without_the_provider_names_the_fix(cpu_bundle):
    with pytest.raises(UserError, match="onnxruntime-openvino"):
        OnnxRuntimeRunner(cpu_bundle / "model.fp32.onnx", "openvino").activate()


def test_openvino_runner_matches_the_cpu_provider_at_every_batch_size(cpu_bundle):
    """Each batch size gets its own static-shape session; outputs match the CPU provider's."""
    script = textwrap.dedent(f"""
        import json, sys, numpy as np
        from edge_tl.runtime.runners import OnnxRuntimeRunner
        assert "torch" not in sys.modules
        x = np.random.default_rng(0).uniform(0, 255, (5, 3, 96, 96)).astype(np.float32)
        out = {{}}
        for name in ("model.fp32.onnx", "model.int8-cpu.onnx"):
            cpu = OnnxRuntimeRunner({str(cpu_bundle)!r} + "/" + name, "cpu").activate()
            ov = OnnxRuntimeRunner({str(cpu_bundle)!r} + "/" + name, "openvino").activate()
            diffs = [float(np.abs(ov.infer(x[:b]) - cpu.infer(x[:b])).max()) for b in (1, 5, 2, 1)]
            agree = float((ov.infer(x).argmax(1) == cpu.infer(x).argmax(1)).mean())
            out[name] = {{"describe": ov.describe(), "diffs": diffs, "agree": agree,
                          "static_shapes": sorted(s[0] for s, sess in ov._static.items() if sess is not ov.session)}}
        from edge_tl.runtime import Predictor
        with Predictor.from_bundle({str(cpu_bundle)!r}) as p:  # device auto: OpenVINO where installed
            out["auto"] = p.describe()
        print(json.dumps(out))
    """)
    r = _run("-c", script)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.splitlines()[-1])
    auto = out.pop("auto")
    assert auto.startswith("int8-cpu ") and "OpenVINOExecutionProvider" in auto, auto
    for name, o in out.items():
        assert "OpenVINOExecutionProvider" in o["describe"], o
        assert o["static_shapes"] == [1, 2, 5], o
    assert max(out["model.fp32.onnx"]["diffs"]) < 1e-3, out
    assert max(out["model.int8-cpu.onnx"]["diffs"]) < 0.5, out  # integer rounding may differ by a step or so
    assert out["model.int8-cpu.onnx"]["agree"] >= 0.8, out


def test_check_gate_on_openvino(pattern_bundle):
    """`edge-tl check --device openvino` in an environment with only the runtime and onnxruntime-openvino."""
    bundle, test_dir = pattern_bundle
    r = _run("-m", "edge_tl", "check", str(bundle), "--data", str(test_dir), "--device", "openvino", "--json")
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    results = json.loads(r.stdout)["artifacts"]
    onnx_results = {k: v for k, v in results.items() if v["backend"] == "onnxruntime"}
    assert {"fp32", "int8-cpu"} <= set(onnx_results), results
    for name, v in onnx_results.items():
        assert "OpenVINOExecutionProvider" in v["runs_on"], (name, v)
        assert v["passed"], (name, v)
