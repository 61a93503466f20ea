"""edge_tl.runtime: what device apps embed. numpy + Pillow + ONNX Runtime or TensorRT; never torch.

Errors a caller can fix (a bad image or argument, a missing package, a damaged bundle) raise
``UserError`` with a one-line message that says how; ``BundleError`` and ``UnreadableImage`` are kinds of it.
"""

from edge_tl.errors import UserError

from .bundle import Bundle, BundleError
from .images import IMAGE_EXTENSIONS, UnreadableImage, load_rgb
from .predictor import Prediction, Predictor
from .spec import PreprocessSpec

__all__ = ["Bundle", "BundleError", "IMAGE_EXTENSIONS", "Prediction", "Predictor", "PreprocessSpec", "UnreadableImage",
           "UserError", "load_rgb"]
