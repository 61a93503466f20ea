"""`edge-tl build`: all stages on a tiny dataset, skip on rerun, --force, report contents."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import unicodedata
from dataclasses import asdict
from pathlib import Path

import pytest

from edge_tl.build import build, folder_fingerprint, format_summary, scratch_twin, summarize
from edge_tl.errors import UserError
from edge_tl.export.bundle import export_bundle
from edge_tl.finetune.config import TrainConfig, check_config, training_roots
from edge_tl.finetune.train import load_checkpoint
from edge_tl.finetune.transfer import compare_run_folders
from edge_tl.report import open_image_count, write_report
from edge_tl.runtime.check import check_bundle

from conftest import make_image_folder

TRAIN = dict(epochs=2, img_size=64, batch_size=8)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("build")
    make_image_folder(root / "imgs" / "train", per_class=12, seed=0)
    make_image_folder(root / "imgs" / "test", per_class=6, seed=1)
    logs: list[str] = []
    summary = build(str(root / "imgs"), "jetson", root / "out", TRAIN, "fp32,int8", bench_batches=(1, 4),
                    bench_seconds=0.2, log=logs.append)
    return root, summary, logs


def test_build_never_deletes_folders_it_did_not_make(tmp_path):
    """An OUT/run or OUT/data that no build made is the user's: refused, kept, before any work."""
    make_image_folder(tmp_path / "imgs", per_class=4)
    for data, folder in ((str(tmp_path / "imgs"), "run"), ("demo", "data")):
        out = tmp_path / f"out-{folder}"
        (out / folder).mkdir(parents=True)
        (out / folder / "notes.txt").write_text("mine")
        with pytest.raises(UserError, match=f"out-{folder}/{folder}: exists and is not"):
            build(data, "cpu", out, TRAIN, log=lambda s: None)
        assert (out / folder / "notes.txt").read_text() == "mine"
    with pytest.raises(UserError, match="where the training images are read"):
        build(str(tmp_path / "imgs"), "cpu", tmp_path / "imgs" / "edge-tl-build", TRAIN, log=lambda s: None)
    with pytest.raises(UserError, match="--img-size 8"):
        build(str(tmp_path / "imgs"), "cpu", tmp_path / "o", {**TRAIN, "img_size": 8}, log=lambda s: None)
    assert not (tmp_path / "imgs" / "edge-tl-build").exists() and not (tmp_path / "o").exists()


def test_scratch_twin_of_a_weights_run_is_valid_and_a_twin(tmp_path):
    cfg = TrainConfig(data=str(tmp_path / "imgs"), out=str(tmp_path / "run"), weights="w.pth", epochs=3)
    twin = scratch_twin(cfg, tmp_path / "run-scratch")
    check_config(twin, tmp_path / "run-scratch")  # --weights with --scratch is refused; the twin has no weights
    assert twin.scratch and twin.weights is None and twin.epochs == 3
    for run, c in (("run", cfg), ("run-scratch", twin)):
        (tmp_path / run).mkdir()
        (tmp_path / run / "metrics.json").write_text(json.dumps({"config": asdict(c)}))
        (tmp_path / run / "history.jsonl").write_text(json.dumps({"epoch": 1, "val_accuracy": 0.5}) + "\n")
    assert compare_run_folders(tmp_path / "run", tmp_path / "run-scratch") is not None


def test_data_fingerprint_covers_what_training_reads_only(tmp_path):
    """An --out inside DIR (beside train/), test/ and hidden files must not make a rerun retrain."""
    data = tmp_path / "d"
    make_image_folder(data / "train", per_class=2)
    fingerprint = lambda: [folder_fingerprint(r) for r in training_roots(data)]
    before = fingerprint()
    (data / "edge-tl-build").mkdir()
    (data / "edge-tl-build" / "build.json").write_text("{}")
    (data / "train" / "checker" / ".DS_Store").write_text("x")
    make_image_folder(data / "test", per_class=1)
    assert fingerprint() == before
    some = next((data / "train" / "checker").glob("*.png"))
    os.utime(some, (1, 1))  # touched, copied or re-unzipped: the same bytes, so training's progress is kept
    assert fingerprint() == before
    some.write_bytes(some.read_bytes() + b"\0")
    assert fingerprint() != before
    before = fingerprint()
    make_image_folder(data / "valid", per_class=1)
    assert fingerprint() != before
    before = fingerprint()  # a class linked in from elsewhere, then an image added inside it: both are new data
    make_image_folder(tmp_path / "elsewhere", per_class=2, classes=("dots",))
    (data / "train" / "dots").symlink_to(tmp_path / "elsewhere" / "dots")
    assert fingerprint() != before
    before = fingerprint()
    make_image_folder(tmp_path / "elsewhere", per_class=3, classes=("dots",))
    assert fingerprint() != before


def test_build_runs_every_stage_and_summarizes(built):
    root, summary, logs = built
    out = root / "out"
    for stage in ("data", "finetune", "export", "check", "bench", "report"):
        assert any(line.startswith("[") and f"] {stage} ..." in line for line in logs), stage
    for f in ("run/best.pt", "bundle/manifest.json", "check.json", "bench.json", "report.html", "summary.json"):
        assert (out / f).is_file(), f
    assert summary["data"].endswith("(18 images)")  # the test/ folder, not the golden set
    assert {r["artifact"] for r in summary["artifacts"]} == {"fp32", "int8"}  # jetson: TensorRT Q/DQ flavour
    assert all(r["accepted"] and "rejected" not in r for r in summary["artifacts"])
    assert all("b1_p50_ms" in r and "b4_p50_ms" in r for r in summary["artifacts"]) and summary["torch_reference"]
    text = format_summary(summary)
    assert "edge-tl engine bundle --precision int8" in text and "trtexec --onnx=bundle/model.int8.onnx" in text
    assert "edge-tl check bundle" in text


def test_a_model_no_better_than_chance_is_said_so(built):
    """check.json names the artifacts whose balanced accuracy is at chance; summary and report say whether
    the model has not learned (all at chance) or an artifact is broken (another above it)."""
    import copy

    from edge_tl.report import write_report

    root, summary, _ = built
    assert summary["chance_note"] is None and "constant answer" not in format_summary(summary)
    out = root / "chance"
    shutil.copytree(root / "out", out)
    check = json.loads((out / "check.json").read_text())
    names = list(check["artifacts"])
    for at, said in ((names, "the model has not learned"), (names[1:], f"while {names[0]} is above it")):
        check.update(at_chance=at, chance=0.5)
        (out / "check.json").write_text(json.dumps(check))
        assert said in write_report(out).read_text() and said in format_summary(summarize(out))


def test_report_has_the_figures(built):
    root, _, _ = built
    page = (root / "out" / "report.html").read_text()
    for section in ("Accuracy per artifact", "Learning curve", "Confusion matrix", "precision", "Misclassified",
                    "Latency", "Environment"):
        assert section in page, section
    assert "on golden.npz's 3 source images: max |Δ| 0 grey levels" in page  # preprocessing here = at export
    # learning curve + 2 confusion matrices + latency plot (+ misclassified thumbnails), all decodable PNGs
    assert open_image_count(page) >= 4
    assert "http://" not in page and "https://" not in page  # self-contained
    assert "Macro recall of int8 (the mean of the classes' recalls" in page
    assert f"End to end: decode + preprocess + infer of 18 files of {root / 'imgs' / 'test'} (40x40 JPEG, 40x40 PNG)" in page


def test_report_and_summary_show_an_int8_not_accepted_and_skipped_training_files(built, tmp_path):
    from edge_tl.build import summarize
    from edge_tl.runtime.bundle import Bundle

    root, _, _ = built
    out = tmp_path / "out"
    shutil.copytree(root / "out", out)
    bundle = Bundle.load(out / "bundle")
    int8 = next(a for a in bundle.manifest["artifacts"] if a["precision"] == "int8")
    int8.update(accepted=False, rejected="fully quantized it loses 5.56 pts (1 of 18 validation images)")
    bundle.save()  # re-signed, as export writes it
    metrics = json.loads((out / "run" / "metrics.json").read_text())
    (out / "run" / "metrics.json").write_text(json.dumps({**metrics, "skipped_files": 3}))
    page = write_report(out).read_text()
    assert "int8 was not accepted at export: fully quantized it loses 5.56 pts (1 of 18 validation images)" in page
    assert "3 training files or folders were skipped (unreadable, not images, or where training does not read)" in page and "layers in float" in page
    text = format_summary(summarize(out))
    assert "int8: not accepted at export, so not gated and used only when asked for (fully quantized it loses 5.56" in text
    assert "3 training files or folders skipped (unreadable, not images, or where training does not read): listed in run/skipped.txt" in text


def test_report_says_why_misclassified_images_are_missing(built, tmp_path):
    """Regenerated after the test images moved: the count stays, the page says why none are shown."""
    root, _, _ = built
    out = tmp_path / "out"
    shutil.copytree(root / "out", out)
    check = json.loads((out / "check.json").read_text())
    check["images"] = [str(tmp_path / "moved" / Path(p).name) for p in check["images"]]
    for art in check["artifacts"].values():
        if "predictions" in art:  # every image wrong, so there is something to show
            art["predictions"] = [(y + 1) % 3 for y in check["labels"]]
    (out / "check.json").write_text(json.dumps(check))
    page = write_report(out).read_text()
    assert f"({len(check['labels'])} of {len(check['labels'])}, their image files are no longer where" in page


def test_report_without_the_learning_curve_says_how_to_draw_it(built, tmp_path):
    root, _, _ = built
    out = tmp_path / "out"
    shutil.copytree(root / "out", out)
    (out / "run" / "learning_curve.png").unlink()  # a fine-tune stopped between metrics.json and its plots
    assert "learning_curve.png is missing" in write_report(out).read_text()


def test_report_shows_golden_images_when_the_check_ran_on_them(built, tmp_path):
    """A build whose data has no test/ folder checks on the bundle's golden images: their thumbnails
    come from golden.npz, the pixels the model saw."""
    root, _, _ = built
    out = tmp_path / "out"
    shutil.copytree(root / "out", out)
    check = check_bundle(out / "bundle", None, keep_predictions=True)
    n = len(check["labels"])
    for art in check["artifacts"].values():  # every image wrong, so there is something to show
        art["predictions"] = [(y + 1) % 3 for y in check["labels"]]
    (out / "check.json").write_text(json.dumps(check))
    page = write_report(out).read_text()
    assert f"({n} of {n}, first {min(n, 24)} shown)" in page
    assert page.count('class="thumb"') == min(n, 24)


def test_rerun_skips_and_force_redoes(built):
    root, summary, _ = built
    logs: list[str] = []
    again = build(str(root / "imgs"), "jetson", root / "out", TRAIN, "fp32,int8", bench_batches=(1, 4),
                  bench_seconds=0.2, log=logs.append)
    assert sum("up to date" in line for line in logs) == 6
    assert again["artifacts"] == summary["artifacts"]
    res = subprocess.run([sys.executable, "-m", "edge_tl", "report", str(root / "out")], capture_output=True, text=True)
    assert res.returncode == 0 and "report.html" in res.stdout
    logs.clear()
    build(str(root / "imgs"), "jetson", root / "out", TRAIN, "fp32,int8", force=True, bench_batches=(1,),
          bench_seconds=0.1, log=logs.append)
    assert not any("up to date" in line for line in logs)
    assert json.loads((root / "out" / "bench.json").read_text())["results"][0]["batch"] == 1


@pytest.mark.parametrize("gone", ["run", "run/best.pt", "run/metrics.json", "run/best.pt+run/metrics.json", "bundle",
                                  "bundle/model.int8.onnx", "bundle/manifest.json", "check.json"])
def test_missing_outputs_rerun_their_stage(built, tmp_path, gone):
    root, _, _ = built
    out = tmp_path / "out"
    shutil.copytree(root / "out", out)
    for i, path in enumerate(gone.split("+")):  # outputs gone -> stage reruns even with same inputs
        shutil.move(out / path, tmp_path / f"moved{i}")
    logs: list[str] = []
    build(str(root / "imgs"), "jetson", out, TRAIN, "fp32,int8", bench_batches=(1,), bench_seconds=0.1, log=logs.append)
    stage = {"run": "finetune", "bundle": "export", "check.json": "check"}[gone.split("/")[0]]
    assert any(f"] {stage} ..." in line for line in logs) and all((out / p).exists() for p in gone.split("+"))
    if gone.startswith("run/best.pt"):  # the finished run's best epoch is lost: retrained, not "resumed" into nothing
        assert any("best.pt is gone, so it trains afresh" in line for line in logs)


def test_a_moved_build_with_an_edited_bundle_and_a_killed_builds_leftovers_reruns_what_it_must(built, tmp_path):
    """A bundle file edited since the export redoes the export (it had said "up to date", then check
    refused the bundle); bench times the moved build's own run, not the path the manifest recorded;
    what a killed build left half-written (temp files of atomic writes) is removed."""
    root, _, _ = built
    out = tmp_path / "moved"
    shutil.copytree(root / "out", out)
    with open(out / "bundle" / "model.fp32.onnx", "ab") as f:
        f.write(b"\0")
    (out / "bench.json").unlink()
    (out / "run" / ".last.pt.0123abcd.tmp").write_bytes(b"half a checkpoint")
    (out / ".bundle.89abcdef.tmp").mkdir()
    logs: list[str] = []
    build(str(root / "imgs"), "jetson", out, TRAIN, "fp32,int8", bench_batches=(1,), bench_seconds=0.1, log=logs.append)
    assert any("] export: its output changed since (" in line and "model.fp32.onnx" in line for line in logs), logs
    assert any(line.endswith("] export ...") for line in logs)
    assert not (out / "run" / ".last.pt.0123abcd.tmp").exists() and not (out / ".bundle.89abcdef.tmp").exists()
    assert any("removed what a killed build left half-written" in line for line in logs)
    bench = json.loads((out / "bench.json").read_text())
    assert bench["reference_checkpoint"] == str((out / "run" / "best.pt").resolve())


def test_one_build_or_fine_tune_at_a_time_writes_a_folder(built, tmp_path):
    """A second build (or fine-tune) into a folder one is writing is refused, naming the holder; once
    it ends, the folder is free again."""
    from edge_tl.fileio import folder_lock
    from edge_tl.finetune.train import finetune

    root, _, _ = built
    out = tmp_path / "out"
    shutil.copytree(root / "out", out)
    with folder_lock(out, "edge-tl build"):
        with pytest.raises(UserError, match=r"out: another edge-tl command is writing it \(edge-tl build, process "
                                            rf"{os.getpid()} on .*\); wait for it to end, or choose another --out"):
            build(str(root / "imgs"), "jetson", out, TRAIN, "fp32,int8", log=lambda s: None)
    with folder_lock(out / "run", "edge-tl finetune"):
        cfg = TrainConfig(data=str(root / "imgs"), out=str(out / "run"), **TRAIN)
        with pytest.raises(UserError, match="run: another edge-tl command is writing it"):
            finetune(cfg, resume=True, progress=False, log=lambda s: None)
    logs: list[str] = []
    build(str(root / "imgs"), "jetson", out, TRAIN, "fp32,int8", log=logs.append)
    assert [s for s in ("finetune", "export") if any(f"] {s}: up to date" in line for line in logs)] == ["finetune", "export"]
    # two builds start on a new --out at once: the one refused by the lock leaves the other's folder alone
    import contextlib

    from edge_tl import build as build_module

    other = contextlib.ExitStack()
    new = tmp_path / "new"

    def made_by_the_other_build_first(path):
        path.mkdir()
        other.enter_context(folder_lock(path, "edge-tl build"))
        (path / "build.json").write_text('{"stages": {}}')

    with other, pytest.MonkeyPatch.context() as m:
        m.setattr(build_module, "make_folder", made_by_the_other_build_first)
        with pytest.raises(UserError, match="another edge-tl command is writing it"):
            build(str(root / "imgs"), "jetson", new, TRAIN, "fp32,int8", log=lambda s: None)
        assert (new / "build.json").is_file()


def test_a_folder_on_a_file_system_without_locks_is_written_with_a_warning(tmp_path, monkeypatch, caplog):
    import errno

    from edge_tl import fileio

    def no_locks(fd, unlock=False):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fileio, "_lock", no_locks)  # NFS without lockd: no such file system here
    with fileio.folder_lock(tmp_path, "edge-tl build"):
        pass
    assert "cannot be locked (No locks available); nothing stops a second edge-tl command" in caplog.text


def test_a_damaged_build_record_is_named_with_the_fix(tmp_path):
    make_image_folder(tmp_path / "imgs", per_class=2)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "build.json").write_text("")
    with pytest.raises(UserError, match=r"build.json: not a build record \(empty or damaged\).* delete .*out and build "
                                        "again, or choose another --out"):
        build(str(tmp_path / "imgs"), "cpu", tmp_path / "out", TRAIN, "fp32", log=lambda s: None)


def test_resume_without_best_pt_says_what_is_lost(built, tmp_path):
    from edge_tl.finetune.train import finetune

    root, _, _ = built
    run = tmp_path / "run"
    shutil.copytree(root / "out" / "run", run)
    (run / "best.pt").unlink()
    cfg = TrainConfig(data=str(root / "imgs"), out=str(run), **TRAIN)
    with pytest.raises(UserError, match="best.pt: missing, and the run is complete, so its best epoch .* is lost"):
        finetune(cfg, resume=True, progress=False, log=lambda s: None)


def test_a_relative_data_path_works_from_any_folder(built, tmp_path, monkeypatch):
    """`build --data imgs`: the run records the folder absolute (export and --resume work from elsewhere),
    and the fine-tune stage keys on the data's content, not on how its path is spelled."""
    root, _, _ = built
    out = tmp_path / "out"
    shutil.copytree(root / "out", out)
    monkeypatch.chdir(root)
    logs: list[str] = []
    build("imgs", "cpu", out, TRAIN, "fp32", bench_batches=(1,), bench_seconds=0.1, log=logs.append)
    assert any("] finetune" in line and "up to date" in line for line in logs), logs
    assert json.loads((out / "check.json").read_text())["data"].startswith(f"{root / 'imgs' / 'test'} (")

    fresh = tmp_path / "fresh"
    build("imgs", "cpu", fresh, {**TRAIN, "epochs": 1}, "fp32", bench_batches=(1,), bench_seconds=0.1, log=lambda s: None)
    monkeypatch.chdir(tmp_path)  # elsewhere: "imgs" means nothing here
    assert Path(load_checkpoint(fresh / "run" / "best.pt")["config"]["data"]) == root / "imgs"
    export_bundle(fresh / "run", tmp_path / "again", "cpu", "fp32", log=lambda s: None)  # finds the data to validate on


def test_moved_data_is_the_same_data_and_export_reads_it_there(built, tmp_path):
    """The data folder moved: no retraining, and the re-run export calibrates on the folder given, not the old one."""
    root, _, _ = built
    out, moved = tmp_path / "out", tmp_path / "moved-imgs"
    shutil.copytree(root / "out", out)
    shutil.copytree(root / "imgs", moved)  # copy2 keeps the files' times: the same content fingerprint
    logs: list[str] = []
    build(str(moved), "cpu", out, TRAIN, "fp32,int8", bench_batches=(1,), bench_seconds=0.1, log=logs.append)
    assert any("] finetune" in line and "up to date" in line for line in logs), logs
    assert json.loads((out / "bundle" / "manifest.json").read_text())["data"] == str(moved)


def test_new_test_images_rerun_only_the_check_onwards(built, tmp_path):
    root, _, _ = built
    out = tmp_path / "out"
    shutil.copytree(root / "out", out)
    extra = root / "imgs" / "test" / "checker" / "from_bob" / "extra.png"  # a sub-folder of its class
    extra.parent.mkdir()
    trained = sorted((root / "imgs" / "train" / "checker").glob("*.png"))[0]
    shutil.copy(trained, extra)  # a training image leaked into test/: the check finds it
    conflict = root / "imgs" / "test" / "hstripes" / "conflict.png"
    shutil.copy(trained, conflict)  # and one filed under another class than in train
    try:
        logs: list[str] = []
        summary = build(str(root / "imgs"), "jetson", out, TRAIN, "fp32,int8", bench_batches=(1, 4),
                        bench_seconds=0.2, log=logs.append)
    finally:
        shutil.rmtree(extra.parent)
        conflict.unlink()
    skipped = {stage for stage in ("finetune", "export", "check") if any(f"] {stage}" in line and "up to date" in line
                                                                      for line in logs)}
    assert skipped == {"finetune", "export"}, logs  # training never reads test/; the check does
    said = "1 test images with a copy of the same class among the training or validation images"
    assert any(said in line and "1 test images with a copy under another class" in line for line in logs), logs
    leaks = json.loads((out / "check.json").read_text())["test_in_training"]
    trained = str(trained.resolve())
    assert sorted(leaks, key=lambda c: c["test"]) == [{"test": str(extra), "training": trained, "same_class": True},
                                                      {"test": str(conflict), "training": trained, "same_class": False}]
    assert summary["duplicates"]["test_in_training"] == 1 == summary["duplicates"]["test_label_conflicts"]
    assert said in format_summary(summary) and said in (out / "report.html").read_text()


def test_a_test_class_training_lacks_is_refused_before_any_training(tmp_path):
    make_image_folder(tmp_path / "imgs" / "train", per_class=2)
    make_image_folder(tmp_path / "imgs" / "Test", per_class=1, classes=("checker", "dog"))
    with pytest.raises(UserError, match=r"Test: class folders \['dog'\] are not among the training classes"):
        build(str(tmp_path / "imgs"), "cpu", tmp_path / "out", TRAIN, "fp32", log=lambda s: None)
    assert not (tmp_path / "out").exists()  # the build made it and wrote nothing but its state: removed again
    # a test/ folder a Mac wrote ("é" decomposed) holds the same class as the training folder
    from edge_tl.build import _check_test_classes

    nfc, nfd = unicodedata.normalize("NFC", "café"), unicodedata.normalize("NFD", "café")
    make_image_folder(tmp_path / "mac" / "train", per_class=2, classes=(nfc, "tea"))
    make_image_folder(tmp_path / "mac" / "test", per_class=1, classes=(nfd, "tea"))
    assert {d.name for d in (tmp_path / "mac" / "test").iterdir()} == {nfd, "tea"}
    _check_test_classes(tmp_path / "mac", tmp_path / "mac" / "test")


def test_many_classes_get_one_confusion_matrix(built, tmp_path, monkeypatch):
    from edge_tl import report

    root, _, _ = built
    assert report.write_report(root / "out").read_text().count('alt="confusion matrix ') == 2  # fp32 and int8
    out = tmp_path / "out"
    shutil.copytree(root / "out", out)
    monkeypatch.setattr(report, "MANY_CLASSES", 2)  # these 3 classes count as many
    page = report.write_report(out).read_text()
    assert page.count('alt="confusion matrix ') == 1 and 'alt="confusion matrix int8"' in page


def test_classes_the_headline_accuracy_hides_are_named():
    from edge_tl.report import _class_warnings, per_class

    rows = per_class([0, 0, 0, 1, 1], [0, 0, 0, 0, 0], ["a", "b", "c"])  # b never right, c never tested nor predicted
    assert rows == [["a", 0.6, 1.0, 3], ["b", "-", 0.0, 2], ["c", "-", "-", 0]]
    page = "".join(_class_warnings(rows, "int8"))
    assert "Macro recall of int8" in page and ": 0.5000." in page
    assert "Never right:</b> b (1 of 3 classes" in page and "Not tested:</b> c (no test images" in page


def test_a_far_larger_class_is_noted_with_the_fix():
    from edge_tl.finetune.train import imbalance_note

    assert imbalance_note([110, 12, 40], ["stop", "yield", "50"], "none") is None
    note = imbalance_note([110, 3, 40], ["stop", "yield", "50"], "none")
    assert "classes differ 37-fold in size ('yield': 3 training images, 'stop': 110)" in note
    assert "--class-weights sqrt (or inverse)" in note


def test_compare_scratch_adds_the_transfer_section(built, tmp_path):
    root, _, _ = built
    out = tmp_path / "out"
    shutil.copytree(root / "out", out)
    logs: list[str] = []
    summary = build(str(root / "imgs"), "jetson", out, TRAIN, "fp32,int8", bench_batches=(1, 4), bench_seconds=0.2,
                    compare_scratch=True, log=logs.append)
    assert "[3/7] scratch ..." in logs and "[2/7] finetune: up to date (inputs unchanged), skipped" in logs
    assert "[7/7] report ..." in logs  # the new comparison changes the report's inputs
    scratch = json.loads((out / "run-scratch" / "metrics.json").read_text())
    assert scratch["pretrained"] == "none (--scratch)" and scratch["config"]["epochs"] == TRAIN["epochs"]
    t = summary["transfer"]
    assert set(t["effects"]) == {"pretrained", "scratch"} and t["metric"] == "validation accuracy"
    history = [json.loads(x) for x in (out / "run-scratch" / "history.jsonl").read_text().splitlines()]
    assert t["effects"]["scratch"]["start"] == history[0]["val_accuracy"]
    page = (out / "report.html").read_text()
    assert "Transfer learning: pretrained vs scratch" in page and "asymptote: best accuracy" in page
    assert "pretrained vs scratch" in format_summary(summary)
    # a few validation images judge nothing: one image is several points
    assert t["validation_images"] < 30 and {t["better"][k] for k in ("start", "slope", "asymptote")} == {"too few images"}
    assert "too few images" in format_summary(summary) and "too few images" in page
    logs.clear()  # dropping the flag: the old run-scratch/ stays on disk but is no longer shown
    again = build(str(root / "imgs"), "jetson", out, TRAIN, "fp32,int8", bench_batches=(1, 4), bench_seconds=0.2,
                  log=logs.append)
    assert again["transfer"] is None and "[6/6] report: up to date (inputs unchanged), skipped" not in logs
    assert "Transfer learning" not in (out / "report.html").read_text()


@pytest.mark.skipif(not any(shutil.which(b) for b in ("chromium", "chromium-browser", "google-chrome")),
                    reason="needs a headless Chromium (chromium / google-chrome on PATH) to render the report")
def test_report_renders_in_headless_chromium(built, tmp_path):
    root, _, _ = built
    browser = next(shutil.which(b) for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b))
    res = subprocess.run([browser, "--headless", "--disable-gpu", "--no-sandbox", "--dump-dom",
                          (root / "out" / "report.html").as_uri()], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0
    assert res.stdout.count("<img") >= 4 and "Latency" in res.stdout


def test_report_of_a_build_folder_edited_into_another_shape_is_a_user_error_and_escapes_values(built, tmp_path):
    root, _, _ = built
    out = tmp_path / "out"
    shutil.copytree(root / "out", out)
    metrics = json.loads((out / "run" / "metrics.json").read_text())
    (out / "run" / "metrics.json").write_text(json.dumps({**metrics, "epochs": "<script>alert(1)</script>"}))
    page = write_report(out).read_text()
    assert "<script>alert(1)" not in page and "&lt;script&gt;alert(1)" in page
    (out / "run" / "metrics.json").write_text(json.dumps({**metrics, "seconds": "<script>"}))
    with pytest.raises(UserError, match=r"not as `edge-tl build` wrote it \(TypeError"):
        write_report(out)
