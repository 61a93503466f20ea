"""What differs on Windows and macOS, checked here where Linux can show it: consoles in a code page,
path order, Unicode forms of names, system files, spawned workers, folders in use."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import unicodedata
from pathlib import Path, PurePosixPath, PureWindowsPath

import pytest

from conftest import make_image_folder
from edge_tl.errors import UserError
from edge_tl.finetune.data import discover
from edge_tl.runtime.images import path_order, visible_files
from edge_tl.runtime.spec import PreprocessSpec

SPEC = PreprocessSpec(input_size=(32, 32), crop_pct=1.0)


def test_predict_prints_any_class_or_path_on_a_console_in_a_code_page(cpu_bundle, elpv_small, tmp_path):
    folder = tmp_path / "缺陷"
    folder.mkdir()
    shutil.copy(sorted((elpv_small / "test" / "p100").iterdir())[0], folder / "cell é.png")
    env = {**os.environ, "PYTHONIOENCODING": "cp1252"}  # what Windows gives a redirected stdout
    res = subprocess.run([sys.executable, "-m", "edge_tl", "predict", str(cpu_bundle), str(folder)],
                         capture_output=True, env=env)
    assert res.returncode == 0, res.stderr.decode("cp1252", "replace")
    assert b"\\u7f3a\\u9677" in res.stdout and "cell é.png".encode("cp1252") in res.stdout


def test_paths_sort_the_same_on_every_os():
    names = ["IMG_0002.PNG", "img_0001.png", "Scan 3.png", "a b/x.png", "a/x.png"]
    posix = sorted((PurePosixPath("/d", n) for n in names), key=path_order)
    windows = sorted((PureWindowsPath("C:/d", n) for n in names), key=path_order)
    assert [p.relative_to("/d").as_posix() for p in posix] == [p.relative_to("C:/d").as_posix() for p in windows]
    assert sorted(PureWindowsPath("C:/d", n) for n in names) != windows  # Windows' own order ignores case


def test_a_class_named_in_another_unicode_form_is_the_same_class(tmp_path):
    nfc, nfd = unicodedata.normalize("NFC", "défaut"), unicodedata.normalize("NFD", "défaut")
    assert nfc != nfd
    make_image_folder(tmp_path / "d" / "train", per_class=4, classes=("hstripes", nfc))
    make_image_folder(tmp_path / "d" / "val", per_class=2, classes=("hstripes", nfd), seed=1)  # copied from a Mac
    data = discover(tmp_path / "d", SPEC, progress=False)
    assert data.classes == sorted(["hstripes", nfc]) and data.val.counts(2) == [2, 2]


def test_windows_and_macos_system_files_are_not_images(tmp_path):
    folder = make_image_folder(tmp_path / "d", per_class=2, classes=("cls",)) / "cls"
    for name in ("Thumbs.db", "desktop.ini", "ehthumbs.db", "Icon\r", ".DS_Store"):
        (folder / name).write_bytes(b"\0" * 8)
    assert [f.name for f in visible_files(folder)] == ["000.png", "001.jpg"]


def test_workers_default_to_none_where_they_are_spawned(monkeypatch):
    import torch

    from edge_tl.finetune.train import auto_workers

    monkeypatch.setattr(torch.multiprocessing, "get_start_method", lambda *a, **k: "spawn")
    assert auto_workers() == 0
    monkeypatch.setattr(torch.multiprocessing, "get_start_method", lambda *a, **k: "fork")
    assert auto_workers() >= 1


def test_a_folder_in_use_is_not_replaced_and_the_error_says_why(tmp_path, monkeypatch):
    from edge_tl.fileio import replace_folder

    old, new = tmp_path / "bundle", tmp_path / "new"
    old.mkdir()
    (old / "manifest.json").write_text("{}")
    new.mkdir()
    real = Path.rename

    def in_use(self, target):
        if self == old:
            raise PermissionError(13, "The process cannot access the file because it is being used by another process")
        return real(self, target)

    monkeypatch.setattr(Path, "rename", in_use)
    with pytest.raises(UserError, match="close the programs using it"):
        replace_folder(new, old)
    assert (old / "manifest.json").is_file()
