"""CUDA fine-tune throughput: eager vs torch.compile, AMP on and off, batch sizes; GPU named.

    python benchmarks/gpu_finetune.py --data ELPV_DIR [--batches 32,64,128] [--steps 30] [--bundle BUNDLE]

Times the training step of the default model (channels_last, AdamW, cross-entropy) on
decoded ELPV training images with the training transform, after warm-up steps (compile
included in warm-up). With --bundle, also times the runtime on this GPU: ONNX Runtime's CUDA
provider and TensorRT engines where installed. Needs a CUDA GPU; exits with a message
elsewhere. Not run in this workplace's CI (no GPU).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from edge_tl.fileio import write_json
from edge_tl.finetune.backbones import create_backbone, preprocess_spec
from edge_tl.finetune.config import TrainConfig
from edge_tl.finetune.data import discover
from edge_tl.finetune.train import amp_dtype, train_transform

ROOT = Path(__file__).resolve().parent


def step_rate(model, x, y, dtype, compile_: bool, steps: int) -> float:
    """Images per second of forward + backward + AdamW step."""
    net = torch.compile(model) if compile_ else model
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    scaler = torch.amp.GradScaler("cuda", enabled=dtype == torch.float16)

    def one():
        with torch.autocast("cuda", dtype=dtype or torch.float32, enabled=dtype is not None):
            loss = F.cross_entropy(net(x).float(), y)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()

    for _ in range(5):
        one()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        one()
    torch.cuda.synchronize()
    return steps * len(x) / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--batches", default="32,64,128")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--bundle", type=Path, default=None)
    ap.add_argument("--results", type=Path, default=ROOT / "results" / "gpu_finetune.json")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("gpu_finetune.py needs a CUDA GPU (torch.cuda.is_available() is False here).")
    dev = torch.device("cuda")
    model, _ = create_backbone("tf_efficientnet_lite0", 4)
    spec = preprocess_spec(model, 224, None)
    ds = discover(args.data, spec, progress=False)
    tf = train_transform(TrainConfig(data="", out=""), spec, 224)
    rows = []
    for batch in (int(b) for b in args.batches.split(",")):
        x = torch.stack([tf(ds.train.image(i % len(ds.train))) for i in range(batch)]).to(
            dev, memory_format=torch.channels_last)
        y = torch.tensor([ds.train.labels[i % len(ds.train)] for i in range(batch)], device=dev)
        for compile_ in (False, True):
            for amp in ("off", "auto"):
                m, _ = create_backbone("tf_efficientnet_lite0", 4)
                m = m.to(dev, memory_format=torch.channels_last).train()
                dtype = amp_dtype(amp, dev)
                rate = step_rate(m, x, y, dtype, compile_, args.steps)
                rows.append({"batch": batch, "compile": compile_, "amp": str(dtype).replace("torch.", "") if dtype else "off",
                             "images_per_s": rate})
                print(json.dumps(rows[-1]), flush=True)
    runtime = None
    if args.bundle:
        from edge_tl.runtime.bench import bench_bundle

        runtime = bench_bundle(args.bundle, batches=(1, 32), seconds=2.0, device="cuda")
    write_json(args.results, {"benchmark": "gpu_finetune", "gpu": torch.cuda.get_device_name(),
                              "torch": torch.__version__, "rows": rows, "runtime": runtime})
    print(f"GPU: {torch.cuda.get_device_name()}; saved {args.results}")


if __name__ == "__main__":
    main()
