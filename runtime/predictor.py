"""``Predictor``: a bundle plus one runner; images in, labels and scores out. Torch-free."""

from __future__ import annotations

import operator
import os
import threading
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from edge_tl.errors import UserError

from .bundle import Bundle
from .images import UnreadableImage, check_aspect, draft_jpeg, to_input, to_rgb
from .monitor import FALSE_ALARM, FieldMonitor, input_stats
from .runners import REOPEN, OnnxRuntimeRunner, Runner, TensorRTRunner, check_threads, import_onnxruntime
from .scores import softmax

PRECISION_PREFERENCE = ("int8", "fp16", "fp32")  # fastest first, for precision=None


@dataclass
class Prediction:
    """One image's answer: the top class (``label``, its ``index`` in ``Predictor.classes``, its
    ``score``: softmax of logits / the bundle's temperature, which export fits on the validation
    split where it has 50 images or more, and is 1 otherwise), the ``topk`` (label, score)
    pairs, best first, and the model input's ``brightness`` and ``contrast`` (mean and standard
    deviation of its grey levels, 0-255: what a :class:`~edge_tl.runtime.monitor.FieldMonitor`
    compares with the validation images; None for predictions decoded from logits)."""

    label: str
    index: int
    score: float
    topk: list[tuple[str, float]]
    brightness: float | None = None
    contrast: float | None = None

    def to_dict(self) -> dict:
        d = asdict(self)
        d["topk"] = [{"label": k, "score": s} for k, s in self.topk]
        return d


def _array_image(a: np.ndarray, channel_order: str) -> Image.Image:
    """A uint8 H×W×3 array (RGB or BGR) or H×W / H×W×1 grayscale array as a PIL image; any other
    array refused with the conversion that fixes it."""
    shape = a.shape
    gray = a.ndim == 2 or (a.ndim == 3 and shape[2] == 1)
    if a.dtype == np.uint8 and (gray or (a.ndim == 3 and shape[2] == 3)):
        if not shape[0] or not shape[1]:
            raise UserError(f"image array of shape {shape}: it has no pixels.")
        check_aspect((shape[1], shape[0]), f"image array of shape {shape}")
        if gray:  # a mono camera's frame: resized as one channel, as a grayscale file is
            return Image.fromarray(a.reshape(shape[:2]), "L")
        return Image.fromarray(a[..., ::-1] if channel_order == "BGR" else a)
    if a.ndim == 4:
        fix = "a batch: pass a list of H×W×3 images to predict_batch, or preprocessed N×H×W×3 pixels to infer"
    elif a.ndim == 3 and a.shape[0] == 3 and a.shape[2] != 3:
        fix = "channels first (C×H×W): pass a.transpose(1, 2, 0)"
    elif a.ndim == 3 and a.shape[2] == 4:
        fix = ("RGBA: pass Image.fromarray(a) (composited on white, as files are); OpenCV's BGRA: pass a[..., :3] "
               "with channel_order='BGR'")
    elif (gray or (a.ndim == 3 and a.shape[2] == 3)) and np.issubdtype(a.dtype, np.floating):
        fix = "floats: pass (a * 255).round().astype(np.uint8) for values 0–1, a.astype(np.uint8) for 0–255"
    elif (gray or (a.ndim == 3 and a.shape[2] == 3)) and a.dtype == np.uint16:
        fix = "16-bit: pass (a // 257).astype(np.uint8), as files are read"
    elif (gray or (a.ndim == 3 and a.shape[2] == 3)) and a.dtype == np.bool_:
        fix = "a mask: pass a.astype(np.uint8) * 255"
    elif (gray or (a.ndim == 3 and a.shape[2] == 3)) and np.issubdtype(a.dtype, np.integer):
        fix = "integers: pass a.astype(np.uint8) for values 0–255"
    else:
        fix = "expected uint8 H×W×3 (colour) or H×W (grayscale)"
    raise UserError(f"image array of dtype {a.dtype} and shape {shape}: {fix}.")


def flavour_mismatch(artifact: dict, runner: Runner) -> str | None:
    """Why ``artifact`` does not suit ``runner`` (e.g. the TensorRT Q/DQ INT8 file on ONNX Runtime's CPU
    provider: several times slower than FP32 there), or None."""
    session = getattr(runner, "session", None)
    gpu = isinstance(runner, TensorRTRunner) or (
        session is not None and session.get_providers()[0] in ("CUDAExecutionProvider", "TensorrtExecutionProvider"))
    made_for = artifact.get("backend", "any")
    if made_for in ("any", "tensorrt" if gpu else "onnxruntime"):
        return None
    return f"made for {made_for}: it may run several times slower here than the fp32 file"


def tensorrt_available() -> bool:
    """True when TensorRT and cuda-python import and a CUDA GPU is visible."""
    from . import trt_support

    return trt_support.available()


def not_runnable(artifact: dict, backend: str, device: str | None = None) -> str | None:
    """Why ``backend`` cannot run ``artifact`` here (None: it can). Engines need TensorRT and the
    TensorRT version, GPU model and DLA core they were built for; ONNX files need ONNX Runtime."""
    if artifact["format"] != "engine":
        return None if backend == "onnxruntime" else f"an ONNX file: {backend} runs engines only"
    if backend != "tensorrt":
        return "a TensorRT engine: it runs on the tensorrt backend only"
    from . import trt_support

    if (missing := trt_support.missing_reason()) is not None:
        return f"needs TensorRT and a GPU ({missing.rstrip('.')})"
    if (mismatch := trt_support.engine_mismatch(artifact, gpu_index(device))) is not None:
        return f"{mismatch}: rebuild it here with `edge-tl engine`"
    return None


def runnable(artifact: dict, backend: str, device: str | None = None) -> bool:
    return not_runnable(artifact, backend, device) is None


def gpu_index(device: str | None) -> int:
    """The CUDA device a TensorRT runner uses for ``device`` ("1" -> 1; anything else -> 0)."""
    return int(device) if device and str(device).isdigit() else 0


def choose_artifact(bundle: Bundle, backend: str = "auto", precision: str | None = None,
                    device: str | None = None) -> tuple[dict, str]:
    """(artifact, backend) per the "auto" rule: a TensorRT engine for this GPU, else ONNX Runtime.

    Precision None takes the fastest accepted one (int8, fp16 on GPUs, fp32; not an INT8 export found
    no faster than FP32, ``default: false``) among artifacts made
    for the chosen backend's flavour or for any (``artifact["backend"]``): ONNX Runtime on CPU
    takes the CPU INT8 flavour, and never the TensorRT Q/DQ one (a gpu/jetson bundle before
    `edge-tl engine` runs FP32 there). An explicit precision takes what the bundle has.
    """
    if backend not in ("auto", "tensorrt", "onnxruntime"):
        raise UserError(f"backend {backend!r}: use auto, tensorrt or onnxruntime.")
    precision = precision.lower() if precision else None
    backends = ["tensorrt", "onnxruntime"] if backend == "auto" else [backend]
    if device in ("cpu", "openvino") and backend == "auto":
        backends = ["onnxruntime"]
    engines = [a for a in bundle.artifacts if a["format"] == "engine"]
    # name -> why it cannot run here (None: it can), asked once per engine: each asks CUDA and TensorRT
    engine_why = {a["name"]: not_runnable(a, "tensorrt", device) for a in engines} if "tensorrt" in backends else {}
    fallback = None  # the first runnable artifact made for the backend but not chosen by default
    for b in backends:
        if b == "tensorrt" and not tensorrt_available():
            if backend == "tensorrt":
                from . import trt_support

                raise UserError(f"--backend tensorrt: {trt_support.missing_reason()}")
            continue
        if b == "onnxruntime":
            import_onnxruntime()
        flavour = "tensorrt" if b == "tensorrt" else _ort_flavour(device)
        wanted = [precision] if precision else [p for p in PRECISION_PREFERENCE if p != "fp16" or flavour == "tensorrt"]
        # a GPU engine of any precision before a DLA engine (the GPU is faster; a DLA engine is for
        # offloading, taken by name or when no GPU engine runs here)
        for dla in ((False, True) if b == "tensorrt" else (False,)):
            for p in wanted:
                # left to choose, only files made for this backend's flavour (or for any): the TensorRT
                # Q/DQ file on ONNX Runtime's CPU provider is several times slower than FP32
                fits = [a for a in bundle.artifacts if a["precision"] == p and (a.get("dla_core") is not None) == dla
                        and (engine_why.get(a["name"], "not an engine") is None if b == "tensorrt" else runnable(a, b))
                        and (precision or a.get("backend", "any") in (flavour, "any"))]
                fits.sort(key=lambda a: {flavour: 0, "any": 1}.get(a.get("backend"), 2))
                cands = [a for a in fits if precision or (a.get("accepted", True) and a.get("default", True))]
                if cands:
                    if b != "tensorrt" and (stale := _stale(engine_why)):
                        warnings.warn(f"{bundle.path}: running {cands[0]['name']} on ONNX Runtime, not the bundle's "
                                      f"TensorRT engines: {stale}", stacklevel=3)
                    return cands[0], b
                fallback = fallback or next(((a, b) for a in fits if a.get("accepted", True)), None)
    if fallback is not None:  # e.g. a bundle slimmed to an INT8 that export found no faster than FP32
        art, b = fallback
        warnings.warn(f"{bundle.path}: running {art['name']}, which export did not make the default "
                      f"({art.get('not_default', 'not the default')}), as nothing else here runs on {b}", stacklevel=3)
        return art, b
    have = ", ".join(f"{a['name']} ({a['format']}, {a['precision']})" for a in bundle.artifacts)
    if precision and precision not in {a["precision"] for a in bundle.artifacts}:
        raise UserError(f"precision {precision!r}: {bundle.path} has no {precision} artifact (it has: {have})"
                        f"{bundle.slim_note()}.")
    why = f" Its engines: {'; '.join(f'{n}: {w}' for n, w in engine_why.items())}." if engine_why else ""
    fix = (f" Build engines on the device with `edge-tl engine {bundle.path}`."
           if engine_why or any(a.get("backend") == "tensorrt" for a in bundle.artifacts) else
           " Name one with precision= (--precision) or artifact=, or re-export the bundle.")
    raise UserError(f"{bundle.path}: nothing runnable here for backend={backend} precision={precision or 'any'} "
                    f"(bundle has: {have}).{why}{fix}")


def _stale(engine_why: dict[str, str | None]) -> str:
    """'name: why; ...' of the engines that cannot run here where TensorRT is meant to (it imports, or
    this is a Jetson): after a JetPack upgrade, or with a cuda-python that cannot reach CUDA, an app
    would otherwise fall back to ONNX Runtime unnoticed. Empty where there is no TensorRT at all."""
    from . import trt_support

    stale = [f"{n}: {w}" for n, w in engine_why.items() if w]
    if stale and (trt_support.on_jetson() or trt_support.tensorrt_installed()):
        return "; ".join(stale)
    return ""


def _ort_flavour(device: str | None) -> str:
    """Which artifact ``backend`` tag suits ONNX Runtime on ``device``."""
    if device in (None, "auto"):
        providers = import_onnxruntime().get_available_providers()
        gpu = "CUDAExecutionProvider" in providers or "TensorrtExecutionProvider" in providers
        return "tensorrt" if gpu else "onnxruntime"
    return "tensorrt" if device in ("cuda", "gpu") else "onnxruntime"


def make_runner(bundle: Bundle, artifact: dict, backend: str, device: str | None = None, threads: int = 0,
                session_options: dict | None = None, session_config: dict | None = None) -> Runner:
    """A runner of ``artifact`` that loads the very bytes it hashed (``Bundle.read_verified``)."""
    path, data = bundle.file(artifact), bundle.read_verified(artifact["file"])
    if backend == "tensorrt":
        return TensorRTRunner(path, gpu_index(device), artifact.get("dla_core"), engine=data)
    return OnnxRuntimeRunner(path, device, threads, model=data, session_options=session_options,
                             session_config=session_config)


class Predictor:
    """Classify images with one artifact of a bundle. Safe to share between threads.

    ``artifact`` is the manifest entry it runs (name, file, precision, the ``backend`` it was made
    for, validation accuracy); ``classes`` the labels in output order; ``spec`` the preprocessing.
    """

    def __init__(self, bundle: Bundle, artifact: dict, runner: Runner):
        self.bundle, self.artifact, self.runner = bundle, artifact, runner
        self.spec, self.classes = bundle.spec, bundle.classes
        self.temperature = bundle.temperature
        self.input_shape = (3, *self.spec.input_size)
        # larger batches run in parts of this size: ONNX Runtime's memory arena keeps the peak of the
        # largest call for the life of the process (~10 MB per 224-px image in FP32)
        self.max_batch = int((bundle.manifest.get("batch") or {}).get("max") or 32)
        self._warmup_image = bundle.golden()[0][:1].copy()  # kept: warmup works after the folder is replaced
        self._calls, self._closing, self._state = 0, False, threading.Lock()
        self.mismatch = flavour_mismatch(artifact, runner)
        if self.mismatch:
            warnings.warn(f"{bundle.path}: {artifact['name']} is {self.mismatch}", stacklevel=3)
        if artifact.get("accepted") is False:
            warnings.warn(f"{bundle.path}: {artifact['name']} was not accepted at export "
                          f"({artifact.get('rejected', 'below --max-drop even with every layer in float')})", stacklevel=3)

    @classmethod
    def from_bundle(cls, path: str | Path, backend: str = "auto", precision: str | None = None,
                    device: str | None = None, threads: int = 0, artifact: str | None = None,
                    session_options: dict | None = None, session_config: dict | None = None) -> "Predictor":
        """Load and verify ``path``; pick an artifact (by name, or by backend and precision) and activate it.

        ``backend``: auto (a TensorRT engine built for this GPU, else ONNX Runtime), tensorrt or onnxruntime.
        ``precision``: fp32, fp16 or int8; None takes the fastest accepted one made for the backend.
        ``device``: ONNX Runtime's execution provider: auto, cpu, openvino or cuda (or a GPU index for
        TensorRT). ``threads``: ONNX Runtime intra-op threads (0: all cores; a service running several
        Predictors or worker threads wants 1-2 each, so that together they do not exceed the cores).
        ``session_options``: further ``onnxruntime.SessionOptions`` attributes by name, e.g.
        ``{"enable_cpu_mem_arena": False}`` (memory back after each call, a little slower).
        ``session_config``: ONNX Runtime session config entries, e.g.
        ``{"session.intra_op.allow_spinning": "0"}`` (threads sleep between calls: a camera app at
        10 fps used a seventh of the CPU for the same latency) or
        ``{"session.intra_op_thread_affinities": "1;2"}`` (pin its threads).
        """
        check_threads(threads)
        bundle = Bundle.load(path)
        if artifact is not None:
            art = bundle.artifact(artifact)
            chosen_backend = "tensorrt" if art["format"] == "engine" else "onnxruntime"
        else:
            art, chosen_backend = choose_artifact(bundle, backend, precision, device)
        runner = make_runner(bundle, art, chosen_backend, device, threads, session_options, session_config).activate()
        try:
            predictor = cls(bundle, art, runner)
            bundle.drop_golden()  # ~6 MB of test images a long-running app does not need (re-read if asked for)
            return predictor
        except BaseException:
            runner.deactivate()  # a TensorRT runner's GPU buffers are freed by nothing else
            raise

    def monitor(self, window: int = 50, false_alarm: float = FALSE_ALARM) -> FieldMonitor:
        """A :class:`FieldMonitor` of this bundle's validation reference: ``add`` each prediction, read
        ``report()["drift"]`` (class mix, share of low scores, brightness, contrast of the last ``window``)."""
        return FieldMonitor.for_predictor(self, window, false_alarm)

    def describe(self) -> str:
        """What runs: artifact, precision, file, and the runner (backend, provider, threads)."""
        return (f"{self.artifact['name']} ({self.artifact['precision']}, {self.artifact['file']}"
                f"{'; ' + self.mismatch if self.mismatch else ''}) on {self.runner.describe()}")

    def warmup(self, batch_sizes=(1,)) -> None:
        """Run each batch size once on a golden image (kept in memory), so the first real call is not the slow one
        (TensorRT and OpenVINO set up each new input shape on its first call)."""
        sizes = [batch_sizes] if isinstance(batch_sizes, (int, np.integer)) else list(batch_sizes)
        if not sizes or not all(isinstance(b, (int, np.integer)) and not isinstance(b, bool) and b >= 1 for b in sizes):
            raise UserError(f"warmup batch sizes {batch_sizes!r}: each must be at least 1 (a whole number), e.g. (1, 8).")
        for b in sizes:
            self.infer(np.repeat(self._warmup_image, int(b), axis=0))

    def close(self) -> None:
        """Release the runner (sessions, GPU memory); the ``with`` block does it. Idempotent.

        Calls already running finish first (the last one releases it), so a service can swap in a
        new Predictor and close the old one at once; calls that start after ``close`` are refused."""
        with self._state:
            self._closing = True
            idle = self._calls == 0
        if idle:
            self.runner.deactivate()

    def _call(self, fn, *args):
        """Run ``fn(*args)`` as one call of this Predictor: ``close`` waits for it."""
        with self._state:
            if self._closing:
                raise UserError(f"{self.bundle.path}: this Predictor was closed, its runner is closed; {REOPEN}")
            self._calls += 1
        try:
            return fn(*args)
        finally:
            with self._state:
                self._calls -= 1
                last = self._closing and self._calls == 0
            if last:
                self.runner.deactivate()

    def __enter__(self) -> "Predictor":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def preprocess(self, image, channel_order: str = "RGB") -> np.ndarray:
        """Path, encoded bytes (or a binary file object: a camera's or a web request's stream), PIL
        image, or uint8 array (any size) -> uint8 H×W×3 RGB at the input size. An array is H×W×3
        colour, or H×W (or H×W×1) grayscale, as a mono camera gives it.

        ``channel_order`` is that of a colour array: "RGB" (Pillow, imageio) or "BGR" (OpenCV's
        imread and VideoCapture); files, bytes and PIL images say their own.

        A JPEG several times the model's input (a camera's photo) is decoded at 1/2, 1/4 or 1/8
        scale, as in training (the manifest's ``preprocess.steps.decode``): from a path, bytes, a file
        object or an ``Image.open()`` image not yet loaded (which this reduces in place). An image
        already decoded (a loaded PIL image, an array) is taken at its size: its pixels differ from
        the reduced decode's by well under a grey level on average.
        """
        if channel_order not in ("RGB", "BGR"):
            raise UserError(f"channel_order {channel_order!r}: use 'RGB', or 'BGR' for OpenCV arrays.")
        if isinstance(image, (str, os.PathLike, bytes, bytearray, memoryview)) or hasattr(image, "read"):
            image = self.spec.load(image)
        elif isinstance(image, np.ndarray):
            image = _array_image(image, channel_order)
        elif isinstance(image, Image.Image):
            if channel_order != "RGB":
                raise UserError(f"channel_order {channel_order!r} with a PIL image: it is RGB already (for an "
                                "OpenCV BGR array, pass the array itself with channel_order='BGR').")
            check_aspect(image.size, "PIL image")
            try:
                if self.spec.jpeg_min_shorter and getattr(image, "tile", None):  # Image.open()'s, not loaded yet:
                    draft_jpeg(image, self.spec.jpeg_min_shorter)  # decoded as its file is (in place, as thumbnail() does)
                image = to_rgb(image, keep_gray=True)  # as for a path: EXIF turn, alpha on white, 16-bit scaled
            except MemoryError:
                raise
            except Exception as exc:  # noqa: BLE001 - truncated, its file closed, malformed (bad EXIF: struct.error)
                raise UnreadableImage(f"PIL image: cannot be decoded ({type(exc).__name__}: {exc}); pass the file's "
                                      "path or bytes, or use the image inside its `with Image.open(...)` block") from exc
        else:
            raise UserError(f"cannot read an image from a {type(image).__name__}: pass a path, bytes, a binary file "
                            "object, a PIL image or a uint8 H×W×3 or H×W array.")
        return self.spec.to_pixels(image)

    def infer(self, array: np.ndarray) -> np.ndarray:
        """Logits for preprocessed input: uint8 N×H×W×3 (or H×W×3) or float32 N×3×H×W pixels 0–255.
        A batch over the bundle's ``batch.max`` runs in parts of that size."""
        return self._call(self._infer, array)

    def _infer(self, array: np.ndarray) -> np.ndarray:
        array = np.asarray(array)
        h, w = self.spec.input_size
        if array.dtype == np.uint8:
            x = array[None] if array.ndim == 3 else array
            if x.ndim != 4 or x.shape[1:] != (h, w, 3):
                raise UserError(f"uint8 array of shape {array.shape}: expected N×{h}×{w}×3 (resize and crop with "
                                "Predictor.preprocess first).")
            x = to_input(x)
        elif array.dtype == np.float32:
            x = array
            if x.ndim != 4 or x.shape[1:] != self.input_shape:
                raise UserError(f"float32 array of shape {array.shape}: expected N×{'×'.join(map(str, self.input_shape))} "
                                "RGB pixels 0–255 (normalization is inside the model).")
        else:
            raise UserError(f"array of dtype {array.dtype}: expected uint8 N×H×W×3 or float32 N×3×H×W.")
        if x.shape[0] == 0:
            return np.zeros((0, len(self.classes)), np.float32)
        parts = [self.runner.infer(np.ascontiguousarray(x[i:i + self.max_batch])) for i in range(0, len(x), self.max_batch)]
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def predict(self, image, topk: int = 5, channel_order: str = "RGB") -> Prediction:
        """Classify one image (anything ``preprocess`` takes); ``topk`` classes with softmax scores."""
        return self.predict_batch([image], topk, channel_order)[0]

    def predict_batch(self, images, topk: int = 5, channel_order: str = "RGB") -> list[Prediction]:
        """``predict`` of each image (a list or other iterable of them, or an N×H×W×3 array),
        inferred as one batch. An image that cannot be read raises ``UnreadableImage`` (a
        ``UserError``) whose ``index`` is its position in ``images``."""
        return self._call(self._predict_batch, images, topk, channel_order)

    def _predict_batch(self, images, topk: int, channel_order: str) -> list[Prediction]:
        topk = _count(topk, "topk")
        if isinstance(images, (str, os.PathLike, bytes, bytearray, memoryview, Image.Image)) or hasattr(images, "read") \
                or (isinstance(images, np.ndarray) and images.ndim < 4):
            one = f"array of shape {images.shape}" if isinstance(images, np.ndarray) else type(images).__name__
            stack = isinstance(images, np.ndarray) and images.ndim == 3 and images.shape[2] != 3
            raise UserError(f"predict_batch takes a list of images (or an N×H×W×3 array), not one {one}: use "
                            "predict for one image, or predict_batch([image])"
                            + ("; for N grayscale frames stacked N×H×W, predict_batch(list(a))." if stack else "."))
        try:
            images = list(images)
        except TypeError:
            raise UserError(f"predict_batch takes a list of images, not a {type(images).__name__}.") from None
        pixels = []
        for i, im in enumerate(images):
            try:
                pixels.append(self.preprocess(im, channel_order))
            except UserError as exc:  # which one of the batch: a service rejects that upload, keeps the rest
                if len(images) > 1:
                    exc.args = (f"image [{i}] of {len(images)}: {exc}",)
                exc.index = i
                raise
        if not pixels:
            return []
        batch = np.stack(pixels)
        predictions = self.decode(self._infer(batch), topk)
        for p, mean, std in zip(predictions, *input_stats(batch)):
            p.brightness, p.contrast = round(float(mean), 2), round(float(std), 2)
        return predictions

    def predict_files(self, paths, topk: int = 5):
        """Yield (path, Prediction) per image file, or (path, UnreadableImage) for one that cannot be
        read: a bad file in a folder does not stop the rest."""
        for path in paths:
            try:
                yield path, self.predict(path, topk)
            except UnreadableImage as exc:
                yield path, exc

    def decode(self, logits: np.ndarray, topk: int = 5) -> list[Prediction]:
        """Predictions from N×classes logits (``infer``'s output): softmax of logits / the manifest's
        ``output.temperature`` (fitted on validation at export; 1 in older bundles), then the ``topk`` best."""
        topk = _count(topk, "topk")
        logits = np.asarray(logits)
        if logits.ndim != 2 or logits.shape[1] != len(self.classes):
            raise UserError(f"logits of shape {logits.shape}: expected N×{len(self.classes)} (one column per class), "
                            "as infer returns them.")
        p = softmax(logits, self.temperature)
        k = min(topk, len(self.classes))
        out = []
        for row in p:
            order = np.argsort(-row, kind="stable")[:k]
            top = [(self.classes[i], float(row[i])) for i in order]
            out.append(Prediction(top[0][0], int(order[0]), top[0][1], top))
        return out


def _count(value, name: str) -> int:
    """``value`` (a top-k) as an int >= 1, or a UserError naming ``name``."""
    try:
        n = 0 if isinstance(value, bool) else operator.index(value)
    except TypeError:
        n = 0
    if n < 1:
        raise UserError(f"{name}={value!r}: ask for at least one class per image (a whole number).")
    return n
