"""The one preprocessing spec: written into the run, then the bundle manifest, used everywhere.

Training eval (timm's transform), ONNX export (normalization baked into the graph) and the
runtime (numpy + Pillow) all derive from this one record, so train/deploy preprocessing
cannot drift apart. Torch-free on purpose: device apps import it.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np
from PIL import Image

from .images import load_rgb

MAX_INPUT_SIDE = 4096
MIN_CROP_PCT, MAX_CROP_PCT = 0.25, 4.0
_PIL_INTERPOLATION = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
}


@dataclass(frozen=True)
class PreprocessSpec:
    """Eval preprocessing of one model: resize shorter side, center crop, scale, normalize.

    ``mean``/``std`` apply to pixels scaled to 0–1, channels in ``channel_order``; the
    exported ONNX graph takes raw 0–255 RGB pixels and applies them itself.
    """

    input_size: tuple[int, int]  # (height, width) fed to the network
    crop_pct: float = 0.875
    interpolation: str = "bicubic"
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    channel_order: str = "RGB"
    layout: str = "NCHW"
    crop_mode: str = field(default="center")
    # a JPEG much larger than the input is decoded at 1/2, 1/4 or 1/8 scale (libjpeg's DCT scaling, Pillow's
    # draft; only a scale that divides both sides) keeping its shorter side >= this × resize_size: several
    # times faster for a camera's photo, its pixels close to the full decode's (benchmarks/jpeg_draft.py).
    # 2 is Pillow's thumbnail() default; None decodes at full size (what bundles and runs made before this
    # field existed do)
    jpeg_reducing_gap: float | None = 2.0

    @property
    def resize_size(self) -> int:
        """Shorter-side size before the center crop (timm: ``floor(size / crop_pct)``)."""
        return math.floor(max(self.input_size) / self.crop_pct)

    @property
    def jpeg_min_shorter(self) -> int | None:
        """The shorter side a JPEG may be decoded down to (None: always full size)."""
        return None if self.jpeg_reducing_gap is None else math.ceil(self.jpeg_reducing_gap * self.resize_size)

    def load(self, image, keep_gray: bool = True) -> Image.Image:
        """Decode ``image`` (a path, encoded bytes or a binary file object) per the ``decode`` step,
        or raise ``UnreadableImage``; ``keep_gray`` keeps a grayscale image one channel ("L")."""
        return load_rgb(image, keep_gray, min_shorter=self.jpeg_min_shorter)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["input_size"] = list(self.input_size)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        d["resize_size"] = self.resize_size
        return d

    def steps(self) -> dict:
        """Each step exactly, for apps that preprocess without this code (C++, another language).

        golden.npz's ``source_<i>`` images with their expected ``source_pixels`` test such a port
        (``edge-tl check`` tests this machine's Pillow with them).
        """
        h, w = self.input_size
        return {
            "decode": "8-bit RGB: EXIF orientation applied, alpha composited on white, a grayscale image's "
                      "channel repeated 3 times, 16-bit values // 257" + self._jpeg_step(),
            "resize": {"side": "shorter", "to": self.resize_size, "longer_to": f"floor({self.resize_size} * longer / shorter)",
                       "skip_when": f"shorter == {self.resize_size}",
                       "filter": f"Pillow Image.resize {self.interpolation}: separable convolution whose support "
                                 "widens by the shrink factor when downscaling (antialiased; bicubic a = -0.5); "
                                 "OpenCV INTER_CUBIC and torch without antialias differ"},
            "crop": {"height": h, "width": w, "top": f"round_half_even((resized_height - {h}) / 2)",
                     "left": f"round_half_even((resized_width - {w}) / 2)",
                     "rounding": "half to even, as Python's round() and C's nearbyint() in the default rounding mode",
                     "outside": "where the crop reaches past the resized image (crop_pct > 1): 0, black"},
            "to_input": f"float32 {self.layout} {self.channel_order} values 0-255 (uint8 cast); "
                        "(x / 255 - mean) / std is inside the ONNX graph: do not normalize",
        }

    def _jpeg_step(self) -> str:
        if self.jpeg_min_shorter is None:
            return ""
        return ("; a JPEG decoded by libjpeg at scale 1/s (its DCT scaling: Pillow's draft, libjpeg-turbo's "
                "scale_denom, OpenCV's IMREAD_REDUCED_*), s the largest of 8, 4, 2 that divides both width and height "
                f"with shorter side / s >= {self.jpeg_min_shorter}, to width / s x height / s, before the EXIF turn; "
                "else at full size")

    def __post_init__(self):
        """Refuse values no preprocessing can follow (a hand-edited manifest, a corrupt checkpoint)."""
        size_ok = len(self.input_size) == 2 and all(isinstance(x, int) and 0 < x <= MAX_INPUT_SIDE for x in self.input_size)
        problems = [what for ok, what in (
            (size_ok, f"input_size {list(self.input_size)} (two integers 1-{MAX_INPUT_SIDE})"),
            # below 1/4 a crop keeps a sliver, and resizes every image to over 4x the input (a re-signed
            # manifest's 0.002: 112000 px, tens of GB per image)
            (MIN_CROP_PCT <= self.crop_pct <= MAX_CROP_PCT,
             f"crop_pct {self.crop_pct} ({MIN_CROP_PCT}-{MAX_CROP_PCT}; timm's are 0.8-1.15)"),
            (self.interpolation in _PIL_INTERPOLATION, f"interpolation {self.interpolation!r} ({', '.join(_PIL_INTERPOLATION)})"),
            (len(self.mean) == 3 and len(self.std) == 3 and all(x > 0 for x in self.std),
             f"mean {list(self.mean)} / std {list(self.std)} (three values each, std > 0)"),
            (self.channel_order == "RGB", f"channel_order {self.channel_order!r} (RGB)"),
            (self.layout == "NCHW", f"layout {self.layout!r} (NCHW)"),
            (self.crop_mode == "center", f"crop_mode {self.crop_mode!r} (center)"),
            (self.jpeg_reducing_gap is None or (type(self.jpeg_reducing_gap) in (int, float) and
                                                1 <= self.jpeg_reducing_gap < math.inf),
             f"jpeg_reducing_gap {self.jpeg_reducing_gap} (null, or >= 1)"),
        ) if not ok]
        if problems:
            raise ValueError("preprocessing spec: unsupported " + "; ".join(problems))

    @classmethod
    def from_dict(cls, d: dict) -> "PreprocessSpec":
        spec = cls._from_dict(d)
        if "resize_size" in d and d["resize_size"] != spec.resize_size:
            raise ValueError(f"preprocessing spec: resize_size {d['resize_size']} is not floor(max(input_size) / "
                             f"crop_pct) = {spec.resize_size}")
        return spec

    @classmethod
    def _from_dict(cls, d: dict) -> "PreprocessSpec":
        return cls(
            input_size=tuple(d["input_size"]),
            crop_pct=float(d["crop_pct"]),
            interpolation=d["interpolation"],
            mean=tuple(d["mean"]),
            std=tuple(d["std"]),
            channel_order=d.get("channel_order", "RGB"),
            layout=d.get("layout", "NCHW"),
            crop_mode=d.get("crop_mode", "center"),
            jpeg_reducing_gap=d.get("jpeg_reducing_gap"),
        )

    def resize_and_crop(self, img: Image.Image) -> Image.Image:
        """Resize the shorter side to ``resize_size`` then center-crop to ``input_size``.

        Identical to torchvision's ``Resize(int)`` + ``CenterCrop`` on PIL images, which is
        what timm's eval transform does.
        """
        img = self.resize_shorter(img)
        th, tw = self.input_size
        w, h = img.size
        if (w, h) != (tw, th):
            top = int(round((h - th) / 2.0))
            left = int(round((w - tw) / 2.0))
            img = img.crop((left, top, left + tw, top + th))
        return img

    def resize_shorter(self, img: Image.Image) -> Image.Image:
        size = self.resize_size
        w, h = img.size
        short, long = (w, h) if w <= h else (h, w)
        if short == size:
            return img
        new_long = int(size * long / short)
        new_w, new_h = (size, new_long) if w <= h else (new_long, size)
        return img.resize((new_w, new_h), _PIL_INTERPOLATION[self.interpolation])

    def to_pixels(self, img: Image.Image) -> np.ndarray:
        """RGB (or grayscale "L") PIL image -> uint8 H×W×3 array at ``input_size`` (what the ONNX graph takes).

        A grayscale image is resized as one channel and then repeated: Pillow filters each
        channel alike, so this equals resizing its RGB conversion, at a third of the cost.
        """
        if img.mode == "L":
            return np.repeat(np.asarray(self.resize_and_crop(img), dtype=np.uint8)[..., None], 3, axis=2)
        return np.asarray(self.resize_and_crop(img if img.mode == "RGB" else img.convert("RGB")), dtype=np.uint8)

    def normalize(self, pixels: np.ndarray) -> np.ndarray:
        """uint8 N×H×W×3 (or H×W×3) -> float32 N×3×H×W normalized, for float-input models."""
        x = pixels.astype(np.float32) / 255.0
        x = (x - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)
        x = x[None] if x.ndim == 3 else x
        return np.ascontiguousarray(x.transpose(0, 3, 1, 2))
