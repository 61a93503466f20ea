"""``edge-tl build``: data -> fine-tune -> export -> check -> bench -> report, resumable.

Each stage records a fingerprint of its inputs in ``OUT/build.json``; a rerun skips stages
whose inputs are unchanged and whose outputs exist, and a fine-tune stopped half-way
resumes from ``last.pt`` (a finished one whose ``best.pt`` is gone trains afresh). ``force``
redoes every stage.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Callable

from edge_tl.errors import UserError
from edge_tl.fileio import LOCK_NAME, folder_lock, make_folder, remove_stale_temps, sha256_file, write_json
from edge_tl.finetune.config import TrainConfig, check_config, check_out_beside_data, split_folder, training_roots
from edge_tl.finetune.data import describe_duplicates
from edge_tl.runtime.check import chance_note
from edge_tl.runtime.images import visible_files

SCRATCH_RUN = "run-scratch"
STAGES = ("data", "finetune", "scratch", "export", "check", "bench", "report")  # scratch: with --compare-scratch


def folder_fingerprint(root: Path) -> str:
    """Hash of every visible file's relative path and content under ``root``: content, not times, so
    a `touch`, `cp -r`, `git checkout` or re-unzip of the same images keeps training's progress
    (reading the bytes costs far less than decoding them, which training does anyway)."""
    h = hashlib.sha256()
    for f in visible_files(root):
        content = sha256_file(f) if f.exists() else f"link to {os.readlink(f)}"  # a broken link counts as itself
        h.update(f"{f.relative_to(root).as_posix()}\0{content}\n".encode())
    return h.hexdigest()


def _hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


class Build:
    """Stage bookkeeping for one output folder."""

    def __init__(self, out: Path, force: bool, log: Callable[[str], None], stages: tuple[str, ...] = STAGES):
        self.out, self.force, self.log, self.stages = out, force, log, stages
        self.state_path = out / "build.json"
        self.state = _read_state(self.state_path)

    def run(self, name: str, inputs: dict, outputs: list[Path], fn: Callable[[], None],
            damage: Callable[[], str | None] | None = None) -> bool:
        """Run stage ``name`` unless its inputs' fingerprint is unchanged and its outputs exist (and,
        with ``damage``, are whole: it returns what is wrong with them, or None)."""
        fp = _hash(inputs)
        done = self.state["stages"].get(name, {})
        index = self.stages.index(name) + 1
        if not self.force and done.get("fingerprint") == fp and all(p.exists() for p in outputs):
            if (why := damage and damage()) is None:
                self.log(f"[{index}/{len(self.stages)}] {name}: up to date (inputs unchanged), skipped")
                return False
            self.log(f"[{index}/{len(self.stages)}] {name}: its output changed since ({why}), so it is redone")
        self.log(f"[{index}/{len(self.stages)}] {name} ...")
        t0 = time.perf_counter()
        fn()
        self.state["stages"][name] = {"fingerprint": fp, "seconds": round(time.perf_counter() - t0, 1),
                                      "finished": time.strftime("%Y-%m-%dT%H:%M:%S")}
        write_json(self.state_path, self.state)
        return True


def build(data: str, target: str, out: str | Path, train: dict, precision: str | None = None, force: bool = False,
          calib_images: int = 512, bench_batches: tuple[int, ...] = (1, 8), bench_seconds: float = 2.0,
          compare_scratch: bool = False, max_drop: float = 1.0, log: Callable[[str], None] = print) -> dict:
    """Run every stage into ``out``; return the summary (also ``OUT/summary.json``).

    ``compare_scratch`` also trains the same recipe from random init (``OUT/run-scratch``), so
    the report shows the transfer-learning gain on this data (start, slope, asymptote).
    """
    from edge_tl.export.bundle import TARGETS
    from edge_tl.export.tensorrt import parse_precisions

    if target not in TARGETS:
        raise UserError(f"--target {target}: use one of {', '.join(TARGETS)}.")
    parse_precisions(precision or TARGETS[target][0])  # a typo fails now, not after the fine-tune
    if calib_images < 1 or max_drop < 0:
        raise UserError(f"--calib-images {calib_images} / --max-drop {max_drop}: must be >= 1 / >= 0.")
    out = Path(out)
    data_dir = out / "data" if data == "demo" else Path(data)
    if data != "demo":
        if not data_dir.is_dir():
            raise UserError(f"{data_dir}: no such folder. Pass --data DIR (an ImageFolder) or --data demo.")
        check_out_beside_data(out, data_dir, with_test=True)
    data_dir = data_dir.resolve()  # recorded by every stage, so export, --resume and report work from any folder
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: is a file; --out takes a folder for the build.")
    run_dir = out / "run"
    cfg = TrainConfig(**{**train, "data": str(data_dir), "out": str(run_dir.resolve())})
    if cfg.img_size is None:  # resolved before the stage fingerprints: the same build as with the size spelled out
        from edge_tl.finetune.backbones import native_img_size

        cfg = replace(cfg, img_size=native_img_size(cfg.model))
    check_config(cfg, run_dir)  # a typo fails now, not after the data stage
    fresh = not out.exists()
    with _removed_if_refused(out, fresh) as ours, contextlib.ExitStack() as held:  # bad data found by a stage
        make_folder(out)  # leaves no OUT holding only build.json
        held.enter_context(folder_lock(out, "edge-tl build"))  # one build at a time: a rerun while one runs is refused
        ours["locked"] = True  # refused by the lock, this build removes nothing: the folder is the other's
        for folder in (out, out / "run", out / SCRATCH_RUN):
            if removed := remove_stale_temps(folder):
                log(f"removed what a killed build left half-written in {folder}: {', '.join(removed)}")
        b = Build(out, force, log, STAGES if compare_scratch else tuple(s for s in STAGES if s != "scratch"))
        b.state["compare_scratch"] = compare_scratch  # a run-scratch/ left by an earlier build is shown only when asked
        write_json(b.state_path, b.state)

        if data == "demo":
            def make_demo() -> None:
                from edge_tl.finetune.elpv import LICENSE_NOTICE, write_elpv

                if data_dir.exists():
                    _remove_own(data_dir, _is_elpv_demo(data_dir), "demo data written by edge-tl (dataset.json)")
                write_elpv(data_dir, "4class")
                log(f"  demo data: ELPV solar cells in {data_dir}; license: {LICENSE_NOTICE}")

            b.run("data", {"demo": "elpv-4class", "seed": 0}, [data_dir / "dataset.json"], make_demo)
        else:
            b.run("data", {"folder": str(data_dir)}, [data_dir], lambda: None)
        data_fp = _hash([folder_fingerprint(r) for r in training_roots(data_dir)])  # not test/ (the check stage's) or OUT
        test_dir = split_folder(data_dir, "test")
        _check_test_classes(data_dir, test_dir)

        # the data is its content's fingerprint, not its path: a moved or differently spelled folder is the same data
        train_inputs = {"config": {k: v for k, v in asdict(cfg).items() if k not in ("workers", "device", "out", "data")},
                        "data": data_fp,
                        "weights": (sha256_file(Path(cfg.weights)) if cfg.weights and Path(cfg.weights).is_file()
                                    else cfg.weights)}

        b.run("finetune", train_inputs, [run_dir / "metrics.json", run_dir / "best.pt"],
              lambda: _finetune_stage(b, "finetune", cfg, train_inputs))
        if compare_scratch:
            scratch_cfg = scratch_twin(cfg, out / SCRATCH_RUN)
            scratch_inputs = {**train_inputs, "scratch": True}
            b.run("scratch", scratch_inputs, [out / SCRATCH_RUN / "metrics.json"],
                  lambda: _finetune_stage(b, "scratch", scratch_cfg, scratch_inputs))

        bundle_dir = out / "bundle"
        export_inputs = {"best": sha256_file(run_dir / "best.pt"), "target": target, "precision": precision,
                         "calib_images": calib_images, "max_drop": max_drop, "data": data_fp}

        def export() -> None:
            from edge_tl.export.bundle import MANIFEST, export_bundle

            if bundle_dir.exists() and not (bundle_dir / MANIFEST).is_file():  # this build's, its manifest lost
                _remove_own(bundle_dir, "export" in b.state["stages"], "a bundle this build exported (build.json: export)")
            export_bundle(run_dir, bundle_dir, target, precision, data=data_dir, calib_images=calib_images,
                          max_drop=max_drop, force=True, log=lambda s: log(f"  {s}"))

        b.run("export", export_inputs, [bundle_dir / "manifest.json"], export, damage=lambda: _bundle_damage(bundle_dir))
        manifest_sha = sha256_file(bundle_dir / "manifest.json")

        def check() -> None:
            from edge_tl.finetune.data import copies_in, run_images
            from edge_tl.runtime.check import check_bundle
            from edge_tl.runtime.images import class_folders, class_key, image_files

            report = check_bundle(bundle_dir, test_dir, max_drop, keep_predictions=True, log=lambda s: log(f"  {s}"))
            copies = copies_in([f for d in class_folders(test_dir) for f in image_files(d)],
                               run_images(run_dir, data_dir)) if test_dir else []
            report["test_in_training"] = [{"test": str(t), "training": str(c),
                                           "same_class": class_key(t.relative_to(test_dir).parts[0]) == class_key(cls)} for t, c, cls in copies]
            if copies:
                log(f"  warning: byte-identical files: {'; '.join(describe_duplicates(test_copy_counts(report)))} "
                    f"(e.g. {copies[0][0]} = {copies[0][1]}); all in check.json's test_in_training")
            write_json(out / "check.json", report)

        test_fp = folder_fingerprint(test_dir) if test_dir else None  # read once: check and bench both decode test/
        b.run("check", {"manifest": manifest_sha, "test": test_fp, "max_drop": max_drop},
              [out / "check.json"], check)

        def bench() -> None:
            from edge_tl.runtime.bench import bench_bundle

            report = bench_bundle(bundle_dir, batches=bench_batches, seconds=bench_seconds, reference="torch",
                                  device="cpu", images=test_dir, reference_run=run_dir, log=lambda s: log(f"  {s}"))
            write_json(out / "bench.json", report)

        b.run("bench", {"manifest": manifest_sha, "batches": bench_batches, "seconds": bench_seconds,
                        "images": test_fp},  # end to end decodes the test images
              [out / "bench.json"], bench)

        def report() -> None:
            from edge_tl.report import write_report

            write_report(out)

        inputs = {k: sha256_file(out / k) for k in ("check.json", "bench.json")}
        if compare_scratch:
            inputs["scratch"] = sha256_file(out / SCRATCH_RUN / "metrics.json")
        b.run("report", {**inputs, "manifest": manifest_sha}, [out / "report.html"], report)
        summary = summarize(out)
        write_json(out / "summary.json", summary)
        return summary


def _finetune_stage(b: Build, name: str, cfg: TrainConfig, inputs: dict) -> None:
    """Fine-tune ``cfg``, resuming its ``last.pt`` when the same inputs started it."""
    from edge_tl.finetune.train import finetune as run

    run_dir = Path(cfg.out)
    key = f"{name}_started"
    lost_best = _finished_without_best(run_dir)
    resumable = not b.force and not lost_best and (run_dir / "last.pt").is_file() and b.state.get(key) == _hash(inputs)
    if not resumable and run_dir.exists():
        if lost_best:
            b.log(f"  {run_dir}: finished but its best.pt is gone, so it trains afresh")
        elif (run_dir / "last.pt").is_file() and not b.force:
            b.log(f"  {run_dir}: its data or settings changed since it started, so it trains afresh "
                  "(its progress would not fit the new inputs)")
        _remove_own(run_dir, key in b.state, f"a run this build started (build.json: {key})")
    b.state[key] = _hash(inputs)
    write_json(b.state_path, b.state)
    run(cfg, resume=resumable, log=lambda s: b.log(f"  {s}"))


@contextlib.contextmanager
def _removed_if_refused(out: Path, fresh: bool):
    """Remove ``out`` again when this build made it and a stage refuses the input before writing
    anything but OUT/build.json (a rerun with the fix then starts clean, and no stray folder is left);
    only once this build held OUT's lock, as a build that made OUT at the same moment as another may
    be the one refused by it."""
    ours = {"locked": False}
    try:
        yield ours
    except UserError:
        if fresh and ours["locked"] and all(p.name in ("build.json", LOCK_NAME) for p in out.rglob("*") if not p.is_dir()):
            shutil.rmtree(out, ignore_errors=True)
        raise


def _read_state(path: Path) -> dict:
    """build.json's record of the finished stages ({"stages": {}} for a new build)."""
    if not path.is_file():
        return {"stages": {}}
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
        if isinstance(state, dict) and isinstance(state.get("stages"), dict):
            return state
    except (OSError, ValueError):
        pass
    raise UserError(f"{path}: not a build record (empty or damaged), and a build finds its stages' outputs by it: "
                    f"delete {path.parent} and build again, or choose another --out.")


def _bundle_damage(bundle_dir: Path) -> str | None:
    """What is wrong with the build's bundle (a file edited or deleted since the export), or None."""
    from edge_tl.runtime.bundle import Bundle, BundleError

    try:
        Bundle.load(bundle_dir)
    except BundleError as exc:
        return str(exc).split(". ")[0]
    return None


def _check_test_classes(data_dir: Path, test_dir: Path | None) -> None:
    """Refuse, before any training, a test/ class the training data lacks (the check stage would)."""
    from edge_tl.runtime.images import class_folders, class_key

    train = split_folder(data_dir, "train")
    if test_dir is None or train is None:  # no test/, or flat classes (the fine-tune refuses test/ beside them)
        return
    classes = {class_key(d.name) for d in class_folders(train)}  # a Mac's decomposed "é" is the same class
    if unknown := sorted({class_key(d.name) for d in class_folders(test_dir)} - classes):
        raise UserError(f"{test_dir}: class folders {unknown} are not among the training classes in {train} "
                        f"({', '.join(sorted(classes))}), so the check after the fine-tune could not score them. Rename "
                        "them to a training class's name, add them to training, or move them out of test/.")


def _finished_without_best(run_dir: Path) -> bool:
    """A run that trained all its epochs but whose best.pt is gone: resuming would train nothing."""
    from edge_tl.finetune.train import load_checkpoint

    if (run_dir / "best.pt").is_file():
        return False
    if (run_dir / "metrics.json").is_file():
        return True
    if not (run_dir / "last.pt").is_file():
        return False
    state = load_checkpoint(run_dir / "last.pt")
    return state["epoch"] >= state["config"]["epochs"]


def scratch_twin(cfg: TrainConfig, out: Path) -> TrainConfig:
    """The same recipe from random init (a --weights file is the pretrained side's only)."""
    return replace(cfg, scratch=True, weights=None, out=str(out))


def _is_elpv_demo(folder: Path) -> bool:
    try:
        return json.loads((folder / "dataset.json").read_text())["dataset"] == "elpv"
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _remove_own(path: Path, ours: bool, what: str) -> None:
    """Delete ``path`` to redo a stage, but only when it is ``what``; anything else is the user's."""
    if not ours:
        raise UserError(f"{path}: exists and is not {what}; build would have to delete it. "
                        "Move it away, or choose another --out.")
    shutil.rmtree(path)


def scratch_comparison(out: Path) -> dict | None:
    """Pretrained vs scratch of the last build into ``out`` when it had ``--compare-scratch``."""
    from edge_tl.finetune.transfer import compare_run_folders

    state = out / "build.json"
    if not state.is_file() or not json.loads(state.read_text()).get("compare_scratch"):
        return None
    return compare_run_folders(out / "run", out / SCRATCH_RUN)


def test_copy_counts(check: dict) -> dict:
    """Test images with a copy among the run's images: of the same class, of another (check.json)."""
    copies = check.get("test_in_training", [])
    return {"test_in_training": sum(c.get("same_class", True) for c in copies),
            "test_label_conflicts": sum(not c.get("same_class", True) for c in copies)}


NOT_ACCEPTED = "below --max-drop even with every layer in float"  # the reason bundles exported before it was kept


def summarize(out: Path) -> dict:
    """Accuracy per artifact, latency per backend and precision, pretrained vs scratch where
    trained, and the next steps."""
    from edge_tl.export.device import device_commands
    from edge_tl.runtime.bundle import Bundle

    check = json.loads((out / "check.json").read_text())
    bench = json.loads((out / "bench.json").read_text())
    bundle = Bundle.load(out / "bundle")
    rows = []
    exported = {a["name"]: a for a in bundle.manifest["artifacts"]}
    for name, r in check["artifacts"].items():
        lat = {f"b{x['batch']}_p50_ms": x["p50_ms"] for x in bench["results"] if x["artifact"] == name}
        art = exported.get(name, {})
        rows.append({"artifact": name, "precision": r["precision"], "backend": r["backend"], "accuracy": r["accuracy"],
                     "passed": r["passed"], "gated": r.get("gated", True), "layers_in_float": len(art.get("float_nodes", [])),
                     "accepted": art.get("accepted", True),
                     **({} if art.get("accepted", True) else {"rejected": art.get("rejected", NOT_ACCEPTED)}),
                     **({"not_default": art["not_default"]} if "not_default" in art else {}),
                     **lat})
    torch_rows = {f"b{x['batch']}_p50_ms": x["p50_ms"] for x in bench["results"] if x["artifact"] == "torch"}
    transfer = scratch_comparison(out)
    metrics = json.loads((out / "run" / "metrics.json").read_text())
    return {"passed": check["passed"], "data": check["data"], "bundle": str(out / "bundle"),
            "duplicates": {**metrics.get("duplicates", {}), **test_copy_counts(check)},
            "skipped_training_files": metrics.get("skipped_files", 0),
            "transfer": None if transfer is None else {k: v for k, v in transfer.items() if k != "curves"},
            "report": str(out / "report.html"), "artifacts": rows, "torch_reference": torch_rows,
            "target": bundle.manifest["target"], "not_run_here": check["skipped"],
            "chance_note": chance_note(check),
            "next_steps": [{"what": w, "command": c} for w, c in device_commands(bundle, out / "bundle")]}


def format_summary(summary: dict) -> str:
    batches = sorted({k for r in summary["artifacts"] for k in r if k.endswith("_p50_ms")},
                     key=lambda k: int(k[1:].split("_")[0]))
    head = f"{'artifact':<10} {'precision':<9} {'accuracy':>8} {'check':>5} " + " ".join(
        f"{k.split('_')[0].replace('b', 'batch '):>10}" for k in batches)
    lines = [head, "-" * len(head)]
    for r in summary["artifacts"]:
        verdict = ("ok" if r["passed"] else "FAIL") if r.get("gated", True) else "-"
        lines.append(f"{r['artifact']:<10} {r['precision']:<9} {r['accuracy']:>8.4f} {verdict:>5} "
                     + " ".join(f"{r.get(k, float('nan')):>7.2f} ms" for k in batches))
    if summary["torch_reference"]:
        lines.append(f"{'torch':<10} {'fp32':<9} {'':>8} {'':>5} " + " ".join(
            f"{summary['torch_reference'].get(k, float('nan')):>7.2f} ms" for k in batches))
    lines += [f"{r['artifact']}: " + (f"not accepted at export, so not gated and used only when asked for "
                                      f"({r.get('rejected', NOT_ACCEPTED)})" if not r.get("accepted", True) else
                                      f"{r['layers_in_float']} layers kept in float to meet --max-drop")
              for r in summary["artifacts"] if not r.get("accepted", True) or r.get("layers_in_float")]
    lines += [f"{r['artifact']}: {r['not_default']}" for r in summary["artifacts"] if r.get("not_default")]
    lines += ["", f"accuracy on {summary['data']}; latency p50 on this machine (ONNX Runtime CPU)",
              f"bundle: {summary['bundle']}", f"report: {summary['report']}"]
    if summary.get("chance_note"):
        lines.append(f"warning: {summary['chance_note']}")
    if summary.get("transfer"):
        e, w = summary["transfer"]["effects"], summary["transfer"]["better"]
        lines += ["", "pretrained vs scratch (validation accuracy, same recipe and epochs):"]
        for key, label in (("start", "start (epoch 1)"), ("slope_epochs_to_90pct_of_best", "epochs to 90 % of best"),
                           ("asymptote", "best")):
            win = w["slope" if key.startswith("slope") else key]
            vals = [f"{e[k][key]:>7.4g}" if e[k][key] is not None else "  never (at chance)" for k in ("pretrained", "scratch")]
            lines.append(f"  {label:<24} {vals[0]} vs {vals[1]}  {win}")
    if skipped := summary.get("skipped_training_files"):
        lines.append(f"{skipped} training files or folders skipped (unreadable, not images, or where training does not read): listed in run/skipped.txt")
    if found := describe_duplicates({k: n for k, n in summary.get("duplicates", {}).items() if k != "moved_to_train"}):
        lines.append("byte-identical images (all in run/duplicates.txt and check.json): " + "; ".join(found))
    if summary["not_run_here"]:
        lines.append(f"not runnable here: {', '.join(summary['not_run_here'])}")
    lines += ["", f"next, on the {summary['target']} device:"]
    lines += [f"  # {s['what']}\n  {s['command']}" for s in summary["next_steps"]]
    return "\n".join(lines)
