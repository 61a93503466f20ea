"""Where a CPU fine-tuning step's time goes (issue 6): memory format x dtype x tuned depthwise, and a per-op profile.

    python benchmarks/train_profile.py [--img-size 224] [--batch 32] [--model tf_efficientnet_lite0]

Synthetic batches (no data loading: edge-tl decodes every image once into memory, so a step
is model compute plus augmentation). Prints images/s of a full training step (forward,
backward, AdamW) for channels_last x bf16 autocast, each with the native and the tuned
depthwise backward (edge_tl.finetune.depthwise, the default on CPU), the share of the step
spent in depthwise convolutions, the top ops of a torch.profiler trace of the default
combination, and a depthwise-vs-pointwise convolution probe; saves
benchmarks/results/train_profile.json.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import timm
import torch
from torch.profiler import ProfilerActivity, profile

from edge_tl.fileio import write_json
from edge_tl.finetune.depthwise import clear_plans, saved_plans, tune_depthwise
from edge_tl.runtime.bench import machine

ROOT = Path(__file__).resolve().parent


def train_step(model_name: str, size: int, batch: int, channels_last: bool, bf16: bool, tuned: bool):
    torch.manual_seed(0)
    model = timm.create_model(model_name, num_classes=4)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=fmt)
    if tuned:
        tune_depthwise(model)
    opt = torch.optim.AdamW(model.parameters(), 1e-3)
    x = torch.randn(batch, 3, size, size).contiguous(memory_format=fmt)
    y = torch.randint(0, 4, (batch,))

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = torch.nn.functional.cross_entropy(model(x).float(), y)
        opt.zero_grad()
        loss.backward()
        opt.step()

    return step


def images_per_second(step, batch: int, iters: int = 4) -> float:
    """After two untimed steps (the depthwise plans are timed in the first)."""
    step(), step()
    t0 = time.perf_counter()
    for _ in range(iters):
        step()
    return batch * iters / (time.perf_counter() - t0)


def depthwise_share(step) -> tuple[float, list[dict]]:
    """Share of a profiled step's op time in depthwise convolution kernels (forward and backward; not the
    fills and casts around the tuned ones), and the step's top ops."""
    step()
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        step(), step()
    events = prof.key_averages(group_by_input_shape=True)
    total = sum(e.self_cpu_time_total for e in events)
    depthwise = 0.0
    for e in events:
        if e.key in ("aten::convolution_backward", "aten::mkldnn_convolution", "aten::_convolution"):
            weight = e.input_shapes[2 if e.key == "aten::convolution_backward" else 1]
            if len(weight) == 4 and weight[1] == 1 and weight[0] > 1:
                depthwise += e.self_cpu_time_total
    ops = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
    return depthwise / total, [{"op": e.key, "self_share": e.self_cpu_time_total / total} for e in ops[:10]]


def conv_probe(depthwise: bool, channels: int, hw: int, batch: int) -> dict:
    """fwd+bwd ms and GFLOP/s of one 3x3 depthwise or 1x1 pointwise conv (channels_last, bf16)."""
    k, groups = (3, channels) if depthwise else (1, 1)
    conv = torch.nn.Conv2d(channels, channels, k, padding=k // 2, groups=groups, bias=False)
    conv = conv.to(memory_format=torch.channels_last)
    x = torch.randn(batch, channels, hw, hw).contiguous(memory_format=torch.channels_last).requires_grad_()

    def run() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = conv(x)
        out.float().sum().backward()

    run()
    t0 = time.perf_counter()
    for _ in range(3):
        run()
    ms = (time.perf_counter() - t0) / 3 * 1000
    flop = 3 * 2 * batch * channels * hw * hw * k * k * (1 if depthwise else channels)  # fwd + 2x for bwd
    return {"layer": f"{'depthwise 3x3' if depthwise else 'pointwise 1x1'} C={channels} @{hw}px",
            "fwd_bwd_ms": ms, "gflop_per_s": flop / ms / 1e6}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--img-size", type=int, default=224)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--model", default="tf_efficientnet_lite0")
    ap.add_argument("--repeats", type=int, default=3, help="Timings of each combination (median reported).")
    ap.add_argument("--results", type=Path, default=ROOT / "results" / "train_profile.json")
    args = ap.parse_args()
    runs: dict[tuple, list[float]] = {}
    for _ in range(args.repeats):  # native and tuned alternate, so a slow spell of the host hits both
        clear_plans()  # each repeat times its own plans
        for cl in (True, False):
            for bf16 in (True, False):
                for tuned in (False, True):
                    step = train_step(args.model, args.img_size, args.batch, cl, bf16, tuned)
                    runs.setdefault((cl, bf16, tuned), []).append(images_per_second(step, args.batch))
    rates = []
    for (cl, bf16, tuned), r in runs.items():
        rates.append({"channels_last": cl, "bf16": bf16, "tuned_depthwise": tuned,
                      "images_per_s": statistics.median(r), "runs": r})
        print(f"channels_last={cl!s:<5} bf16={bf16!s:<5} tuned_depthwise={tuned!s:<5} "
              f"{statistics.median(r):6.1f} img/s (median of {len(r)})")
    for cl in (True, False):
        for bf16 in (True, False):
            ratio = statistics.median(runs[cl, bf16, True]) / statistics.median(runs[cl, bf16, False])
            print(f"tuned / native depthwise, channels_last={cl} bf16={bf16}: x{ratio:.2f} images/s")
    plans = saved_plans()  # of the last repeat, every combination
    profiles = {tuned: depthwise_share(train_step(args.model, args.img_size, args.batch, True, True, tuned))
                for tuned in (False, True)}
    for tuned, (share, _) in profiles.items():
        print(f"depthwise convolution kernels: {share:.1%} of a channels_last bf16 step "
              f"({'tuned; its zero-insertion fills and float32 casts not counted' if tuned else 'native'})")
    top = profiles[True][1]
    for t in top:
        print(f"{t['self_share']:6.1%}  {t['op']}")
    probes = [conv_probe(True, 96, 56, args.batch), conv_probe(False, 96, 56, args.batch)]
    for p in probes:
        print(f"{p['layer']:<28} fwd+bwd {p['fwd_bwd_ms']:6.1f} ms  {p['gflop_per_s']:6.1f} GFLOP/s")
    write_json(args.results, {"benchmark": "train_profile", "model": args.model, "img_size": args.img_size,
                              "batch": args.batch, "step_rates": rates,
                              "depthwise_share": {"native": profiles[False][0], "tuned": profiles[True][0]},
                              "top_ops_tuned": top, "depthwise_plans": plans, "conv_probe": probes,
                              "machine": machine(), "torch": torch.__version__})


if __name__ == "__main__":
    main()
