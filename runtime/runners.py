"""Backends as small runners with one interface: ``activate()``, ``infer(x)``, ``deactivate()``.

``infer`` takes float32 RGB pixels 0–255, N×3×H×W (normalization is inside the graph) and
returns float32 logits N×classes. Optional dependencies are imported when a runner is
activated, never at import time, so a device app needs only the backend it uses.
Runners are thread-safe: ONNX Runtime sessions are; the TensorRT runner serializes calls
on its one execution context with a lock.
"""

from __future__ import annotations

import json
import operator
import threading
import weakref
from pathlib import Path

import numpy as np

from edge_tl.errors import UserError

from .cpu import int8_may_saturate

REOPEN = "load the bundle again (Predictor.from_bundle), or use the Predictor inside its `with` block"


class Runner:
    """Base class; subclasses set ``name`` and implement the three methods."""

    name = "runner"

    def activate(self) -> "Runner":
        raise NotImplementedError

    def infer(self, x: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def deactivate(self) -> None:
        raise NotImplementedError

    def describe(self) -> str:
        return self.name

    def __enter__(self) -> "Runner":
        return self.activate()

    def __exit__(self, *exc) -> None:
        self.deactivate()


def import_onnxruntime():
    try:
        import onnxruntime
    except ImportError:
        raise UserError("ONNX Runtime is not installed: pip install onnxruntime (CPU) or onnxruntime-gpu.") from None
    return onnxruntime


OPENVINO = "OpenVINOExecutionProvider"
OPENVINO_INSTALL = ("pip install onnxruntime-openvino into an environment without onnxruntime (x86-64 Linux or Windows; "
                    "both packages provide the `onnxruntime` module): `make openvino-env` makes .venv-openvino")


def ort_providers(device: str | None) -> list[str]:
    """Execution providers for ``device``: None/"auto" = TensorRT, CUDA, OpenVINO, then CPU, as installed."""
    available = import_onnxruntime().get_available_providers()
    wanted = {
        None: ["TensorrtExecutionProvider", "CUDAExecutionProvider", OPENVINO, "CPUExecutionProvider"],
        "auto": ["TensorrtExecutionProvider", "CUDAExecutionProvider", OPENVINO, "CPUExecutionProvider"],
        "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
        "gpu": ["CUDAExecutionProvider", "CPUExecutionProvider"],
        "openvino": [OPENVINO, "CPUExecutionProvider"],
        "cpu": ["CPUExecutionProvider"],
    }.get(device)
    if wanted is None:
        raise UserError(f"--device {device}: use auto, cpu, openvino or cuda.")
    chosen = [p for p in wanted if p in available]
    if device in ("cuda", "gpu") and "CUDAExecutionProvider" not in chosen:
        raise UserError(f"--device {device}: ONNX Runtime here has no CUDA provider (has {', '.join(available)}). "
                        "pip install onnxruntime-gpu on a machine with an NVIDIA GPU, or use --device cpu.")
    if device == "openvino" and OPENVINO not in chosen:
        raise UserError(f"--device openvino: ONNX Runtime here has no OpenVINO provider (has {', '.join(available)}). "
                        f"{OPENVINO_INSTALL}; or use --device cpu.")
    return chosen


NO_WEIGHT_FILES = ".edge-tl-bundles-hold-no-weight-files"  # where ONNX Runtime is told to find external data


def _settings(settings, name: str) -> dict:
    if settings is None:
        return {}
    if not isinstance(settings, dict):
        raise UserError(f"{name}: a dict of setting -> value, not a {type(settings).__name__}.")
    return dict(settings)


def check_threads(threads) -> int:
    """``threads`` as an int >= 0 (0: all cores), or a UserError."""
    try:
        n = -1 if isinstance(threads, bool) else operator.index(threads)
    except TypeError:
        n = -1
    if n < 0:
        raise UserError(f"threads={threads!r}: use 0 (all cores) or a positive whole number.")
    return n


def openvino_options(threads: int, input_name: str | None, shape: tuple | None) -> dict:
    """OpenVINO on the CPU with its latency hint and, where ``shape`` is given, a static input shape.

    Static shapes matter: on this workplace's 2-core AVX-512 VNNI EPYC the INT8 EfficientNet-Lite0
    ran 1.1-1.2x faster compiled for one batch size than with a dynamic batch (one interleaved
    probe: batch 1 2.22 -> 1.86 ms, batch 32 63.9 -> 56.4 ms).
    """
    opts = {"device_type": "CPU", "load_config": json.dumps({"CPU": {"PERFORMANCE_HINT": "LATENCY"}})}
    if threads:
        opts["num_of_threads"] = str(threads)
    if shape is not None:
        opts["reshape_input"] = f"{input_name}[{','.join(str(d) for d in shape)}]"
    return opts


class OnnxRuntimeRunner(Runner):
    """ONNX Runtime session (CPU, OpenVINO, CUDA or TensorRT execution provider).

    Under OpenVINO each input shape gets its own session compiled for that static shape, on
    its first call (about 0.5 s and 25-35 MB each for EfficientNet-Lite0; at most
    ``MAX_STATIC_SHAPES``, later shapes use the dynamic session). Should OpenVINO refuse a
    static shape, that shape uses the dynamic session; should it refuse the model under
    ``auto``, the next provider (ONNX Runtime's CPU) runs it.
    """

    name = "onnxruntime"
    MAX_STATIC_SHAPES = 4

    def __init__(self, path: str | Path, device: str | None = None, threads: int = 0, model: bytes | None = None,
                 session_options: dict | None = None, session_config: dict | None = None):
        self.threads = check_threads(threads)
        self.path, self.device = Path(path), device
        self.model = model  # the file's bytes, as verified against a manifest: loaded instead of ``path``
        self.session_options = _settings(session_options, "session_options")
        exact = {"session.x64quantprecision": "1"} if int8_may_saturate() else {}  # x86 without VNNI
        self.session_config = {**exact, **_settings(session_config, "session_config")}
        if bad := {"intra_op_num_threads"} & set(self.session_options):
            raise UserError(f"session_options {sorted(bad)}: set the thread count with threads=.")
        self.session, self.closed = None, False
        self.providers: list[str] = []
        self.input_name: str | None = None
        self._static: dict[tuple, object] | None = None
        self._lock = threading.Lock()

    def activate(self) -> "OnnxRuntimeRunner":
        self.providers, self.closed = ort_providers(self.device), False
        try:
            self.session = self._new_session()
        except UserError:
            if self.device not in (None, "auto") or self.providers[0] != OPENVINO:
                raise
            self.providers = self.providers[1:]
            self.session = self._new_session()
        self.input_name = self.session.get_inputs()[0].name
        self._static = {} if self.session.get_providers()[0] == OPENVINO else None
        if self._static is None:
            self.model = None  # only OpenVINO's later static-shape sessions need the bytes again
        return self

    def _new_session(self, shape: tuple | None = None):
        ort = import_onnxruntime()
        opts = ort.SessionOptions()
        # OpenVINO optimizes the graph it is given; ONNX Runtime's own rewrites first cost it 12 % at batch 1
        # (one interleaved probe: 2.08 vs 1.83 ms, identical outputs)
        opts.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_DISABLE_ALL if self.providers[0] == OPENVINO
                                         else ort.GraphOptimizationLevel.ORT_ENABLE_ALL)
        opts.intra_op_num_threads = self.threads
        opts.log_severity_level = 3
        for key, value in self.session_options.items():
            if not hasattr(opts, key) or key.startswith("_") or callable(getattr(opts, key)):
                raise UserError(f"session_options {key!r}: not an onnxruntime.SessionOptions setting "
                                "(e.g. enable_cpu_mem_arena, inter_op_num_threads, execution_mode).")
            try:
                setattr(opts, key, value)
            except (TypeError, ValueError, AttributeError) as exc:
                raise UserError(f"session_options {key}={value!r}: onnxruntime refuses it ({str(exc).splitlines()[0]}).") from None
        for key, value in self.session_config.items():
            opts.add_session_config_entry(str(key), str(value))
        if self.model is not None:
            # bytes carry no folder: ONNX Runtime would look for external weight files in the current
            # directory. Bundles hold self-contained files, so point it at a folder that cannot exist.
            opts.add_session_config_entry("session.model_external_initializers_file_folder_path",
                                          str(self.path.with_name(NO_WEIGHT_FILES)))
        providers = [(p, openvino_options(self.threads, self.input_name, shape)) if p == OPENVINO else p
                     for p in self.providers]
        try:
            return ort.InferenceSession(self.model if self.model is not None else str(self.path), opts,
                                        providers=providers)
        except Exception as exc:  # ORT raises its own Fail/InvalidGraph types
            first = str(exc).splitlines()[0]
            if self.model is not None and (NO_WEIGHT_FILES in first or "external data" in first.lower()):
                raise UserError(f"{self.path}: keeps its weights in a separate file, which a bundle's manifest does "
                                f"not cover ({first}). Export bundles with edge-tl (self-contained ONNX files).") from None
            raise UserError(f"{self.path}: ONNX Runtime cannot load it ({first}).") from None

    def _static_session(self, static: dict, shape: tuple, dynamic):
        """OpenVINO's session compiled for ``shape`` (made on its first call), or the dynamic one."""
        session = static.get(shape)
        if session is None:
            with self._lock:
                if shape not in static and len(static) < self.MAX_STATIC_SHAPES:
                    try:
                        static[shape] = self._new_session(shape)
                    except UserError:  # an OpenVINO build without reshape_input: the dynamic session is correct too
                        static[shape] = dynamic
                session = static.get(shape, dynamic)
        return session

    def infer(self, x: np.ndarray) -> np.ndarray:
        session, static = self.session, self._static  # one read each: close() may run meanwhile
        if session is None:
            raise UserError(f"{self.path}: runner is closed; {REOPEN}")
        if static is not None:
            session = self._static_session(static, x.shape, session)
        return session.run(None, {self.input_name: x})[0]

    def deactivate(self) -> None:
        self.session, self._static, self.model, self.closed = None, None, None, True

    def describe(self) -> str:
        providers = self.session.get_providers() if self.session else ort_providers(self.device)
        return (f"onnxruntime {import_onnxruntime().__version__} ({providers[0]}, "
                f"{self.threads or 'all'} thread{'s' if self.threads != 1 else ''}{', closed' if self.closed else ''})")


_CUDA_FREE = {"host": "cudaFreeHost", "device": "cudaFree", "event": "cudaEventDestroy", "stream": "cudaStreamDestroy"}


def _free_cuda(cudart, held: list) -> None:
    """Free what ``held`` lists, newest first, and empty it: pinned and GPU memory, events and the
    stream are no Python objects, so the garbage collector alone would never give them back."""
    while held:
        kind, handle = held.pop()
        getattr(cudart, _CUDA_FREE[kind])(handle)


class TensorRTRunner(Runner):
    """A TensorRT engine (TensorRT 10 or 11) with reused device buffers, pinned host memory and stream.

    Uses the named-tensor API (``set_input_shape``, ``set_tensor_address``,
    ``execute_async_v3``) common to TensorRT 10 and 11, and cuda-python for memory.
    ``last_timings`` holds the CUDA-event times (ms) of the last call: host→device copy,
    compute, device→host copy.
    """

    name = "tensorrt"

    def __init__(self, path: str | Path, device: int = 0, dla_core: int | None = None, engine: bytes | None = None):
        self.path, self.device, self.dla_core = Path(path), device, dla_core
        self._engine_bytes = engine  # the file's bytes, as verified against a manifest: loaded instead of ``path``
        self._lock = threading.RLock()
        self.last_timings: dict[str, float] = {}
        self._held: list = []  # (kind, handle) of what CUDA handed out, freed by _release
        self._events: list = []
        self._stream = self._cudart = self.engine = self.context = None
        self._release = None

    def activate(self) -> "TensorRTRunner":
        from edge_tl.runtime import trt_support as ts

        trt, cudart = ts.import_tensorrt(), ts.import_cudart()
        ts.check(cudart.cudaSetDevice(self.device))
        self._trt, self._cudart = trt, cudart
        self._held = []  # freed by deactivate, or when the runner is garbage-collected without it (a service's
        self._release = weakref.finalize(self, _free_cuda, cudart, self._held)  # reload that forgot close)
        self._release.atexit = False  # at exit a daemon thread may still be in infer; the process frees it all
        try:
            return self._load(trt, cudart, ts)
        except BaseException:
            self.deactivate()  # a failure half-way (e.g. an output numpy cannot hold) frees what was allocated
            raise

    def _load(self, trt, cudart, ts) -> "TensorRTRunner":
        self._logger = ts.logger()
        since = self._logger.mark()
        self._runtime = trt.Runtime(self._logger)
        if self.dla_core is not None:
            self._runtime.DLA_core = self.dla_core  # else a DLA engine runs on core 0, whatever it was built for
        data, self._engine_bytes = self._engine_bytes or self.path.read_bytes(), None
        self.engine = self._runtime.deserialize_cuda_engine(data)
        if self.engine is None:
            cause = self._logger.cause("no message", since)
            raise UserError(f"{self.path}: TensorRT {trt.__version__} cannot load this engine on {ts.gpu_name(self.device)} "
                            f"({cause}); engines only run on the GPU model and TensorRT version that built them. Rebuild here: "
                            f"edge-tl engine {self.path.parent.parent if self.path.parent.name == 'engines' else self.path.parent}")
        self.context = self.engine.create_execution_context()
        if self.context is None:
            raise UserError(f"{self.path}: TensorRT could not create an execution context (out of GPU memory?).")
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        mode = trt.TensorIOMode.INPUT
        self.input_name = next(n for n in names if self.engine.get_tensor_mode(n) == mode)
        self.output_name = next(n for n in names if self.engine.get_tensor_mode(n) != mode)
        profile = self.engine.get_tensor_profile_shape(self.input_name, 0)
        self.min_batch, self.max_batch = int(profile[0][0]), int(profile[2][0])
        in_shape = tuple(self.engine.get_tensor_shape(self.input_name))[1:]
        out_shape = tuple(self.engine.get_tensor_shape(self.output_name))[1:]
        self._stream = ts.check(cudart.cudaStreamCreate())
        self._held.append(("stream", self._stream))
        for _ in range(4):
            self._events.append(ts.check(cudart.cudaEventCreate()))  # one at a time: deactivate frees those made
            self._held.append(("event", self._events[-1]))
        self._host_in, self._dev_in = self._buffers((self.max_batch, *in_shape), self.input_name)
        self._host_out, self._dev_out = self._buffers((self.max_batch, *out_shape), self.output_name)
        self.context.set_tensor_address(self.input_name, self._dev_in)
        self.context.set_tensor_address(self.output_name, self._dev_out)
        return self

    def _buffers(self, shape: tuple[int, ...], name: str) -> tuple[np.ndarray, int]:
        from edge_tl.runtime import trt_support as ts

        trt_dtype = self.engine.get_tensor_dtype(name)
        try:
            dtype = np.dtype(self._trt.nptype(trt_dtype))
        except TypeError:  # BF16, FP8, INT4, FP4: numpy has no such type
            raise UserError(f"{self.path}: engine tensor {name!r} is {trt_dtype}, which numpy cannot hold; "
                            "build the engine from an ONNX file with float32 inputs and outputs (edge-tl exports them so)") from None
        host, host_ptr = ts.pinned_array(self._cudart, shape, dtype)
        self._held.append(("host", host_ptr))  # before cudaMalloc, which may fail: deactivate frees it
        dev = ts.check(self._cudart.cudaMalloc(host.nbytes))
        self._held.append(("device", dev))
        return host, dev

    def infer(self, x: np.ndarray) -> np.ndarray:
        from edge_tl.runtime import trt_support as ts

        n = x.shape[0]
        if n > self.max_batch:
            with self._lock:  # re-entrant: the parts' timings are this call's, not another thread's
                parts, timings = [], []
                for i in range(0, n, self.max_batch):
                    parts.append(self.infer(x[i:i + self.max_batch]))
                    timings.append(self.last_timings)
                self.last_timings = {k: sum(t[k] for t in timings) for k in timings[0]}
                return np.concatenate(parts)
        cudart, stream, ev = self._cudart, self._stream, self._events
        h2d, d2h = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        m = max(n, self.min_batch)  # below the profile's minimum: pad with zeros, return the first n
        with self._lock:
            if self.engine is None:
                raise UserError(f"{self.path}: runner is closed; {REOPEN}")
            ts.check(cudart.cudaSetDevice(self.device))  # the current device is per host thread
            host_in, host_out = self._host_in[:m], self._host_out[:m]
            np.copyto(host_in[:n], x, casting="same_kind")
            host_in[n:] = 0
            if not self.context.set_input_shape(self.input_name, host_in.shape):
                raise UserError(f"{self.path}: batch {m} is outside the engine's profile "
                                f"{self.min_batch}..{self.max_batch}: re-export the bundle with a wider --batch "
                                "MIN:OPT:MAX, then run `edge-tl engine` on it again.")
            ts.check(cudart.cudaEventRecord(ev[0], stream))
            ts.check(cudart.cudaMemcpyAsync(self._dev_in, host_in.ctypes.data, host_in.nbytes, h2d, stream))
            ts.check(cudart.cudaEventRecord(ev[1], stream))
            if not self.context.execute_async_v3(ts.handle(stream)):
                raise RuntimeError(f"{self.path}: TensorRT execute_async_v3 failed (see the TensorRT log above).")
            ts.check(cudart.cudaEventRecord(ev[2], stream))
            ts.check(cudart.cudaMemcpyAsync(host_out.ctypes.data, self._dev_out, host_out.nbytes, d2h, stream))
            ts.check(cudart.cudaEventRecord(ev[3], stream))
            ts.check(cudart.cudaStreamSynchronize(stream))
            self.last_timings = {k: ts.check(cudart.cudaEventElapsedTime(ev[i], ev[i + 1]))
                                 for i, k in enumerate(("h2d_ms", "compute_ms", "d2h_ms"))}
            return host_out[:n].astype(np.float32, copy=True)

    def deactivate(self) -> None:
        with self._lock:  # never free buffers under a running infer
            if self._release is not None:
                self._release()  # once: a second call does nothing
            self._events, self._stream, self.context, self.engine = [], None, None, None

    def describe(self) -> str:
        from edge_tl.runtime import trt_support as ts

        return f"tensorrt {self._trt.__version__} on {ts.gpu_name(self.device)}{'' if self.engine else ', closed'}"
