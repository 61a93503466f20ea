"""TensorRT: option handling and trtexec lines everywhere; builder and runner where TensorRT and a GPU exist."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from edge_tl.errors import UserError
from edge_tl.export.tensorrt import (BatchProfile, engine_filename, parse_precisions, trtexec_command,
                                     typing_mode)
from edge_tl.runtime import trt_support

TRT_MISSING = trt_support.missing_reason()
needs_trt = pytest.mark.skipif(
    TRT_MISSING is not None,
    reason=f"needs TensorRT 10/11 + cuda-python + an NVIDIA GPU ({TRT_MISSING}); run "
           "`pip install -e '.[dev,tensorrt]' && pytest tests/test_tensorrt.py` on a GPU machine or a Jetson")


def test_batch_profile_parsing():
    assert BatchProfile.parse("1:8:32") == BatchProfile(1, 8, 32)
    assert BatchProfile.parse("4") == BatchProfile(1, 4, 4)
    assert BatchProfile(1, 2, 3).shapes((3, 8, 8)) == ((1, 3, 8, 8), (2, 3, 8, 8), (3, 3, 8, 8))
    for bad in ("8:1:4", "0:1:2", "a:b:c", "1:2"):
        with pytest.raises(UserError, match="MIN:OPT:MAX"):
            BatchProfile.parse(bad)


def test_precision_list_and_typing_mode():
    assert parse_precisions("fp16, int8,fp16") == ["fp16", "int8"]
    with pytest.raises(UserError, match="--precision"):
        parse_precisions("fp8")
    assert typing_mode("10.13.0.35") == "weak" and typing_mode("11.1.0") == "strong"


def test_trtexec_lines_for_tensorrt_10_and_11():
    args = ("m.onnx", "m.engine", "int8", "pixels", (3, 224, 224), BatchProfile(1, 1, 8))
    weak = trtexec_command(*args, mode="weak", workspace_mb=512)
    assert weak[:3] == ["trtexec", "--onnx=m.onnx", "--saveEngine=m.engine"]
    assert "--minShapes=pixels:1x3x224x224" in weak and "--maxShapes=pixels:8x3x224x224" in weak
    assert {"--int8", "--fp16", "--memPoolSize=workspace:512M"} <= set(weak)
    dla = trtexec_command(*args, mode="weak", dla_core=0)  # DLA: one fixed shape, at OPT
    assert {"--useDLACore=0", "--allowGPUFallback", "--maxShapes=pixels:1x3x224x224"} <= set(dla)
    assert BatchProfile(2, 4, 8).for_dla(1) == BatchProfile(4, 4, 4) and BatchProfile(2, 4, 8).for_dla(None).max == 8
    strong = trtexec_command(*args, mode="strong")
    assert "--stronglyTyped" in strong and not {"--int8", "--fp16"} & set(strong)  # removed in trtexec 11


def test_engine_names_carry_precision_version_and_gpu():
    name = engine_filename("fp16", "10.13.0", "NVIDIA H100 80GB HBM3", "9.0")
    assert name == "model.fp16.trt10.13.0.nvidia-h100-80gb-hbm3.sm90.engine"
    assert engine_filename("int8", "10.3.0", "Orin", "8.7", dla_core=1).endswith(".sm87.dla1.engine")


def test_missing_tensorrt_is_a_clear_error(cpu_bundle):
    if TRT_MISSING is None:
        pytest.skip("TensorRT is installed here; this checks the message on machines without it")
    assert "pip install" in TRT_MISSING or "GPU" in TRT_MISSING
    from edge_tl.runtime import Predictor

    with pytest.raises(UserError, match="--backend tensorrt"):
        Predictor.from_bundle(cpu_bundle, backend="tensorrt")


@needs_trt
def test_build_engines_and_run_them(cpu_bundle, elpv_run, tmp_path):
    """Engines from a gpu bundle agree with the golden FP32 outputs; a wrong engine is refused clearly."""
    from edge_tl.export.bundle import export_bundle
    from edge_tl.export.device import build_engines
    from edge_tl.runtime import Predictor
    from edge_tl.runtime.bundle import Bundle

    out = tmp_path / "gpu"
    export_bundle(elpv_run, out, "gpu", "fp32,fp16,int8", progress=False, log=lambda s: None)
    bundle = Bundle.load(out)
    if not any(a["format"] == "engine" for a in bundle.artifacts):
        build_engines(bundle, ["fp32", "fp16", "int8"], log=lambda s: None)
    bundle = Bundle.load(out)
    pixels, logits = bundle.golden()
    for art in (a for a in bundle.artifacts if a["format"] == "engine"):
        with Predictor.from_bundle(out, artifact=art["name"]) as p:
            got = p.infer(pixels)
            assert got.shape == logits.shape
            agree = (got.argmax(1) == logits.argmax(1)).mean()
            assert agree >= (0.99 if art["precision"] != "int8" else 0.9), (art["name"], agree)
            assert set(p.runner.last_timings) == {"h2d_ms", "compute_ms", "d2h_ms"}
    engine = next(a for a in bundle.artifacts if a["format"] == "engine")
    (out / engine["file"]).write_bytes(b"not an engine")
    bundle.add_file(engine["file"])
    bundle.save()
    with pytest.raises(UserError, match="cannot load this engine"):
        Predictor.from_bundle(out, artifact=engine["name"])
    assert np.isfinite(logits).all()


def test_cuda_problem_names_the_cuda_error_without_a_driver():
    """cuda-python's real bindings on a machine without an NVIDIA driver: the reason names CUDA's error and the fix."""
    cudart = pytest.importorskip("cuda.bindings.runtime", reason="cuda-python is not installed (the dev extra has it)")
    if any(Path(p).exists() for p in ("/dev/nvidia0", "/dev/nvhost-ctrl", "/proc/driver/nvidia/version")):
        pytest.skip("an NVIDIA driver is present; this checks the message on machines without one")
    reason = trt_support.cuda_problem(cudart)
    assert reason is not None and "cudaError" in reason, reason
    assert "tensorrt-cu12 'cuda-python>=12.6,<13'" in reason
