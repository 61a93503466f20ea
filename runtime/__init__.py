"""edge_tl.runtime: what device apps embed. numpy + Pillow + ONNX Runtime or TensorRT; never torch."""

from .images import IMAGE_EXTENSIONS, UnreadableImage, load_rgb
from .spec import PreprocessSpec

__all__ = ["IMAGE_EXTENSIONS", "PreprocessSpec", "UnreadableImage", "load_rgb"]
