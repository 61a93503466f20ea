"""Bundles as untrusted input (copied between machines) and the runtime embedded in a service."""

from __future__ import annotations

import io
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
from PIL import Image

from edge_tl.errors import UserError
from edge_tl.runtime import Bundle, Predictor
from edge_tl.runtime.bundle import BundleError
from edge_tl.runtime.cpu import int8_may_saturate
from edge_tl.runtime.images import to_input


def _copy(bundle: Path, tmp_path: Path, name: str = "copy") -> Path:
    out = tmp_path / name
    shutil.copytree(bundle, out)
    return out


def _image(elpv_small: Path) -> Path:
    return sorted((elpv_small / "test" / "p100").iterdir())[0]


def _resign(path: Path, edit) -> None:
    """Edit the manifest and re-sign it: what someone who knows the (public) digest recipe can do."""
    bundle = Bundle.load(path, verify=False)
    edit(bundle.manifest)
    bundle.save()


def test_slim_writes_its_own_gitattributes_never_a_linked_file(cpu_bundle, tmp_path):
    from edge_tl.export.device import slim_bundle

    secret = tmp_path / "secret.txt"
    secret.write_text("CI_TOKEN=ghp_example\n")
    src = _copy(cpu_bundle, tmp_path, "src")
    (src / ".gitattributes").unlink()
    (src / ".gitattributes").symlink_to(secret)
    slim = slim_bundle(src, ["int8-cpu"], tmp_path / "slim", log=lambda s: None)
    text = (slim.path / ".gitattributes").read_text()
    assert "ghp_example" not in text and "* -text" in text and not (slim.path / ".gitattributes").is_symlink()


def test_export_force_replaces_only_a_bundle_and_nothing_else_in_it(cpu_bundle, tmp_path):
    from edge_tl.export.bundle import _check_replaceable

    run, data = tmp_path / "run", tmp_path / "data"
    app = tmp_path / "webapp"  # a folder with its own manifest.json (a browser extension, a PWA)
    (app / "src").mkdir(parents=True)
    (app / "manifest.json").write_text(json.dumps({"name": "my app", "version": "1.0"}))
    (app / "src" / "a.py").write_text("print(1)\n")
    with pytest.raises(UserError, match="not an edge-tl manifest"):
        _check_replaceable(app, run, data)
    bundle = _copy(cpu_bundle, tmp_path, "bundle")
    _check_replaceable(bundle, run, data)  # an earlier bundle: replaceable
    (bundle / "notes.txt").write_text("calibration notes\n")
    with pytest.raises(UserError, match=r"holds files that are not the bundle's \(notes.txt\)"):
        _check_replaceable(bundle, run, data)


def test_runners_load_the_bytes_they_hashed_not_a_file_swapped_after_the_check(cpu_bundle, tmp_path):
    from edge_tl.runtime.predictor import make_runner

    path = _copy(cpu_bundle, tmp_path)
    bundle = Bundle.load(path)
    art = bundle.artifact("fp32")
    other = onnx.load(path / "model.int8-cpu.onnx")
    onnx.save(other, path / "model.fp32.onnx")  # swapped between the verify and the load
    with pytest.raises(BundleError, match=r"model\.fp32\.onnx: changed since the bundle was loaded"):
        make_runner(bundle, art, "onnxruntime", "cpu")


def test_an_onnx_file_with_external_weights_is_refused_even_when_listed(cpu_bundle, tmp_path):
    path = _copy(cpu_bundle, tmp_path)
    model = onnx.load(path / "model.fp32.onnx")
    onnx.save(model, path / "model.fp32.onnx", save_as_external_data=True, location="weights.bin", size_threshold=1024)
    (tmp_path / "weights.bin").write_bytes((path / "weights.bin").read_bytes())  # also where a cwd lookup would go
    _resign(path, lambda m: m["files"].update({"model.fp32.onnx": _sha(path / "model.fp32.onnx"),
                                                "weights.bin": _sha(path / "weights.bin")}))
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        with pytest.raises(UserError, match="keeps its weights in a separate file"):
            Predictor.from_bundle(path, precision="fp32", device="cpu")
    finally:
        os.chdir(cwd)


def _sha(f: Path) -> str:
    import hashlib

    return hashlib.sha256(f.read_bytes()).hexdigest()


@pytest.mark.parametrize("edit, message", [
    (lambda m: m["preprocess"].update(crop_pct=0.002), "crop_pct 0.002"),
    (lambda m: m["preprocess"].update(resize_size=112000), "resize_size 112000"),
    (lambda m: m.update(classes="abcd"), "non-empty list of non-empty names"),
    (lambda m: m.update(classes=[1, 2, 3, 4]), "non-empty list of non-empty names"),
    (lambda m: m["artifacts"][0].update(fp32_agreement="0.97"), r"artifacts\[0\]\.fp32_agreement"),
    (lambda m: m.update(validation=None), "'validation' must be an object"),  # check crashed on it
    (lambda m: m["artifacts"][1].update(name=m["artifacts"][0]["name"]), "distinct names"),  # one hid the other
    (lambda m: m["reference"]["predicted"].__setitem__(0, 9), "'reference' names classes beyond"),  # no class 9
    (lambda m: m["reference"]["score"].pop(), "'reference' must be"),
])
def test_a_re_signed_manifest_that_would_misbehave_is_refused(cpu_bundle, tmp_path, edit, message):
    path = _copy(cpu_bundle, tmp_path)
    _resign(path, edit)
    with pytest.raises(BundleError, match=message):
        Bundle.load(path)


def test_class_names_with_terminal_escapes_are_refused(cpu_bundle, tmp_path):
    path = _copy(cpu_bundle, tmp_path)
    classes = ["\x1b[31mRED\x1b[0m", "b", "c", "d"]
    (path / "labels.txt").write_text("\n".join(classes) + "\n")
    _resign(path, lambda m: m.update(classes=classes) or m["files"].update({"labels.txt": _sha(path / "labels.txt")}))
    with pytest.raises(BundleError, match="control characters"):
        Bundle.load(path)


def test_lowering_the_schema_does_not_turn_off_the_manifest_digest(cpu_bundle, tmp_path):
    path = _copy(cpu_bundle, tmp_path)
    manifest = json.loads((path / "manifest.json").read_text())
    manifest.update(schema=1, output={"temperature": 0.05})  # edited, not re-signed
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="changed since edge-tl wrote it"):
        Bundle.load(path)


def _golden_edit(path: Path, change) -> None:
    with np.load(path / "golden.npz") as z:
        arrays = {k: z[k] for k in z.files}
    change(arrays)
    np.savez_compressed(path / "golden.npz", **arrays)
    _resign(path, lambda m: m["files"].update({"golden.npz": _sha(path / "golden.npz")}))


@pytest.mark.parametrize("change, message", [
    (lambda a: a.pop("pixels"), r"needs 'pixels' \(uint8"),
    (lambda a: a.update(logits=a["logits"][:, 0]), r"and 'logits' \(float"),
    (lambda a: a.update(labels=a["labels"] + 7), "one class index"),
    (lambda a: a.update(pixels=np.zeros((3000, *a["pixels"].shape[1:]), np.uint8)), "unpacks to"),  # 80 MB of zeros
])
def test_a_malformed_or_inflated_golden_file_is_a_bundle_error_not_a_crash(cpu_bundle, tmp_path, change, message):
    path = _copy(cpu_bundle, tmp_path)
    _golden_edit(path, change)
    with pytest.raises(BundleError, match=message):
        Bundle.load(path)


def test_importing_the_runtime_leaves_pillows_truncated_image_setting_alone(tmp_path):
    code = ("from PIL import ImageFile; ImageFile.LOAD_TRUNCATED_IMAGES = True; import edge_tl.runtime; "
            "import edge_tl.runtime.predictor; print(ImageFile.LOAD_TRUNCATED_IMAGES)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "True"


def test_service_errors_are_user_errors_that_say_which_image(cpu_bundle, elpv_small):
    image = _image(elpv_small)
    truncated = image.read_bytes()[:3000]
    with Predictor.from_bundle(cpu_bundle, device="cpu", threads=1) as p:
        with pytest.raises(UserError) as info:
            p.predict_batch([image, b"not an image", image])
        assert info.value.index == 1 and str(info.value).startswith("image [1] of 3: <image bytes>: not a readable")
        assert "0x" not in str(info.value)  # no object addresses
        with pytest.raises(UserError, match="PIL image: cannot be decoded"):
            p.predict(Image.open(io.BytesIO(truncated)))
        for bad in ({"topk": 2.5}, {"topk": "3"}, {"topk": 0}):
            with pytest.raises(UserError, match="topk="):
                p.predict(image, **bad)
        with pytest.raises(UserError, match=r"expected N×4"):
            p.decode(np.zeros((2, 7), np.float32))
        with pytest.raises(UserError, match="not a NoneType"):
            p.predict_batch(None)
        assert "1 thread" in p.describe()
    with pytest.raises(UserError, match=r"threads='2'"):
        Predictor.from_bundle(cpu_bundle, device="cpu", threads="2")
    with pytest.raises(UserError, match="session_options 'arena'"):
        Predictor.from_bundle(cpu_bundle, device="cpu", session_options={"arena": False})


def test_large_batches_run_in_parts_of_the_bundles_max_batch(cpu_bundle):
    with Predictor.from_bundle(cpu_bundle, device="cpu", session_options={"enable_cpu_mem_arena": False}) as p:
        sizes, real = [], p.runner.infer
        p.runner.infer = lambda x: sizes.append(len(x)) or real(x)
        pixels, logits = Bundle.load(cpu_bundle).golden()
        many = np.concatenate([pixels] * (2 * p.max_batch // len(pixels) + 1))[:2 * p.max_batch + 3]
        out = p.infer(many)
        assert sizes == [p.max_batch, p.max_batch, 3] and out.shape == (len(many), len(p.classes))
        np.testing.assert_allclose(out[:len(pixels)], real(to_input(pixels)), atol=1e-5)


def test_close_waits_for_calls_in_flight_and_refuses_new_ones(cpu_bundle, elpv_small, tmp_path):
    image = _image(elpv_small)
    path = _copy(cpu_bundle, tmp_path)
    p = Predictor.from_bundle(path, device="cpu")
    entered, release, results = threading.Event(), threading.Event(), []
    real = p.runner.infer

    def slow(x):
        entered.set()
        release.wait(10)
        return real(x)

    p.runner.infer = slow
    worker = threading.Thread(target=lambda: results.append(p.predict(image).label))
    worker.start()
    assert entered.wait(10)
    p.close()  # a hot reload: the new Predictor is in place, the old one closed while it still serves a call
    assert p.runner.session is not None  # not yet: a call is running
    with pytest.raises(UserError, match="this Predictor was closed, its runner is closed"):
        p.predict(image)
    release.set()
    worker.join(10)
    assert results and results[0] in p.classes and p.runner.session is None
    shutil.rmtree(path)  # the bundle folder replaced on disk: a new Predictor's warmup needs no file
    q = Predictor.from_bundle(cpu_bundle, device="cpu")
    shutil.copytree(cpu_bundle, path)
    q.bundle.path = path / "gone"
    q.warmup((1, 3))


def test_a_bundle_behind_a_link_loads_from_one_folder_and_half_copies_say_copy_again(cpu_bundle, tmp_path):
    """A service's `current` link: the bundle is read from the folder the link named at load (a swap
    mid-load cannot mix two releases); a missing folder, a dangling link, a manifest cut short and a file
    gone after the check each say what happened and to copy again, not to chmod or re-export."""
    release = _copy(cpu_bundle, tmp_path, "v1")
    (tmp_path / "current").symlink_to(release)
    bundle = Bundle.load(tmp_path / "current")
    assert bundle.path == release.resolve() and bundle.release_id == bundle.digest
    p = Predictor.from_bundle(tmp_path / "current", device="cpu")
    assert p.bundle.path == release.resolve() and p.bundle._golden is None  # golden arrays freed once loaded
    with pytest.raises(BundleError, match="not found .it does not exist"):
        Bundle.load(tmp_path / "v2")
    (tmp_path / "next").symlink_to(tmp_path / "v2")
    with pytest.raises(BundleError, match=r"a symbolic link to .*v2, which does not exist"):
        Bundle.load(tmp_path / "next")
    half = _copy(cpu_bundle, tmp_path, "half")
    text = (half / "manifest.json").read_text()
    (half / "manifest.json").write_text(text[:len(text) // 2])
    with pytest.raises(BundleError, match=r"cut short or damaged .a copy still in progress.*Copy the bundle again"):
        Bundle.load(half)
    (release / "model.fp32.onnx").unlink()
    with pytest.raises(BundleError, match=r"fp32.onnx: missing, though listed .*Copy the whole bundle again") as exc:
        bundle.read_verified("model.fp32.onnx")  # verified at load, gone when a runner reads it
    assert "chmod" not in str(exc.value)


def test_expand_images_takes_one_path_as_well_as_a_list(elpv_small):
    from edge_tl.runtime.images import expand_images

    folder = elpv_small / "test" / "p100"
    assert expand_images(str(folder)) == expand_images([folder]) == sorted(folder.iterdir())


def test_a_bundle_slimmed_to_an_int8_that_is_not_the_default_still_runs_with_a_warning(cpu_bundle, elpv_small, tmp_path):
    from edge_tl.export.device import slim_bundle

    src = _copy(cpu_bundle, tmp_path, "src")  # as export marks an INT8 no faster than FP32 (MobileNetV3-small, MobileViT)
    _resign(src, lambda m: next(a for a in m["artifacts"] if a["name"] == "int8-cpu").update(
        default=False, not_default="not the default: no faster than fp32 on this machine"))
    logs = []
    slim_bundle(src, ["int8-cpu"], tmp_path / "slim", log=logs.append)
    assert any("chose none of int8-cpu as a default" in line for line in logs)
    with pytest.warns(UserWarning, match="which export did not make the default"):
        p = Predictor.from_bundle(tmp_path / "slim", device="cpu")
    with p:
        assert p.artifact["name"] == "int8-cpu" and p.predict(_image(elpv_small)).label in p.classes
    with Predictor.from_bundle(src, device="cpu") as full:  # with fp32 beside it, fp32 is chosen
        assert full.artifact["name"] == "fp32"


def test_onnx_runtime_settings_reach_the_session_and_bad_ones_are_user_errors(cpu_bundle):
    config = {"session.intra_op.allow_spinning": "0"}
    with Predictor.from_bundle(cpu_bundle, device="cpu", session_config=config) as p:
        exact = {"session.x64quantprecision": "1"} if int8_may_saturate() else {}  # x86 without VNNI only
        assert p.runner.session_config == {**exact, **config}
        assert p.runner.session.get_session_options().get_session_config_entry("session.intra_op.allow_spinning") == "0"
    for kwargs, message in (({"session_options": {"enable_cpu_mem_arena": "no"}}, "onnxruntime refuses it"),
                            ({"session_options": {"add_session_config_entry": 1}}, "not an onnxruntime.SessionOptions"),
                            ({"session_options": {"intra_op_num_threads": 3}}, "threads="),
                            ({"session_options": ["x"]}, "a dict of setting"),
                            ({"threads": True}, "threads=True")):
        with pytest.raises(UserError, match=message):
            Predictor.from_bundle(cpu_bundle, device="cpu", **kwargs)


def test_golden_arrays_that_claim_more_than_they_hold_or_do_not_unpack_are_refused(cpu_bundle, tmp_path):
    import zipfile

    path = _copy(cpu_bundle, tmp_path)
    data = bytearray((path / "golden.npz").read_bytes())
    buf = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(bytes(data))) as src, zipfile.ZipFile(buf, "w") as out:
        for info in src.infolist():
            out.writestr(info, src.read(info))
        header = io.BytesIO()
        np.lib.format.write_array_header_1_0(header, {"descr": "<f8", "fortran_order": False, "shape": (10**13,)})
        out.writestr("huge.npy", b"\x93NUMPY\x01\x00" + header.getvalue()[8:] + b"\0" * 64)
    (path / "golden.npz").write_bytes(buf.getvalue())
    _resign(path, lambda m: m["files"].update({"golden.npz": _sha(path / "golden.npz")}))
    with pytest.raises(BundleError, match=r"member huge.npy claims \(10000000000000,\)"):
        Bundle.load(path)


@pytest.mark.parametrize("batch", [{"min": 1, "opt": 1, "max": -1}, {"min": 1, "opt": 1, "max": "x"}, "x"])
def test_a_batch_profile_that_is_not_one_is_refused(cpu_bundle, tmp_path, batch):
    path = _copy(cpu_bundle, tmp_path)
    _resign(path, lambda m: m.update(batch=batch))
    with pytest.raises(BundleError, match="'batch' must be"):
        Bundle.load(path)


def test_export_force_ignores_the_files_file_browsers_leave_in_a_bundle(cpu_bundle, tmp_path):
    from edge_tl.export.bundle import _check_replaceable

    bundle = _copy(cpu_bundle, tmp_path, "bundle")
    for name in (".DS_Store", "Thumbs.db", "desktop.ini"):
        (bundle / name).write_bytes(b"\0")
    _check_replaceable(bundle, tmp_path / "run", tmp_path / "data")


def test_cpu_info_names_arm_cores_and_their_int8_features():
    from edge_tl.runtime.cpu import cpu_info

    pi5 = ("processor\t: 0\nBogoMIPS\t: 108.00\nFeatures\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp "
           "asimdhp cpuid asimdrdm lrcpc dcpop asimddp\nCPU implementer\t: 0x41\nCPU architecture: 8\nCPU part\t: 0xd0b\n")
    info = cpu_info(pi5)
    assert "implementer 0x41, part 0xd0b" in info["cpu"] and info["cpu_int8_features"] == ["asimddp"]
    epyc = "processor\t: 0\nmodel name\t: AMD EPYC 9R14\nflags\t\t: fpu avx2 avx512f avx512_vnni\n"
    assert cpu_info(epyc) == {"cpu": "AMD EPYC 9R14", "cpu_int8_features": ["avx512_vnni"]}


def test_the_exact_int8_path_only_where_int8_products_saturate():
    avx2 = "processor\t: 0\nmodel name\t: Intel(R) Core(TM) i5-10400\nflags\t\t: fpu sse4_1 avx2 fma\n"
    vnni = "processor\t: 0\nmodel name\t: AMD EPYC\nflags\t\t: fpu avx2 avx512f avx512_vnni\n"
    assert int8_may_saturate(avx2, "x86_64") and not int8_may_saturate(vnni, "x86_64")
    assert not int8_may_saturate("Features\t: fp asimd\n", "aarch64") and not int8_may_saturate("", "x86_64")


def test_where_int8_products_saturate_sessions_take_the_exact_path(cpu_bundle, monkeypatch):
    from edge_tl.runtime import runners

    monkeypatch.setattr(runners, "int8_may_saturate", lambda: True)  # an AVX2 CPU without VNNI
    with Predictor.from_bundle(cpu_bundle, device="cpu") as p:
        assert p.runner.session.get_session_options().get_session_config_entry("session.x64quantprecision") == "1"


def test_export_force_still_refuses_a_bundle_holding_someone_s_dot_files(cpu_bundle, tmp_path):
    from edge_tl.export.bundle import _check_replaceable

    bundle = _copy(cpu_bundle, tmp_path, "bundle")
    (bundle / ".env").write_text("TOKEN=1\n")
    with pytest.raises(UserError, match=r"holds files that are not the bundle's \(.env\)"):
        _check_replaceable(bundle, tmp_path / "run", tmp_path / "data")


def test_code_version_is_edge_tls_commit_whatever_git_dir_says(tmp_path, monkeypatch):
    from edge_tl.provenance import code_version

    root = Path(__file__).resolve().parents[1]
    clean = {k: v for k, v in os.environ.items() if not k.startswith("GIT_")}
    head = subprocess.run(["git", "-C", str(root), "rev-parse", "--short=12", "HEAD"], capture_output=True,
                          text=True, env=clean)
    if head.returncode != 0:
        pytest.skip("edge-tl is not a git checkout here (installed from a wheel): code_version records no commit")
    other = tmp_path / "other"
    subprocess.run(["git", "init", "-q", str(other)], check=True, env=clean)
    subprocess.run(["git", "-C", str(other), "-c", "user.email=a@b", "-c", "user.name=a", "commit", "-q",
                    "--allow-empty", "-m", "x"], check=True, env=clean)
    monkeypatch.setenv("GIT_DIR", str(other / ".git"))  # as in a git hook or `git rebase -x`
    code_version.cache_clear()
    try:
        assert code_version()["git"].startswith(head.stdout.strip())
    finally:
        code_version.cache_clear()
