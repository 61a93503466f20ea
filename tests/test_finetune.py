"""Fine-tune end to end on tiny data: outputs, exact resume, and the CLI's bad-input errors."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys

import pytest
import timm
import torch

from edge_tl.errors import UserError
from edge_tl.finetune import depthwise
from edge_tl.finetune.data import discover
from edge_tl.finetune.train import (TrainConfig, _train_sizes, auto_workers, finetune, load_checkpoint, load_model,
                                   make_optimizer, mixup_batch)
from edge_tl.runtime.spec import PreprocessSpec

from conftest import make_image_folder

QUICK = dict(img_size=64, batch_size=8, epochs=2, lr=3e-3, warmup_epochs=0.5)


def _cfg(data, out, **kw):
    return TrainConfig(data=str(data), out=str(out), **{**QUICK, **kw})


def test_run_folder_complete(tiny_folder, tmp_path):
    out = tmp_path / "run"
    metrics = finetune(_cfg(tiny_folder, out), progress=False, log=lambda s: None)
    for name in ("best.pt", "last.pt", "history.jsonl", "metrics.json", "learning_curve.png", "confusion_matrix.png"):
        assert (out / name).stat().st_size > 0, name
    for key in ("best_val_accuracy", "best_epoch", "classes", "num_train", "num_val", "model", "pretrained", "seconds"):
        assert key in metrics
    assert metrics["classes"] == ["checker", "hstripes", "vstripes"] and metrics["num_val"] == 3
    hist = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    assert [h["epoch"] for h in hist] == [1, 2]
    assert set(hist[0]) >= {"epoch", "train_loss", "val_loss", "val_accuracy", "lr", "seconds"}
    assert metrics["best_epoch"] == max(hist, key=lambda h: (h["val_accuracy"], -h["val_loss"]))["epoch"]
    assert not list(out.glob("*.tmp")) and [p.name for p in out.glob(".*")] == [".edge-tl.lock"]  # one run at a time
    rows = [line.split("\t") for line in (out / "images.tsv").read_text().splitlines()]
    assert rows[0] == ["split", "class", "sha256", "path"] and len(rows) == 1 + metrics["num_train"] + 3
    assert rows[1][3] == "checker/000.png" and rows[1][2] == hashlib.sha256((tiny_folder / rows[1][3]).read_bytes()).hexdigest()
    assert metrics["duplicates"] == {"label_conflicts": 0, "val_in_train": 0, "moved_to_train": 0}
    assert (out / "duplicates.txt").read_text() == ""
    model, ckpt = load_model(out / "best.pt")  # weights_only=True inside
    assert ckpt["preprocess"]["input_size"] == [64, 64] and ckpt["preprocess"]["mean"] == [0.5, 0.5, 0.5]
    assert model.get_classifier().out_features == 3
    logs = []  # --resume keeps the saved settings and says so; a finished run has nothing left
    finetune(_cfg(tiny_folder, out, epochs=5), resume=True, progress=False, log=logs.append)
    assert any("ignored: epochs=5 (run: 2)" in line for line in logs), logs
    assert any("already complete (2/2 epochs)" in line for line in logs), logs
    assert torch.load(out / "last.pt", weights_only=True)["epoch"] == 2
    for f in discover(tiny_folder, PreprocessSpec.from_dict(ckpt["preprocess"]), progress=False).val.paths:
        f.unlink()  # the data changed: the carved validation split is no longer the run's
    logs.clear()
    finetune(_cfg(tiny_folder, out), resume=True, progress=False, log=logs.append)
    assert any("validation split differs" in line for line in logs), logs
    assert any("the data changed since this run (" in line and "removed" in line and "the run is complete" in line
               for line in logs), logs


def test_resume_after_interrupt_equals_uninterrupted(tiny_folder, tmp_path, monkeypatch):
    aug = dict(ema=True, vflip=0.5, rot90=1.0, mixup=0.4)  # every random draw must replay on resume
    # each new run times its own depthwise plans (separate runs may pick differently: documented); here both
    # runs pick the same, the non-native ones, so that the comparison is of resume alone
    monkeypatch.setattr(depthwise, "_fastest", lambda methods, args: min(methods))
    ref = finetune(_cfg(tiny_folder, tmp_path / "ref", **aug), progress=False, log=lambda s: None)

    def interrupt(step):
        if step == 3:  # mid-epoch 2 (2 steps per epoch... 21 train images / 8 = 2 steps)
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C: takes effect at the end of this step

    with pytest.raises(KeyboardInterrupt):
        finetune(_cfg(tiny_folder, tmp_path / "cut", **aug), progress=False, on_step=interrupt, log=lambda s: None)
    saved = torch.load(tmp_path / "cut" / "last.pt", weights_only=True)
    assert (saved["epoch"], saved["step"]) == (1, 1)
    moved = shutil.copytree(tiny_folder, tmp_path / "moved")  # the data may move between the two runs
    renamed = shutil.copytree(tiny_folder, tmp_path / "renamed")
    first = sorted(p for p in renamed.iterdir() if p.is_dir())[0]
    first.rename(first.with_name("zz-other"))
    with pytest.raises(UserError, match="differ from the run's"):
        finetune(_cfg(renamed, tmp_path / "cut"), resume=True, progress=False, log=lambda s: None)
    assert saved["depthwise_plans"]  # a CPU run: its depthwise convs were tuned; another process may time them
    monkeypatch.setattr(depthwise, "_plans", {  # differently, so the resumed run must replay the saved plans
        key: ("flipped" if i == "native" else "native", "float32" if w == "native" else "native")
        for key, (i, w) in saved["depthwise_plans"].items()})
    resumed = finetune(_cfg(moved, tmp_path / "cut", workers=1), resume=True, progress=False, log=lambda s: None)
    a = torch.load(tmp_path / "ref" / "last.pt", weights_only=True)["state_dict"]
    b = torch.load(tmp_path / "cut" / "last.pt", weights_only=True)["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert resumed["best_val_accuracy"] == ref["best_val_accuracy"]
    history = [[json.loads(line) for line in (tmp_path / r / "history.jsonl").read_text().splitlines()]
               for r in ("ref", "cut")]
    for a, b in zip(*history):  # the interrupted epoch's train metrics include the steps before the cut
        assert (a["train_loss"], a["train_accuracy"], a["val_loss"]) == pytest.approx(
            (b["train_loss"], b["train_accuracy"], b["val_loss"]), abs=1e-6)


def test_sigterm_saves_at_a_step_boundary_and_a_second_signal_saves_nothing(tiny_folder, tmp_path):
    """SIGTERM (docker stop, Kubernetes) stops training as Ctrl-C does, at the step's end with last.pt
    saved (it killed the process, unsaved); a second signal mid-step stops at once and leaves the
    last.pt of the epoch boundary before, so a resume stays bit-identical (it saved half an update)."""
    from edge_tl.errors import Terminated

    def terminate(step):
        if step == 3:  # mid-epoch 2
            os.kill(os.getpid(), signal.SIGTERM)

    with pytest.raises(Terminated):
        finetune(_cfg(tiny_folder, tmp_path / "term"), progress=False, on_step=terminate, log=lambda s: None)
    saved = torch.load(tmp_path / "term" / "last.pt", weights_only=True)
    assert (saved["epoch"], saved["step"]) == (1, 1)

    def twice(step):
        if step == 3:
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)  # raises at once, as inside a step

    logs: list[str] = []
    with pytest.raises(KeyboardInterrupt):
        finetune(_cfg(tiny_folder, tmp_path / "twice"), progress=False, on_step=twice, log=logs.append)
    saved = torch.load(tmp_path / "twice" / "last.pt", weights_only=True)
    assert (saved["epoch"], saved["step"]) == (1, 0)  # the end of epoch 1
    assert "stopped at once (interrupted twice): last.pt keeps the last step boundary it saved" in logs


@pytest.mark.skipif(sys.platform == "win32", reason="the file-size limit (RLIMIT_FSIZE) is POSIX's")
def test_a_disk_that_refuses_a_checkpoint_is_a_user_error(tmp_path):
    """torch.save reports a full disk as "RuntimeError: [enforce fail ...] unexpected pos" (exit 3, a
    traceback); the file system's own refusal is named instead, and no temp file is left."""
    code = (f"import resource, torch\nfrom pathlib import Path\nfrom edge_tl.errors import UserError\n"
            f"from edge_tl.finetune.train import _save_checkpoint\n"
            f"resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))\n"
            f"try:\n    _save_checkpoint(Path({str(tmp_path / 'last.pt')!r}), {{'w': torch.zeros(1 << 20)}})\n"
            f"except UserError as exc:\n    print(exc)\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.stdout.strip() == f"{tmp_path / 'last.pt'}: cannot write it (File too large). Free space or choose another path."
    assert list(tmp_path.iterdir()) == []


def test_runs_from_before_the_tuned_depthwise_backward_and_reduced_jpeg_decode_resume_without_them(tiny_folder, tmp_path):
    out = tmp_path / "run"
    finetune(_cfg(tiny_folder, out, epochs=1), progress=False, log=lambda s: None)
    state = torch.load(out / "last.pt", weights_only=True)
    assert state["preprocess"]["jpeg_reducing_gap"] == 2.0  # new runs record their decode
    del state["config"]["tune_depthwise"], state["depthwise_plans"]  # as an older edge-tl wrote it
    del state["preprocess"]["jpeg_reducing_gap"]
    state["config"]["epochs"] = 2
    torch.save(state, out / "last.pt")
    finetune(_cfg(tiny_folder, out), resume=True, progress=False, log=lambda s: None)
    resumed = torch.load(out / "last.pt", weights_only=True)
    assert resumed["epoch"] == 2 and resumed["config"]["tune_depthwise"] is False and resumed["depthwise_plans"] == {}
    assert resumed["preprocess"]["jpeg_reducing_gap"] is None  # it keeps decoding at full size, as it started


def test_quarter_turns_cover_four_orientations():
    import random

    import numpy as np
    from PIL import Image

    from edge_tl.finetune.train import RandomQuarterTurn

    img = Image.fromarray(np.arange(16, dtype=np.uint8).reshape(4, 4))
    random.seed(0)
    seen = {np.asarray(RandomQuarterTurn(1.0)(img)).tobytes() for _ in range(64)}
    assert len(seen) == 4 and np.asarray(img).tobytes() in seen
    assert all(RandomQuarterTurn(0.0)(img) is img for _ in range(8))


def test_real_elpv_subset(elpv_small, tmp_path):
    metrics = finetune(_cfg(elpv_small, tmp_path / "run", epochs=1), progress=False, log=lambda s: None)
    assert metrics["classes"] == ["p000", "p033", "p067", "p100"]
    assert metrics["num_train"] + metrics["num_val"] == 24  # the test/ split is never read
    assert 0.0 <= metrics["best_val_accuracy"] <= 1.0


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "edge_tl", *map(str, args)], capture_output=True, text=True)


@pytest.mark.parametrize("extra, match", [
    (["--model", "not_a_model_xyz"], "not a timm model"),
    (["--device", "cuda"], "--device cuda"),
    (["--freeze-stages", "9"], "can be frozen (stem + stages; the last group holds the classifier). Use 0..7"),
    (["--layer-decay", "1.5"], "--layer-decay 1.5: use a factor in (0, 1]"),
    (["--mixup", "-1"], "--mixup -1.0: use a Beta alpha > 0"),
    (["--mixup", "nan"], "--mixup nan: use a Beta alpha > 0"),
    (["--img-size", "7"], "--img-size 7: use 32 (the network downsamples 32x) to 4096"),
    (["--crop-pct", "0"], "--crop-pct 0.0: the eval center crop is a fraction in [0.25, 1]"),
    (["--lr", "nan"], "--lr nan: all must be positive"),
    (["--workers", "-1"], "--workers -1 / --freeze-stages 0: neither can be negative"),
    (["--device", "cuda:0"], "--device cuda:0: no CUDA device"),
    (["--amp", "xyz"], "--amp xyz: use auto, off, bf16 or fp16"),
    (["--scratch", "--weights", "w.pth"], "--weights w.pth and --scratch: pick one"),
])
def test_cli_bad_options_exit_2(tiny_folder, tmp_path, extra, match):
    if "cuda" in extra and torch.cuda.is_available():
        pytest.skip("CUDA is available here, so --device cuda is valid")
    res = _cli("finetune", "--data", tiny_folder, "--out", tmp_path / "r", "--img-size", 64, "--epochs", 1, *extra)
    assert res.returncode == 2, res.stderr
    assert match in res.stderr and "Traceback" not in res.stderr
    assert not (tmp_path / "r" / "last.pt").exists()


@pytest.mark.parametrize("extra, match", [
    (["--crop-pct", "0"], "--crop-pct 0.0: the eval center crop is a fraction in [0.25, 1]"),
    (["--class-weights", "cube"], "cube"),
    (["--max-drop", "-1"], "--max-drop -1.0: must be >= 1 / >= 0"),
])
def test_build_takes_the_recipe_options_and_checks_them_before_training(tiny_folder, tmp_path, extra, match):
    res = _cli("build", "--data", tiny_folder, "--out", tmp_path / "b", "--img-size", 64, "--epochs", 1,
               "--vflip", 0.5, "--rot90", 1, "--ema", *extra)
    assert res.returncode == 2 and match in res.stderr and "Traceback" not in res.stderr, res.stderr
    assert not (tmp_path / "b" / "run").exists()


def test_cli_missing_data_exit_2(tmp_path):
    res = _cli("finetune", "--data", tmp_path / "nope", "--out", tmp_path / "r")
    assert res.returncode == 2 and str(tmp_path / "nope") in res.stderr and "Traceback" not in res.stderr


def test_cli_refuses_an_out_that_is_a_file_or_inside_the_data(tiny_folder, tmp_path):
    (tmp_path / "afile").write_text("mine")
    for out, match in ((tmp_path / "afile", "is a file"), (tiny_folder / "run", "where the training images are read")):
        res = _cli("finetune", "--data", tiny_folder, "--out", out, "--img-size", 64, "--epochs", 1)
        assert res.returncode == 2 and match in res.stderr and "Traceback" not in res.stderr, res.stderr
    split = make_image_folder(tmp_path / "split" / "train", per_class=2).parent
    for out in (split / "test" / "out", split / "test"):  # the check would read it; without test/, the --out makes it
        res = _cli("build", "--data", split, "--out", out, "--img-size", 64, "--epochs", 1)
        assert res.returncode == 2 and "where the test images are read" in res.stderr, res.stderr
    assert not (split / "test").exists()
    assert (tmp_path / "afile").read_text() == "mine" and not (tiny_folder / "run").exists()


def test_cli_refuses_to_overwrite_a_run(tiny_folder, tmp_path):
    out = tmp_path / "r"
    out.mkdir()
    (out / "last.pt").write_bytes(b"x")
    res = _cli("finetune", "--data", tiny_folder, "--out", out)
    assert res.returncode == 2 and "--resume" in res.stderr


def test_ties_in_validation_accuracy_go_to_the_lower_validation_loss():
    from edge_tl.finetune.train import _better

    history = [{"epoch": 1, "val_loss": 0.31}, {"epoch": 2, "val_loss": 0.2}]
    best = {"val_accuracy": 1.0, "val_loss": 0.31, "epoch": 1}
    assert _better(1.0, 0.08, best, history) and not _better(1.0, 0.4, best, history)
    assert _better(1.0, 0.9, {"val_accuracy": 0.9, "epoch": 1}, history) and not _better(0.9, 0.01, best, history)
    old = {"val_accuracy": 1.0, "epoch": 2}  # kept by a run from before: its loss comes from the history
    assert _better(1.0, 0.1, old, history) and not _better(1.0, 0.25, old, history)


def test_last_epoch_always_at_full_size():
    spec = PreprocessSpec((224, 224))
    sizes = lambda epochs, frac: _train_sizes(TrainConfig(data="", out="", epochs=epochs, low_res_epochs=frac), spec)
    assert sizes(1, 0.6) == [224] and sizes(2, 1.0) == [160, 224] and sizes(10, 0.6) == [160] * 6 + [224] * 4


def test_a_fixed_size_backbone_trains_at_its_size_and_another_size_is_refused(tiny_folder, tmp_path):
    """ViT, DeiT and LeViT run only at their pretrained size: the low-resolution epochs are left out,
    saying so, and another --img-size is a UserError naming the size (both crashed with exit 3)."""
    logs = []
    metrics = finetune(TrainConfig(data=str(tiny_folder), out=str(tmp_path / "levit"), model="levit_128s", scratch=True,
                                   epochs=2, batch_size=8), progress=False, log=logs.append)
    assert any("levit_128s does not run at 160 px" in line and "every epoch at 224 px" in line for line in logs), logs
    assert metrics["config"]["low_res_epochs"] == 0 and metrics["epochs"] == 2
    with pytest.raises(UserError, match=r"deit_tiny_patch16_224 does not run on 64x64 input \(.*\); it takes 224x224: "
                                         r"pass --img-size 224"):
        finetune(TrainConfig(data=str(tiny_folder), out=str(tmp_path / "deit"), model="deit_tiny_patch16_224",
                             scratch=True, img_size=64), progress=False, log=lambda s: None)
    assert not (tmp_path / "deit" / "last.pt").exists()


def test_the_default_input_size_is_the_models_pretrained_one(tiny_folder, tmp_path):
    """As timm's pretrained_cfg drives mean, std and crop, it drives the size (tinynet_e: 106 px)."""
    from edge_tl.finetune.backbones import native_img_size

    assert native_img_size("tf_efficientnet_lite0") == 224 and native_img_size("tinynet_e") == 106
    assert native_img_size("vit_base_patch16_384") == 384 and native_img_size("no_such_model") is None
    metrics = finetune(TrainConfig(data=str(tiny_folder), out=str(tmp_path / "run"), model="tinynet_e", scratch=True,
                                   epochs=1, batch_size=8), progress=False, log=lambda s: None)
    assert metrics["config"]["img_size"] == 106 and metrics["preprocess"]["input_size"] == [106, 106]


def test_layer_decay_scales_lr_from_head_down():
    model = timm.create_model("tf_efficientnet_lite0", num_classes=3)
    scale = lambda opt, name: next(g.get("lr_scale", 1.0) for g in opt.param_groups
                                   if any(p is dict(model.named_parameters())[name] for p in g["params"]))
    flat = make_optimizer(model, TrainConfig(data="", out="", lr=1e-3))
    assert {g.get("lr_scale", 1.0) for g in flat.param_groups} == {1.0}
    opt = make_optimizer(model, TrainConfig(data="", out="", lr=1e-3, layer_decay=0.8))
    head, top, stem = (scale(opt, n) for n in ("classifier.weight", "blocks.6.0.conv_pw.weight", "conv_stem.weight"))
    assert head == 1.0 and stem < top < head
    assert stem == pytest.approx(0.8 ** (len({g["lr_scale"] for g in opt.param_groups}) - 1))


def test_no_channels_last_trains_in_the_plain_layout(tiny_folder, tmp_path):
    """--no-channels-last (a workaround for kernels that fail with NHWC) reaches the model being trained."""
    layouts = {}
    for channels_last in (True, False):
        def record(epoch, model, key=channels_last):
            stem = next(p for p in model.parameters() if p.dim() == 4 and p.shape[-1] == 3)
            layouts[key] = stem.is_contiguous(memory_format=torch.channels_last) and not stem.is_contiguous()
        finetune(_cfg(tiny_folder, tmp_path / str(channels_last), channels_last=channels_last), progress=False,
                 log=lambda s: None, on_epoch=record)
    assert layouts == {True: True, False: False}


def test_layer_decay_reaches_the_training_steps(tiny_folder, tmp_path):
    """The decayed LRs are what the optimizer stepped with (scheduler applies lr_scale); history logs the head's."""
    out = tmp_path / "run"
    finetune(_cfg(tiny_folder, out, layer_decay=0.5), progress=False, log=lambda s: None)
    groups = load_checkpoint(out / "last.pt")["optimizer"]["param_groups"]
    peak = max(g["lr"] for g in groups)
    assert len({g["lr_scale"] for g in groups}) > 2
    assert all(g["lr"] == pytest.approx(peak * g["lr_scale"]) for g in groups)
    last = json.loads((out / "history.jsonl").read_text().splitlines()[-1])
    assert last["lr"] == pytest.approx(peak)


def test_mixup_blends_each_image_with_its_mirror_in_the_batch():
    torch.manual_seed(0)
    x = torch.arange(4, dtype=torch.float32).view(4, 1, 1, 1).expand(4, 3, 2, 2)
    y = torch.tensor([0, 1, 2, 2])
    mixed, target = mixup_batch(x, y, num_classes=3, alpha=0.4)
    lam = float(mixed[0, 0, 0, 0] - 3) / -3  # image 0 blended with image 3: lam * 0 + (1 - lam) * 3
    assert 0 < lam < 1 and lam != 0.5
    assert torch.allclose(mixed[:, 0, 0, 0], lam * torch.arange(4.0) + (1 - lam) * torch.arange(4.0).flip(0))
    assert torch.allclose(target.sum(1), torch.ones(4))
    assert torch.allclose(target[0], torch.tensor([lam, 0, 1 - lam]))
    assert torch.allclose(target[2], torch.tensor([0, 1 - lam, lam]))
    again = {float(mixup_batch(x, y, 3, 0.4)[0][0, 0, 0, 0]) for _ in range(5)}
    assert again != {float(mixed[0, 0, 0, 0])}  # a new lam per batch


def test_mixup_reaches_every_training_step(tiny_folder, tmp_path, monkeypatch):
    """--mixup blends every batch the model trains on (the real function, counted)."""
    import edge_tl.finetune.train as train

    calls = []

    def counted(x, y, num_classes, alpha):
        calls.append(len(y))
        return mixup_batch(x, y, num_classes, alpha)

    monkeypatch.setattr(train, "mixup_batch", counted)
    finetune(_cfg(tiny_folder, tmp_path / "plain"), progress=False, log=lambda s: None)
    assert calls == []
    metrics = finetune(_cfg(tiny_folder, tmp_path / "mixed", mixup=0.4, class_weights="inverse"), progress=False,
                       log=lambda s: None)
    assert calls == [8] * (metrics["num_train"] // 8) * QUICK["epochs"]
    hist = [json.loads(line) for line in (tmp_path / "mixed" / "history.jsonl").read_text().splitlines()]
    assert all(0 < h["train_loss"] < 5 and 0 <= h["train_accuracy"] <= 1 for h in hist)


def test_images_decoded_at_each_use_train_exactly_as_in_memory(tiny_folder, tmp_path, monkeypatch):
    """With no memory to spare every image is decoded from its file at each use, in a DataLoader
    worker: the weights come out bit for bit those of the run that held them all in memory."""
    from edge_tl.finetune import data as data_module

    exact = dict(epochs=1, tune_depthwise=False)  # the depthwise plans are timed, so may differ between two runs
    ref = finetune(_cfg(tiny_folder, tmp_path / "ref", **exact), progress=False, log=lambda s: None)
    monkeypatch.setattr(data_module, "available_memory", lambda: 1)
    logs = []
    streamed = finetune(_cfg(tiny_folder, tmp_path / "streamed", **exact), progress=False, log=logs.append)
    workers = auto_workers()  # by default, when images are decoded at each use: min(4, cores - 1), at least 1
    assert any(line.startswith("warning: 24 of 24 images do not fit in memory") and
               line.endswith(f"DataLoader workers: {workers} (--workers).") for line in logs), logs
    assert (ref["decoded_at_each_use"], streamed["decoded_at_each_use"]) == (0, 24)
    assert (ref["config"]["workers"], streamed["config"]["workers"]) == (0, workers) and workers >= 1
    a, b = (torch.load(tmp_path / r / "last.pt", weights_only=True)["state_dict"] for r in ("ref", "streamed"))
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("workers", [0, 1])
def test_an_image_changed_while_training_stops_with_one_line_and_resumes_exactly(tiny_folder, tmp_path,
                                                                                 monkeypatch, workers):
    """Images decoded at each use must keep the bytes they had at the scan. One that changes stops
    the run with a one-line error (from a DataLoader worker too: there the error comes after the
    prefetched batches, in validation), the steps done saved: restored, --resume ends where an
    uninterrupted run ends."""
    from edge_tl.finetune import data as data_module

    exact = dict(tune_depthwise=False, workers=workers)
    data = shutil.copytree(tiny_folder, tmp_path / "data")
    ref = finetune(_cfg(data, tmp_path / "ref", **exact), progress=False, log=lambda s: None)
    kept = {p: p.read_bytes() for p in sorted(data.rglob("*")) if p.is_file()}
    monkeypatch.setattr(data_module, "available_memory", lambda: 1)

    def overwrite_all(step):
        if step == 1:  # after the first step: every later read finds other bytes
            contents = list(kept.values())
            for p, content in zip(kept, contents[1:] + contents[:1]):
                p.write_bytes(content)

    with pytest.raises(UserError) as caught:
        finetune(_cfg(data, tmp_path / "run", **exact), progress=False, on_step=overwrite_all, log=lambda s: None)
    message = str(caught.value)
    assert "\n" not in message and "Traceback" not in message, message
    assert message.startswith(str(data)) and "its content changed since the data was scanned" in message
    saved = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    assert (saved["epoch"], saved["step"]) == (0, 1 if workers == 0 else 2)  # the steps done before it: kept
    for p, content in kept.items():
        p.write_bytes(content)
    resumed = finetune(_cfg(data, tmp_path / "run", **exact), resume=True, progress=False, log=lambda s: None)
    a, b = (torch.load(tmp_path / r / "last.pt", weights_only=True)["state_dict"] for r in ("ref", "run"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert resumed["best_val_accuracy"] == ref["best_val_accuracy"]


def test_worker_error_keeps_the_message_and_kind_of_a_data_loader_workers_error():
    from edge_tl.finetune.train import worker_error
    from edge_tl.runtime.images import UnreadableImage

    class Failing(torch.utils.data.Dataset):
        def __len__(self):
            return 2

        def __getitem__(self, i):
            raise UnreadableImage("a/b.png: first line\nsecond line: the fix")

    with pytest.raises(UnreadableImage) as caught:
        next(iter(torch.utils.data.DataLoader(Failing(), num_workers=1)))
    assert "Original Traceback" in str(caught.value)  # what DataLoader makes of it
    cut = worker_error(caught.value)
    assert type(cut) is UnreadableImage and str(cut) == "a/b.png: first line\nsecond line: the fix"
    plain = UserError("x.png: Original Traceback is in the name")
    assert worker_error(plain) is plain


def test_class_names_outside_the_plot_font_get_a_fallback_font_or_an_index_never_a_box(tmp_path):
    import warnings

    from edge_tl.finetune.plots import class_tick_labels, plot_confusion

    assert class_tick_labels(["défaut", "ok"]) == (["défaut", "ok"], class_tick_labels(["a"])[1], "")
    labels, _, note = class_tick_labels(["\U000f0000 private", "défaut"])  # a code point no font draws
    assert labels == ["class 0", "défaut"] and "class <index>" in note
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # matplotlib warned once per missing glyph, per plot
        plot_confusion([[2, 1], [0, 3]], ["\U000f0000 private", "défaut"], tmp_path / "cm.png")
    assert (tmp_path / "cm.png").stat().st_size > 0


def test_a_resume_on_changed_data_keeps_the_earlier_image_list(tiny_folder, tmp_path):
    data = shutil.copytree(tiny_folder, tmp_path / "data")

    def interrupt(step):
        if step == 1:
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C part-way: epochs are left to train

    with pytest.raises(KeyboardInterrupt):
        finetune(_cfg(data, tmp_path / "run", epochs=2), progress=False, on_step=interrupt, log=lambda s: None)
    before = (tmp_path / "run" / "images.tsv").read_text()
    first = sorted((data / "checker").iterdir())[0]
    first.write_bytes(sorted((data / "hstripes").iterdir())[0].read_bytes())  # new content, same name
    logs = []
    finetune(_cfg(data, tmp_path / "run", epochs=2), resume=True, progress=False, log=logs.append)
    assert (tmp_path / "run" / "images.before-resume-1.tsv").read_text() == before
    after = (tmp_path / "run" / "images.tsv").read_text()
    assert after != before and any("the data changed since this run started (1 images with new content)" in line
                                   for line in logs)
    first.write_bytes(sorted((data / "vstripes").iterdir())[0].read_bytes())  # again, after the run is complete
    logs.clear()
    finetune(_cfg(data, tmp_path / "run", epochs=2), resume=True, progress=False, log=logs.append)
    assert (tmp_path / "run" / "images.tsv").read_text() == after  # the record stays that of what it trained on
    assert not (tmp_path / "run" / "images.before-resume-2.tsv").exists()
    assert any("the run is complete, so nothing trains on it" in line for line in logs)
