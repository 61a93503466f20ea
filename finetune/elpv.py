"""The ELPV solar-cell demo dataset (PyPI ``elpv-dataset``) written as an ImageFolder.

2,624 real 300x300 8-bit grayscale electroluminescence images of solar cells from mono- and
polycrystalline modules, each labelled with a defect probability of 0, 1/3, 2/3 or 1.
Images: CC BY-NC-SA 4.0 (Buerhop-Lutz et al. 2018; Deitsch et al. 2019), non-commercial use.
"""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path

from tqdm import tqdm

from edge_tl.errors import UserError
from edge_tl.fileio import write_json, write_text

LICENSE_NOTICE = (
    "ELPV dataset images (github.com/zae-bayern/elpv-dataset, via PyPI elpv-dataset): "
    "CC BY-NC-SA 4.0 -- attribution, non-commercial, share-alike. Cite: Buerhop-Lutz et al., "
    "'A Benchmark for Visual Identification of Defective Solar Cells in Electroluminescence Imagery', "
    "EU PVSEC 2018; Deitsch et al., 'Automatic classification of defective photovoltaic module cells "
    "in electroluminescence images', Solar Energy 185, 2019."
)
TASKS = {
    "4class": lambda p: f"p{round(p * 100):03d}",  # p000 p033 p067 p100
    "binary": lambda p: "defective" if p >= 0.5 else "functional",
}


def _labels() -> tuple[Path, list[tuple[str, float, str]]]:
    try:
        import elpv_dataset
    except ImportError as exc:
        raise UserError("the demo data needs PyPI elpv-dataset: pip install elpv-dataset "
                        "(or pip install -e '.[demo]' in the edge-tl checkout)") from exc
    csv = Path(elpv_dataset.__file__).parent / "data" / "labels.csv"
    rows = []
    for line in csv.read_text().splitlines():
        if line.strip():
            path, prob, kind = line.split()
            rows.append((path, float(prob), kind))
    return csv.parent, rows


def write_elpv(out: str | Path, task: str = "4class", test_fraction: float = 0.25, seed: int = 0,
               limit_per_class: int | None = None, progress: bool = True) -> dict:
    """Write ``out/train/<class>/*.png`` and ``out/test/<class>/*.png``; return a summary.

    The split is stratified by class and cell type (mono/poly) and depends only on ``seed``.
    ``limit_per_class`` keeps the first N images of each class and split (for quick tests).
    """
    if task not in TASKS:
        raise UserError(f"--task {task}: use one of {', '.join(TASKS)}.")
    if not 0.0 < test_fraction < 1.0:
        raise UserError(f"--test-fraction {test_fraction}: must be between 0 and 1.")
    if limit_per_class is not None and limit_per_class < 1:
        raise UserError(f"--limit-per-class {limit_per_class}: must be at least 1 (leave it out for all images).")
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"{out}: exists and is not an empty folder. Choose a new --out folder or delete it.")
    src_dir, rows = _labels()
    label_of = TASKS[task]
    strata: dict[tuple[str, float], list[tuple[str, float, str]]] = {}
    for row in rows:
        strata.setdefault((row[2], row[1]), []).append(row)
    rng = random.Random(seed)
    plan: list[tuple[str, str, str]] = []  # (split, class, source path)
    for key in sorted(strata):
        group = sorted(strata[key])
        rng.shuffle(group)
        n_test = round(len(group) * test_fraction)
        plan += [("test", label_of(p), path) for path, p, _ in group[:n_test]]
        plan += [("train", label_of(p), path) for path, p, _ in group[n_test:]]
    if limit_per_class is not None:
        kept: dict[tuple[str, str], int] = {}
        trimmed = []
        for split, cls, path in sorted(plan, key=lambda t: (t[0], t[1], t[2])):
            if kept.get((split, cls), 0) < limit_per_class:
                kept[(split, cls)] = kept.get((split, cls), 0) + 1
                trimmed.append((split, cls, path))
        plan = trimmed
    tmp = out.with_name(f".{out.name}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    for split, cls, path in tqdm(plan, desc="write ELPV", unit="img", disable=None if progress else True, leave=False):
        dst = tmp / split / cls / Path(path).name
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src_dir / path, dst)
    counts: dict[str, dict[str, int]] = {}
    for split, cls, _ in plan:
        counts.setdefault(split, {}).setdefault(cls, 0)
        counts[split][cls] += 1
    summary = {"dataset": "elpv", "task": task, "test_fraction": test_fraction, "seed": seed,
               "counts": {s: dict(sorted(c.items())) for s, c in sorted(counts.items())}, "license": LICENSE_NOTICE}
    write_text(tmp / "LICENSE.txt", LICENSE_NOTICE + "\n")
    write_json(tmp / "dataset.json", summary)
    if out.exists():
        out.rmdir()
    os.replace(tmp, out)
    return summary
