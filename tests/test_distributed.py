"""torchrun: a 2-process gloo DDP fine-tune on CPU; CUDA paths skip with a reason on CPU machines."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from edge_tl.finetune.data import discover
from edge_tl.finetune.train import load_checkpoint, load_model, predict_logits
from edge_tl.runtime.spec import PreprocessSpec

from conftest import make_image_folder


def test_two_process_gloo_finetune(tmp_path):
    data = make_image_folder(tmp_path / "imgs", per_class=10)
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "edge_tl",
           "finetune", "--data", str(data), "--out", str(out), "--epochs", "2", "--img-size", "48",
           "--batch-size", "4", "--device", "cpu"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.count("best val accuracy") == 1  # rank 1 prints nothing
    assert "2 processes (DistributedDataParallel" in res.stdout
    files = sorted(p.name for p in out.iterdir())
    assert files == sorted(["best.pt", "last.pt", "history.jsonl", "metrics.json", "learning_curve.png",
                            "confusion_matrix.png", "skipped.txt", "duplicates.txt", "odd_images.txt", "images.tsv",
                            ".edge-tl.lock"])  # none from rank 1
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["processes"] == 2 and len((out / "history.jsonl").read_text().splitlines()) == 2
    assert load_checkpoint(out / "last.pt")["depthwise_plans"]  # a CPU run under torchrun is tuned too
    # the reduced validation accuracy is the accuracy of the saved model on the whole val split
    model, ckpt = load_model(out / "best.pt")
    spec = PreprocessSpec.from_dict(ckpt["preprocess"])
    val = discover(data, spec, progress=False).val
    logits = predict_logits(model, val, spec, torch.device("cpu"))
    acc = float((logits.argmax(1).numpy() == np.asarray(val.labels)).mean())
    assert acc == pytest.approx(metrics["best_val_accuracy"], abs=1e-6)
    # the loss too (finer than accuracy): shards must not be scored with each rank's own BatchNorm statistics
    best = json.loads((out / "history.jsonl").read_text().splitlines()[metrics["best_epoch"] - 1])
    loss = torch.nn.functional.cross_entropy(logits, torch.tensor(val.labels)).item()
    assert loss == pytest.approx(best["val_loss"], abs=1e-4)
    # 2 processes x batch 4 over 24 training images: 3 optimizer steps per epoch
    assert json.loads((out / "history.jsonl").read_text().splitlines()[0])["epoch"] == 1


def _torchrun_finetune(data, out, *extra) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "edge_tl",
            "finetune", "--data", str(data), "--out", str(out), "--epochs", "3", "--img-size", "48", "--batch-size", "4",
            "--device", "cpu", *extra]


# Rank 0 presses Ctrl-C at a fixed step: SIGINT to torchrun, which passes it on to both ranks, as at a terminal.
INTERRUPTED_RUN = """
import os, signal, sys
from edge_tl.finetune.train import TrainConfig, finetune
def on_step(step):
    if step == 9 and os.environ["RANK"] == "0":  # epoch 2 of 3, its step 2 of 7
        os.kill(os.getppid(), signal.SIGINT)
finetune(TrainConfig(data=sys.argv[1], out=sys.argv[2], epochs=3, img_size=48, batch_size=4, device="cpu",
                     tune_depthwise=False), progress=False, on_step=on_step)
"""


def test_ddp_ctrl_c_mid_epoch_then_resume_equals_the_uninterrupted_run(tmp_path):
    """Ctrl-C in epoch 2 of a 2-process run, then --resume: the same history as a run never stopped, train
    statistics of the interrupted epoch included (they are summed over ranks every step)."""
    data = make_image_folder(tmp_path / "imgs", per_class=24)
    # two separate runs of a seed are bit-identical only with the same depthwise plans: none here (the resume
    # takes the setting from last.pt); plans replayed on resume: test_finetune.py
    whole = subprocess.run(_torchrun_finetune(data, tmp_path / "whole", "--no-tune-depthwise"), capture_output=True,
                           text=True, timeout=600)
    assert whole.returncode == 0, whole.stderr[-3000:]

    out = tmp_path / "stopped"
    script = tmp_path / "interrupted_run.py"
    script.write_text(INTERRUPTED_RUN)
    stopped = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                              str(script), str(data), str(out)], capture_output=True, text=True, timeout=600)
    assert stopped.returncode != 0, stopped.stderr[-3000:]
    state = load_checkpoint(out / "last.pt")
    assert state["epoch"] == 1 and 0 < state["step"] < 7, (state["epoch"], state["step"])  # saved mid-epoch 2

    resumed = subprocess.run(_torchrun_finetune(data, out, "--resume"), capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    def history(run):
        rows = [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]
        return [{k: v for k, v in row.items() if k != "seconds"} for row in rows]

    for got, want in zip(history(out), history(tmp_path / "whole"), strict=True):
        assert got == pytest.approx(want, rel=1e-9), (got, want)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run pytest on a GPU machine)")
def test_cuda_amp_finetune(tmp_path):
    from edge_tl.finetune.train import TrainConfig, amp_dtype, finetune

    data = make_image_folder(tmp_path / "imgs", per_class=8)
    m = finetune(TrainConfig(data=str(data), out=str(tmp_path / "run"), epochs=1, img_size=64, batch_size=8,
                             device="cuda", amp="auto"), progress=False, log=lambda s: None)
    assert m["device"].startswith("cuda")
    assert amp_dtype("auto", torch.device("cuda")) in (torch.bfloat16, torch.float16)


# Every image decoded at each use; after step 1, rank 0 gives the validation images of rank 1's shard
# (the odd ones in images.tsv's order) other bytes: only rank 1 finds them, at the end of epoch 1.
CHANGED_FILE_RUN = """
import os, sys
from pathlib import Path
from edge_tl.finetune import data as data_module
from edge_tl.finetune.data import read_images_table
from edge_tl.finetune.train import TrainConfig, finetune
data_module.available_memory = lambda: 1
data, out = Path(sys.argv[1]), Path(sys.argv[2])
def on_step(step):
    if step == 1 and os.environ["RANK"] == "0":
        val = [data / r[3] for r in read_images_table(out / "images.tsv") if r[0] == "val"]
        for path in val[1::2]:
            path.write_bytes(val[0].read_bytes())
finetune(TrainConfig(data=str(data), out=str(out), epochs=3, img_size=48, batch_size=4, device="cpu",
                     tune_depthwise=False, workers=0), progress=False, on_step=on_step)
"""


def test_ddp_a_changed_file_one_rank_finds_stops_every_rank_with_the_steps_saved(tmp_path):
    """Under torchrun, images decoded at each use that changed since the scan are found by the rank
    that reads them; the ranks agree on it, so all stop at the same point, rank 0 saves the steps
    done, and once the files are restored --resume ends where a run never stopped ends."""
    data = make_image_folder(tmp_path / "imgs", per_class=24)
    whole = subprocess.run(_torchrun_finetune(data, tmp_path / "whole", "--no-tune-depthwise"), capture_output=True,
                           text=True, timeout=600)
    assert whole.returncode == 0, whole.stderr[-3000:]
    kept = {p: p.read_bytes() for p in data.rglob("*") if p.is_file()}
    out = tmp_path / "stopped"
    script = tmp_path / "changed_file_run.py"
    script.write_text(CHANGED_FILE_RUN)
    stopped = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                              str(script), str(data), str(out)], capture_output=True, text=True, timeout=600)
    assert stopped.returncode != 0
    assert "UserError: rank 1 of 2 (torchrun) found: " in stopped.stderr, stopped.stderr[-3000:]  # rank 0 learns of it
    assert "its content changed since the data was scanned" in stopped.stderr
    state = load_checkpoint(out / "last.pt")
    assert (state["epoch"], state["step"]) == (0, 7)  # epoch 1's 7 steps, saved before its validation
    for path, content in kept.items():
        path.write_bytes(content)
    resumed = subprocess.run(_torchrun_finetune(data, out, "--resume"), capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    for got, want in zip(_history(out), _history(tmp_path / "whole"), strict=True):
        assert got == pytest.approx(want, rel=1e-9), (got, want)


def _history(run) -> list[dict]:
    rows = [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]
    return [{k: v for k, v in row.items() if k != "seconds"} for row in rows]
