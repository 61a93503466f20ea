"""TensorRT: option handling and trtexec lines everywhere; builder and runner where TensorRT and a GPU exist."""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path

import pytest

from edge_tl.errors import UserError
from edge_tl.export.tensorrt import (BatchProfile, engine_filename, parse_precisions, trtexec_command,
                                     typing_mode)
from edge_tl.runtime import trt_support

TRT_MISSING = trt_support.missing_reason()
ON_A_JETSON = ("on a Jetson (JetPack's TensorRT, no torch): python3 -m venv --system-site-packages .venv && "
               ".venv/bin/pip install -e . 'cuda-python>=12.6,<13' pytest (JetPack 7: 'cuda-python>=13'), copy there a "
               "--target jetson bundle exported elsewhere, then EDGE_TL_TRT_BUNDLE=BUNDLE .venv/bin/pytest "
               "tests/test_tensorrt.py -k copied_bundle")
needs_trt = pytest.mark.skipif(
    TRT_MISSING is not None,
    reason=f"needs TensorRT 10/11 + cuda-python + an NVIDIA GPU ({TRT_MISSING.rstrip('.') if TRT_MISSING else ''}); on a "
           f"GPU machine: pip install -e '.[dev,tensorrt]' && pytest tests/test_tensorrt.py; {ON_A_JETSON}")
DEVICE_BUNDLE = os.environ.get("EDGE_TL_TRT_BUNDLE")


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
    import re

    # what is missing and its fix: the install line, or CUDA's own error (a GPU-less or too old driver)
    assert "pip install tensorrt cuda-python" in TRT_MISSING or "cudaError" in TRT_MISSING, TRT_MISSING
    from edge_tl.runtime import Predictor

    with pytest.raises(UserError, match="--backend tensorrt: " + re.escape(TRT_MISSING[:60])):
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


@needs_trt
@pytest.mark.skipif(not DEVICE_BUNDLE, reason="set EDGE_TL_TRT_BUNDLE to a --target gpu or jetson bundle exported on "
                                              f"another machine: this test builds and checks its engines, torch-free; {ON_A_JETSON}")
def test_engines_of_a_copied_bundle_build_check_and_predict(tmp_path):
    """What a device does with a bundle exported elsewhere, without torch: build its engines, check
    them (--require-engines: each kind must run here) and predict with the one "auto" picks."""
    import shutil

    from edge_tl.export.device import build_engines
    from edge_tl.export.tensorrt import SOURCE_ARTIFACT, typing_mode
    from edge_tl.runtime import Predictor
    from edge_tl.runtime.bundle import Bundle
    from edge_tl.runtime.check import check_bundle, failures

    out = tmp_path / "bundle"
    shutil.copytree(DEVICE_BUNDLE, out)
    names = {a["name"] for a in Bundle.load(out).artifacts}
    mode = typing_mode(trt_support.import_tensorrt().__version__)
    precisions = [p for p in ("fp16", "int8") if SOURCE_ARTIFACT[mode][p] in names]
    assert precisions, f"{DEVICE_BUNDLE}: no ONNX file to build fp16/int8 engines from ({sorted(names)})"
    build_engines(Bundle.load(out), precisions)
    report = check_bundle(out, require_engines=True)
    assert report["passed"], failures(report)
    pixels, logits = Bundle.load(out).golden()
    with Predictor.from_bundle(out) as p:
        assert p.artifact["format"] == "engine", p.artifact
        assert (p.infer(pixels).argmax(1) == logits.argmax(1)).mean() >= 0.9


def test_cuda_problem_names_the_cuda_error_without_a_driver():
    """cuda-python's real bindings on a machine without an NVIDIA driver: the reason names CUDA's error and the fix."""
    cudart = pytest.importorskip("cuda.bindings.runtime", reason="cuda-python is not installed (the dev extra has it)")
    if any(Path(p).exists() for p in ("/dev/nvidia0", "/dev/nvhost-ctrl", "/proc/driver/nvidia/version")):
        pytest.skip("an NVIDIA driver is present; this checks the message on machines without one")
    reason = trt_support.cuda_problem(cudart)
    assert reason is not None and "cudaError" in reason, reason
    assert "tensorrt-cu12 'cuda-python>=12.6,<13'" in reason


def test_on_a_jetson_the_fixes_are_jetpacks(monkeypatch):
    """On a Jetson the advice is JetPack's TensorRT and a cuda-python of JetPack's CUDA, never PyPI's tensorrt."""
    import types

    monkeypatch.setattr(trt_support, "on_jetson", lambda: True)
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # import fails: not installed
    with pytest.raises(UserError, match="this is a Jetson: use JetPack's own TensorRT, not PyPI's") as err:
        trt_support.import_tensorrt()
    assert "pip install tensorrt" not in str(err.value)
    old_cuda = types.SimpleNamespace(cudaGetDeviceCount=lambda: (35, 0), cudaGetErrorName=lambda e: (0, b"cudaErrorInsufficientDriver"))
    reason = trt_support.cuda_problem(old_cuda)
    assert "(cudaErrorInsufficientDriver)" in reason and "JetPack 6 (CUDA 12) pip install 'cuda-python>=12.6,<13'" in reason
    assert "tensorrt-cu12" not in reason


def test_a_tensorrt_older_than_10_is_refused_naming_what_runs_instead(monkeypatch):
    """JetPack 5's TensorRT 8.5 imports, but its Python API lacks what the engines use: a clear refusal,
    not an AttributeError deep in a build (its Python 3.8 runs the runtime, tests/test_oldest_python.py)."""
    import types

    monkeypatch.setitem(sys.modules, "tensorrt", types.SimpleNamespace(__version__="8.5.2.2"))
    with pytest.raises(UserError, match=r"TensorRT 8\.5\.2\.2 is older than 10.*--device cuda.*JetPack 6"):
        trt_support.import_tensorrt()
    monkeypatch.setitem(sys.modules, "tensorrt", types.SimpleNamespace(__version__="10.3.0"))
    assert trt_support.import_tensorrt().__version__ == "10.3.0"


def fake_tensorrt(version: str, build_ok: bool = True, dla_cores: int = 0):
    """A recording stand-in for the ``tensorrt`` module, shaped like TensorRT 10 or 11's Python API
    (11 has no FP16/INT8 builder flags). It checks edge-tl's own logic around the builder (flags
    per generation, profile, cache, errors), not TensorRT, which cannot run here."""
    import enum
    import types

    import onnx

    calls: list = []
    trt = types.ModuleType("tensorrt")
    trt.__version__ = version
    flags = ["GPU_FALLBACK"] + (["FP16", "INT8"] if version.startswith("10.") else [])
    trt.BuilderFlag = enum.Enum("BuilderFlag", flags)
    # 10: EXPLICIT_BATCH = 0 (deprecated), STRONGLY_TYPED = 1; 11.1: STRONGLY_TYPED = 0 (deprecated, ignored)
    trt.NetworkDefinitionCreationFlag = enum.IntEnum("NetworkDefinitionCreationFlag",
                                                     {"STRONGLY_TYPED": 1 if version.startswith("10.") else 0})
    trt.MemoryPoolType = enum.Enum("MemoryPoolType", ["WORKSPACE"])
    trt.DeviceType = enum.Enum("DeviceType", ["GPU", "DLA"])

    class ILogger:
        Severity = enum.IntEnum("Severity", {"INTERNAL_ERROR": 0, "ERROR": 1, "WARNING": 2, "INFO": 3})

        def __init__(self):
            pass

    class Network:
        def __init__(self):
            self.inputs = []

        num_inputs = property(lambda self: len(self.inputs))

        def get_input(self, i):
            return types.SimpleNamespace(name=self.inputs[i])

    class OnnxParser:
        def __init__(self, network, logger):
            self.network, self.num_errors = network, 0

        def parse(self, data):
            self.network.inputs = [i.name for i in onnx.load_from_string(data).graph.input]
            return True

    class Config:
        default_device_type, DLA_core = None, None

        def set_memory_pool_limit(self, pool, size):
            calls.append(("workspace", size))

        def set_flag(self, flag):
            calls.append(("flag", flag.name))

        def add_optimization_profile(self, profile):
            calls.append(("profile", profile.shapes))
            return 0

        def create_timing_cache(self, data):
            if data and not data.startswith(b"cache"):
                raise RuntimeError("corrupt timing cache")
            return types.SimpleNamespace(serialize=lambda: b"cache-v1")

        def set_timing_cache(self, cache, ignore_mismatch):
            self.cache = cache
            return True

        def get_timing_cache(self):
            return self.cache

    class Builder:
        num_DLA_cores = dla_cores

        def __init__(self, logger):
            self.logger = logger

        def create_network(self, flags):
            calls.append(("network_flags", flags))
            return Network()

        def create_builder_config(self):
            return Config()

        def create_optimization_profile(self):
            profile = types.SimpleNamespace(shapes={})
            profile.set_shape = lambda name, *s: profile.shapes.update({name: s})
            return profile

        def build_serialized_network(self, network, config):
            if build_ok:
                return b"engine-bytes"
            self.logger.log(ILogger.Severity.ERROR, "out of workspace")
            self.logger.log(ILogger.Severity.WARNING, "weak typing is deprecated")
            return None

    class Runtime:
        num_DLA_cores = dla_cores

        def __init__(self, logger):
            pass

    trt.ILogger, trt.OnnxParser, trt.Builder, trt.Runtime = ILogger, OnnxParser, Builder, Runtime
    return trt, calls


@pytest.fixture
def fake_gpu(monkeypatch):
    """This machine as a 'Fake GPU' (sm 8.7) to the code around TensorRT; the devices set are recorded."""
    import types

    devices = []
    monkeypatch.setattr(trt_support, "gpu_info", lambda device=0: {"gpu": "Fake GPU", "compute_capability": "8.7"})
    monkeypatch.setattr(trt_support, "import_cudart", lambda: types.SimpleNamespace(
        cudaSetDevice=lambda d: devices.append(d) or (0,)))
    monkeypatch.setattr(trt_support, "_LOGGER", None)
    return devices


@pytest.fixture
def engines_run_as_their_onnx(monkeypatch):
    """`check` runs an engine as the ONNX file it was built from, on ONNX Runtime: TensorRT cannot
    run here, and what is tested is which engines check runs, skips or fails, not their outputs."""
    from edge_tl.runtime import check as check_module

    make_runner = check_module.make_runner

    def source_on_onnxruntime(bundle, art, backend, device=None, threads=0):
        src = next(a for a in bundle.artifacts if a["file"] == art.get("source", art["file"]))
        return make_runner(bundle, src, "onnxruntime", "cpu", threads)

    monkeypatch.setattr(check_module, "make_runner", source_on_onnxruntime)


@pytest.fixture
def tiny_onnx(tmp_path) -> Path:
    import onnx
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 3, 8, 8])
    y = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 3, 8, 8])
    graph = helper.make_graph([helper.make_node("Identity", ["image"], ["logits"])], "g", [x], [y])
    path = tmp_path / "model.onnx"
    onnx.save(helper.make_model(graph), path)
    return path


@pytest.mark.parametrize("version, precision, expected_flags, network_flags", [
    ("10.16.0", "fp16", ["FP16"], 0), ("10.16.0", "int8", ["FP16", "INT8"], 0),
    ("10.16.0", "fp32", [], 0), ("11.1.0", "fp16", [], 1), ("11.1.0", "int8", [], 1)])
def test_build_engine_flags_per_tensorrt_generation(monkeypatch, fake_gpu, tiny_onnx, tmp_path, version, precision,
                                                    expected_flags, network_flags):
    """TensorRT 10: precision flags on a weakly typed network; 11: a strongly typed one, never the
    flags (11 has none: touching them would raise). Engine and timing cache are written."""
    from edge_tl.export.tensorrt import build_engine

    trt, calls = fake_tensorrt(version)
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    cache = tmp_path / "timing.cache"
    facts = build_engine(tiny_onnx, tmp_path / "m.engine", precision, "image", (3, 8, 8), BatchProfile(1, 4, 16),
                         workspace_mb=64, timing_cache=cache, gpu=1, log=lambda s: None)
    assert fake_gpu == [1]  # built on the CUDA device asked for
    assert [c[1] for c in calls if c[0] == "flag"] == expected_flags
    assert ("network_flags", network_flags) in calls and ("workspace", 64 << 20) in calls
    assert ("profile", {"image": ((1, 3, 8, 8), (4, 3, 8, 8), (16, 3, 8, 8))}) in calls
    assert (tmp_path / "m.engine").read_bytes() == b"engine-bytes" and cache.read_bytes() == b"cache-v1"
    assert facts["typing"] == ("strong" if version.startswith("11") else "weak") and facts["gpu"] == "Fake GPU"


def test_build_engine_errors_name_their_cause(monkeypatch, fake_gpu, tiny_onnx, tmp_path):
    """A wrong input name lists the real ones; a failed build names the last error, not a later
    warning; a corrupt timing cache is replaced; DLA without DLA cores is refused; DLA fixes the batch."""
    from edge_tl.export.tensorrt import build_engine

    args = (tiny_onnx, tmp_path / "m.engine", "fp16")
    for version, ok, dla in (("10.16.0", True, 0), ("10.16.0", False, 0), ("11.1.0", True, 2)):
        trt, calls = fake_tensorrt(version, build_ok=ok, dla_cores=dla)
        monkeypatch.setitem(sys.modules, "tensorrt", trt)
        monkeypatch.setattr(trt_support, "_LOGGER", None)
        if ok and not dla:
            with pytest.raises(UserError, match=r"no input named 'input' \(it has \['image'\]\)"):
                build_engine(*args, "input", (3, 8, 8), BatchProfile(), log=lambda s: None)
            with pytest.raises(UserError, match=r"--dla-core 0: Fake GPU has 0 DLA cores under TensorRT 10.16.0 "
                                                 r"\(DLA cores are on Jetson AGX Orin"):
                build_engine(*args, "image", (3, 8, 8), BatchProfile(), dla_core=0, log=lambda s: None)
        elif not ok:
            with pytest.raises(UserError, match=r"could not build a fp16 engine \(out of workspace\)"):
                build_engine(*args, "image", (3, 8, 8), BatchProfile(), log=lambda s: None)
        else:
            cache, logged = tmp_path / "bad.cache", []
            cache.write_bytes(b"\x00garbage")
            build_engine(*args, "image", (3, 8, 8), BatchProfile(1, 4, 16), dla_core=1, timing_cache=cache,
                         log=logged.append)
            assert ("profile", {"image": ((4, 3, 8, 8),) * 3}) in calls and ("flag", "GPU_FALLBACK") in calls
            assert any("unreadable" in line for line in logged) and cache.read_bytes() == b"cache-v1"


def test_rebuilding_under_a_new_tensorrt_replaces_the_engine_of_that_name(monkeypatch, fake_gpu, cpu_bundle, tmp_path):
    """`edge-tl engine` after a TensorRT upgrade: one `trt-fp16@gpu` artifact, the old file gone (it could
    not run on the new version), the manifest still verifying. Builder: the stand-in above."""
    import shutil

    from edge_tl.export.device import build_engines
    from edge_tl.runtime.bundle import Bundle

    bundle_dir = tmp_path / "b"
    shutil.copytree(cpu_bundle, bundle_dir)
    monkeypatch.setattr(trt_support, "missing_reason", lambda: None)  # no GPU here: the stand-in is the TensorRT
    files = []
    for version in ("10.16.0", "10.17.0"):
        trt, _ = fake_tensorrt(version)
        monkeypatch.setitem(sys.modules, "tensorrt", trt)
        monkeypatch.setattr(trt_support, "_LOGGER", None)
        logs = []
        (art,) = build_engines(Bundle.load(bundle_dir), ["fp16"], log=logs.append)
        files.append(art["file"])
    bundle = Bundle.load(bundle_dir)  # verifies every listed file
    engines = [a for a in bundle.artifacts if a["format"] == "engine"]
    assert [(a["name"], a["tensorrt"]) for a in engines] == [("trt-fp16@fake-gpu", "10.17.0")]
    assert files[0] != files[1] and not (bundle_dir / files[0]).exists() and files[0] not in bundle.manifest["files"]
    assert any(f"replaced {files[0]}" in line for line in logs)
    exported = Bundle.load(cpu_bundle).digest  # re-signed twice, still the release it was exported as
    assert bundle.release_id == exported != bundle.digest


def test_an_engine_built_for_another_tensorrt_is_named_and_gated(monkeypatch, fake_gpu, engines_run_as_their_onnx,
                                                                 cpu_bundle, tmp_path):
    """After a TensorRT (JetPack) upgrade the bundle's engine cannot run: check and bench say why,
    `check --require-engines` fails on it (and on a bundle without engines), the JUnit says so, and an
    app's Predictor warns instead of falling back to ONNX Runtime unnoticed. Builder: the stand-in above."""
    import shutil

    from edge_tl.export.device import build_engines
    from edge_tl.runtime import Predictor
    from edge_tl.runtime.bench import bench_bundle
    from edge_tl.runtime.bundle import Bundle
    from edge_tl.runtime.check import NO_ENGINE, check_bundle, failures, write_junit

    bundle_dir = tmp_path / "b"
    shutil.copytree(cpu_bundle, bundle_dir)
    monkeypatch.setattr(trt_support, "missing_reason", lambda: None)
    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt("10.3.0")[0])
    plain = check_bundle(bundle_dir, require_engines=True, log=lambda s: None)
    assert not plain["passed"] and NO_ENGINE in plain["engine_failures"]
    assert f"`edge-tl engine {bundle_dir}`" in plain["engine_failures"][NO_ENGINE]
    build_engines(Bundle.load(bundle_dir), ["fp16"], log=lambda s: None)
    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt("10.7.0")[0])  # the upgrade
    why = ("built by TensorRT 10.3.0 for Fake GPU (sm 8.7); this machine has TensorRT 10.7.0 and Fake GPU (sm 8.7): "
           "rebuild it here with `edge-tl engine`")
    logs = []
    report = check_bundle(bundle_dir, log=logs.append)
    engine_lines = lambda r: [f for f in failures(r) if f.startswith("trt-")]  # noqa: E731 (int8-cpu of a 1-epoch model may fail)
    assert report["skipped_reasons"] == {"trt-fp16@fake-gpu": why} and engine_lines(report) == []
    assert f"  trt-fp16@fake-gpu: skipped: {why}" in logs
    required = check_bundle(bundle_dir, require_engines=True, log=lambda s: None)
    assert not required["passed"] and engine_lines(required) == [f"trt-fp16@fake-gpu: {why}"]
    case = '<testcase classname="edge-tl.check" name="trt-fp16@fake-gpu"><{} message="built by TensorRT 10.3.0'
    assert case.format("failure") in write_junit(required, tmp_path / "junit.xml").read_text()
    assert case.format("skipped") in write_junit(report, tmp_path / "ok.xml").read_text()
    logs = []
    bench_bundle(bundle_dir, precisions=["fp16"], batches=[1], seconds=0.05, log=logs.append)
    assert f"trt-fp16@fake-gpu: skipped ({why})" in logs
    with pytest.warns(UserWarning, match=r"on ONNX Runtime, not the bundle's TensorRT engines: trt-fp16@fake-gpu: "
                                         r"built by TensorRT 10\.3\.0"):
        Predictor.from_bundle(bundle_dir).close()
    with warnings.catch_warnings():  # asked for the CPU: TensorRT is not consulted, nothing to warn about
        warnings.simplefilter("error")
        Predictor.from_bundle(bundle_dir, device="cpu").close()
    with pytest.raises(UserError, match=r"Its engines: trt-fp16@fake-gpu: built by TensorRT 10\.3\.0"):
        Predictor.from_bundle(bundle_dir, backend="tensorrt")
    # TensorRT installed, but its cuda-python cannot reach CUDA (JetPack 7 with a CUDA 12 cuda-python)
    monkeypatch.setattr(trt_support, "missing_reason", lambda: "CUDA cannot count GPUs (cudaErrorInsufficientDriver)")
    with pytest.warns(UserWarning, match=r"trt-fp16@fake-gpu: needs TensorRT and a GPU \(CUDA cannot count GPUs"):
        Predictor.from_bundle(bundle_dir).close()
    monkeypatch.setattr(trt_support, "missing_reason", lambda: None)
    # a bundle carrying engines for two devices: this one's runs, the other's is skipped, not a failure
    build_engines(Bundle.load(bundle_dir), ["fp16"], log=lambda s: None)  # rebuilt for 10.7.0 here
    monkeypatch.setattr(trt_support, "gpu_info", lambda device=0: {"gpu": "Orin", "compute_capability": "8.7"})
    build_engines(Bundle.load(bundle_dir), ["fp16"], log=lambda s: None)
    monkeypatch.setattr(trt_support, "gpu_info", lambda device=0: {"gpu": "Fake GPU", "compute_capability": "8.7"})
    both = check_bundle(bundle_dir, require_engines=True, log=lambda s: None)
    assert list(both["skipped_reasons"]) == ["trt-fp16@orin"] and both["engine_failures"] == {}


def test_dla_engines_need_their_core_and_come_after_gpu_engines(monkeypatch, fake_gpu, engines_run_as_their_onnx,
                                                                cpu_bundle, tmp_path):
    """An Orin Nano reports the same GPU and sm as an AGX Orin but has no DLA: its DLA engine is not
    runnable there. Where both run, "auto" takes a GPU engine of any precision (fp32) before a DLA one
    (fp16, the preferred precision), whatever the manifest order; a DLA engine alone is taken."""
    import shutil

    from edge_tl.export.device import build_engines
    from edge_tl.runtime.bundle import Bundle
    from edge_tl.runtime.check import check_bundle
    from edge_tl.runtime.predictor import choose_artifact, not_runnable

    bundle_dir = tmp_path / "b"
    shutil.copytree(cpu_bundle, bundle_dir)
    monkeypatch.setattr(trt_support, "missing_reason", lambda: None)
    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt("10.3.0", dla_cores=2)[0])
    build_engines(Bundle.load(bundle_dir), ["fp16"], dla_core=1, log=lambda s: None)
    assert choose_artifact(Bundle.load(bundle_dir))[0]["name"] == "trt-fp16-dla1@fake-gpu"  # the only engine
    build_engines(Bundle.load(bundle_dir), ["fp32"], log=lambda s: None)
    bundle = Bundle.load(bundle_dir)
    dla, gpu = (next(a for a in bundle.artifacts if a["format"] == "engine" and (a["dla_core"] is None) == g)
                for g in (False, True))
    assert [a["name"] for a in bundle.artifacts if a["format"] == "engine"] == [dla["name"], gpu["name"]]
    assert choose_artifact(bundle)[0]["name"] == gpu["name"] == "trt-fp32@fake-gpu"
    assert not_runnable(dla, "tensorrt") is None
    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt("10.3.0", dla_cores=0)[0])  # an Orin Nano
    assert not_runnable(dla, "tensorrt") == ("built for DLA core 1: Fake GPU has 0 DLA cores under TensorRT 10.3.0 "
                                             f"({trt_support.DLA_SUPPORT}): rebuild it here with `edge-tl engine`")
    assert not_runnable(gpu, "tensorrt") is None
    # no fp16 engine runs here: --require-engines fails on it, and says so once, as a failure
    logs = []
    report = check_bundle(bundle_dir, require_engines=True, log=logs.append)
    assert list(report["engine_failures"]) == [dla["name"]] and "trt-fp32@fake-gpu" in report["artifacts"]
    assert [line for line in logs if dla["name"] in line] == [
        f"  {dla['name']}: skipped: {not_runnable(dla, 'tensorrt')}",
        f"  {dla['name']}: FAIL (--require-engines: no fp16 engine runs here): {not_runnable(dla, 'tensorrt')}"]


def test_gpu_index_out_of_range_is_bad_input(monkeypatch):
    import types

    monkeypatch.setattr(trt_support, "import_cudart", lambda: types.SimpleNamespace(cudaGetDeviceCount=lambda: (0, 1)))
    for bad in (1, -1):
        with pytest.raises(UserError, match=rf"CUDA device {bad}: this machine has 1 GPU \(0 to 0\); pass one of those"):
            trt_support.gpu_info(bad)


@pytest.fixture
def fake_cuda(monkeypatch):
    """cuda-python's runtime calls the TensorRT runner makes, over host memory; ``live`` holds what
    it handed out and has not had back (pinned and device memory, streams, events)."""
    import ctypes
    import types

    live: dict = {}

    def make(kind):
        def alloc(nbytes=1):
            buf = ctypes.create_string_buffer(max(int(nbytes), 1))
            live[ctypes.addressof(buf)] = (kind, buf)
            return 0, ctypes.addressof(buf)
        return alloc

    def free(handle):
        live.pop(handle)
        return (0,)

    cudart = types.SimpleNamespace(
        cudaMallocHost=make("pinned"), cudaMalloc=make("device"), cudaStreamCreate=make("stream"),
        cudaEventCreate=make("event"), cudaFreeHost=free, cudaFree=free, cudaStreamDestroy=free, cudaEventDestroy=free,
        cudaSetDevice=lambda d: (0,), cudaEventRecord=lambda e, s: (0,), cudaStreamSynchronize=lambda s: (0,),
        cudaEventElapsedTime=lambda a, b: (0, 0.0),
        cudaMemcpyKind=types.SimpleNamespace(cudaMemcpyHostToDevice=1, cudaMemcpyDeviceToHost=2),
        cudaMemcpyAsync=lambda dst, src, n, kind, s: (ctypes.memmove(dst, src, n), (0,))[1])
    monkeypatch.setattr(trt_support, "import_cudart", lambda: cudart)
    monkeypatch.setattr(trt_support, "gpu_name", lambda device=0: "Fake GPU")
    monkeypatch.setattr(trt_support, "_LOGGER", None)
    return live


def engine_runtime(trt, load):
    """``trt.Runtime`` deserializing engines whose ``load(runtime, data)`` returns True: an engine
    computing each image's three channel means as logits (the pixels through the device buffers); or
    False: None, as TensorRT does for an engine it cannot load (after logging why)."""
    import ctypes
    import types

    import numpy as np

    trt.TensorIOMode = types.SimpleNamespace(INPUT="in", OUTPUT="out")
    trt.nptype = lambda dtype: np.float32

    class Context:
        def __init__(self):
            self.address, self.shape = {}, None

        def set_tensor_address(self, name, ptr):
            self.address[name] = ptr

        def set_input_shape(self, name, shape):
            self.shape = shape
            return True

        def execute_async_v3(self, stream):
            n = self.shape[0]
            view = lambda name, shape: np.ctypeslib.as_array(  # noqa: E731
                (ctypes.c_float * int(np.prod(shape))).from_address(self.address[name])).reshape(shape)
            view("logits", (n, 3))[:] = view("pixels", (n, 3, 4, 4)).mean(axis=(2, 3))
            return True

    class Engine:
        num_io_tensors = 2
        get_tensor_name = staticmethod(lambda i: ("pixels", "logits")[i])
        get_tensor_mode = staticmethod(lambda name: "in" if name == "pixels" else "out")
        get_tensor_profile_shape = staticmethod(lambda name, profile: [(1, 3, 4, 4), (2, 3, 4, 4), (4, 3, 4, 4)])
        get_tensor_shape = staticmethod(lambda name: (-1, 3, 4, 4) if name == "pixels" else (-1, 3))
        get_tensor_dtype = staticmethod(lambda name: "float32")
        create_execution_context = staticmethod(Context)

    class Runtime:
        def __init__(self, logger):
            self.logger = logger

        def deserialize_cuda_engine(self, data):
            return Engine() if load(self, data) else None

    trt.Runtime = Runtime


def test_a_tensorrt_runner_dropped_without_close_gives_back_its_cuda_memory(monkeypatch, fake_cuda):
    """Pinned and GPU memory, events and the stream are freed by deactivate, and also when a runner
    is garbage-collected without it (a service's hot reload that forgot close()), as ONNX Runtime's
    sessions are. TensorRT and CUDA: stand-ins; what is tested is the runner's bookkeeping."""
    import gc

    import numpy as np

    from edge_tl.runtime.runners import TensorRTRunner

    trt = fake_tensorrt("10.16.0")[0]
    engine_runtime(trt, lambda runtime, data: True)
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    x = np.arange(6 * 48, dtype=np.float32).reshape(6, 3, 4, 4)
    runner = TensorRTRunner("b/engines/e.engine", engine=b"E").activate()
    assert {kind for kind, _ in fake_cuda.values()} == {"pinned", "device", "stream", "event"}
    assert np.array_equal(runner.infer(x), x.mean(axis=(2, 3)))  # 6 images: parts of the profile's 4
    runner.deactivate()
    runner.deactivate()
    assert fake_cuda == {}
    for _ in range(3):
        TensorRTRunner("b/engines/e.engine", engine=b"E").activate().infer(x[:1])
    gc.collect()
    assert fake_cuda == {}


def test_a_failed_engine_load_names_its_own_cause_while_another_loads(monkeypatch, fake_cuda):
    """TensorRT says why it cannot load an engine only in its log: a load on another thread at the same
    time (a service loading two bundles) no longer clears that message before it is read, and the
    logger keeps only recent messages in a long-running process."""
    import threading

    from edge_tl.runtime.runners import TensorRTRunner

    trt = fake_tensorrt("10.16.0")[0]
    logged, other_loaded = threading.Event(), threading.Event()

    def load(runtime, data):
        if data == b"old":
            runtime.logger.log(trt.ILogger.Severity.ERROR, "Error Code 6: engine plan file is incompatible")
            logged.set()
            other_loaded.wait(5)
            return False
        runtime.logger.log(trt.ILogger.Severity.WARNING, "a deprecation notice")
        return True

    engine_runtime(trt, load)
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    errors = []

    def load_old():
        try:
            TensorRTRunner("a/engines/old.engine", engine=b"old").activate()
        except UserError as exc:
            errors.append(str(exc))

    thread = threading.Thread(target=load_old)
    thread.start()
    assert logged.wait(5)
    TensorRTRunner("b/engines/new.engine", engine=b"new").activate().deactivate()
    other_loaded.set()
    thread.join(5)
    assert errors and "(Error Code 6: engine plan file is incompatible); engines only run on" in errors[0]
    logger = trt_support.logger()
    for i in range(3 * trt_support.KEPT_MESSAGES):
        logger.log(trt.ILogger.Severity.WARNING, f"warning {i}")
    assert len(logger.messages) == trt_support.KEPT_MESSAGES
