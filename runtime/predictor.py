"""``Predictor``: a bundle plus one runner; images in, labels and scores out. Torch-free."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from edge_tl.errors import UserError

from .bundle import Bundle
from .images import load_rgb, to_rgb
from .runners import OnnxRuntimeRunner, Runner, TensorRTRunner, import_onnxruntime

PRECISION_PREFERENCE = ("int8", "fp16", "fp32")  # fastest first, for precision=None


@dataclass
class Prediction:
    label: str
    index: int
    score: float
    topk: list[tuple[str, float]]

    def to_dict(self) -> dict:
        d = asdict(self)
        d["topk"] = [{"label": k, "score": s} for k, s in self.topk]
        return d


def tensorrt_available() -> bool:
    """True when TensorRT and cuda-python import and a CUDA GPU is visible."""
    from . import trt_support

    return trt_support.available()


def runnable(artifact: dict, backend: str) -> bool:
    """Can ``backend`` run ``artifact`` here? Engines need TensorRT; ONNX files need ONNX Runtime."""
    if artifact["format"] == "engine":
        return backend == "tensorrt" and tensorrt_available() and _engine_matches(artifact)
    return backend == "onnxruntime"


def _engine_matches(artifact: dict) -> bool:
    from . import trt_support

    return trt_support.engine_matches_here(artifact)


def choose_artifact(bundle: Bundle, backend: str = "auto", precision: str | None = None,
                    device: str | None = None) -> tuple[dict, str]:
    """(artifact, backend) per the "auto" rule: a TensorRT engine for this GPU, else ONNX Runtime.

    Precision None takes the fastest accepted one (int8, fp16 on GPUs, fp32) among artifacts made
    for the chosen backend's flavour or for any (``artifact["backend"]``): ONNX Runtime on CPU
    takes the CPU INT8 flavour, and never the TensorRT Q/DQ one (a gpu/jetson bundle before
    `edge-tl engine` runs FP32 there). An explicit precision takes what the bundle has.
    """
    if backend not in ("auto", "tensorrt", "onnxruntime"):
        raise UserError(f"--backend {backend}: use auto, tensorrt or onnxruntime.")
    backends = ["tensorrt", "onnxruntime"] if backend == "auto" else [backend]
    if device in ("cpu", "openvino") and backend == "auto":
        backends = ["onnxruntime"]
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
        for p in wanted:
            # left to choose, only files made for this backend's flavour (or for any): the TensorRT
            # Q/DQ file on ONNX Runtime's CPU provider is several times slower than FP32
            cands = [a for a in bundle.artifacts if a["precision"] == p and runnable(a, b)
                     and (precision or (a.get("accepted", True) and a.get("backend", "any") in (flavour, "any")))]
            cands.sort(key=lambda a: {flavour: 0, "any": 1}.get(a.get("backend"), 2))
            if cands:
                return cands[0], b
    have = ", ".join(f"{a['name']} ({a['format']}, {a['precision']})" for a in bundle.artifacts)
    if precision and precision not in {a["precision"] for a in bundle.artifacts}:
        raise UserError(f"--precision {precision}: {bundle.path} has no {precision} artifact (it has: {have}).")
    raise UserError(f"{bundle.path}: nothing runnable here for backend={backend} precision={precision or 'any'} "
                    f"(bundle has: {have}). Build engines on the device with `edge-tl engine {bundle.path}`.")


def _ort_flavour(device: str | None) -> str:
    """Which artifact ``backend`` tag suits ONNX Runtime on ``device``."""
    if device in (None, "auto"):
        providers = import_onnxruntime().get_available_providers()
        gpu = "CUDAExecutionProvider" in providers or "TensorrtExecutionProvider" in providers
        return "tensorrt" if gpu else "onnxruntime"
    return "tensorrt" if device in ("cuda", "gpu") else "onnxruntime"


def make_runner(bundle: Bundle, artifact: dict, backend: str, device: str | None = None, threads: int = 0) -> Runner:
    path = bundle.file(artifact)
    if backend == "tensorrt":
        return TensorRTRunner(path, int(device) if device and str(device).isdigit() else 0,
                              artifact.get("dla_core"))
    return OnnxRuntimeRunner(path, device, threads)


class Predictor:
    """Classify images with one artifact of a bundle. Safe to share between threads."""

    def __init__(self, bundle: Bundle, artifact: dict, runner: Runner):
        self.bundle, self.artifact, self.runner = bundle, artifact, runner
        self.spec, self.classes = bundle.spec, bundle.classes
        self.input_shape = (3, *self.spec.input_size)

    @classmethod
    def from_bundle(cls, path: str | Path, backend: str = "auto", precision: str | None = None,
                    device: str | None = None, threads: int = 0, artifact: str | None = None) -> "Predictor":
        """Load and verify ``path``; pick an artifact (by name, or by backend and precision) and activate it."""
        bundle = Bundle.load(path)
        if artifact is not None:
            art = bundle.artifact(artifact)
            chosen_backend = "tensorrt" if art["format"] == "engine" else "onnxruntime"
        else:
            art, chosen_backend = choose_artifact(bundle, backend, precision, device)
        return cls(bundle, art, make_runner(bundle, art, chosen_backend, device, threads).activate())

    def describe(self) -> str:
        return f"{self.artifact['name']} ({self.artifact['precision']}, {self.artifact['file']}) on {self.runner.describe()}"

    def close(self) -> None:
        self.runner.deactivate()

    def __enter__(self) -> "Predictor":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def preprocess(self, image) -> np.ndarray:
        """Path, encoded bytes (or a binary file object: a camera's or a web request's stream), PIL
        image or H×W×3 uint8 array (any size) -> uint8 H×W×3 at the input size."""
        if isinstance(image, (str, os.PathLike, bytes, bytearray, memoryview)) or hasattr(image, "read"):
            image = load_rgb(image, keep_gray=True)
        elif isinstance(image, np.ndarray):
            if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
                raise UserError(f"image array of dtype {image.dtype} and shape {image.shape}: "
                                "expected uint8 H×W×3 RGB (convert grayscale with np.repeat(a[..., None], 3, 2)).")
            if not image.shape[0] or not image.shape[1]:
                raise UserError(f"image array of shape {image.shape}: it has no pixels.")
            image = Image.fromarray(image)
        elif isinstance(image, Image.Image):
            image = to_rgb(image, keep_gray=True)  # as for a path: EXIF turn, alpha on white, 16-bit scaled
        else:
            raise UserError(f"cannot read an image from a {type(image).__name__}: pass a path, bytes, a binary file "
                            "object, a PIL image or a uint8 H×W×3 array.")
        return self.spec.to_pixels(image)

    def infer(self, array: np.ndarray) -> np.ndarray:
        """Logits for preprocessed input: uint8 N×H×W×3 (or H×W×3) or float32 N×3×H×W pixels 0–255."""
        array = np.asarray(array)
        h, w = self.spec.input_size
        if array.dtype == np.uint8:
            x = array[None] if array.ndim == 3 else array
            if x.ndim != 4 or x.shape[1:] != (h, w, 3):
                raise UserError(f"uint8 array of shape {array.shape}: expected N×{h}×{w}×3 (resize and crop with "
                                "Predictor.preprocess first).")
            x = np.ascontiguousarray(x.transpose(0, 3, 1, 2), dtype=np.float32)
        elif array.dtype == np.float32:
            x = array
            if x.ndim != 4 or x.shape[1:] != self.input_shape:
                raise UserError(f"float32 array of shape {array.shape}: expected N×{'×'.join(map(str, self.input_shape))} "
                                "RGB pixels 0–255 (normalization is inside the model).")
        else:
            raise UserError(f"array of dtype {array.dtype}: expected uint8 N×H×W×3 or float32 N×3×H×W.")
        if x.shape[0] == 0:
            return np.zeros((0, len(self.classes)), np.float32)
        return self.runner.infer(np.ascontiguousarray(x))

    def predict(self, image, topk: int = 5) -> Prediction:
        return self.predict_batch([image], topk)[0]

    def predict_batch(self, images, topk: int = 5) -> list[Prediction]:
        """``predict`` of each image (any iterable), inferred as one batch."""
        images = list(images)
        pixels = np.stack([self.preprocess(im) for im in images]) if len(images) else np.zeros((0, 1, 1, 3), np.uint8)
        return self.decode(self.infer(pixels) if len(images) else np.zeros((0, len(self.classes))), topk)

    def decode(self, logits: np.ndarray, topk: int = 5) -> list[Prediction]:
        if topk < 1:
            raise UserError(f"topk={topk}: ask for at least one class per image.")
        z = logits.astype(np.float64)
        p = np.exp(z - z.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        k = min(topk, len(self.classes))
        out = []
        for row in p:
            order = np.argsort(-row, kind="stable")[:k]
            top = [(self.classes[i], float(row[i])) for i in order]
            out.append(Prediction(top[0][0], int(order[0]), top[0][1], top))
        return out
