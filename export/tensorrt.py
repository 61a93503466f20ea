"""TensorRT engines from the bundle's ONNX files, for TensorRT 10 and 11, built on the device.

Engines do not move across GPU models or TensorRT versions, so they are built where they
run (``edge-tl engine BUNDLE``) and named by precision, TensorRT version and GPU.

- TensorRT 10: weakly typed networks; FP16 by the builder flag on the FP32 ONNX, INT8
  from the Q/DQ ONNX (INT8 + FP16 flags so unquantized layers may run in half precision).
- TensorRT 11: only strongly typed networks (the precision flags are gone); the ONNX file's
  types decide, so FP16 is built from the FP16 ONNX and INT8 from the Q/DQ ONNX.

This module needs ``tensorrt`` only inside :func:`build_engine`; the option handling and
the equivalent ``trtexec`` command line are plain Python, tested everywhere. The builder
itself was written against the TensorRT 10/11 Python API documentation and is tested only
where TensorRT and a GPU exist (tests skip elsewhere and say so).
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from pathlib import Path

from edge_tl.errors import UserError
from edge_tl.fileio import atomic_write
from edge_tl.runtime import trt_support as ts

ENGINE_PRECISIONS = ("fp32", "fp16", "int8")
# which ONNX artifact each engine precision is built from, per TensorRT generation
SOURCE_ARTIFACT = {
    "weak": {"fp32": "fp32", "fp16": "fp32", "int8": "int8"},
    "strong": {"fp32": "fp32", "fp16": "fp16", "int8": "int8"},
}


@dataclass(frozen=True)
class BatchProfile:
    """TensorRT optimization profile for the batch dimension: MIN:OPT:MAX."""

    min: int = 1
    opt: int = 1
    max: int = 32

    @classmethod
    def parse(cls, text: str) -> "BatchProfile":
        parts = text.split(":")
        try:
            values = [int(p) for p in parts]
        except ValueError:
            values = []
        if len(values) == 1:
            values = [1, values[0], values[0]]
        if len(values) != 3 or not 1 <= values[0] <= values[1] <= values[2]:
            raise UserError(f"--batch {text}: expected MIN:OPT:MAX with 1 <= MIN <= OPT <= MAX, e.g. 1:1:32 (or one number).")
        return cls(*values)

    def to_dict(self) -> dict:
        return {"min": self.min, "opt": self.opt, "max": self.max}

    def shapes(self, chw: tuple[int, int, int]) -> tuple[tuple[int, ...], ...]:
        return tuple((b, *chw) for b in (self.min, self.opt, self.max))

    def for_dla(self, dla_core: int | None) -> "BatchProfile":
        """DLA has no dynamic shapes (with a range every layer falls back to the GPU): fix the batch at OPT.

        The runtime pads smaller batches and splits larger ones."""
        return self if dla_core is None or self.min == self.max else BatchProfile(self.opt, self.opt, self.opt)


def parse_precisions(text: str, allowed: tuple[str, ...] = ENGINE_PRECISIONS) -> list[str]:
    out = [p.strip().lower() for p in text.split(",") if p.strip()]
    bad = [p for p in out if p not in allowed]
    if bad or not out:
        raise UserError(f"--precision {text}: use a comma list of {', '.join(allowed)}.")
    return list(dict.fromkeys(out))


def typing_mode(trt_version: str) -> str:
    """"strong" on TensorRT ≥ 11 (weak typing removed), "weak" on TensorRT 10."""
    return "strong" if int(trt_version.split(".")[0]) >= 11 else "weak"


def engine_filename(precision: str, trt_version: str, gpu: str, compute_capability: str,
                    dla_core: int | None = None) -> str:
    dla = f".dla{dla_core}" if dla_core is not None else ""
    return f"model.{precision}.trt{trt_version}.{ts.slug(gpu)}.sm{compute_capability.replace('.', '')}{dla}.engine"


def trtexec_command(onnx_file: str, engine_file: str, precision: str, input_name: str, chw: tuple[int, int, int],
                    batch: BatchProfile, mode: str, workspace_mb: int = 1024, dla_core: int | None = None,
                    timing_cache: str | None = "timing.cache") -> list[str]:
    """The ``trtexec`` line equivalent to :func:`build_engine` (for people who prefer NVIDIA's tool)."""
    mn, opt, mx = ("x".join(map(str, s)) for s in batch.for_dla(dla_core).shapes(chw))
    cmd = ["trtexec", f"--onnx={onnx_file}", f"--saveEngine={engine_file}",
           f"--minShapes={input_name}:{mn}", f"--optShapes={input_name}:{opt}", f"--maxShapes={input_name}:{mx}",
           f"--memPoolSize=workspace:{workspace_mb}M"]
    if mode == "strong":
        cmd.append("--stronglyTyped")
    elif precision == "fp16":
        cmd.append("--fp16")
    elif precision == "int8":
        cmd += ["--int8", "--fp16"]
    if timing_cache:
        cmd.append(f"--timingCacheFile={timing_cache}")
    if dla_core is not None:
        cmd += [f"--useDLACore={dla_core}", "--allowGPUFallback"]
    return cmd


def format_command(cmd: list[str]) -> str:
    return " ".join(shlex.quote(c) for c in cmd)


def build_engine(onnx_path: Path, engine_path: Path, precision: str, input_name: str, chw: tuple[int, int, int],
                 batch: BatchProfile, workspace_mb: int = 1024, dla_core: int | None = None,
                 timing_cache: Path | None = None, gpu: int = 0, log=print) -> dict:
    """Parse ``onnx_path``, build and write a serialized engine for CUDA device ``gpu``; return the facts
    for the manifest."""
    trt = ts.import_tensorrt()
    mode = typing_mode(trt.__version__)
    if dla_core is not None and precision == "fp32":
        raise UserError("--dla-core: DLA runs fp16 or int8 only; choose --precision fp16 or int8.")
    ts.check(ts.import_cudart().cudaSetDevice(gpu))  # TensorRT builds for the current device
    logger = ts.logger()
    since = logger.mark()
    builder = trt.Builder(logger)
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if mode == "strong" else 0
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(onnx_path.read_bytes()):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise UserError(f"{onnx_path}: TensorRT {trt.__version__} cannot parse it: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_mb << 20)
    if mode == "weak" and precision in ("fp16", "int8"):
        config.set_flag(trt.BuilderFlag.FP16)
        if precision == "int8":
            config.set_flag(trt.BuilderFlag.INT8)
    if batch.for_dla(dla_core) != batch:
        batch = batch.for_dla(dla_core)
        log(f"DLA needs one fixed shape: building for batch {batch.opt} (the runtime pads smaller batches "
            "and splits larger ones)")
    profile = builder.create_optimization_profile()
    inputs = [network.get_input(i).name for i in range(network.num_inputs)]
    if input_name not in inputs:
        raise UserError(f"{onnx_path}: no input named {input_name!r} (it has {inputs}); the bundle manifest and "
                        "its ONNX file disagree: re-export the bundle")
    profile.set_shape(input_name, *batch.shapes(chw))
    if config.add_optimization_profile(profile) < 0:
        raise UserError(f"{onnx_path}: TensorRT rejected the batch profile {batch.to_dict()} for input {input_name!r}")
    cache_bytes = timing_cache.read_bytes() if timing_cache and timing_cache.is_file() else b""
    try:
        cache = config.create_timing_cache(cache_bytes)
    except Exception:  # a truncated or corrupt file: the cache only saves time, so start afresh
        cache = None
    if cache is None or not config.set_timing_cache(cache, ignore_mismatch=False):
        log(f"timing cache {timing_cache} is unreadable or does not match this GPU/TensorRT; starting a new one")
        config.set_timing_cache(config.create_timing_cache(b""), ignore_mismatch=False)
    if dla_core is not None:
        if builder.num_DLA_cores <= dla_core:
            raise UserError(f"--dla-core {dla_core}: {ts.gpu_name(gpu)} has {builder.num_DLA_cores} DLA cores under "
                            f"TensorRT {trt.__version__} ({ts.DLA_SUPPORT}).")
        config.default_device_type = trt.DeviceType.DLA
        config.DLA_core = dla_core
        config.set_flag(trt.BuilderFlag.GPU_FALLBACK)
    log(f"building TensorRT {trt.__version__} {precision} engine ({mode}ly typed) from {onnx_path.name} ...")
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        cause = logger.cause("see the TensorRT log above", since)
        raise UserError(f"{onnx_path}: TensorRT {trt.__version__} could not build a {precision} engine ({cause}).")
    atomic_write(engine_path, lambda tmp: tmp.write_bytes(bytes(serialized)))
    cache = config.get_timing_cache()
    if timing_cache is not None and cache is not None:
        atomic_write(timing_cache, lambda tmp: tmp.write_bytes(bytes(cache.serialize())))
    return {"tensorrt": trt.__version__, "typing": mode, "workspace_mb": workspace_mb, "dla_core": dla_core,
            "batch": batch.to_dict(), **ts.gpu_info(gpu)}
