"""Lazy TensorRT / cuda-python imports and GPU facts, shared by the engine builder and the runner.

Nothing here is imported until TensorRT is actually wanted. Verified only where TensorRT
and an NVIDIA GPU exist; on other machines :func:`missing_reason` says what would run it.
"""

from __future__ import annotations

import ctypes
import itertools
import logging
import re
import threading
from collections import deque
from pathlib import Path

import numpy as np

from edge_tl.errors import UserError

INSTALL_HINT = ("pip install tensorrt cuda-python (or pip install -e '.[tensorrt]' in the edge-tl checkout) on a machine with an NVIDIA GPU; "
                "those are CUDA 13 builds, which need driver r580 or newer: with an older driver, "
                "pip install tensorrt-cu12 'cuda-python>=12.6,<13'. On Jetson use JetPack's system TensorRT "
                "(python3 -c 'import tensorrt') and the cuda-python of JetPack's CUDA major version (JetPack 6: 'cuda-python>=12.6,<13')")
JETSON_HINT = ("this is a Jetson: use JetPack's own TensorRT, not PyPI's (a virtual environment made with "
               "python3 -m venv --system-site-packages sees it: python3 -c 'import tensorrt'; a tensorrt from PyPI "
               "in the environment hides it), and the cuda-python of JetPack's CUDA major version: JetPack 6 "
               "(CUDA 12) pip install 'cuda-python>=12.6,<13', JetPack 7 (CUDA 13) pip install 'cuda-python>=13'")


OLDEST_TENSORRT = 10  # name-based I/O tensors, execute_async_v3, explicit batch only


def on_jetson() -> bool:
    """A Jetson (JetPack's Linux for Tegra), whose TensorRT and CUDA come with the system image."""
    return Path("/etc/nv_tegra_release").exists()


def tensorrt_installed() -> bool:
    """Whether a ``tensorrt`` package is there to import (without importing it: it may be broken)."""
    import importlib.util

    try:
        return importlib.util.find_spec("tensorrt") is not None
    except ValueError:  # imported already, without a module spec
        return True


def install_hint() -> str:
    return JETSON_HINT if on_jetson() else INSTALL_HINT


def import_tensorrt():
    try:
        import tensorrt
    except ImportError:
        raise UserError(f"TensorRT is not installed here: {install_hint()}.") from None
    except OSError as exc:  # its libraries are missing (TensorRT's loader raises this on Windows)
        raise UserError(f"TensorRT is installed but cannot load its libraries ({exc}): {install_hint()}.") from None
    if int(re.match(r"\d*", tensorrt.__version__).group() or 0) < OLDEST_TENSORRT:
        raise UserError(f"TensorRT {tensorrt.__version__} is older than {OLDEST_TENSORRT}, the oldest whose Python API "
                        "edge-tl's engines use (JetPack 5 has 8.5): there, run the bundle's ONNX files on ONNX Runtime "
                        "(--device cuda with NVIDIA's onnxruntime-gpu for Jetson, or --device cpu), or move to JetPack 6 "
                        "or newer.")
    return tensorrt


def import_cudart():
    """cuda-python's runtime bindings: ``cuda.bindings.runtime`` (cuda-python ≥ 12.6), else legacy ``cuda.cudart``."""
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        try:
            from cuda import cudart
        except ImportError:
            raise UserError(f"cuda-python is not installed here: {install_hint()}.") from None
    return cudart


def check(result):
    """Unwrap cuda-python's ``(err, value...)`` tuples; raise on a CUDA error."""
    err, *rest = result if isinstance(result, tuple) else (result,)
    if getattr(err, "value", err) != 0:
        raise RuntimeError(f"CUDA error {err}")
    return rest[0] if len(rest) == 1 else (tuple(rest) if rest else None)


def handle(obj) -> int:
    """Integer handle of a cuda-python stream/event (``get_cuda_native_handle`` on cuda-bindings ≥ 12.9.1)."""
    try:
        from cuda.bindings.utils import get_cuda_native_handle

        return int(get_cuda_native_handle(obj))
    except (ImportError, TypeError):  # older cuda-python, or a type it does not list
        return int(obj)


_LOGGER = None
KEPT_MESSAGES = 200  # the logger keeps this many recent warnings and errors (a long-running service logs forever)


def logger():
    """The process's one TensorRT logger (TensorRT keeps the first one it is given, as
    Polygraphy does). It prints warnings and errors and keeps the recent ones, so a failed
    deserialize/build (which returns None, no exception) can name its cause: take
    ``mark()`` before the call, ``cause(default, mark)`` after it. TensorRT logs a call's errors
    on the thread that made it, so a cause is looked for among that thread's messages first:
    another thread's load at the same time neither hides nor lends one."""
    global _LOGGER
    if _LOGGER is None:
        trt = import_tensorrt()

        class Logger(trt.ILogger):
            def __init__(self):
                trt.ILogger.__init__(self)
                self.messages: deque = deque(maxlen=KEPT_MESSAGES)  # (number, thread, severity, text)
                self._numbers = itertools.count()
                self._lock = threading.Lock()

            def log(self, severity, msg):
                if severity <= trt.ILogger.Severity.WARNING:
                    with self._lock:
                        self.messages.append((next(self._numbers), threading.get_ident(), severity, str(msg)))
                    logging.getLogger("edge_tl").log(logging.ERROR if severity <= trt.ILogger.Severity.ERROR
                                                     else logging.WARNING, "[TensorRT] %s", msg)

            def mark(self) -> int:
                """The number the next message will get."""
                with self._lock:
                    return self.messages[-1][0] + 1 if self.messages else 0

            def cause(self, default: str, since: int) -> str:
                """The last error logged from ``since`` on, this thread's first (a later warning, e.g. a
                deprecation notice, is not the cause); ``default`` where none was."""
                with self._lock:
                    new = [m for m in self.messages if m[0] >= since]
                mine = [m for m in new if m[1] == threading.get_ident()] or new
                errors = [m for m in mine if m[2] <= trt.ILogger.Severity.ERROR]
                return (errors or mine)[-1][3] if mine else default

        _LOGGER = Logger()
    return _LOGGER


def missing_reason() -> str | None:
    """None when TensorRT, cuda-python and a CUDA GPU are all present; else what is missing and how to get it."""
    try:
        import_tensorrt()
        return cuda_problem(import_cudart())
    except UserError as exc:
        return str(exc)


def cuda_problem(cudart) -> str | None:
    """None when CUDA sees a GPU through these cuda-python bindings; else why not, by CUDA's own error name."""
    err, count = cudart.cudaGetDeviceCount()
    if int(err) != 0:
        name = cudart.cudaGetErrorName(err)[1]
        name = name.decode() if isinstance(name, bytes) else str(name)
        if on_jetson():
            return f"CUDA cannot count GPUs ({name}) with this cuda-python: {JETSON_HINT}."
        return (f"CUDA cannot count GPUs ({name}): no NVIDIA driver here, or one older than this cuda-python/TensorRT "
                "build needs (CUDA 13 builds need driver r580 or newer; with an older driver: "
                "pip install tensorrt-cu12 'cuda-python>=12.6,<13'). Run on a machine with an NVIDIA GPU (or a Jetson).")
    if not count:
        return "CUDA sees no GPU; run on a machine with an NVIDIA GPU (or a Jetson)."
    return None


def available() -> bool:
    return missing_reason() is None


def gpu_info(device: int = 0) -> dict:
    """Name and compute capability of CUDA device ``device``."""
    cudart = import_cudart()
    count = check(cudart.cudaGetDeviceCount())
    if not 0 <= device < count:
        raise UserError(f"CUDA device {device}: this machine has {count} GPU{'s' * (count != 1)} (0 to {count - 1}); "
                        "pass one of those (edge-tl engine --gpu N, --device N).")
    prop = check(cudart.cudaGetDeviceProperties(device))
    name = prop.name.decode() if isinstance(prop.name, bytes) else str(prop.name)
    return {"gpu": name.strip("\x00 "), "compute_capability": f"{prop.major}.{prop.minor}"}


def gpu_name(device: int = 0) -> str:
    try:
        return gpu_info(device)["gpu"]
    except Exception:  # noqa: BLE001 - only for messages
        return "this GPU"


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


DLA_SUPPORT = ("DLA cores are on Jetson AGX Orin and Orin NX, not Orin Nano or Thor; TensorRT drives them up to 10.7 "
               "(JetPack 6 has 10.3) and again from 11.4.1, on AGX Orin with JetPack 7.2.2 or later")


def dla_cores() -> int:
    """DLA cores this machine's TensorRT can use."""
    return import_tensorrt().Runtime(logger()).num_DLA_cores




def engine_mismatch(artifact: dict, device: int = 0) -> str | None:
    """None when this machine can run the engine; else what differs. An engine runs only on the
    TensorRT version and GPU model (compute capability) that built it, and on a DLA core it has."""
    trt = import_tensorrt()
    info = gpu_info(device)
    if (artifact.get("tensorrt"), artifact.get("compute_capability"), slug(artifact.get("gpu", ""))) != (
            trt.__version__, info["compute_capability"], slug(info["gpu"])):
        return (f"built by TensorRT {artifact.get('tensorrt')} for {artifact.get('gpu')} (sm "
                f"{artifact.get('compute_capability')}); this machine has TensorRT {trt.__version__} and "
                f"{info['gpu']} (sm {info['compute_capability']})")
    dla = artifact.get("dla_core")
    if dla is not None and (cores := dla_cores()) <= dla:
        return (f"built for DLA core {dla}: {info['gpu']} has {cores} DLA cores under TensorRT {trt.__version__} "
                f"({DLA_SUPPORT})")
    return None


def pinned_array(cudart, shape: tuple[int, ...], dtype: np.dtype) -> tuple[np.ndarray, int]:
    """A numpy array over page-locked host memory (fast, async copies) and its pointer."""
    nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
    ptr = check(cudart.cudaMallocHost(nbytes))
    raw = ctypes.cast(ctypes.c_void_p(int(ptr)), ctypes.POINTER(ctypes.c_ubyte))
    return np.ctypeslib.as_array(raw, (nbytes,)).view(dtype).reshape(shape), ptr
