"""Soak: 100 000 predicts on CPU from 4 threads sharing one Predictor, RSS sampled.

    python benchmarks/soak.py --bundle BUNDLE --images DIR [--total 100000] [--threads 4]

Target (issue 4): no errors, RSS growth after warm-up <= 5 MB. Prints and saves JSON
(RSS samples included, for a plot).
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from pathlib import Path

from edge_tl.fileio import write_json
from edge_tl.runtime import Predictor, load_rgb
from edge_tl.runtime.bench import machine
from edge_tl.runtime.images import IMAGE_EXTENSIONS

ROOT = Path(__file__).resolve().parent


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status (Linux only)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", type=Path, required=True)
    ap.add_argument("--images", type=Path, required=True)
    ap.add_argument("--precision", default=None)
    ap.add_argument("--total", type=int, default=100_000)
    ap.add_argument("--threads", type=int, default=4)
    ap.add_argument("--warmup", type=int, default=2000, help="predicts before the RSS baseline is taken")
    ap.add_argument("--results", type=Path, default=ROOT / "results" / "soak.json")
    args = ap.parse_args()
    images = [load_rgb(p) for p in sorted(q for q in args.images.rglob("*") if q.suffix.lower() in IMAGE_EXTENSIONS)[:64]]
    done, errors, lock = [0], [], threading.Lock()
    samples: list[tuple[float, int, float]] = []
    with Predictor.from_bundle(args.bundle, precision=args.precision, device="cpu") as p:
        def work(k: int) -> None:
            i = k
            while True:
                with lock:
                    if done[0] >= args.total:
                        return
                    done[0] += 1
                try:
                    p.predict(images[i % len(images)])
                except Exception as exc:  # noqa: BLE001 - a soak counts every failure
                    errors.append(repr(exc))
                i += args.threads

        t0 = time.perf_counter()
        workers = [threading.Thread(target=work, args=(k,)) for k in range(args.threads)]
        for w in workers:
            w.start()
        baseline = None
        while any(w.is_alive() for w in workers):
            time.sleep(1.0)
            samples.append((round(time.perf_counter() - t0, 1), done[0], round(rss_mb(), 2)))
            if baseline is None and done[0] >= args.warmup:
                baseline = samples[-1][2]
        for w in workers:
            w.join()
        seconds = time.perf_counter() - t0
        final = rss_mb()
        result = {"benchmark": "soak", "artifact": p.artifact["name"], "runner": p.runner.describe(),
                  "predicts": done[0], "threads": args.threads, "errors": len(errors), "first_errors": errors[:5],
                  "seconds": round(seconds, 1), "predicts_per_s": round(done[0] / seconds, 1),
                  "rss_after_warmup_mb": baseline, "rss_final_mb": round(final, 2),
                  "rss_max_after_warmup_mb": max(s[2] for s in samples if baseline is not None and s[1] >= args.warmup),
                  "rss_growth_mb": round(final - (baseline or final), 2), "machine": machine(), "samples": samples}
    write_json(args.results, result)
    print(json.dumps({k: v for k, v in result.items() if k not in ("samples", "machine")}, indent=2))
    print(f"saved {args.results}")


if __name__ == "__main__":
    main()
