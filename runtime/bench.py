"""``edge-tl bench``: latency and throughput per backend × precision × batch, inference and end to end.

Inference alone times ``runner.infer`` on preprocessed pixels; end to end times JPEG decode,
the manifest's resize/crop and inference together (``preprocess_p50_ms`` is their difference). TensorRT runs also report the CUDA-event times
of the host→device copy, compute and device→host copy. ``--reference torch`` times the
run's PyTorch model (eager, channels_last) in the same process; only then is torch imported.
"""

from __future__ import annotations

import importlib.util
import io
import itertools
import logging
import os
import platform
import time
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

from edge_tl import __version__
from edge_tl.errors import UserError

from .bundle import Bundle
from .images import UnreadableImage, expand_images, to_input
from .cpu import cpu_info
from .predictor import choose_artifact, flavour_mismatch, make_runner, not_runnable, tensorrt_available

LOG = logging.getLogger("edge_tl").info  # progress lines; the CLI passes its own printer


def machine() -> dict:
    """CPU model and threads, GPU, library versions: numbers mean nothing without them."""
    info = {**cpu_info(), "cpu_threads": os.cpu_count(), "python": platform.python_version(), "numpy": np.__version__}
    try:
        import onnxruntime

        info["onnxruntime"] = onnxruntime.__version__
        info["onnxruntime_providers"] = onnxruntime.get_available_providers()
    except ImportError:
        pass
    if tensorrt_available():
        from . import trt_support

        info["tensorrt"] = trt_support.import_tensorrt().__version__
        info.update(trt_support.gpu_info())
    return info


def stats(times_ms: list[float], batch: int) -> dict:
    t = np.asarray(times_ms)
    p50, p90, p99 = np.percentile(t, [50, 90, 99])
    mean = float(t.mean())
    return {"p50_ms": float(p50), "p90_ms": float(p90), "p99_ms": float(p99), "mean_ms": mean,
            "std_ms": float(t.std()), "throughput": batch * 1000.0 / mean, "iters": len(t)}


def time_calls(fn, warmup: int, iters: int | None, seconds: float | None) -> list[float]:
    """Milliseconds of ``fn()`` per call after ``warmup`` calls; ``iters`` calls or ``seconds`` of them."""
    for _ in range(warmup):
        fn()
    times, start = [], time.perf_counter()
    while True:
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1000.0)
        if iters is not None and len(times) >= iters:
            return times
        if iters is None and time.perf_counter() - start >= (seconds or 1.0) and len(times) >= 5:
            return times


def interleaved_blocks(calls: dict, blocks: int, iters: int, settle_s: float = 0.25) -> tuple[dict, dict]:
    """Time ``calls`` (name -> fn) side by side: ``blocks`` rounds, each calling every fn untimed
    for ``settle_s`` seconds (at least once), then ``iters`` times timed.

    The untimed calls matter: an ONNX Runtime session's intra-op threads spin on after its
    calls, so the session timed next shares the cores with them for a while (probe on this
    workplace's 2-core VM: batch-1 INT8 took 1.5-2.5x its settled time for the first ~80 ms
    after an FP32 session, and FP32 likewise after INT8; none with spinning off).
    Returns every timed call's ms and each block's median ms (an array per name).
    """
    times = {k: [] for k in calls}
    medians = {k: [] for k in calls}
    for _ in range(blocks):
        for k, fn in calls.items():
            start = time.perf_counter()
            fn()
            while time.perf_counter() - start < settle_s:
                fn()
            t = time_calls(fn, 0, iters, None)
            times[k] += t
            medians[k].append(float(np.median(t)))
    return times, {k: np.asarray(v) for k, v in medians.items()}


def int8_speed(fp32, int8, pixels: np.ndarray, blocks: int = 4, runs: int = 10) -> dict:
    """Batch-1 latency (ms) of two runners (FP32 and INT8 of one model) and INT8's ratio to FP32,
    timed in interleaved blocks (``interleaved_blocks``; the ratio is ``paired_ratio``'s). Whether
    INT8 pays off depends on the CPU: VNNI or dot-product instructions, or neither."""
    x = to_input(pixels[:1])
    _, medians = interleaved_blocks({"fp32": lambda: fp32.infer(x), "int8": lambda: int8.infer(x)}, blocks, runs)
    fp32_ms, int8_ms = float(np.median(medians["fp32"])), float(np.median(medians["int8"]))
    ratio = paired_ratio(medians["int8"], medians["fp32"])["paired"]
    # on a busy host the median of the blocks' ratios and the ratio of the medians can disagree: faster
    # only where both say so
    return {"fp32_ms": round(fp32_ms, 3), "int8_ms": round(int8_ms, 3), "ratio": round(ratio, 3), "batch": 1,
            "faster": bool(ratio < 1 and int8_ms < fp32_ms)}


def paired_ratio(num_block_medians: np.ndarray, den_block_medians: np.ndarray) -> dict:
    """Median over blocks of the per-block ratio, and its interquartile range: load that comes and
    goes on a shared host hits both sides of a block alike."""
    r = np.asarray(num_block_medians) / np.asarray(den_block_medians)
    return {"paired": float(np.median(r)), "paired_iqr": [float(v) for v in np.percentile(r, [25, 75])]}


def _jpegs(pixels: np.ndarray, n: int) -> list[bytes]:
    out = []
    for i in range(n):
        buf = io.BytesIO()
        Image.fromarray(pixels[i % len(pixels)]).save(buf, format="JPEG", quality=95)
        out.append(buf.getvalue())
    return out


def e2e_inputs(spec, golden: np.ndarray, images: str | Path | None, log=LOG) -> tuple[Callable[[int], list], str]:
    """What end-to-end timing decodes: ``batch -> the next inputs`` (each call takes the next ones in
    turn, so every input is timed) and its description. ``images`` (a file or folder: the user's
    own, e.g. a camera's photos) are read from disk at each call, the unreadable ones left out as
    check leaves them; without them, the golden images as JPEGs at the input size, which decode far
    faster than a camera's photo."""
    if images is None:
        h, w = spec.input_size
        items, what = _jpegs(golden, len(golden)), f"the golden images as {w}x{h} JPEGs (quality 95, in memory)"
    else:
        found = expand_images([images])
        sample = [found[i] for i in np.linspace(0, len(found) - 1, min(len(found), E2E_FILES)).round().astype(int)]
        items, sizes = [], set()
        for f in sample:
            try:
                spec.load(f)
                with Image.open(f) as img:
                    sizes.add(f"{img.width}x{img.height} {img.format}")
                items.append(f)
            except (UnreadableImage, OSError) as exc:
                log(f"end to end: left out {exc}")
        if not items:
            raise UserError(f"{images}: none of its images can be read ({len(sample)} tried); pass readable images "
                            "to --images.")
        shown = ", ".join(sorted(sizes)[:3]) + (f" and {len(sizes) - 3} more" if len(sizes) > 3 else "")
        what = f"{len(items)} files of {images} ({shown}), read from disk"
    turn = itertools.cycle(items)
    return (lambda b: [next(turn) for _ in range(b)]), what


E2E_FILES = 64  # of --images, evenly spaced: enough for its mix of sizes, quick to check before timing


def bench_bundle(path: str | Path, backends: list[str] | None = None, precisions: list[str] | None = None,
                 batches: tuple[int, ...] = (1, 8, 32), warmup: int = 10, iters: int | None = None,
                 seconds: float | None = 2.0, reference: str | None = None, device: str | None = "cpu",
                 threads: int = 0, images: str | Path | None = None, log=LOG,
                 reference_run: str | Path | None = None) -> dict:
    """Time every runnable artifact (filtered by backend and precision) at each batch size; end to
    end (decode + preprocess + infer) on ``images`` (see ``e2e_inputs``). ``reference_run``: the run
    folder ``reference`` "torch" times (default: the manifest's ``run.path``, where it was exported;
    a build passes its own, which moves with it)."""
    if warmup < 0 or (iters is not None and iters < 1) or (iters is None and not (seconds and seconds > 0)):
        raise UserError(f"--warmup {warmup} / --iters {iters} / --seconds {seconds}: warm-up calls >= 0 and "
                        "either at least one timed call or a positive number of seconds.")
    if reference not in (None, "torch"):
        raise UserError(f"--reference {reference}: only 'torch' is supported.")
    precisions = [p.lower() for p in precisions] if precisions else precisions  # as Predictor takes them
    if unknown := sorted(set(backends or ()) - {"onnxruntime", "tensorrt"}):
        raise UserError(f"--backend {','.join(unknown)}: unknown; use onnxruntime and/or tensorrt.")
    bundle = Bundle.load(path)
    checkpoint = _reference_checkpoint(bundle, reference_run) if reference == "torch" else None  # refused before any timing
    golden, _ = bundle.golden()
    spec = bundle.spec
    e2e_files, e2e_input = e2e_inputs(spec, golden, images, log)
    log(f"end to end: decode + preprocess + infer of {e2e_input}")
    results = []
    for art in bundle.artifacts:
        backend = "tensorrt" if art["format"] == "engine" else "onnxruntime"
        if (backends and backend not in backends) or (precisions and art["precision"] not in precisions):
            continue
        if skip := not_runnable(art, backend, device):
            log(f"{art['name']}: skipped ({skip})")
            continue
        with make_runner(bundle, art, backend, device, threads) as runner:
            log(f"{art['name']}: {runner.describe()}" + (f" ({why})" if (why := flavour_mismatch(art, runner)) else ""))
            for b in batches:
                x = to_input(np.stack([golden[i % len(golden)] for i in range(b)]))
                row = {"artifact": art["name"], "backend": backend, "precision": art["precision"], "batch": b,
                       "runner": runner.describe()}
                transfers = []

                def infer():
                    runner.infer(x)
                    if getattr(runner, "last_timings", None):
                        transfers.append(runner.last_timings)

                row.update(stats(time_calls(infer, warmup, iters, seconds), b))
                if transfers:
                    for k in ("h2d_ms", "compute_ms", "d2h_ms"):
                        row[f"{k[:-3]}_p50_ms"] = float(np.median([t[k] for t in transfers]))
                def end_to_end():
                    pix = np.stack([spec.to_pixels(spec.load(f)) for f in e2e_files(b)])
                    runner.infer(to_input(pix))

                e2e = stats(time_calls(end_to_end, max(1, warmup // 2), iters, seconds), b)
                row["e2e_p50_ms"], row["e2e_mean_ms"] = e2e["p50_ms"], e2e["mean_ms"]
                row["preprocess_p50_ms"] = max(0.0, e2e["p50_ms"] - row["p50_ms"])
                results.append(row)
                log(f"{art['name']:>10} {backend:>11} batch {b:>3}: p50 {row['p50_ms']:8.2f} ms  p99 {row['p99_ms']:8.2f} ms"
                    f"  {row['throughput']:8.1f} img/s  end-to-end p50 {row['e2e_p50_ms']:8.2f} ms")
    # as many blocks and calls as the timing above was given, at most 4 x 10 (a slow device's big model)
    blocks, runs = (4, 10) if iters is None and (seconds or 0) >= 1 else (2, max(1, min(10, iters or 5)))
    int8 = _default_int8_vs_fp32(bundle, {r["artifact"] for r in results}, device, threads, golden, log, blocks, runs)
    if checkpoint:
        results += _torch_reference(checkpoint, bundle, golden, batches, warmup, iters, seconds, log)
    if not results:
        raise UserError(f"{bundle.path}: nothing to time on this machine for backend {', '.join(backends or ['any'])}, "
                        f"precision {', '.join(precisions or ['any'])} (it has: "
                        f"{', '.join(a['name'] + ' ' + a['precision'] for a in bundle.artifacts)}).")
    return {"machine": machine(), "edge_tl": __version__, "bundle": str(bundle.path.resolve()),
            "manifest_sha256": bundle.digest, "release_id": bundle.release_id, "threads": threads, "e2e_input": e2e_input,
            "results": results, **({"default_int8_vs_fp32": int8} if int8 else {}),
            **({"reference_checkpoint": str(checkpoint.resolve())} if checkpoint else {})}


def _default_int8_vs_fp32(bundle: Bundle, timed: set[str], device, threads: int, golden: np.ndarray, log,
                          blocks: int = 4, runs: int = 10) -> dict | None:
    """Where apps get an INT8 artifact by default on ONNX Runtime and fp32 was timed too: the two
    interleaved at batch 1 on this machine. Export made INT8 the default on the exporting machine's
    CPU; a device without VNNI or dot-product instructions may find it slower than FP32."""
    if "fp32" not in timed:
        return None
    try:
        chosen, backend = choose_artifact(bundle, "onnxruntime", None, device)
    except UserError:
        return None
    if chosen["precision"] != "int8" or chosen["name"] not in timed or backend != "onnxruntime":
        return None
    with make_runner(bundle, bundle.artifact("fp32"), "onnxruntime", device, threads) as fp32, \
            make_runner(bundle, chosen, "onnxruntime", device, threads) as int8:
        speed = {"artifact": chosen["name"], **int8_speed(fp32, int8, golden, blocks, runs), "exported": chosen.get("speed")}
    here = f"{chosen['name']} (the default) is {speed['ratio']:.2f}x fp32 here at batch 1 (interleaved)"
    if not speed["faster"]:
        speed["advice"] = (f"{here} ({speed['int8_ms']:.2f} vs {speed['fp32_ms']:.2f} ms), not faster: apps on this "
                           "machine should ask for precision='fp32' (--precision fp32), or slim the bundle to fp32 "
                           f"(`edge-tl slim {bundle.path} --keep fp32 --out SMALL`)")
    log(speed.get("advice", here) + (f"; {speed['exported']['ratio']:.2f}x on the exporting machine"
                                     if speed["exported"] else ""))
    return speed


def _reference_checkpoint(bundle: Bundle, run: str | Path | None = None) -> Path:
    """The run's best.pt that ``--reference torch`` times, or a UserError saying what is missing."""
    run = Path(run or bundle.manifest.get("run", {}).get("path", ""))
    if not (run / "best.pt").is_file():
        raise UserError(f"--reference torch needs the fine-tune run the bundle was exported from: {run / 'best.pt'} "
                        "not found (moved, deleted, or on another machine). Run the bench where the run is, or drop --reference.")
    if importlib.util.find_spec("torch") is None:
        raise UserError("--reference torch needs PyTorch, which this torch-free install lacks: "
                        "pip install 'edge-tl[train]', or drop --reference.")
    return run / "best.pt"


def _torch_reference(checkpoint: Path, bundle: Bundle, golden: np.ndarray, batches, warmup, iters, seconds, log) -> list[dict]:
    """The fine-tuned PyTorch model (eager, channels_last, float32) on the same inputs."""
    import torch

    from edge_tl.export.onnx_export import PixelInput
    from edge_tl.finetune.train import load_model

    model, _ = load_model(checkpoint)
    model = PixelInput(model, bundle.spec).eval().to(memory_format=torch.channels_last)
    rows = []
    for b in batches:
        x = torch.from_numpy(to_input(np.stack([golden[i % len(golden)] for i in range(b)])))
        x = x.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode():
            row = {"artifact": "torch", "backend": "torch", "precision": "fp32", "batch": b,
                   "runner": f"torch {torch.__version__} eager channels_last ({torch.get_num_threads()} threads)",
                   **stats(time_calls(lambda: model(x), warmup, iters, seconds), b)}
        rows.append(row)
        log(f"{'torch':>10} {'eager':>11} batch {b:>3}: p50 {row['p50_ms']:8.2f} ms  p99 {row['p99_ms']:8.2f} ms"
            f"  {row['throughput']:8.1f} img/s")
    return rows
