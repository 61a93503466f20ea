"""The ELPV demo writer: stratified by class and cell type, deterministic for a seed."""

from __future__ import annotations

import json

import pytest

from edge_tl.errors import UserError
from edge_tl.finetune.elpv import _labels, write_elpv


def _files(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*.png"))


def test_split_stratified_and_deterministic(tmp_path):
    a = write_elpv(tmp_path / "a", "4class", 0.25, seed=0, progress=False)
    write_elpv(tmp_path / "b", "4class", 0.25, seed=0, progress=False)
    c = write_elpv(tmp_path / "c", "binary", 0.25, seed=1, progress=False)
    assert _files(tmp_path / "a") == _files(tmp_path / "b")
    assert len(_files(tmp_path / "a")) == 2624
    assert set(c["counts"]["train"]) == {"functional", "defective"}
    _, rows = _labels()
    kind = {path.split("/")[-1]: t for path, _, t in rows}
    for cls, n_test in a["counts"]["test"].items():
        n_train = a["counts"]["train"][cls]
        assert abs(n_test / (n_test + n_train) - 0.25) < 0.02, cls
        for t in ("mono", "poly"):
            te = sum(kind[p.name] == t for p in (tmp_path / "a" / "test" / cls).iterdir())
            tr = sum(kind[p.name] == t for p in (tmp_path / "a" / "train" / cls).iterdir())
            assert abs(te - round((te + tr) * 0.25)) <= 1, (cls, t)
    assert "CC BY-NC-SA 4.0" in (tmp_path / "a" / "LICENSE.txt").read_text()
    assert json.loads((tmp_path / "a" / "dataset.json").read_text())["counts"] == a["counts"]
    assert not set(_files(tmp_path / "a" / "test")) & set(_files(tmp_path / "a" / "train"))


def test_refuses_non_empty_out(tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "keep.txt").write_text("mine")
    with pytest.raises(UserError, match="not an empty folder"):
        write_elpv(tmp_path / "x", progress=False)
    assert (tmp_path / "x" / "keep.txt").read_text() == "mine"


def test_bad_output_or_limit_is_a_clear_error(tmp_path):
    (tmp_path / "afile").write_text("x")
    with pytest.raises(UserError, match="not an empty folder"):
        write_elpv(tmp_path / "afile", progress=False)
    for limit in (0, -1):
        with pytest.raises(UserError, match="--limit-per-class"):
            write_elpv(tmp_path / "out", limit_per_class=limit, progress=False)
    assert not (tmp_path / "out").exists()
