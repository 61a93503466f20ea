"""Runtime: torch-free boundary, preprocessing parity, Predictor, check, bench, threads, CLI errors."""

from __future__ import annotations

import io
import math
import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper
from PIL import Image, ImageOps

import edge_tl
from edge_tl.errors import UserError
from edge_tl.runtime import Bundle, Predictor
from edge_tl.runtime.bench import bench_bundle, interleaved_blocks, paired_ratio
from edge_tl.runtime.check import chance_note, check_bundle, golden_tolerance, write_junit

ROOT = Path(edge_tl.__file__).resolve().parent.parent


def _images(elpv_small: Path) -> list[Path]:
    return sorted((elpv_small / "test").rglob("*.png"))


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edge_tl", *args], capture_output=True, text=True, timeout=300)


def test_runtime_runs_with_only_numpy_pillow_onnxruntime(cpu_bundle, elpv_small, tmp_path):
    """A device app's environment: only numpy, Pillow and onnxruntime importable (no torch, timm, onnx, tqdm)."""
    import numpy
    import onnxruntime
    import PIL

    site = tmp_path / "site"
    (site / "edge_tl").mkdir(parents=True)
    for mod in (numpy, PIL, onnxruntime):
        pkg = Path(mod.__file__).parent
        (site / pkg.name).symlink_to(pkg)
        libs = pkg.parent / f"{'pillow' if mod is PIL else pkg.name}.libs"
        if libs.exists():
            (site / libs.name).symlink_to(libs)
    for f in ("__init__.py", "errors.py", "fileio.py"):
        (site / "edge_tl" / f).symlink_to(ROOT / "edge_tl" / f)
    (site / "edge_tl" / "runtime").symlink_to(ROOT / "runtime")
    code = ("import sys; from edge_tl.runtime import Predictor\n"
            f"p = Predictor.from_bundle({str(cpu_bundle)!r}, device='cpu')\n"
            f"print(p.predict({str(_images(elpv_small)[0])!r}).label)\n"
            "bad = [m for m in sys.modules if m.split('.')[0] in ('torch', 'timm', 'torchvision', 'onnx', 'tqdm')]\n"
            "assert not bad, bad\n")
    env = {"PYTHONPATH": str(site), "PATH": os.environ.get("PATH", "")}
    res = subprocess.run([sys.executable, "-S", "-c", code], capture_output=True, text=True, env=env, timeout=120,
                         cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() in Bundle.load(cpu_bundle).classes


def test_preprocessing_equals_timm_eval_transform(elpv_small):
    """Runtime numpy/Pillow preprocessing vs timm's eval transform on real images (square ELPV, non-square photo)."""
    import skimage.data
    import torch
    from timm.data import create_transform

    from edge_tl.runtime import PreprocessSpec, load_rgb

    photo = Image.fromarray(skimage.data.chelsea())  # 451x300, RGB
    for spec in (PreprocessSpec((96, 96), 0.875, "bicubic"), PreprocessSpec((224, 224), 1.0, "bilinear",
                                                                           (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))):
        tf = create_transform(input_size=(3, *spec.input_size), is_training=False, interpolation=spec.interpolation,
                              mean=spec.mean, std=spec.std, crop_pct=spec.crop_pct)
        for img in [load_rgb(p) for p in _images(elpv_small)[:6]] + [photo]:
            ref = tf(img).numpy()
            got = spec.normalize(spec.to_pixels(img))[0]
            assert got.shape == ref.shape
            assert np.abs(got - ref).max() < 1e-5
        for path in _images(elpv_small)[:6]:  # grayscale fast path (one channel resized) == the RGB path
            gray = load_rgb(path, keep_gray=True)
            assert gray.mode == "L" and np.array_equal(spec.to_pixels(gray), spec.to_pixels(load_rgb(path)))
    assert torch.is_tensor(tf(photo))


def test_predict_batch_and_infer_on_real_images(cpu_bundle, elpv_small):
    paths = _images(elpv_small)[:8]
    with Predictor.from_bundle(cpu_bundle, backend="onnxruntime", precision="fp32", device="cpu") as p:
        assert p.artifact["name"] == "fp32" and "CPUExecutionProvider" in p.describe()
        single = [p.predict(x, topk=2) for x in paths]
        batch = p.predict_batch(paths, topk=2)
        assert [s.label for s in single] == [b.label for b in batch]
        pixels = np.stack([p.preprocess(x) for x in paths])
        logits = p.infer(pixels)
        assert logits.shape == (8, 4) and [p.classes[i] for i in logits.argmax(1)] == [b.label for b in batch]
        np.testing.assert_allclose(p.infer(pixels.transpose(0, 3, 1, 2).astype(np.float32)), logits, atol=1e-4)
        pil = Image.open(paths[0])
        assert p.predict(pil).label == p.predict(np.asarray(pil.convert("RGB"))).label == single[0].label
        assert abs(sum(s for _, s in p.predict(paths[0], topk=4).topk) - 1) < 1e-5
        _, golden = Bundle.load(cpu_bundle).golden()
        for bad, fix in ((np.zeros((8, 8, 4), np.uint8), r"OpenCV's BGRA: pass a\[\.\.\., :3\] with channel_order='BGR'"),
                         (np.zeros((8, 8, 3), np.float64), r"floats: pass \(a \* 255\)"),
                         (np.zeros((8, 8), np.float32), r"floats: pass \(a \* 255\)"),
                         (np.zeros((8, 8, 3), np.uint16), "16-bit: pass"), (np.zeros((8, 8), np.uint16), "16-bit: pass"),
                         (np.zeros((3, 8, 9), np.uint8), "channels first"), (np.zeros((2, 8, 8, 3), np.uint8), "a batch"),
                         (np.zeros((8, 8, 5), np.uint8), "expected uint8"),
                         (np.zeros((8, 8), bool), r"a mask: pass a\.astype\(np\.uint8\) \* 255"),
                         (np.zeros((8, 8, 3), np.int64), r"integers: pass a\.astype\(np\.uint8\) for values 0–255"),
                         (np.zeros((2, 300, 3), np.uint8), r"image array of shape \(2, 300, 3\): 300×2 pixels, over 100 "
                                                           r"times longer than it is wide or tall \(150\.0:1\)")):
            with pytest.raises(UserError, match=fix):
                p.predict(bad)
        gray = np.asarray(Image.open(paths[2]))  # a mono camera's frame: H×W or H×W×1, as its file gives
        assert gray.ndim == 2 and p.predict(gray) == p.predict(gray[..., None]) == p.predict(paths[2])
        with pytest.raises(UserError, match=r"not one array of shape \(300, 300, 3\): use predict for one image"):
            p.predict_batch(np.asarray(Image.open(paths[1]).convert("RGB")))
        with pytest.raises(UserError, match="not one PosixPath: use predict"):
            p.predict_batch(paths[0])
        with pytest.raises(UserError, match=r"for N grayscale frames stacked N×H×W, predict_batch\(list\(a\)\)"):
            p.predict_batch(np.stack([gray, gray]))
        assert p.predict_batch(list(np.stack([gray, gray])))[1] == p.predict(gray)
        with pytest.raises(UserError, match=r"PIL image: 0×5 pixels, no image"):
            p.predict(Image.new("L", (0, 5)))
        frames = np.stack([np.asarray(Image.open(x).convert("RGB")) for x in paths[:2]])  # N×H×W×3: N images
        assert [b.label for b in p.predict_batch(frames)] == [b.label for b in batch[:2]]
        with pytest.raises(UserError, match="channel_order 'BGR' with a PIL image: it is RGB already"):
            p.predict(Image.open(paths[1]).convert("RGB"), channel_order="BGR")
        rgb = np.asarray(Image.open(paths[1]).convert("RGB")).copy()
        rgb[..., 0] //= 3  # channels that differ, so their order matters
        bgr = np.ascontiguousarray(rgb[..., ::-1])  # what OpenCV hands an app
        np.testing.assert_array_equal(p.preprocess(bgr, channel_order="BGR"), p.preprocess(rgb))
        assert p.predict(bgr, channel_order="BGR").topk == p.predict(rgb).topk != p.predict(bgr).topk
        with pytest.raises(UserError, match="channel_order 'bgr'"):
            p.predict(bgr, channel_order="bgr")
        p.warmup((1, 3))
        with pytest.raises(UserError, match="each must be at least 1"):
            p.warmup((0,))
        with pytest.raises(UserError, match="it has no pixels"):
            p.predict(np.zeros((0, 5, 3), np.uint8))
        with pytest.raises(UserError, match="topk=0: ask for at least one class"):
            p.predict(paths[0], topk=0)
        assert [b.label for b in p.predict_batch(x for x in paths)] == [b.label for b in batch]  # any iterable
        for bad in (np.zeros((1, 50, 50, 3), np.uint8), np.zeros((1, 3, 50, 50), np.float32),
                    np.zeros((1, 3, 96, 96), np.int64)):
            with pytest.raises(UserError, match="expected"):
                p.infer(bad)
        assert golden.shape[1] == 4
    with pytest.raises(UserError, match="runner is closed; load the bundle again"):
        p.predict(paths[0])
    assert p.describe().endswith("(CPUExecutionProvider, all threads, closed)")
    with Predictor.from_bundle(cpu_bundle, device="cpu") as auto:
        assert auto.artifact["name"] == "int8-cpu"  # fastest accepted for ONNX Runtime on CPU
    with Predictor.from_bundle(cpu_bundle, precision="INT8", device="cpu") as upper:
        assert upper.artifact["name"] == "int8-cpu" and not upper.mismatch


def test_pil_image_preprocessed_like_its_file(cpu_bundle, tmp_path):
    """Image.open(path) must give the pixels the path gives: EXIF turn, alpha on white, 16-bit scaling."""
    rng = np.random.default_rng(0)
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(rng.integers(0, 256, (60, 90, 3), np.uint8)).save(tmp_path / "turned.jpg", exif=exif)
    Image.fromarray(rng.integers(0, 256, (50, 70, 4), np.uint8), "RGBA").save(tmp_path / "alpha.png")
    Image.fromarray(rng.integers(0, 65536, (40, 40), np.uint16)).save(tmp_path / "deep.png")
    with Predictor.from_bundle(cpu_bundle, backend="onnxruntime", precision="fp32", device="cpu") as p:
        for name in ("turned.jpg", "alpha.png", "deep.png"):
            path = tmp_path / name
            expected = p.preprocess(path)
            data = path.read_bytes()
            for same in (str(path), data, bytearray(data), memoryview(data), io.BytesIO(data)):
                np.testing.assert_array_equal(p.preprocess(same), expected, err_msg=f"{name} {type(same).__name__}")
            with open(path, "rb") as f:
                np.testing.assert_array_equal(p.preprocess(f), expected)
            with Image.open(path) as img:
                np.testing.assert_array_equal(p.preprocess(img), expected, err_msg=name)


def test_a_cameras_jpeg_gives_the_pixels_training_saw_from_every_input_form(cpu_bundle, tmp_path):
    """Path, bytes, file object and a not yet loaded Image.open() all take the reduced decode training's
    scan took; a decoded image (a loaded PIL image, an array) is taken at full size, close to it."""
    import skimage.data

    from edge_tl.finetune.data import decode_resized

    path = tmp_path / "camera.jpg"
    Image.fromarray(skimage.data.chelsea()).resize((1800, 1200), Image.Resampling.LANCZOS).save(path, quality=90)
    with Predictor.from_bundle(cpu_bundle, backend="onnxruntime", precision="fp32", device="cpu") as p:
        assert p.spec.jpeg_reducing_gap == 2.0 and p.spec.jpeg_min_shorter == 218  # 96-px model: resized to 109
        trained = p.spec.to_pixels(Image.fromarray(decode_resized(p.spec, path)))
        data = path.read_bytes()
        with open(path, "rb") as f, Image.open(path) as lazy:
            for same in (path, str(path), data, io.BytesIO(data), f, lazy):
                np.testing.assert_array_equal(p.preprocess(same), trained, err_msg=type(same).__name__)
            assert lazy.size == (450, 300)  # 1/4 (1/8 would be under 218): in place, as Pillow's thumbnail() does
        with Image.open(path) as img:
            img.load()
            decoded = [img, np.asarray(img)]
            for other in decoded:
                diff = np.abs(p.preprocess(other).astype(np.int16) - trained)
                assert 0 < diff.mean() < 1, diff.mean()


def test_concurrent_predicts_agree_with_serial(cpu_bundle, elpv_small):
    paths = _images(elpv_small)
    with Predictor.from_bundle(cpu_bundle, precision="fp32", device="cpu") as p:
        serial = [p.predict(x).score for x in paths]
        results: dict[int, list[float]] = {}

        def work(k: int) -> None:
            results[k] = [p.predict(x).score for x in paths]

        threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert all(np.allclose(results[k], serial, atol=1e-5) for k in range(4))


def test_check_on_real_images_runs_every_artifact(cpu_bundle, elpv_small, tmp_path):
    report = check_bundle(cpu_bundle, elpv_small / "test", max_drop=100, min_agreement=0, log=lambda s: None)
    assert set(report["artifacts"]) == {"fp32", "fp16", "int8-cpu"} and report["data"].endswith("(24 images)")
    fp32 = report["artifacts"]["fp32"]
    assert fp32["agreement"] == 1.0 and fp32["max_abs_diff"] < 1e-3 and fp32["drop"] == 0.0
    assert report["artifacts"]["fp16"]["max_abs_diff"] < 0.05
    assert report["preprocess"] == {"images": 3, "max_abs_diff": 0, "jpeg_max_abs_diff": 0, "tolerance": 2,
                                    "passed": True, "reason": "ok"}
    junit = write_junit(report, tmp_path / "check.xml").read_text()
    assert junit.count("<testcase") == 4 and 'name="preprocess"' in junit and 'failures="0"' in junit


def test_manifest_steps_alone_reproduce_the_preprocessing_test_vectors(cpu_bundle):
    """A port that follows the manifest's preprocess.steps (numpy + Pillow here, no edge-tl code) gets
    golden.npz's source_pixels exactly; the sources put the crop on half pixels, so rounding matters."""
    manifest = json.loads((cpu_bundle / "manifest.json").read_text())
    steps, interpolation = manifest["preprocess"]["steps"], manifest["preprocess"]["interpolation"]
    to, h, w = steps["resize"]["to"], steps["crop"]["height"], steps["crop"]["width"]
    assert manifest["input"]["normalized_in_graph"] and manifest["input"]["value_range"] == [0, 255]
    with np.load(cpu_bundle / "golden.npz") as z:
        expected = z["source_pixels"]
        sources = [z[f"source_{i}"] for i in range(len(expected))]
    halves = 0
    for src, want in zip(sources, expected):
        img = Image.fromarray(src)
        short, long = sorted(img.size)
        if short != to:  # "skip_when"
            longer = to * long // short  # "longer_to": floor(to * longer / shorter)
            img = img.resize((to, longer) if img.width <= img.height else (longer, to),
                             getattr(Image.Resampling, interpolation.upper()))
        top, left = round((img.height - h) / 2), round((img.width - w) / 2)  # Python's round: half to even
        halves += ((img.height - h) % 2) + ((img.width - w) % 2)
        assert np.array_equal(np.asarray(img)[top:top + h, left:left + w], want)
    assert len(sources) == 3 and halves >= 2 and {s.shape[0] > s.shape[1] for s in sources} == {True, False}
    with np.load(cpu_bundle / "golden.npz") as z:  # the decode step: a camera-sized JPEG, followed with plain Pillow
        jpeg, want = io.BytesIO(z["jpeg_source"].tobytes()), z["jpeg_pixels"]
    least = math.ceil(manifest["preprocess"]["jpeg_reducing_gap"] * to)
    assert f"shorter side / s >= {least}" in steps["decode"]
    with Image.open(jpeg) as img:
        (w0, h0), s = img.size, max(s for s in (1, 2, 4, 8) if img.width % s == img.height % s == 0
                                    and min(img.size) // s >= least)
        img.draft(img.mode, (w0 // s, h0 // s))
        img = ImageOps.exif_transpose(img)  # "before the EXIF turn"
    assert s == 2 and img.size == (h0 // 2, w0 // 2) and w0 > h0  # decoded at 1/2, then turned to portrait
    img = img.resize((to, to * img.height // img.width), getattr(Image.Resampling, interpolation.upper()))
    top, left = round((img.height - h) / 2), round((img.width - w) / 2)
    assert np.array_equal(np.asarray(img)[top:top + h, left:left + w], want)
    from edge_tl.runtime.spec import PreprocessSpec

    wide = PreprocessSpec((64, 64), crop_pct=1.15)  # "outside": a crop past the 55 px resize is black
    assert "0, black" in wide.steps()["crop"]["outside"]
    pixels = wide.to_pixels(Image.new("RGB", (100, 100), "white"))
    top = round((wide.resize_size - 64) / 2)  # -4 (half to even)
    assert top == -4 and pixels[:4].max() == pixels[59:].max() == pixels[:, :4].max() == 0
    assert pixels[4:59, 4:59].min() == 255


def test_check_fails_when_this_machines_resize_differs_from_the_exports(cpu_bundle, monkeypatch, tmp_path):
    from edge_tl.runtime import spec
    from edge_tl.runtime.check import failures

    monkeypatch.setitem(spec._PIL_INTERPOLATION, "bicubic", Image.Resampling.NEAREST)  # as another resize would
    report = check_bundle(cpu_bundle, max_drop=100, min_agreement=0, log=lambda s: None)
    assert all(r["passed"] for r in report["artifacts"].values())  # golden pixels need no resize
    assert not report["passed"] and report["preprocess"]["max_abs_diff"] > 2
    assert any(line.startswith("preprocess: resize/crop here differs") for line in failures(report))
    assert 'name="preprocess"><failure' in write_junit(report, tmp_path / "check.xml").read_text()


def test_check_fails_when_this_machines_jpeg_decode_differs_from_the_exports(cpu_bundle, monkeypatch):
    from edge_tl.runtime import images

    report = check_bundle(cpu_bundle, max_drop=100, min_agreement=0, log=lambda s: None)
    assert report["preprocess"]["jpeg_max_abs_diff"] == 0 and report["passed"]
    monkeypatch.setattr(images, "draft_jpeg", lambda img, least: img.draft(img.mode, (img.width // 8, img.height // 8)))
    report = check_bundle(cpu_bundle, max_drop=100, min_agreement=0, log=lambda s: None)  # a decoder at another scale
    assert not report["passed"] and report["preprocess"]["max_abs_diff"] == 0
    assert report["preprocess"]["jpeg_max_abs_diff"] > 2 and "the camera-sized JPEG decodes here" in report["preprocess"]["reason"]


def test_check_passes_honest_bundle_and_fails_damaged_int8(pattern_bundle, tmp_path):
    bundle_dir, test_dir = pattern_bundle
    report = check_bundle(bundle_dir, test_dir, log=lambda s: None)
    assert report["passed"], report
    assert report["chance"] == 1 / 3 and report["at_chance"] == []
    damaged = tmp_path / "damaged"
    shutil.copytree(bundle_dir, damaged)
    path = damaged / "model.int8-cpu.onnx"
    model = onnx.load(str(path))
    for t in model.graph.initializer:  # scramble every int8 weight tensor
        a = numpy_helper.to_array(t)
        if a.dtype == np.int8 and a.size > 64:
            t.CopyFrom(numpy_helper.from_array(np.random.default_rng(0).permutation(a.ravel()).reshape(a.shape), t.name))
    onnx.save(model, str(path))
    bundle = Bundle.load(damaged, verify=False)
    bundle.add_file("model.int8-cpu.onnx")  # a re-signed, wrong model: only the check can catch it
    bundle.save()
    baseline = tmp_path / "baseline.json"
    baseline.write_text(json.dumps(report))
    res = _cli("check", str(damaged), "--data", str(test_dir), "--baseline", str(baseline), "--json",
               "--junit", str(tmp_path / "bad.xml"))
    assert res.returncode == 1 and res.stdout.startswith("{"), res.stderr
    out = json.loads(res.stdout)
    assert not out["passed"] and out["artifacts"]["fp32"]["passed"]
    bad = out["artifacts"]["int8-cpu"]
    assert not bad["passed"] and "agreement" in bad["reason"] and "below the reference" in bad["reason"]
    assert out["at_chance"] == ["int8-cpu"], bad["balanced_accuracy"]  # said too, not only a drop
    assert chance_note(out).endswith("while fp32 is above it: int8-cpu is broken; re-export the bundle")
    assert bad["reference"].startswith("baseline") and bad["drop"] > 1
    assert 'failures="1"' in (tmp_path / "bad.xml").read_text()
    # the same INT8, had export found it short of --max-drop: measured and shown, not gated
    int8 = next(a for a in bundle.manifest["artifacts"] if a["name"] == "int8-cpu")
    int8.update(accepted=False, rejected="it loses 5.56 pts on 18 validation images")
    bundle.save()
    res = _cli("check", str(damaged), "--data", str(test_dir), "--json", "--junit", str(tmp_path / "not_gated.xml"))
    out = json.loads(res.stdout)
    assert res.returncode == 0 and out["passed"] and not out["artifacts"]["int8-cpu"]["passed"], res.stderr
    assert out["artifacts"]["int8-cpu"]["gated"] is False and "5.56 pts" in out["artifacts"]["int8-cpu"]["not_accepted"]
    junit = (tmp_path / "not_gated.xml").read_text()
    assert 'failures="0" skipped="1"' in junit and "not accepted at export, not gated: it loses 5.56 pts" in junit
    # ... unless a passing release gated it: then its regression against that baseline fails the check
    res = _cli("check", str(damaged), "--data", str(test_dir), "--baseline", str(baseline), "--json")
    assert res.returncode == 1 and json.loads(res.stdout)["artifacts"]["int8-cpu"]["gated"], res.stderr
    not_gated = tmp_path / "not_gated.json"  # a baseline that did not gate it: a bundle without it is no regression
    not_gated.write_text(json.dumps(out))
    slim = tmp_path / "fp32_only"
    assert _cli("slim", str(damaged), "--keep", "fp32", "--out", str(slim)).returncode == 0
    fp32_only = Bundle.load(slim)
    del fp32_only.manifest["slimmed"]  # as an fp32-only export of the next release
    fp32_only.save()
    res = _cli("check", str(slim), "--data", str(test_dir), "--baseline", str(not_gated))
    assert res.returncode == 0 and "not gated there (not accepted at export), not in this bundle" in res.stderr + res.stdout
    with pytest.warns(UserWarning, match="int8-cpu was not accepted at export \\(it loses 5.56 pts"):
        Predictor.from_bundle(damaged, precision="int8", device="cpu").close()


def test_golden_tolerance_allows_sampling_noise_of_int8_but_not_a_broken_deployment():
    # Lite2 INT8 on ELPV (session 9): 96.3 % agreement with FP32 on 296 validation images; 30 of 32
    # golden images agreed (0.938) and one image more was right (-3.1 pts): a sound export, failed before.
    floor, limit = golden_tolerance({"fp32_agreement": 0.9628}, 32, 296, 0.95, 1.0)
    assert floor == 0.85 and limit > 100 / 32  # sampling reaches 5 flips (0.844): capped at 0.95 - 0.1
    # a better export, p = 0.99 (3 of 296 flipped, the demo's): 2 flips of 32 are sampling (4 %), 3 are not
    # (0.1 %); a normal approximation had failed 2 (floor 0.940)
    floor, limit = golden_tolerance({"fp32_agreement": 0.99}, 32, 296, 0.95, 1.0)
    assert 29 / 32 < floor <= 30 / 32 and 100 / 32 < limit < 300 / 32
    rng = np.random.default_rng(0)
    for p, population in ((0.99, 296), (0.97, 296), (0.96, 2000), (0.995, 5000)):  # a sound export fails rarely
        floor, limit = golden_tolerance({"fp32_agreement": p}, 32, population, 0.95, 1.0)
        flips = rng.hypergeometric(round((1 - p) * population), population - round((1 - p) * population), 32, 20000)
        net_losses = 2 * rng.binomial(flips, 0.5) - flips
        assert ((1 - flips / 32 < floor) | (100 * net_losses / 32 > limit)).mean() < 0.01, p
    floor, limit = golden_tolerance({"fp32_agreement": 0.995}, 24, 1000, 0.95, 1.0)  # 100 / 24 pts per image
    allowed = round(limit * 24 / 100)
    assert allowed >= 1 and round(100 * allowed / 24, 3) <= limit  # the drop as check rounds it passes
    broken = rng.binomial(32, 0.25, 20000)  # one that disagrees on a quarter of the images fails nearly always
    assert (1 - broken / 32 < golden_tolerance({"fp32_agreement": 0.99}, 32, 296, 0.95, 1.0)[0]).mean() > 0.99
    assert golden_tolerance({"fp32_agreement": 0.9628}, 3000, 30000, 0.95, 1.0) == pytest.approx((0.95, 1.0), abs=0.06)
    assert golden_tolerance({"fp32_agreement": 7 / 8}, 8, 8, 0.95, 1.0) == (0.875, 1.0)  # golden = validation: no noise
    # golden = 6 validation images, one flipped at export (accepted there): check wants what export measured,
    # not 0.95 - 0.1 = 0.85, which the same images cannot reach
    assert golden_tolerance({"fp32_agreement": 5 / 6}, 6, 6, 0.95, 1.0) == (5 / 6, 1.0)
    assert golden_tolerance({"fp32_agreement": 0.5}, 32, 296, 0.95, 1.0)[0] == pytest.approx(0.85)  # floor capped
    assert golden_tolerance({"fp32_agreement": 0.9, "accepted": False}, 32, 296, 0.95, 1.0) == (0.95, 1.0)
    assert golden_tolerance({"fp32_agreement": 1.0}, 32, 296, 0.95, 1.0) == (0.95, 1.0)  # exact INT8: gate unchanged
    assert golden_tolerance({"precision": "fp32"}, 32, 296, 0.95, 1.0) == (0.95, 1.0)  # nothing measured: as given
    with pytest.raises(UserError, match="fp32_agreement 1.5"):
        golden_tolerance({"name": "int8", "fp32_agreement": 1.5}, 32, 296, 0.95, 1.0)


def test_check_baseline_must_match_the_bundle_and_data(pattern_bundle, tmp_path):
    """A baseline that compares nothing, other images or a vanished artifact must not pass silently."""
    bundle_dir, test_dir = pattern_bundle
    report = check_bundle(bundle_dir, test_dir, log=lambda s: None)

    def run(base, *extra):
        path = tmp_path / "base.json"
        path.write_text(base if isinstance(base, str) else json.dumps(base))
        return _cli("check", str(bundle_dir), "--data", str(test_dir), "--baseline", str(path), *extra)

    gone = {**report, "artifacts": {**report["artifacts"], "int8": report["artifacts"]["fp32"]}}
    res = run(gone, "--json")
    assert res.returncode == 1 and json.loads(res.stdout)["missing"] == ["int8"], res.stderr
    res = run(gone)
    assert res.returncode == 1 and res.stdout.strip().endswith("FAILED: int8: in the baseline but not in the bundle")
    other_names = {**report, "artifacts": {"int8": report["artifacts"]["fp32"]}}
    other_data = {**report, "class_counts": [1] * len(report["class_counts"])}
    other_images = {**report, "images_sha256": "0" * 64}  # the same class counts, other files
    failed = {**report, "passed": False, "artifacts": {**report["artifacts"], "fp32": {
        **report["artifacts"]["fp32"], "passed": False}}}
    for base, match in ((other_names, "none of its artifacts"), (other_data, "same --data"),
                        (other_images, "other images than this check's"), (failed, "a check that FAILED (fp32)"),
                        ('{"artifacts": {"fp32": {"accuracy": 0.5}}}', "nothing says which images"),
                        ('{"artifacts": []}', "not a baseline"), ('{"artifacts": {"fp32": {"accuracy": NaN}}}',
                                                                  "between 0 and 1")):
        res = run(base, "--json", "--junit", str(tmp_path / "junit.xml"))
        assert res.returncode == 2 and match in res.stderr and "Traceback" not in res.stderr, res.stderr
        # CI still gets a report that says why: JSON on stdout, an erroring JUnit case
        # (a mismatch of images shows after the run that measured them: the progress lines come first)
        assert json.loads(res.stdout) == {"passed": False, "error": res.stderr.strip().splitlines()[-1].removeprefix("error: ")}
        assert 'errors="1"' in (tmp_path / "junit.xml").read_text() and match in (tmp_path / "junit.xml").read_text()
    res = run(report, "--max-drop", "nan")
    assert res.returncode == 2 and "--max-drop nan" in res.stderr, res.stderr
    res = run({k: v for k, v in report.items() if k != "images_sha256"}, "--json")  # a baseline from before it
    assert res.returncode == 0 and "predates images_sha256" in res.stderr, res.stderr
    out = json.loads(res.stdout)
    assert out["edge_tl"] and out["manifest_sha256"] == Bundle.load(bundle_dir).manifest["manifest_sha256"]
    assert out["image_count"] == sum(out["class_counts"]) and out["unreadable"] == [] and out["baseline"].endswith("base.json")


def test_a_closed_stdout_is_neither_a_pass_nor_a_regression(pattern_bundle, tmp_path):
    """`check --json | head -1` or a reader that exits: 141, said on stderr, the JUnit report written
    first (click's own handling exited 1, check's "regression", and the report was lost)."""
    bundle_dir, test_dir = pattern_bundle
    for args, junit in ((["check", str(bundle_dir), "--json", "--junit", str(tmp_path / "j.xml")], tmp_path / "j.xml"),
                        (["predict", str(bundle_dir), str(test_dir), "--json"], None)):
        proc = subprocess.Popen([sys.executable, "-m", "edge_tl", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        proc.stdout.close()  # the reader is gone before anything is written
        err = proc.stderr.read().decode()
        assert proc.wait(timeout=300) == 141 and "stdout was closed" in err and "Traceback" not in err, err
        assert junit is None or 'failures="0"' in junit.read_text()
    junit = tmp_path / "progress.xml"  # without --json the progress lines to stdout stop the check itself
    proc = subprocess.Popen([sys.executable, "-m", "edge_tl", "check", str(bundle_dir), "--junit", str(junit)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=300) == 141 and "cut short: stdout was closed" in junit.read_text(), err


@pytest.mark.skipif(sys.platform == "win32", reason="SIGTERM is POSIX's")
def test_sigterm_ends_a_command_through_its_cleanup_with_exit_143(pattern_bundle):
    """`docker stop` / Kubernetes send SIGTERM: the command stops as on Ctrl-C (cleanup runs) and exits
    143, as a shell reports it, not killed on the spot."""
    import signal

    bundle_dir, _ = pattern_bundle
    proc = subprocess.Popen([sys.executable, "-m", "edge_tl", "bench", str(bundle_dir), "--seconds", "60"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})  # its first line as soon as it is written
    assert proc.stdout.readline()  # it is timing
    proc.send_signal(signal.SIGTERM)
    err = proc.communicate(timeout=120)[1]
    assert proc.returncode == 143 and "Traceback" not in err, err


def test_a_check_on_some_classes_only_says_which_it_did_not_check(pattern_bundle, tmp_path):
    """A partial checkout or a renamed folder would otherwise gate only the classes left, silently."""
    bundle_dir, test_dir = pattern_bundle
    first = sorted(test_dir.iterdir())[0]
    shutil.copytree(first, tmp_path / "some" / first.name)
    res = _cli("check", str(bundle_dir), "--data", str(tmp_path / "some"))
    others = sorted(Bundle.load(bundle_dir).classes)[1:]
    last = res.stdout.strip().splitlines()[-1]
    assert res.returncode == 0 and last == f"PASSED (not checked, no images: {', '.join(others)})", res.stdout
    assert f"no images of {len(others)} of the {len(others) + 1} classes" in res.stdout
    report = check_bundle(bundle_dir, test_dir, log=lambda s: None)
    assert report["classes_without_images"] == []


def test_a_baseline_that_cannot_match_the_images_is_refused_before_any_run(pattern_bundle, tmp_path, monkeypatch):
    """Measured on the golden images, or on more images than --data lists: no need to run the set first."""
    from edge_tl.runtime import check

    bundle_dir, test_dir = pattern_bundle
    on_golden, on_data = tmp_path / "golden.json", tmp_path / "data.json"
    on_golden.write_text(json.dumps(check_bundle(bundle_dir, log=lambda s: None)))
    bigger = check_bundle(bundle_dir, test_dir, log=lambda s: None)
    for r in bigger["artifacts"].values():
        del r["right_images"]  # (they would not fit a million images: refused as "not a baseline")
    on_data.write_text(json.dumps({**bigger, "image_count": 10 ** 6}))

    def ran(*args, **kwargs):
        raise AssertionError("an artifact ran")

    monkeypatch.setattr(check, "make_runner", ran)
    for base, data in ((on_golden, test_dir), (on_data, None), (on_data, test_dir)):
        with pytest.raises(UserError, match="measured on other images than this check's"):
            check_bundle(bundle_dir, data, baseline=base, log=lambda s: None)


def test_a_drop_against_the_last_release_may_be_its_paired_noise_as_at_export(pattern_bundle, tmp_path):
    """A model retrained on each change differs from the last release on images either gets right:
    a drop within that noise passes, as against FP32 at export; the same drop without the
    release's per-image results (a report from before them) still fails the exact --max-drop."""
    from edge_tl.runtime.check import _unpack_right

    bundle_dir, test_dir = pattern_bundle
    classes = sorted(d.name for d in test_dir.iterdir())
    big = tmp_path / "big"
    for d in test_dir.iterdir():
        (big / d.name).mkdir(parents=True)
        for k in range(40):
            for f in d.iterdir():
                os.link(f, big / d.name / f"{k}_{f.name}")
    for k, f in enumerate(sorted((test_dir / classes[0]).iterdir()) * 5):  # 40 images filed under the wrong class
        os.link(f, big / classes[1] / f"mislabelled_{k}_{f.name}")
    report = check_bundle(bundle_dir, big, log=lambda s: None)
    n = report["image_count"]
    assert n == 1000 and report["artifacts"]["fp32"]["accuracy"] == 0.96  # wrong on exactly the mislabelled ones
    for r in report["artifacts"].values():  # the release: right on those 40, wrong on 25 others: 65 differ, 1.5 pts
        right = _unpack_right(r["right_images"], n)
        release = np.ones(n, bool)
        release[np.flatnonzero(right)[:25]] = False
        r.update(accuracy=float(release.mean()), right_images=np.packbits(release).tobytes().hex())
    base = tmp_path / "release.json"
    base.write_text(json.dumps(report))
    again = check_bundle(bundle_dir, big, baseline=base, log=lambda s: None)["artifacts"]["fp32"]
    assert again["drop"] == pytest.approx(1.5) and again["drop_noise_pts"] == pytest.approx(np.sqrt(65) / 10, abs=1e-3)
    assert again["drop_limit"] == pytest.approx(1 + np.sqrt(65) / 10, abs=1e-3) and again["passed"]
    for r in report["artifacts"].values():
        del r["right_images"]
    base.write_text(json.dumps(report))
    before = check_bundle(bundle_dir, big, baseline=base, log=lambda s: None)["artifacts"]["fp32"]
    assert before["drop_limit"] == 1.0 and not before["passed"]


def test_a_class_lost_against_the_last_release_fails_max_class_drop_though_accuracy_passes(pattern_bundle, tmp_path):
    """The release got 40 more images of one class right (11 pts of its recall, 4 of the accuracy): --max-drop 5
    passes it, --max-class-drop 5 names the class, beyond its paired noise."""
    from edge_tl.runtime.check import _unpack_right

    bundle_dir, test_dir = pattern_bundle
    classes = sorted(d.name for d in test_dir.iterdir())
    big = tmp_path / "big"
    for d in test_dir.iterdir():
        (big / d.name).mkdir(parents=True)
        for k in range(40):
            for f in d.iterdir():
                os.link(f, big / d.name / f"{k}_{f.name}")
    for k, f in enumerate(sorted((test_dir / classes[0]).iterdir()) * 5):  # 40 images filed under the wrong class
        os.link(f, big / classes[1] / f"mislabelled_{k}_{f.name}")
    report = check_bundle(bundle_dir, big, log=lambda s: None)
    n = report["image_count"]
    for r in report["artifacts"].values():  # the release: right on every image
        r.update(accuracy=1.0, right_images=np.packbits(np.ones(n, bool)).tobytes().hex())
    assert _unpack_right(report["artifacts"]["fp32"]["right_images"], n).all()
    base = tmp_path / "release.json"
    base.write_text(json.dumps(report))
    kept = check_bundle(bundle_dir, big, max_drop=5, baseline=base, log=lambda s: None)["artifacts"]["fp32"]
    assert kept["passed"] and kept["drop"] == pytest.approx(4.0)
    lost = check_bundle(bundle_dir, big, max_drop=5, baseline=base, max_class_drop=5, log=lambda s: None)
    drops = lost["artifacts"]["fp32"]["class_recall_drops"]
    assert drops[classes[1]]["drop"] == pytest.approx(4000 / 360, abs=1e-3) and drops[classes[0]]["drop"] == 0
    assert drops[classes[1]]["limit"] == pytest.approx(5 + np.sqrt(40) / 360 * 100, abs=1e-3)
    assert not lost["passed"] and f"class {classes[1]}: recall 0.889" in lost["artifacts"]["fp32"]["reason"]


def test_check_holds_one_batch_of_a_large_test_set_not_all_of_it(pattern_bundle, tmp_path):
    """A test set of any size fits a device's memory: images are decoded batch by batch (numpy's
    allocations are traced; ONNX Runtime's are not, and are the same for any set size)."""
    bundle_dir, test_dir = pattern_bundle
    big = tmp_path / "big"
    for d in test_dir.iterdir():
        (big / d.name).mkdir(parents=True)
        for k in range(40):  # 960 images
            for f in d.iterdir():
                os.link(f, big / d.name / f"{k}_{f.name}")
    # traced in a process of its own: in this one, what earlier tests left behind moved the peak by
    # +10 MB in a full run (not in this file alone) and failed the check of the code, not of the test
    code = ("import json, sys, tracemalloc\nfrom edge_tl.runtime.check import check_bundle\nout = []\n"
            "for folder in sys.argv[2:]:\n    tracemalloc.start()\n"
            "    report = check_bundle(sys.argv[1], folder, log=lambda s: None)\n"
            "    out.append((report, tracemalloc.get_traced_memory()[1]))\n    tracemalloc.stop()\n"
            "print(json.dumps(out))\n")
    res = subprocess.run([sys.executable, "-c", code, str(bundle_dir), str(test_dir), str(big)], capture_output=True,
                         text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    (small, small_peak), (report, peak) = json.loads(res.stdout.splitlines()[-1])
    held = report["image_count"] * 64 * 64 * 3  # all the set's uint8 pixels at the bundle's 64 px
    assert report["image_count"] == 40 * small["image_count"] and held > 11e6
    # the peak is loading the models' bytes, whatever the set's size; holding the set would add `held` to it
    assert peak - small_peak < held / 4, (peak, small_peak, held)
    for name, r in report["artifacts"].items():  # the same images forty times: the same accuracy
        assert r["accuracy"] == pytest.approx(small["artifacts"][name]["accuracy"]) and r["passed"]


def test_check_and_predict_bad_input_exit_2(cpu_bundle, tmp_path):
    tampered = tmp_path / "t"
    shutil.copytree(cpu_bundle, tampered)
    (tampered / "labels.txt").write_text("x\n")
    not_a_dict = tmp_path / "l"
    shutil.copytree(cpu_bundle, not_a_dict)
    (not_a_dict / "manifest.json").write_text("[1, 2]")
    for args in (["check", str(tampered)], ["check", str(not_a_dict)], ["predict", str(cpu_bundle), str(tmp_path / "missing.png")],
                 ["check", str(tmp_path)], ["bench", str(cpu_bundle), "--batch", "0"],
                 ["predict", str(cpu_bundle), str(tampered / "labels.txt")],
                 ["check", str(cpu_bundle), "--junit", str(tmp_path)],  # a folder where a file goes
                 ["check", str(cpu_bundle), "--junit", str(tampered / "labels.txt" / "x.xml")],  # a file where a folder goes
                 ["predict", str(cpu_bundle), str(tmp_path)],  # a folder without images
                 ["bench", str(cpu_bundle), "--iters", "0"], ["predict", str(cpu_bundle), str(tmp_path), "--threads", "-1"],
                 ["check", str(cpu_bundle), "--threads", "-2"]):
        res = _cli(*args)
        assert res.returncode == 2, (args, res.stderr)
        assert res.stderr.splitlines()[-1].startswith("error: ") and "Traceback" not in res.stderr, res.stderr
    res = _cli("check", str(cpu_bundle), "--json", "--junit", str(tmp_path))  # refused before the check runs
    assert res.returncode == 2 and "is a folder" in json.loads(res.stdout)["error"], res.stdout
    stale = tmp_path / "stale.xml"
    for args in (["--max-drop", "abc"], ["--junit"]):  # refused by the option parser: the file says so, not the last run
        stale.write_text('<testsuite tests="2" failures="0"/>')
        res = _cli("check", str(cpu_bundle), "--junit", str(stale), *args)
        assert res.returncode == 2 and 'errors="1"' in stale.read_text() and "refused" in stale.read_text(), res.stderr
    for args in (["check", str(cpu_bundle), "--max-drop", "abc"], ["check", "--bogus"], ["bench", str(cpu_bundle), "-x"]):
        res = _cli(*args, "--json")  # refused by the option parser: --json still prints what the README promises
        assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
        out = json.loads(res.stdout)
        assert set(out) == ({"passed", "error"} if args[0] == "check" else {"error"}) and out.get("passed") is not True
        assert out["error"].startswith("the command line was refused: ")
    notes = tmp_path / "notes.md"  # a value of --data, not --junit's; and not a JUnit file: never overwritten
    notes.write_text("precious")
    assert _cli("check", str(cpu_bundle), "--data", "--junit", str(notes)).returncode == 2
    first, last = tmp_path / "first.xml", tmp_path / "last.xml"
    res = _cli("check", str(cpu_bundle), "--junit", str(first), "--junit", str(last), "--bogus")
    assert res.returncode == 2 and notes.read_text() == "precious" and not first.exists()
    assert "refused" in last.read_text()  # click takes the last --junit, so does the usage-error report
    res = _cli("check", str(cpu_bundle), "--junit", str(tampered / "labels.txt" / "x.xml"))
    assert res.returncode == 2 and "labels.txt is a file, not a folder" in res.stderr, res.stderr
    link = tmp_path / "link.xml"
    link.symlink_to(stale)  # written through, the link kept
    assert _cli("check", str(cpu_bundle), "--junit", str(link), "--min-agreement", "0").returncode == 0
    assert link.is_symlink() and 'name="fp32"' in stale.read_text()
    moved_run = tmp_path / "moved_run"  # the run the bundle came from, no longer where the manifest says
    shutil.copytree(cpu_bundle, moved_run)
    moved = Bundle.load(moved_run)
    moved.manifest["run"]["path"] = str(tmp_path / "gone")
    moved.save()
    for args, message in ((["bench", str(cpu_bundle), "--reference", "tf"], "only 'torch' is supported"),
                          (["bench", str(moved_run), "--reference", "torch"], "gone/best.pt not found (moved"),
                          (["predict", str(cpu_bundle), str(tampered / "labels.txt"), "--precision", "int4"],
                           "has no int4 artifact"),
                          (["predict", str(cpu_bundle), str(_images_png(tmp_path)), "--topk", "0"], "--topk 0")):
        res = _cli(*args)  # refused before any timing or loading, with a message that says why
        assert res.returncode == 2 and message in res.stderr and "fp32:" not in res.stdout + res.stderr, res.stderr


def test_help_keeps_each_docstring_sentence_whole_at_any_terminal_width():
    """--help reflows a command's docstring to the terminal: no line break of the source survives mid-sentence."""
    res = subprocess.run([sys.executable, "-m", "edge_tl", "export", "--help"], capture_output=True, text=True,
                         timeout=120, env={**os.environ, "COLUMNS": "200", "TERM": "dumb"})
    assert res.returncode == 0, res.stderr
    assert "validation split; when it loses more than --max-drop points, the layers" in res.stdout, res.stdout


def test_a_crash_exits_3_never_1_which_check_means_as_regression(monkeypatch, capsys):
    from edge_tl import cli

    def crash(**kwargs):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(cli, "app", crash)
    with pytest.raises(SystemExit) as exc:
        cli.main()
    assert exc.value.code == 3 and "ZeroDivisionError: a bug" in capsys.readouterr().err


def test_a_crashed_check_still_writes_its_junit_and_json(cpu_bundle, tmp_path, monkeypatch, capsys):
    from edge_tl import cli
    from edge_tl.runtime import check

    def crash(*args, **kwargs):
        raise ZeroDivisionError("a bug")

    junit = tmp_path / "check.xml"
    junit.write_text('<testsuite tests="2" failures="0"/>')  # a previous run's, passing
    monkeypatch.setattr(check, "check_bundle", crash)
    monkeypatch.setattr(sys, "argv", ["edge-tl", "check", str(cpu_bundle), "--json", "--junit", str(junit)])
    with pytest.raises(SystemExit) as exc:
        cli.main()
    assert exc.value.code == 3 and "edge-tl failed unexpectedly: ZeroDivisionError" in junit.read_text()
    assert json.loads(capsys.readouterr().out)["error"].startswith("edge-tl failed unexpectedly")


def _images_png(folder):
    Image.new("L", (40, 40), 128).save(folder / "gray.png")
    return folder / "gray.png"


def test_bench_json_is_consistent(cpu_bundle):
    report = bench_bundle(cpu_bundle, precisions=["fp32", "int8"], batches=(1, 4), warmup=2, iters=8, seconds=None,
                          log=lambda s: None)
    assert report["machine"]["cpu_threads"] >= 1 and report["machine"]["onnxruntime"]
    rows = report["results"]
    assert {(r["artifact"], r["batch"]) for r in rows} == {(a, b) for a in ("fp32", "int8-cpu") for b in (1, 4)}
    for r in rows:
        assert 0 < r["p50_ms"] <= r["p90_ms"] <= r["p99_ms"] and r["std_ms"] >= 0 and r["iters"] == 8
        assert abs(r["throughput"] - r["batch"] * 1000 / r["mean_ms"]) < 1e-6 * r["throughput"]
        assert r["e2e_p50_ms"] > 0
    assert report["e2e_input"] == "the golden images as 96x96 JPEGs (quality 95, in memory)"
    default = report["default_int8_vs_fp32"]  # the INT8 apps get by default, timed against fp32 on this machine
    assert default["artifact"] == "int8-cpu" and default["ratio"] > 0 and default["exported"]["cpu_int8_features"] is not None
    assert ("advice" in default) == (not default["faster"])


def test_bench_times_end_to_end_on_the_users_own_images(cpu_bundle, elpv_small, tmp_path, monkeypatch):
    """--images: decode + preprocess + infer of those files, read from disk, each timed call the next ones in
    turn; one it cannot read is left out and said, as check leaves it out."""
    from edge_tl.runtime.spec import PreprocessSpec

    read, load = [], PreprocessSpec.load
    monkeypatch.setattr(PreprocessSpec, "load", lambda self, f: read.append(f) or load(self, f))  # records each read
    images = tmp_path / "images"
    shutil.copytree(elpv_small / "test", images)
    (images / "p000" / "bad.jpg").write_bytes(b"not a jpeg")
    logs = []
    report = bench_bundle(cpu_bundle, precisions=["fp32"], batches=(1,), warmup=2, iters=5, seconds=None,
                          images=images, log=logs.append)
    files = sorted(f for f in images.rglob("*.png"))
    assert report["e2e_input"] == f"24 files of {images} (300x300 PNG), read from disk"
    assert any(line.startswith("end to end: left out ") and "bad.jpg: not a readable image" in line for line in logs)
    timed = read[len(files) + 1:]  # after the check of each file: the timed calls, batch 1, each the next file
    assert len(timed) >= 6 and timed == files[:len(timed)], timed
    (images / "p000" / "bad.jpg").rename(tmp_path / "bad.jpg")
    with pytest.raises(UserError, match="none of its images can be read"):
        bench_bundle(cpu_bundle, precisions=["fp32"], batches=(1,), iters=1, seconds=None, images=tmp_path / "bad.jpg",
                     log=lambda s: None)


def _darkened(images: list[Path], folder: Path) -> Path:
    folder.mkdir()
    for f in images:
        Image.fromarray((np.asarray(Image.open(f).convert("RGB")) * 0.5).astype(np.uint8)).save(folder / f.name)
    return folder


def _bundle_with_reference(cpu_bundle: Path, images: list[Path], out: Path) -> dict:
    """A copy of the test bundle whose reference is made from ``images`` and their mirror images (its own
    validation split is a handful of images), through the real model, by export's own function; re-signed."""
    from edge_tl.runtime.monitor import reference_record

    shutil.copytree(cpu_bundle, out)
    with Predictor.from_bundle(out, device="cpu") as p:
        cells = [Image.open(f).convert("RGB") for f in images]
        views = cells + [ImageOps.mirror(c) for c in cells] + [ImageOps.flip(c) for c in cells]
        pixels = np.stack([p.preprocess(v) for v in views])
        reference = reference_record(pixels, p.infer(pixels), p.temperature)
    bundle = Bundle.load(out, verify=False)
    bundle.manifest["reference"] = reference
    bundle.save()
    return reference


def test_field_monitor_flags_darker_images_not_those_like_its_reference(cpu_bundle, elpv_small, tmp_path):
    """Real cells through the real model: windows of images like the reference stay in range; the same
    images at half brightness are drift. Each prediction carries its preprocessed input's statistics."""
    from edge_tl.runtime.monitor import input_stats

    images = sorted(elpv_small.rglob("*.png"))  # 48 cells, train and test
    with Predictor.from_bundle(cpu_bundle, device="cpu") as p:
        with pytest.raises(UserError, match="too few to tell drift from chance"):  # this model's own: a handful
            p.monitor(10)
    reference = _bundle_with_reference(cpu_bundle, images, tmp_path / "b")
    assert reference["images"] == 3 * len(images) == len(reference["brightness"])
    with Predictor.from_bundle(tmp_path / "b", device="cpu") as p:
        predictions = p.predict_batch(images)
        mean, std = input_stats(np.stack([p.preprocess(f) for f in images]))
        assert [(q.brightness, q.contrast) for q in predictions] == [
            (round(float(m), 2), round(float(s), 2)) for m, s in zip(mean, std)]
        monitor = p.monitor(window=24)
        assert monitor.report()["drift"] is None  # not yet a window's worth
        for q in predictions[::2]:
            monitor.add(q)
        report = monitor.report()
        assert report["drift"] is False and report["predictions"] == 24, report
        for q in p.predict_batch(sorted(_darkened(images[::2], tmp_path / "dark").iterdir())):
            monitor.add(q)  # the window slides onto the darkened images
        report = monitor.report()
        assert report["drift"] is True and report["statistics"]["brightness"]["unusual"], report
        assert report["statistics"]["brightness"]["value"] < report["statistics"]["brightness"]["range"][0]
        with pytest.raises(UserError, match="without brightness and contrast"):
            monitor.add(p.decode(p.infer(p.preprocess(images[0])))[0])
        with pytest.raises(UserError, match="class index 4: this bundle has 4 classes"):
            monitor.add({**predictions[0].to_dict(), "index": 4})  # a line of another bundle's predict --json


def test_field_monitor_ranges_hold_at_their_edges():
    """A reference that is all one class (100 % validation accuracy: scores round to 1.0), a class it never
    predicted appearing once in a window, numpy integers and false-alarm levels past the resamples."""
    from edge_tl.runtime.monitor import FieldMonitor

    reference = {"predicted": [0] * 150, "score": [1.0] * 150, "brightness": [100.0] * 150, "contrast": [20.0] * 150}
    monitor = FieldMonitor(reference, ["ok", "bad"], window=np.int64(50))
    for i in range(50):  # one "bad" of 50: rare classes the reference never showed are not alarms by themselves
        monitor.add({"index": int(i == 7), "score": 0.99999917, "brightness": 100.0, "contrast": 20.0})
    report = monitor.report()
    assert report["drift"] is False and report["statistics"]["class_mix"]["value"] == pytest.approx(0.02), report
    for i in range(50):  # a third of them: drift
        monitor.add({"index": int(i % 3 == 0), "score": 1.0, "brightness": 100.0, "contrast": 20.0})
    assert monitor.report()["statistics"]["class_mix"]["unusual"] is True
    with pytest.raises(UserError, match="false alarm 1e-05: a fraction from 0.0005"):
        FieldMonitor(reference, ["ok", "bad"], 50, false_alarm=1e-5)
    with pytest.raises(UserError, match="validation images: too few"):
        FieldMonitor({k: v[:99] for k, v in reference.items()}, ["ok", "bad"])


def test_cli_drift_exits_1_on_drift_0_on_images_like_the_reference(cpu_bundle, elpv_small, tmp_path):
    images = sorted(elpv_small.rglob("*.png"))
    _bundle_with_reference(cpu_bundle, images, tmp_path / "b")
    same = _cli("drift", str(tmp_path / "b"), str(elpv_small / "test"), "--json")
    assert same.returncode == 0 and json.loads(same.stdout)["drift"] is False, same.stdout + same.stderr
    dark = _cli("drift", str(tmp_path / "b"), str(_darkened(images, tmp_path / "dark")))
    assert dark.returncode == 1 and "brightness" in dark.stdout and "DRIFT" in dark.stdout, dark.stdout + dark.stderr
    few = _cli("drift", str(tmp_path / "b"), str(images[0]), str(tmp_path / "gone.png"))
    assert few.returncode == 2 and "1 readable images; 1 unreadable, the first: " in few.stderr, few.stderr
    assert "gone.png" in few.stderr and "10 or more" in few.stderr, few.stderr
    own = _cli("drift", str(cpu_bundle), str(tmp_path / "dark"), "--json")  # refused before reading any image
    assert own.returncode == 2 and "too few to tell drift" in json.loads(own.stdout)["error"], own.stdout
    good = tmp_path / "good"  # images known to be good in place of its handful of validation images
    good.mkdir()
    for f in images:
        cell = Image.open(f).convert("RGB")
        for name, view in (("", cell), ("m", ImageOps.mirror(cell)), ("f", ImageOps.flip(cell))):
            view.save(good / f"{name}{f.parent.name}_{f.name}")
    field = _cli("drift", str(cpu_bundle), str(elpv_small / "test"), "--reference", str(good), "--json")
    report = json.loads(field.stdout)
    assert field.returncode == 0 and report["reference_images"] == 144 and "given as good" in report["reference_source"]
    dark = _cli("drift", str(cpu_bundle), str(tmp_path / "dark"), "--reference", str(good))
    assert dark.returncode == 1 and "144 reference images" in dark.stdout, dark.stdout + dark.stderr


def test_cli_predict_json(cpu_bundle, elpv_small):
    res = _cli("predict", str(cpu_bundle), *map(str, _images(elpv_small)[:2]), "--json", "--topk", "2")
    assert res.returncode == 0, res.stderr
    lines = [json.loads(line) for line in res.stdout.splitlines()]
    assert len(lines) == 2 and all(len(x["topk"]) == 2 and x["label"] == x["topk"][0]["label"] for x in lines)
    manifest = json.loads((cpu_bundle / "manifest.json").read_text())
    assert {(x["artifact"], x["model"], x["manifest_sha256"]) for x in lines} == {
        ("int8-cpu", manifest["model"], manifest["manifest_sha256"])}  # which bundle made each line
    for command in (["predict", str(cpu_bundle.parent), str(_images(elpv_small)[0])], ["bench", str(cpu_bundle.parent)]):
        res = _cli(*command, "--json")  # a refused bundle: scripts get the reason as JSON too
        assert res.returncode == 2 and "not a bundle" in json.loads(res.stdout)["error"], res.stdout
        assert f"the bundle is inside it: pass {cpu_bundle}" in json.loads(res.stdout)["error"]  # an unzip's folder


def test_cli_predict_folder_and_bad_file_keeps_going(cpu_bundle, elpv_small, tmp_path):
    folder = elpv_small / "test" / "p100"
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not a png")
    good = _images(elpv_small)[0]
    strip = tmp_path / "strip.png"  # 86 bytes that would take ~300 MB scaled to the model's input: refused
    Image.new("L", (1500, 1)).save(strip)
    res = _cli("predict", str(cpu_bundle), str(bad), str(folder), str(good), str(strip), "--json")
    assert res.returncode == 1 and "2 of" in res.stderr.splitlines()[-1], res.stderr  # 2 only when none was readable
    lines = [json.loads(line) for line in res.stdout.splitlines()]
    assert "error" in lines[0] and lines[0]["image"] == str(bad) and lines[0]["manifest_sha256"]
    assert lines[-1]["image"] == str(strip) and lines[-1]["error"].startswith(
        f"{strip}: 1500×1 pixels, over 100 times longer than it is wide or tall (1500.0:1)")
    lines = lines[:-1]
    assert [x["image"] for x in lines[1:]] == sorted(map(str, folder.iterdir())) + [str(good)]
    assert all("label" in x for x in lines[1:])
    from edge_tl.runtime import Prediction, UnreadableImage
    from edge_tl.runtime.images import expand_images

    files = expand_images([bad, folder, good])  # the library the command is a few lines over
    assert files == [bad, *sorted(folder.iterdir()), good]
    with Predictor.from_bundle(cpu_bundle, device="cpu") as p:
        results = list(p.predict_files(files, topk=2))
    assert isinstance(results[0][1], UnreadableImage) and all(isinstance(r, Prediction) for _, r in results[1:])
    assert [r.label for _, r in results[1:]] == [x["label"] for x in lines[1:]]
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(UserError, match="no image files"):
        expand_images([tmp_path / "empty_dir"])


def test_device_commands_run_without_training_dependencies(cpu_bundle, elpv_small, tmp_path):
    """predict, check, bench and slim work when torch, timm, onnx, tqdm and matplotlib cannot be imported."""
    blocker = ("import sys, runpy\n"
               "class Block:\n"
               "    def find_spec(self, name, path=None, target=None):\n"
               "        if name.split('.')[0] in {'torch', 'torchvision', 'timm', 'onnx', 'tqdm', 'matplotlib'}:\n"
               "            raise ModuleNotFoundError(f'blocked: {name}', name=name)\n"
               "sys.meta_path.insert(0, Block())\n"
               "sys.argv = ['edge-tl'] + sys.argv[1:]\n"
               "runpy.run_module('edge_tl', run_name='__main__')\n")
    image = str(_images(elpv_small)[0])
    slim = tmp_path / "slim"
    for args in (["predict", str(cpu_bundle), image], ["check", str(cpu_bundle), "--min-agreement", "0", "--max-drop", "100"],
                 ["bench", str(cpu_bundle), "--batch", "1", "--iters", "3"],
                 ["slim", str(cpu_bundle), "--keep", "int8-cpu", "--out", str(slim)],
                 ["check", str(slim), "--data", str(elpv_small / "test"), "--min-agreement", "0"]):
        res = subprocess.run([sys.executable, "-c", blocker, *args], capture_output=True, text=True, timeout=300)
        assert res.returncode == 0, (args, res.stderr[-2000:])
    res = subprocess.run([sys.executable, "-c", blocker, "finetune", "--data", "x", "--out", "y"],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 2 and 'pip install -e ".[train]"' in res.stderr, res.stderr


def test_slim_bundle_is_complete_verified_and_smaller(cpu_bundle, elpv_small, tmp_path):
    from edge_tl.export.device import slim_bundle

    slim = slim_bundle(cpu_bundle, ["int8-cpu"], tmp_path / "slim", log=lambda s: None)
    assert [a["name"] for a in slim.artifacts] == ["int8-cpu"] and not (slim.path / "model.fp32.onnx").exists()
    assert slim.manifest["slimmed"]["dropped"] == ["fp32", "fp16"] and (slim.path / ".gitattributes").is_file()
    assert slim.manifest["slimmed"]["from_manifest_sha256"] == Bundle.load(cpu_bundle).manifest["manifest_sha256"]
    assert slim.release_id == Bundle.load(cpu_bundle).digest != slim.digest  # one release, re-signed
    hint = rf"; `edge-tl slim` dropped fp32, fp16: use the bundle it was slimmed from, {cpu_bundle.resolve()}\.$"
    with pytest.raises(UserError, match=r"no artifact 'fp32' \(has: int8-cpu\)" + hint):
        slim.artifact("fp32")
    with pytest.raises(UserError, match=r"has no fp32 artifact \(it has: int8-cpu \(onnx, int8\)\)" + hint):
        Predictor.from_bundle(slim.path, precision="fp32", device="cpu")
    assert set(slim.manifest["files"]) == {"model.int8-cpu.onnx", "golden.npz", "labels.txt"}
    assert "model.fp32.onnx" not in (slim.path / "README.md").read_text()
    logs = []
    report = check_bundle(slim.path, elpv_small / "test", min_agreement=0, log=logs.append)
    assert report["passed"] and report["artifacts"]["int8-cpu"]["reference"] == "none (the bundle has no fp32 artifact)"
    assert report["preprocess"]["passed"] and any("only the golden agreement gates it" in line for line in logs)
    full_report = tmp_path / "full.json"  # the full bundle's report as the baseline: the dropped artifacts are not missing
    full_report.write_text(json.dumps(check_bundle(cpu_bundle, elpv_small / "test", max_drop=100, min_agreement=0,
                                                   log=lambda s: None)))
    with_base = check_bundle(slim.path, elpv_small / "test", max_drop=100, min_agreement=0, baseline=full_report,
                             log=logs.append)
    assert with_base["passed"] and with_base["missing"] == [] and any("left out of this bundle" in line for line in logs)
    fp32_only = tmp_path / "fp32_only.json"  # shares no artifact with the slim bundle: nothing would be compared
    fp32_only.write_text(json.dumps({**json.loads(full_report.read_text()), "artifacts": {
        "fp32": json.loads(full_report.read_text())["artifacts"]["fp32"]}}))
    with pytest.raises(UserError, match="none of its artifacts"):
        check_bundle(slim.path, elpv_small / "test", max_drop=100, min_agreement=0, baseline=fp32_only, log=lambda s: None)
    acc = report["artifacts"]["int8-cpu"]["accuracy"]
    gated = check_bundle(slim.path, elpv_small / "test", min_agreement=0, min_accuracy=min(1.0, acc + 0.01),
                         log=lambda s: None)
    assert not gated["passed"] and "--min-accuracy" in gated["artifacts"]["int8-cpu"]["reason"]
    with Predictor.from_bundle(slim.path, device="cpu") as p, Predictor.from_bundle(cpu_bundle, device="cpu") as full:
        image = _images(elpv_small)[0]
        assert p.predict(image).topk == full.predict(image).topk
    (tmp_path / "afile").write_text("")
    for keep, out, message in ((["int4"], tmp_path / "x", "--keep int4: name artifacts of"), ([], tmp_path / "y", "(nothing)"),
                               (["fp32"], slim.path, "already exists"),
                               (["fp32"], tmp_path / "afile" / "x", "cannot create a folder beside it")):
        with pytest.raises(UserError, match=message):
            slim_bundle(cpu_bundle, keep, out, log=lambda s: None)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "fp32_only.json", "full.json", "slim"]  # nothing left behind


def test_interleaved_blocks_settle_each_block_then_time_and_pair_per_block():
    import itertools
    import time

    order = []
    last = [None]

    def b():  # slow (30 ms) on the first call of each of its runs, like a session whose neighbour still spins
        time.sleep(0.03 if last[0] != "b" else 0.0005)
        order.append("b")
        last[0] = "b"

    def a():
        order.append("a")
        last[0] = "a"

    times, medians = interleaved_blocks({"a": a, "b": b}, blocks=3, iters=4, settle_s=0.05)
    assert {k: len(v) for k, v in times.items()} == {"a": 12, "b": 12}
    runs = [(k, len(list(g))) for k, g in itertools.groupby(order)]
    assert [k for k, _ in runs] == ["a", "b"] * 3  # every block: a's settle + timed calls, then b's
    assert all(n > 4 + 20 for k, n in runs if k == "a")  # "a" takes microseconds: 50 ms of settle is many calls
    assert all(n >= 4 + 1 for k, n in runs if k == "b")
    assert max(times["b"]) < 25  # the slow first call of each block fell in the settle, untimed
    for k in ("a", "b"):
        assert [float(np.median(times[k][4 * i:4 * i + 4])) for i in range(3)] == medians[k].tolist()

    r = paired_ratio(np.array([1.0, 2.0, 10.0]), np.array([4.0, 4.0, 20.0]))
    assert r["paired"] == 0.5  # per-block ratios 0.25, 0.5, 0.5: a burst on both sides of block 3 cancels
    assert r["paired_iqr"] == [0.375, 0.5]


def test_non_finite_outputs_fail_and_the_json_stays_strict(cpu_bundle, tmp_path):
    broken = tmp_path / "inf"
    shutil.copytree(cpu_bundle, broken)
    path = broken / "model.fp32.onnx"
    model = onnx.load(str(path))
    gemm = next(n for n in model.graph.node if n.op_type == "Gemm")  # the classifier: its logits overflow to inf
    w = next(t for t in model.graph.initializer if t.name == gemm.input[1])
    w.CopyFrom(numpy_helper.from_array(np.full(numpy_helper.to_array(w).shape, 3e38, np.float32), w.name))
    onnx.save(model, str(path))
    bundle = Bundle.load(broken, verify=False)
    bundle.add_file("model.fp32.onnx")  # re-signed: only the check can catch it
    bundle.save()
    res = _cli("check", str(broken), "--json", "--min-agreement", "0", "--max-drop", "100")

    def strict(constant):
        raise AssertionError(f"not JSON: {constant}")

    fp32 = json.loads(res.stdout, parse_constant=strict)["artifacts"]["fp32"]
    assert res.returncode == 1 and "non-finite outputs" in fp32["reason"] and fp32["max_abs_diff"] is None, res.stdout
    with np.load(broken / "golden.npz") as z:
        arrays = {k: z[k] for k in z.files}
    arrays["logits"][0, 0] = np.inf
    np.savez(broken / "golden.npz", **arrays)
    bundle.add_file("golden.npz")
    bundle.save()
    res = _cli("check", str(broken))
    assert res.returncode == 2 and "reference logits are not all finite" in res.stderr, res.stderr


def test_a_bundle_file_this_user_cannot_read_is_refused_with_the_fix(cpu_bundle, monkeypatch):
    """Unzipped or copied as another user, a model file may be unreadable (tests run as root, who
    reads anything, so the operating system's PermissionError is raised by hand here)."""
    from edge_tl.runtime import bundle as bundle_module

    real = bundle_module.sha256_file

    def denied(path):
        if Path(path).name == "model.fp32.onnx":
            raise PermissionError(13, "Permission denied", str(path))
        return real(path)

    monkeypatch.setattr(bundle_module, "sha256_file", denied)
    with pytest.raises(UserError, match=r"model\.fp32\.onnx: cannot be read \(Permission denied\)\. .* "
                                        rf"chmod -R a\+rX {cpu_bundle}$"):
        Predictor.from_bundle(cpu_bundle, device="cpu")


def test_refusals_that_name_the_cause(cpu_bundle, tmp_path):
    lfs = tmp_path / "lfs"
    shutil.copytree(cpu_bundle, lfs)
    (lfs / "model.int8-cpu.onnx").write_text("version https://git-lfs.github.com/spec/v1\noid sha256:ab\nsize 1\n")
    res = _cli("check", str(lfs))
    assert res.returncode == 2 and "a Git LFS pointer" in res.stderr and "git lfs pull" in res.stderr, res.stderr
    res = _cli("bench", str(cpu_bundle), "--backend", "foo", "--iters", "1")
    assert res.returncode == 2 and "--backend foo: unknown" in res.stderr, res.stderr


@pytest.mark.parametrize("edit, field", [(lambda m: m.update(artifacts="x"), "'artifacts'"),
                                         (lambda m: m["artifacts"][0].pop("format"), "'artifacts[0]'"),
                                         (lambda m: m.update(validation={"images": "many"}), "'validation'"),
                                         (lambda m: m.update(output=None), "'output'")])
def test_a_re_signed_manifest_with_wrong_field_types_is_refused_by_name(cpu_bundle, tmp_path, edit, field):
    edited = tmp_path / "edited"
    shutil.copytree(cpu_bundle, edited)
    bundle = Bundle.load(edited)
    edit(bundle.manifest)
    bundle.save()  # re-signed: the digest alone cannot catch it
    res = _cli("check", str(edited), "--json")
    assert res.returncode == 2 and field in json.loads(res.stdout)["error"] and "Traceback" not in res.stderr, res.stderr


def test_temperature_fit_recovers_a_known_overconfidence():
    from edge_tl.runtime.scores import ece, fit_temperature, softmax

    rng = np.random.default_rng(0)
    z = rng.normal(0, 2, size=(4000, 4))  # calibrated logits: labels drawn from their softmax
    labels = np.array([rng.choice(4, p=p) for p in softmax(z)])
    fit = fit_temperature(3 * z, labels)  # a model three times over-confident
    assert fit["temperature"] == pytest.approx(3, rel=0.08)
    assert fit["nll"][1] < fit["nll"][0] and fit["ece"][1] < 0.03 < fit["ece"][0]
    assert ece(softmax(z), labels) < 0.03 and ece(softmax(3 * z), labels) > 0.1
    small = fit_temperature(3 * z[:20], labels[:20])  # too few images to fit: plain softmax, said so
    assert small["temperature"] == 1.0 and "only 20 validation images" in small["skipped"]


def test_scores_follow_the_manifest_temperature(cpu_bundle, elpv_small, tmp_path):
    from edge_tl.runtime.check import labelled_images
    from edge_tl.runtime.scores import ece, softmax

    manifest = Bundle.load(cpu_bundle).manifest  # 4 validation images: too few to fit, recorded as such
    assert manifest["output"]["temperature"] == 1.0 and "skipped" in manifest["scores"]
    hot = tmp_path / "hot"
    shutil.copytree(cpu_bundle, hot)
    bundle = Bundle.load(hot)
    bundle.manifest["output"]["temperature"] = 2.0
    bundle.save()
    image = _images(elpv_small)[0]
    with Predictor.from_bundle(hot, precision="fp32") as p:
        logits = p.infer(p.preprocess(image)[None])
        pred = p.predict(image, topk=4)
    want = softmax(logits, 2.0)[0]
    assert [s for _, s in pred.topk] == pytest.approx(sorted(want, reverse=True), abs=1e-9)
    assert pred.label == p.classes[int(logits.argmax())]  # the ranking is the logits'
    report = check_bundle(hot, elpv_small / "test", max_drop=100, min_agreement=0, log=lambda s: None)
    pixels, labels, _, _ = labelled_images(elpv_small / "test", p.classes, p.spec)
    with Predictor.from_bundle(hot, precision="fp32") as p:
        want_ece = ece(softmax(p.infer(pixels), 2.0), labels)
    assert report["artifacts"]["fp32"]["score_ece"] == pytest.approx(want_ece, abs=1e-4)
    bundle.manifest["output"]["temperature"] = 0
    bundle.save()
    with pytest.raises(UserError, match="'output' must be an object whose 'temperature'"):
        Bundle.load(hot)


def test_cli_predict_of_a_huge_image_prints_no_pillow_bomb_warning(cpu_bundle, tmp_path):
    """Pillow warns past MAX_IMAGE_PIXELS without naming the file (a 100-MP scan, here a 120x120 image
    under a 10,000-pixel limit); the user's own images are no attack, and past twice the limit the
    refusal names the file."""
    Image.effect_noise((120, 120), 50).save(tmp_path / "big.png")
    code = ("import sys; from PIL import Image; Image.MAX_IMAGE_PIXELS = 10_000; "
            "sys.argv = ['edge-tl', *sys.argv[1:]]; from edge_tl.cli import main; main()")
    res = subprocess.run([sys.executable, "-c", code, "predict", str(cpu_bundle), str(tmp_path / "big.png")],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and "big.png" in res.stdout, res.stderr
    assert "DecompressionBombWarning" not in res.stderr, res.stderr


def test_every_json_command_reports_bad_input_as_json(tmp_path):
    """finetune, export and build --json, like check, predict and bench: scripts read why from stdout."""
    for command in (["finetune", "--data", str(tmp_path / "nope"), "--out", str(tmp_path / "run")],
                    ["export", str(tmp_path / "nope"), "--out", str(tmp_path / "bundle")],
                    ["build", "--data", str(tmp_path / "nope"), "--out", str(tmp_path / "b")]):
        res = _cli(*command, "--json")
        assert res.returncode == 2 and "nope" in json.loads(res.stdout)["error"], (command, res.stdout, res.stderr)
