"""The one-time scan of a dataset (decode, resize, hash every image): one thread vs all cores.

    python benchmarks/decode_scan.py --data ELPV [--rounds 3] [--img-size 224]

Every fine-tune, export and build starts by decoding each image once (``discover``); it runs on
a thread pool because Pillow lets go of the GIL while it decodes and resizes. This times
``discover`` with 1 thread and with ``decode_threads()`` (the cores, at most 8), interleaved round by
round in one process (the page cache warmed by an untimed first scan), checks that both give the
same images, digests and pixels, and prints and saves the times and their ratio.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from edge_tl.fileio import write_json
from edge_tl.finetune import data as data_module
from edge_tl.runtime.bench import machine
from edge_tl.runtime.spec import PreprocessSpec

ROOT = Path(__file__).resolve().parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--img-size", type=int, default=224)
    ap.add_argument("--results", type=Path, default=ROOT / "results" / "decode_scan.json")
    args = ap.parse_args()
    spec = PreprocessSpec(input_size=(args.img_size, args.img_size), crop_pct=0.875)
    all_cores = data_module.decode_threads()
    scan = data_module.discover
    reference = scan(args.data, spec, progress=False)  # untimed: warms the page cache
    seconds: dict[int, list[float]] = {1: [], all_cores: []}  # one key on a one-core machine: nothing to compare
    for _ in range(args.rounds):
        for threads in seconds:
            data_module.decode_threads = lambda t=threads: t
            t0 = time.perf_counter()
            got = scan(args.data, spec, progress=False)
            seconds[threads].append(time.perf_counter() - t0)
            for a, b in ((got.train, reference.train), (got.val, reference.val)):
                assert (a.paths, a.digests) == (b.paths, b.digests)
                assert all((x == y).all() for x, y in zip(a.arrays, b.arrays))
    images = len(reference.train) + len(reference.val)
    medians = {t: statistics.median(s) for t, s in seconds.items()}
    result = {"benchmark": "decode_scan", "machine": machine(), "data": str(args.data), "images": images,
              "img_size": args.img_size, "threads": list(seconds), "seconds": seconds, "median_s": medians,
              "ratio_all_cores_to_one": medians[all_cores] / medians[1] if all_cores > 1 else None}
    for t, m in medians.items():
        print(f"{t} thread{'s' if t > 1 else ''}: median {m:.2f} s over {args.rounds} rounds "
              f"({images / m:.0f} images/s)")
    if all_cores > 1:
        print(f"all cores / one thread: {result['ratio_all_cores_to_one']:.2f}")
    write_json(args.results, result)


if __name__ == "__main__":
    main()
