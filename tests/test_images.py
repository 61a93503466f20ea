"""Every common image flavour becomes correct RGB; broken files raise UnreadableImage."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import warnings
from pathlib import Path
from tempfile import TemporaryDirectory

import numpy as np
import pytest
from PIL import Image

from edge_tl.runtime.images import UnreadableImage, in_order, load_rgb, visible_files


def _rgb(path):
    img = load_rgb(path)
    assert img.mode == "RGB"
    return np.asarray(img)


@pytest.mark.parametrize("ext", ["png", "jpg", "bmp", "tiff", "webp"])
def test_formats_decode_to_rgb(tmp_path, ext):
    arr = np.zeros((20, 30, 3), np.uint8)
    arr[:, :15] = (200, 30, 40)
    Image.fromarray(arr).save(tmp_path / f"a.{ext}", **({"quality": 95} if ext in ("jpg", "webp") else {}))
    out = _rgb(tmp_path / f"a.{ext}")
    assert out.shape == (20, 30, 3)
    assert abs(int(out[10, 5, 0]) - 200) < 12 and abs(int(out[10, 25, 0])) < 12


def test_grayscale_and_16bit(tmp_path):
    Image.fromarray(np.full((8, 8), 77, np.uint8), "L").save(tmp_path / "g.png")
    assert (_rgb(tmp_path / "g.png") == 77).all()
    Image.fromarray(np.full((8, 8), 65535, np.uint16)).save(tmp_path / "w16.png")
    Image.fromarray(np.full((8, 8), 32896, np.uint16)).save(tmp_path / "m16.tiff")
    assert (_rgb(tmp_path / "w16.png") == 255).all()
    assert (_rgb(tmp_path / "m16.tiff") == 128).all()


def test_alpha_and_palette_composite_on_white(tmp_path):
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., 0] = 255
    rgba[:2, :, 3] = 255  # top half opaque red, bottom half fully transparent
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    out = _rgb(tmp_path / "a.png")
    assert tuple(out[0, 0]) == (255, 0, 0) and tuple(out[3, 3]) == (255, 255, 255)
    pal = Image.fromarray(np.array([[0, 1], [1, 0]], np.uint8), "P")
    pal.putpalette([0, 0, 255, 0, 255, 0] + [0] * 762)
    pal.save(tmp_path / "p.png", transparency=1)
    out = _rgb(tmp_path / "p.png")
    assert tuple(out[0, 0]) == (0, 0, 255) and tuple(out[0, 1]) == (255, 255, 255)
    # PNG colour keys (tRNS) on RGB and grey images: that colour is transparent too
    Image.fromarray(np.array([[[255, 0, 0], [0, 0, 255]]], np.uint8), "RGB").save(tmp_path / "k.png",
                                                                                  transparency=(255, 0, 0))
    Image.fromarray(np.array([[7, 100]], np.uint8), "L").save(tmp_path / "g.png", transparency=7)
    assert _rgb(tmp_path / "k.png").tolist() == [[[255, 255, 255], [0, 0, 255]]]
    assert _rgb(tmp_path / "g.png").tolist() == [[[255, 255, 255], [100, 100, 100]]]
    Image.fromarray(np.array([[0, 1000]], np.uint16)).save(tmp_path / "g16.png", transparency=0)  # 16-bit grey key
    assert _rgb(tmp_path / "g16.png").tolist() == [[[255, 255, 255], [3, 3, 3]]]


def test_exif_rotation_applied(tmp_path):
    arr = np.zeros((10, 20, 3), np.uint8)  # landscape, left half white
    arr[:, :10] = 255
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90° CW to display
    Image.fromarray(arr).save(tmp_path / "r.jpg", exif=exif, quality=95)
    out = _rgb(tmp_path / "r.jpg")
    assert out.shape == (20, 10, 3)  # displayed upright: portrait
    assert out[2, 5].mean() > 200 and out[17, 5].mean() < 50  # left half ends up on top
    from edge_tl.runtime.images import to_rgb

    assert np.array_equal(np.asarray(to_rgb(load_rgb(tmp_path / "r.jpg"))), out)  # turned once, not again


def _jpeg_with_exif(arr: np.ndarray, exif: Image.Exif) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", exif=exif.tobytes(), quality=95)
    return buf.getvalue()


def test_a_photo_whose_exif_is_slightly_malformed_is_still_turned_upright():
    """Pillow reads such a photo's orientation but its exif_transpose raised re-writing the EXIF
    (an XResolution stored as text: TypeError), which stopped a fine-tune (exit 3) on one photo."""
    import struct

    arr = np.zeros((10, 20, 3), np.uint8)
    arr[:, :10] = 255
    exif = Image.Exif()
    exif[0x0112], exif[0x011A] = 6, 72.0  # orientation, XResolution (a RATIONAL)
    good = _jpeg_with_exif(arr, exif)
    data = bytearray(good)
    tiff = data.find(b"Exif\0\0") + 6
    order = "<" if data[tiff:tiff + 2] == b"II" else ">"
    ifd = tiff + struct.unpack(order + "I", data[tiff + 4:tiff + 8])[0]
    for k in range(struct.unpack(order + "H", data[ifd:ifd + 2])[0]):
        entry = ifd + 2 + 12 * k
        if struct.unpack(order + "H", data[entry:entry + 2])[0] == 0x011A:
            data[entry + 2:entry + 4] = struct.pack(order + "H", 2)  # its type: RATIONAL -> ASCII
    assert bytes(data) != good
    out = np.asarray(load_rgb(bytes(data)))
    assert out.shape == (20, 10, 3) and np.array_equal(out, np.asarray(load_rgb(good)))


def test_any_decoder_failure_is_an_unreadable_image(monkeypatch):
    """A parser's odd exception (struct.error, NotImplementedError, ...) and Pillow's bomb warning
    under an app's warnings-as-errors are UnreadableImage, a UserError a service answers with 400."""
    from PIL import JpegImagePlugin

    def odd(self):
        raise NotImplementedError("an unknown pixel format")

    data = _jpeg_with_exif(np.zeros((8, 8, 3), np.uint8), Image.Exif())
    with monkeypatch.context() as m:
        m.setattr(JpegImagePlugin.JpegImageFile, "load", odd)
        with pytest.raises(UnreadableImage, match=r"not a readable image \(NotImplementedError: an unknown pixel format"):
            load_rgb(data)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 40)  # 64 pixels: over the limit, under twice it, so a warning
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with pytest.raises(UnreadableImage, match="too large to decode safely"):
            load_rgb(data)


@pytest.mark.parametrize("fmt", ["EPS", "DDS", "TGA", "ICO"])
def test_only_the_documented_formats_are_parsed(fmt):
    """Bytes from a client reach only the decoders of the documented formats, whatever their name:
    Pillow alone would try some 40 (EPS hands them to Ghostscript where it is installed)."""
    buf = io.BytesIO()
    if fmt == "EPS":
        buf.write(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\n")
    else:
        Image.new("RGB", (8, 8)).save(buf, fmt)
    assert fmt == "EPS" or Image.open(io.BytesIO(buf.getvalue())).format == fmt  # Pillow itself would read it
    with pytest.raises(UnreadableImage, match="cannot identify image file; formats read: JPEG, PNG, BMP, TIFF, WEBP"):
        load_rgb(buf.getvalue())


def test_alpha_is_composited_in_bands_to_the_same_pixels(monkeypatch):
    """Compositing band by band (bounded memory for a huge PNG) gives the whole-image composite's pixels."""
    from edge_tl.runtime import images

    rng = np.random.default_rng(0)
    rgba = Image.fromarray(rng.integers(0, 256, (37, 23, 4), dtype=np.uint8), "RGBA")
    pal = Image.fromarray(rng.integers(0, 4, (37, 23), dtype=np.uint8), "P")
    pal.putpalette(list(rng.integers(0, 256, 12)) + [0] * 756)
    pal.info["transparency"] = 2
    monkeypatch.setattr(images, "BAND_PIXELS", 100)  # 4 rows a band
    for img in (rgba, rgba.convert("LA"), pal):
        whole = Image.alpha_composite(Image.new("RGBA", img.size, (255,) * 4), img.convert("RGBA")).convert("RGB")
        assert np.array_equal(np.asarray(images.to_rgb(img)), np.asarray(whole)), img.mode


def test_cmyk(tmp_path):
    Image.new("CMYK", (6, 6), (0, 255, 255, 0)).save(tmp_path / "c.jpg")
    r, g, b = _rgb(tmp_path / "c.jpg")[3, 3].tolist()
    assert r > 200 and g < 60 and b < 60


def test_broken_files_raise(tmp_path):
    (tmp_path / "zero.png").write_bytes(b"")
    (tmp_path / "text.jpg").write_text("not an image")
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buf, "JPEG")
    (tmp_path / "trunc.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    buf = io.BytesIO()
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(buf, "PNG")
    (tmp_path / "trunc.png").write_bytes(buf.getvalue()[:-30])
    for name in ("zero.png", "text.jpg", "trunc.jpg", "trunc.png", "missing.png"):
        with pytest.raises(UnreadableImage, match=name):
            load_rgb(tmp_path / name)
    with open(tmp_path / "text.jpg", "rb") as f, pytest.raises(UnreadableImage, match="text.jpg: not a readable image"):
        load_rgb(f)  # an open file is named by its path
    with open(tmp_path / "trunc.png") as f, pytest.raises(UnreadableImage, match=r"trunc.png: a text-mode .*'rb'"):
        load_rgb(f)
    for empty in (b"", bytearray(), memoryview(b"")):
        with pytest.raises(UnreadableImage, match="empty"):
            load_rgb(empty)


def test_decompression_bomb_is_an_unreadable_image(tmp_path, monkeypatch):
    Image.new("L", (100, 100)).save(tmp_path / "huge.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 10,000 pixels: over twice the limit, so Pillow refuses
    with pytest.raises(UnreadableImage, match="huge.png: too large to decode safely"):
        load_rgb(tmp_path / "huge.png")


def test_a_jpeg_over_the_pixel_limit_is_read_where_its_reduced_decode_is_within_it(monkeypatch):
    """A 200-Mpx phone photo is over Pillow's bomb limit (179 Mpx) but decodes at 1/8 scale (3 Mpx):
    read so, to the pixels it has under a higher limit; decoded at full size, or not a JPEG, refused."""
    arr = np.random.default_rng(0).integers(0, 255, (96, 128, 3), dtype=np.uint8)
    jpeg, png = io.BytesIO(), io.BytesIO()
    Image.fromarray(arr).save(jpeg, "JPEG")
    Image.fromarray(arr).save(png, "PNG")
    expected = np.asarray(load_rgb(jpeg.getvalue(), min_shorter=12))
    assert expected.shape == (12, 16, 3)  # 1/8 scale
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 12,288 pixels: over twice the limit; 1/8 of it under
    assert np.array_equal(np.asarray(load_rgb(jpeg.getvalue(), min_shorter=12)), expected)
    for data, min_shorter in ((jpeg.getvalue(), None), (jpeg.getvalue(), 40), (png.getvalue(), 12)):
        with pytest.raises(UnreadableImage, match="too large to decode safely"):
            load_rgb(data, min_shorter=min_shorter)


def test_hidden_files_and_folders_are_not_images(tmp_path):
    for rel in ("a/x.png", "a/sub/y.png", "a/.ipynb_checkpoints/x-checkpoint.png", "a/._x.png", "a/.DS_Store"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"")
    assert [p.relative_to(tmp_path).as_posix() for p in visible_files(tmp_path / "a")] == ["a/sub/y.png", "a/x.png"]


def test_linked_folders_are_followed_but_not_up_or_round(tmp_path):
    """A class assembled from links keeps its images; a link up, or round through another folder, is not followed."""
    for rel in ("a/x.png", "elsewhere/more/y.png", "elsewhere/more/z.png"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"")
    (tmp_path / "a" / "more").symlink_to(tmp_path / "elsewhere" / "more")
    (tmp_path / "a" / "loop").symlink_to(tmp_path / "a")
    (tmp_path / "a" / "up").symlink_to(tmp_path)  # a folder above: it would take in elsewhere/ and a/ again
    (tmp_path / "elsewhere" / "more" / "back").symlink_to(tmp_path / "a")  # a loop through another folder
    assert [p.relative_to(tmp_path).as_posix() for p in visible_files(tmp_path / "a")] == [
        "a/more/y.png", "a/more/z.png", "a/x.png"]


def test_strips_far_longer_than_wide_are_refused_before_decoding(tmp_path):
    """A 1×1500 strip is 86 bytes but ~300 MB once its shorter side is scaled to the model's input."""
    Image.new("RGB", (100, 1)).save(tmp_path / "ok.png")  # 100:1 is the most taken
    assert load_rgb(tmp_path / "ok.png").size == (100, 1)
    Image.new("L", (2, 201)).save(tmp_path / "strip.png")  # 100.5:1
    with pytest.raises(UnreadableImage, match=r"strip\.png: 2×201 pixels, over 100 times longer than it is wide or "
                                              r"tall \(100\.5:1\).* Crop or tile it"):
        load_rgb(tmp_path / "strip.png")


def test_in_order_runs_ahead_boundedly_and_raises_in_order():
    import threading

    started, lock = [], threading.Lock()

    def work(i):
        with lock:
            started.append(i)
        if i == 30:
            raise MemoryError("item 30")
        return i * i

    results = in_order(work, list(range(40)), threads=2)
    for i in range(30):
        assert next(results) == i * i
        assert len(started) <= i + 1 + 4 * 2  # never more than 4 × threads ahead of the consumer
    with pytest.raises(MemoryError, match="item 30"):
        next(results)
    assert list(in_order(work, [3, 1, 2], threads=4)) == [9, 1, 4]  # fewer items than the window
    assert list(in_order(repr, [None, 1, None, 2], threads=2)) == ["None", "1", "None", "2"]  # any item


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="CPU affinity is Linux's (os.sched_setaffinity)")
def test_threads_and_workers_follow_the_cores_this_process_may_use():
    """A container or `taskset` may pin a process to fewer cores than the machine has."""
    code = ("import os; os.sched_setaffinity(0, {min(os.sched_getaffinity(0))}); "
            "from edge_tl.finetune.data import decode_threads; from edge_tl.finetune.train import auto_workers; "
            "from edge_tl.runtime.images import cpu_cores; print(cpu_cores(), decode_threads(), auto_workers())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["1", "1", "1"]


def _photo_jpeg(path, size, exif=None):
    """A real photo (scikit-image's coffee) at a camera's size, with sensor-like noise, as a JPEG."""
    import skimage.data

    big = np.asarray(Image.fromarray(skimage.data.coffee()).resize(size, Image.Resampling.LANCZOS), np.int16)
    noisy = big + np.random.default_rng(0).normal(0, 5, big.shape[:2] + (1,)).astype(np.int16)
    Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)).save(path, quality=90, **({"exif": exif} if exif else {}))
    return path


@pytest.mark.parametrize("size, scale", [((2100, 1500), 2), ((4100, 2100), 4), ((1536, 1024), 2), ((1534, 1022), 1),
                                         ((4101, 2101), 1), ((4104, 2102), 2)])
def test_a_large_jpeg_is_decoded_at_a_dct_scale_to_nearly_the_full_decodes_pixels(tmp_path, size, scale):
    from edge_tl.finetune.data import decode_resized
    from edge_tl.runtime.spec import PreprocessSpec

    spec = PreprocessSpec((224, 224))  # resized to 256: a JPEG may be decoded down to a shorter side of 512
    path = _photo_jpeg(tmp_path / "photo.jpg", size)
    # the manifest's decode step, followed without edge-tl: s the largest of 8, 4, 2 dividing both sides with
    # shorter / s >= 512 (1022 px: under the threshold; 4101 x 2101: no such s; 4104 x 2102: 2 divides, 4 not)
    s = max(s for s in (1, 2, 4, 8) if size[0] % s == size[1] % s == 0 and min(size) // s >= spec.jpeg_min_shorter)
    assert s == scale and spec.jpeg_min_shorter == 512 and "shorter side / s >= 512" in spec.steps()["decode"]
    reduced = spec.load(path)
    assert reduced.size == (size[0] // s, size[1] // s)
    full = load_rgb(path)
    assert full.size == size
    # libjpeg's scaled IDCT ≈ the mean of each s × s block of the full decode; after the resize and
    # crop the model sees pixels within a few grey levels of the full decode's
    assert np.abs(np.asarray(reduced, np.int16) - np.asarray(full.reduce(s))).mean() < (0.5 if s > 1 else 1e-9)
    diff = np.abs(spec.to_pixels(reduced).astype(np.int16) - spec.to_pixels(full))
    assert diff.mean() < 1 and diff.max() <= 8, (diff.mean(), diff.max())
    # training's cache and the runtime decode alike: the model sees at deployment what it trained on
    assert np.array_equal(spec.to_pixels(Image.fromarray(decode_resized(spec, path))), spec.to_pixels(reduced))
    # no reducing gap (runs and bundles made before it existed): full size; other formats: always full size
    assert PreprocessSpec((224, 224), jpeg_reducing_gap=None).load(path).size == size
    Image.open(path).save(tmp_path / "photo.png")
    assert spec.load(tmp_path / "photo.png").size == size


def test_a_reduced_jpeg_is_still_turned_upright():
    from edge_tl.runtime.spec import PreprocessSpec

    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° CW to display: the landscape file shows as portrait
    with TemporaryDirectory() as tmp:
        path = _photo_jpeg(Path(tmp) / "turned.jpg", (2100, 1500), exif)
        img = PreprocessSpec((224, 224)).load(path)
        assert img.size == (750, 1050)
        upright = load_rgb(path).resize(img.size, Image.Resampling.BOX)
        assert np.abs(np.asarray(img, np.int16) - np.asarray(upright)).mean() < 3


def test_the_reducing_gap_is_recorded_and_old_records_decode_at_full_size():
    from edge_tl.runtime.spec import PreprocessSpec

    spec = PreprocessSpec((224, 224))
    assert spec.jpeg_reducing_gap == 2.0 and PreprocessSpec.from_dict(spec.to_dict()) == spec
    old = {k: v for k, v in spec.to_dict().items() if k != "jpeg_reducing_gap"}  # a manifest from before
    assert PreprocessSpec.from_dict(old).jpeg_min_shorter is None
    assert "libjpeg" not in PreprocessSpec.from_dict(old).steps()["decode"]
    for bad in (0.5, float("nan"), float("inf"), "fast"):
        with pytest.raises(ValueError, match="jpeg_reducing_gap"):
            PreprocessSpec.from_dict({**spec.to_dict(), "jpeg_reducing_gap": bad})


def test_photos_to_convert_first_are_listed_with_the_fix_not_passed_over(tmp_path):
    """check and predict FOLDER read image_files: an iPhone's HEIC or a camera's RAW is named, with how to convert it."""
    from edge_tl.runtime.images import image_files

    (tmp_path / "IMG_1.HEIC").write_bytes(b"\0\0\0\x18ftypheic" + bytes(64))
    (tmp_path / "DSC_2.NEF").write_bytes(b"II*\0" + bytes(64))
    (tmp_path / "notes.txt").write_text("not an image")
    assert [f.name for f in image_files(tmp_path)] == ["DSC_2.NEF", "IMG_1.HEIC"]
    for name, kind in (("IMG_1.HEIC", r"a HEIC/HEIF photo \(iPhones' default format\)"), ("DSC_2.NEF", "a camera RAW file")):
        with pytest.raises(UnreadableImage, match=f"{name}: {kind}, which this Pillow .* convert it to JPEG or PNG$"):
            load_rgb(tmp_path / name)
    (tmp_path / "IMG_1.jpg").write_bytes((tmp_path / "IMG_1.HEIC").read_bytes())  # renamed, or sent as bytes:
    for source, name in ((tmp_path / "IMG_1.jpg", "IMG_1.jpg"), ((tmp_path / "IMG_1.HEIC").read_bytes(), "<image bytes>")):
        with pytest.raises(UnreadableImage, match=f"{name}: a HEIC/HEIF photo .* convert it to JPEG or PNG$"):
            load_rgb(source)  # still named by its format
