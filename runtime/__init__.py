"""edge_tl.runtime: what device apps embed. numpy + Pillow + ONNX Runtime or TensorRT; never torch."""

from .bundle import Bundle, BundleError
from .images import IMAGE_EXTENSIONS, UnreadableImage, load_rgb
from .predictor import Prediction, Predictor
from .spec import PreprocessSpec

__all__ = ["Bundle", "BundleError", "IMAGE_EXTENSIONS", "Prediction", "Predictor", "PreprocessSpec", "UnreadableImage",
           "load_rgb"]
