"""``edge-tl check``: does every artifact this machine can run still answer like the fine-tuned model?

Per artifact: agreement and max logit difference against ``golden.npz`` (FP32 PyTorch
outputs saved at export, so the comparison works on another machine), and top-1 accuracy
on labelled images (``--data DIR``, else the golden images' labels) compared with a
reference: an earlier release's ``--baseline`` JSON when given, else the FP32 ONNX model
on the same images (whose own parity with PyTorch is the golden check). Torch-free.
"""

from __future__ import annotations

import hashlib
import json
import logging
import contextlib
import math
import time
from pathlib import Path
from xml.sax.saxutils import escape, quoteattr

import numpy as np
from PIL import Image

from edge_tl import __version__
from edge_tl.errors import UserError
from edge_tl.fileio import sha256_file, write_text

from .bundle import Bundle
from .images import (MAX_DECODE_THREADS, UnreadableImage, class_folders, class_key, cpu_cores, image_files, in_order,
                     to_input)
from .predictor import make_runner, not_runnable, tensorrt_available
from .scores import ece, softmax

LOG = logging.getLogger("edge_tl").info  # progress lines; the CLI passes its own printer


def labelled_files(root: str | Path, classes: list[str]) -> tuple[list[Path], np.ndarray]:
    """The image files and labels of an ImageFolder (``DIR/<class>/*``) whose classes are the bundle's."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"{root}: no such folder; --data takes an ImageFolder with one sub-folder per class.")
    folders, index = class_folders(root), {class_key(c): i for i, c in enumerate(classes)}
    unknown = [d.name for d in folders if class_key(d.name) not in index]
    if not folders or unknown:
        raise UserError(f"{root}: class folders {unknown or '(none)'} are not the bundle's classes {classes}; "
                        "--data needs DIR/<class>/* with the bundle's class names.")
    files = [(f, index[class_key(d.name)]) for d in folders for f in image_files(d)]
    return [f for f, _ in files], np.asarray([y for _, y in files], np.int64)


def decoded_batches(files: list[Path], labels: np.ndarray, spec, skipped: list[str], batch: int = 32):
    """Yield ``(uint8 pixels, labels, paths)`` of the readable files, ``batch`` at a time (decoded on
    every core, in order), so a test set of any size takes memory for a batch; each unreadable
    file's reason is appended to ``skipped``."""
    def read(f: Path) -> np.ndarray | UnreadableImage:
        try:
            return spec.to_pixels(spec.load(f))
        except UnreadableImage as exc:
            return exc

    pixels, ys, paths = [], [], []
    for f, y, result in zip(files, labels, in_order(read, files, min(MAX_DECODE_THREADS, cpu_cores()))):
        if isinstance(result, UnreadableImage):
            skipped.append(str(result))
            continue
        pixels.append(result)
        ys.append(y)
        paths.append(str(f))
        if len(pixels) == batch:
            yield np.stack(pixels), np.asarray(ys, np.int64), paths
            pixels, ys, paths = [], [], []
    if pixels:
        yield np.stack(pixels), np.asarray(ys, np.int64), paths


def labelled_images(root: str | Path, classes: list[str], spec) -> tuple[np.ndarray, np.ndarray, list[str], list[str]]:
    """uint8 pixels, labels, paths and skipped files of an ImageFolder whose classes are the bundle's, all in memory."""
    files, labels = labelled_files(root, classes)
    skipped: list[str] = []
    batches = list(decoded_batches(files, labels, spec, skipped))
    if not batches:
        raise UserError(f"{root}: no readable images in its class folders.")
    return (np.concatenate([b[0] for b in batches]), np.concatenate([b[1] for b in batches]),
            [p for b in batches for p in b[2]], skipped)


PREPROCESS_TOLERANCE = 2  # grey levels: another Pillow build may round differently; another resize differs far more


def preprocess_parity(bundle: Bundle) -> dict | None:
    """This machine's preprocessing of golden.npz's source images (and its JPEG decode of the
    camera-sized JPEG) against the export machine's (None: no sources)."""
    vectors = bundle.preprocess_vectors()
    if not vectors:
        return None
    diff = max(int(np.abs(bundle.spec.to_pixels(Image.fromarray(src)).astype(np.int16) - want).max()) for src, want in vectors)
    jpeg = bundle.jpeg_vector()
    jpeg_diff = None if jpeg is None else int(np.abs(bundle.spec.to_pixels(bundle.spec.load(jpeg[0])).astype(np.int16)
                                                      - jpeg[1]).max())
    passed = diff <= PREPROCESS_TOLERANCE and (jpeg_diff or 0) <= PREPROCESS_TOLERANCE
    what = (f"resize/crop here differs from export's by up to {diff} grey levels" if diff > PREPROCESS_TOLERANCE else
            f"the camera-sized JPEG decodes here to pixels up to {jpeg_diff} grey levels from export's (another libjpeg, "
            "or one without its DCT scaling?)")
    return {"images": len(vectors), "max_abs_diff": diff, "jpeg_max_abs_diff": jpeg_diff,
            "tolerance": PREPROCESS_TOLERANCE, "passed": passed,
            "reason": "ok" if passed else f"{what} (> {PREPROCESS_TOLERANCE}): another Pillow build? Install the Pillow "
            "of the manifest's versions"}


def accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    """Top-1 accuracy of N×classes logits (NaN for no images)."""
    return float((logits.argmax(1) == labels).mean()) if len(labels) else float("nan")


PROGRESS_SECONDS = 10


def run_on_files(runners: dict, files: list[Path], labels: np.ndarray, spec, outputs: dict, seconds: dict,
                 log) -> tuple[np.ndarray, list[str], list[str]]:
    """Decode the files batch by batch and run each batch on every runner (memory for one batch, not
    the test set); each runner's logits are appended to its ``outputs`` entry, making it
    ``(golden logits, data logits)``, and the time in it added to ``seconds``. Returns the readable
    files' labels and paths, and the unreadable ones' reasons."""
    chunks, ys, paths, skipped = {name: [] for name in runners}, [], [], []
    last = time.perf_counter()
    for pixels, batch_labels, batch_paths in decoded_batches(files, labels, spec, skipped):
        x = to_input(pixels)
        for name, runner in runners.items():
            t0 = time.perf_counter()
            chunks[name].append(runner.infer(x).astype(np.float32))
            seconds[name] += time.perf_counter() - t0
        ys.append(batch_labels)
        paths += batch_paths
        if time.perf_counter() - last > PROGRESS_SECONDS:
            log(f"  {len(paths) + len(skipped)} of {len(files)} images")
            last = time.perf_counter()
    n_classes = {name: outputs[name].shape[1] for name in runners}
    for name in runners:
        outputs[name] = (outputs[name], np.concatenate(chunks[name]) if chunks[name]
                         else np.zeros((0, n_classes[name]), np.float32))
    return (np.concatenate(ys) if ys else np.zeros(0, np.int64)), paths, skipped


def infer_all(runner, pixels: np.ndarray, batch: int = 32) -> np.ndarray:
    """Float32 logits of NHWC pixels (the bundle's input before the transpose), in batches."""
    outs = [runner.infer(to_input(pixels[i:i + batch])) for i in range(0, len(pixels), batch)]
    return np.concatenate(outs).astype(np.float32)


NOISE_MIN_IMAGES = 50  # fewer images: a drop budget is strict (as scores.MIN_IMAGES for the temperature)


def drop_noise(reference_logits: np.ndarray, logits: np.ndarray, labels: np.ndarray) -> float:
    """Standard error (points) of the accuracy drop from ``reference_logits`` to ``logits`` on the
    same images: only the images exactly one of them gets right move it."""
    return paired_noise(reference_logits.argmax(1) == labels, logits.argmax(1) == labels)


def paired_noise(ref_right: np.ndarray, right: np.ndarray) -> float:
    """``drop_noise`` of two models' right/wrong per image (booleans, the same images in the same order)."""
    return float(np.sqrt((ref_right != right).sum()) / max(len(right), 1) * 100)


def noise_allowance(noise: float, max_drop: float, images: int) -> float:
    """Points a drop may exceed ``max_drop`` by as sampling noise: its paired standard error, capped at
    ``max_drop`` (never more than twice the budget; none for a budget of 0), and none under
    ``NOISE_MIN_IMAGES`` images, where one lost image is always "within noise". Export and check alike."""
    return min(noise, max_drop) if images >= NOISE_MIN_IMAGES else 0.0


GOLDEN_TAIL = 0.00135  # the chance a sound export is failed by sampling: that of three standard errors of a normal
EXACT_FLIPS = 30  # expected disagreements up to which they are counted exactly (beyond, a normal approximation)


def _log_comb(a: int, b: int) -> float:
    return math.lgamma(a + 1) - math.lgamma(b + 1) - math.lgamma(a - b + 1) if 0 <= b <= a else -math.inf


def flips_pmf(q: float, n: int, population: int | None) -> list[float]:
    """P(k of ``n`` golden images disagree with FP32), k = 0.., for an export that disagrees on a
    fraction ``q`` of the ``population`` validation images they are drawn from (hypergeometric;
    binomial without a population); cut where the rest is below 1e-12."""
    if population and population >= n:
        bad = round(q * population)
        log_p = lambda k: _log_comb(bad, k) + _log_comb(population - bad, n - k) - _log_comb(population, n)  # noqa: E731
    else:
        log_p = lambda k: _log_comb(n, k) + (k * math.log(q) if k else 0.0) + ((n - k) * math.log1p(-q) if n > k else 0.0)  # noqa: E731
    pmf, total = [], 0.0
    for k in range(n + 1):
        pmf.append(math.exp(log_p(k)) if q > 0 else float(k == 0))
        total += pmf[-1]
        if total > 1 - 1e-12:
            break
    return pmf


def upper_count(pmf: list[float]) -> int:
    """The smallest count m with P(more than m) <= GOLDEN_TAIL, of a distribution over 0, 1, .."""
    tail = 1.0
    for m, pm in enumerate(pmf):
        tail -= pm
        if tail <= GOLDEN_TAIL:
            return m
    return len(pmf) - 1


def net_losses_pmf(flips: list[float]) -> list[float]:
    """P(m more golden images lost than gained), m = 0.. (0: none more, or more gained), where each
    flip is a loss or a gain with equal chance: the sampling of a drop-free export. Export accepted
    a drop up to --max-drop (and its noise), which need not split so; the golden limit is the larger
    of --max-drop and this sampling's, as the normal approximation's was."""
    net = [0.0] * len(flips)
    for k, pk in enumerate(flips):
        for losses in range(k + 1):
            net[max(2 * losses - k, 0)] += pk * math.exp(_log_comb(k, losses) - k * math.log(2))
    return net


def golden_tolerance(artifact: dict, n: int, population: int | None, min_agreement: float,
                     max_drop: float) -> tuple[float, float]:
    """(agreement floor, drop limit in points) for ``artifact`` judged on ``n`` golden images.

    An INT8 artifact agrees with FP32 on a fraction p < 1 of the ``population`` validation images
    export measured it on (the manifest's ``fp32_agreement``); the golden images are drawn from
    them. On a few golden images its agreement and accuracy then move by sampling alone: at
    p = 0.96 on 32 images a sound export shows 30 or fewer a third of the time, and one image is
    3.1 points. Where ``min_agreement`` / ``max_drop`` would fail such an export more often than
    ``GOLDEN_TAIL``, the gate widens to what sampling reaches with that chance (counted exactly
    where few flips are expected: there a normal approximation is too narrow; at p = 0.99 it failed
    two flips of 32), never more than 0.1 below ``min_agreement``, and only for an export that was accepted: a
    sound INT8 is not failed by two flipped images, a broken deployment still is. Where the golden
    images are the whole validation set (a small one), the floor is the agreement export measured
    on them and accepted: the runtime must reproduce it.
    """
    p = artifact.get("fp32_agreement")
    if p is None or not artifact.get("accepted", True):
        return min_agreement, max_drop
    if not 0 < p <= 1:
        raise UserError(f"manifest artifact {artifact.get('name')}: fp32_agreement {p} is not in (0, 1]. Re-export the bundle.")
    if population and population <= n:  # the golden images are the whole validation set: export measured exactly this
        return min(min_agreement, p), max_drop
    if (1 - p) * n > EXACT_FLIPS:  # many flips expected: the normal approximation holds
        fpc = math.sqrt((population - n) / (population - 1)) if population and population > 1 else 1.0
        floor, drop = p - 3 * fpc * math.sqrt(p * (1 - p) / n), 300 * fpc * math.sqrt((1 - p) / n)
    else:
        flips = flips_pmf(1 - p, n, population)
        floor = 1 - upper_count(flips) / n - 1e-9  # 1e-9: agreement is a count / n in floating point
        drop = 100 * upper_count(net_losses_pmf(flips)) / n + 5e-4  # the drop it is compared with is rounded to 0.001
    return min(min_agreement, max(floor, min_agreement - 0.1)), max(max_drop, drop)


NO_ENGINE = "tensorrt-engines"  # the report's name for "--require-engines, and the bundle has no engine"


def check_bundle(path: str | Path, data: str | Path | None = None, max_drop: float = 1.0, min_agreement: float = 0.95,
                 baseline: str | Path | None = None, device: str | None = "cpu", min_accuracy: float | None = None,
                 threads: int = 0, keep_predictions: bool = False, require_engines: bool = False,
                 max_class_drop: float | None = None, log=LOG) -> dict:
    """Run every artifact runnable here; return ``{"passed", "artifacts": {name: {...}}}``.

    ``min_accuracy`` also fails any artifact below it (the reference included); ``keep_predictions``
    adds the images, labels and each artifact's top-1 per image (for reports); ``require_engines``
    fails the check when the bundle has no TensorRT engine, or an engine cannot run here and no other of
    its precision can (CI on the device: after a TensorRT or JetPack upgrade the app would otherwise
    fall back to ONNX Runtime unnoticed). ``max_class_drop`` (points) also fails an artifact whose recall
    on any one class falls that far below the reference's (the baseline's same artifact, else the FP32
    ONNX on the same images) beyond its sampling noise: overall accuracy hides a rare class lost.
    """
    if max_class_drop is not None and not (math.isfinite(max_class_drop) and max_class_drop >= 0):
        raise UserError(f"--max-class-drop {max_class_drop}: points, 0 or more.")
    if not (math.isfinite(max_drop) and max_drop >= 0 and 0 <= min_agreement <= 1
            and (min_accuracy is None or 0 <= min_accuracy <= 1)):
        raise UserError(f"--max-drop {max_drop} / --min-agreement {min_agreement} / --min-accuracy {min_accuracy}: need "
                        "a drop >= 0 (points), an agreement and an accuracy between 0 and 1.")
    bundle = Bundle.load(path)
    golden_pixels, golden_logits = bundle.golden()
    golden_labels = bundle.golden_labels()
    golden_labels = golden_logits.argmax(1) if golden_labels is None else golden_labels
    base = Baseline.load(baseline, bundle) if baseline else None
    files, file_labels = labelled_files(data, bundle.classes) if data is not None else ([], None)
    if base is not None:
        base.check_can_match(len(files) if data is not None else len(golden_labels), data is None,
                             f"{len(files)} image files in {data}" if data is not None else "golden.npz")
    order = sorted(bundle.artifacts, key=lambda a: a["name"] != "fp32")  # fp32 first: it is the default reference
    backends = {a["name"]: "tensorrt" if a["format"] == "engine" else "onnxruntime" for a in order}
    skipped_why = {a["name"]: why for a in order if (why := not_runnable(a, backends[a["name"]], device))}
    if len(skipped_why) == len(order):
        raise UserError(f"{bundle.path}: no artifact can run on this machine (ONNX Runtime missing?).")
    golden_source = (f"golden.npz ({len(golden_labels)} labelled validation images, which chose the best epoch: not "
                     "an independent test; held-out images give one: check --data DIR, or DATA/test/ for build)")
    log(f"check {bundle.path} on {golden_source if data is None else f'{data} ({len(files)} image files)'}")
    outputs, seconds, runs_on = {}, {}, {}  # name -> (golden logits, data logits); time in its runner; describe()
    with contextlib.ExitStack() as runners:
        active = {}
        for art in order:
            if art["name"] not in skipped_why:
                t0 = time.perf_counter()
                runner = active[art["name"]] = runners.enter_context(
                    make_runner(bundle, art, backends[art["name"]], device, threads))
                outputs[art["name"]] = infer_all(runner, golden_pixels)
                seconds[art["name"]], runs_on[art["name"]] = time.perf_counter() - t0, runner.describe()
        if data is not None:
            labels, paths, skipped = run_on_files(active, files, file_labels, bundle.spec, outputs, seconds, log)
            if not paths:
                raise UserError(f"{data}: no readable images in its class folders.")
            source = f"{data} ({len(labels)} images{f', {len(skipped)} unreadable skipped' if skipped else ''})"
            rows = [f"{bundle.classes[y]}\t{sha256_file(f)}" for f, y in zip(paths, labels)]
            in_digest_order = sorted(range(len(rows)), key=rows.__getitem__)  # of the files' contents, not names
            images_sha = _digest([rows[i] for i in in_digest_order])
        else:
            labels, source = golden_labels, golden_source
            paths, skipped = [f"golden.npz[{i}]" for i in range(len(labels))], []
            images_sha = hashlib.sha256(golden_pixels.tobytes() + np.asarray(golden_labels, np.int64).tobytes()).hexdigest()
            in_digest_order = list(range(len(labels)))
            outputs = {name: (g, g) for name, g in outputs.items()}
    class_counts = np.bincount(labels, minlength=len(bundle.classes)).tolist()
    unchecked = [c for c, n in zip(bundle.classes, class_counts) if n == 0]
    if unchecked:  # a partial checkout or a renamed folder: the gate would judge only the classes left
        log(f"  note: no images of {len(unchecked)} of the {len(bundle.classes)} classes ({', '.join(unchecked)}) in "
            f"{data if data is not None else 'golden.npz'}: the check says nothing about them")
    dropped = set((bundle.manifest.get("slimmed") or {}).get("dropped", []))
    unknown = sorted(set(base.accuracies if base else ()) - {a["name"] for a in bundle.artifacts} - dropped
                     - (base.not_gated if base else set()))
    if base is not None:
        base.check_same_images(images_sha, class_counts, source, log)
    for line in skipped[:5]:
        log(f"  unreadable, not counted: {line}")
    if len(skipped) > 5:
        log(f"  ... and {len(skipped) - 5} more unreadable (all in the report's 'unreadable')")
    preprocess = preprocess_parity(bundle)
    if preprocess:
        log(f"  preprocess: {'PASS' if preprocess['passed'] else 'FAIL'} {preprocess['images']} source images, max |diff| "
            f"{preprocess['max_abs_diff']} grey levels" + ("" if preprocess["jpeg_max_abs_diff"] is None else
            f", camera-sized JPEG decoded: {preprocess['jpeg_max_abs_diff']}")
            + ("" if preprocess["passed"] else f": {preprocess['reason']}"))

    results, accuracies, fp32_logits = {}, {}, None
    for art in order:
        if art["name"] in skipped_why:
            log(f"  {art['name']}: skipped: {skipped_why[art['name']]}")
            continue
        g, logits = outputs[art["name"]]
        acc = accuracy(logits, labels)
        accuracies[art["name"]] = acc
        balanced = float(np.mean([(logits.argmax(1)[labels == c] == c).mean() for c in np.unique(labels)]))
        if base is not None:
            ref, ref_source = base.accuracies.get(art["name"]), f"baseline {baseline}"
        elif data is None:
            ref, ref_source = accuracy(golden_logits, labels), "PyTorch FP32 on golden images"
        else:
            ref, ref_source = accuracies.get("fp32"), "fp32 ONNX on the same images"
        drop = None if ref is None else round((ref - acc) * 100, 3)
        if art["name"] == "fp32":
            fp32_logits = logits
        right = (logits.argmax(1) == labels)[in_digest_order]
        if base is not None:  # a retrained model against the last release: the images either one gets right move it
            base_right = base.right.get(art["name"])
            noise = None if base_right is None else round(paired_noise(base_right, right), 3)
        else:  # against the fp32 ONNX on the same --data images, as at export
            paired = data is not None and ref is not None and fp32_logits is not None
            noise = round(drop_noise(fp32_logits, logits, labels), 3) if paired else None
        agreement = float((g.argmax(1) == golden_logits.argmax(1)).mean())
        agreement_floor, golden_drop_limit = golden_tolerance(
            art, len(golden_logits), bundle.manifest.get("validation", {}).get("images"), min_agreement, max_drop)
        # judged on the golden images against FP32: sampling noise; on --data or against a baseline's same artifact: none
        drop_limit = (golden_drop_limit if data is None and base is None else
                      max_drop + (noise_allowance(noise, max_drop, len(labels)) if noise is not None else 0.0))
        finite = bool(np.isfinite(g).all() and np.isfinite(logits).all())
        reasons = [] if finite else ["non-finite outputs (inf or NaN): the artifact overflows or is broken"]
        if min_accuracy is not None and not acc >= min_accuracy:
            reasons.append(f"accuracy {acc:.4f} < --min-accuracy {min_accuracy}")
        if ref is None and min_accuracy is None:
            why = "not in the baseline" if base is not None else "the bundle has no fp32 artifact"
            log(f"  {art['name']}: no reference accuracy ({why}): only the golden agreement gates it; add "
                f"{'a baseline that has it' if base is not None else '--baseline'} or --min-accuracy")
        if agreement < agreement_floor:
            reasons.append(f"golden top-1 agreement {agreement:.3f} < {agreement_floor:.3f} (one image is "
                           f"{1 / len(golden_logits):.3f}; export measured {art.get('fp32_agreement') or 'nothing'} "
                           "on validation)")
        if drop is not None and drop > drop_limit:
            allowed = f"{drop_limit:.2f}" + (f": --max-drop {max_drop:g} + its noise" if drop_limit > max_drop else "")
            reasons.append(f"accuracy {acc:.4f} is {drop:.2f} pts below the reference {ref:.4f} (> {allowed})")
        ref_right = (base.right.get(art["name"]) if base is not None else
                     None if fp32_logits is None or data is None else (fp32_logits.argmax(1) == labels)[in_digest_order])
        class_drops = None if ref_right is None else class_recall_drops(ref_right, right, labels[in_digest_order],
                                                                        bundle.classes, max_class_drop or 0.0)
        if max_class_drop is not None and class_drops:
            reasons += [f"class {c}: recall {d['recall']:.3f}, {d['drop']:.2f} pts below the reference's "
                        f"{d['reference_recall']:.3f} (> {d['limit']:.2f}, --max-class-drop)"
                        for c, d in class_drops.items() if d["drop"] > d["limit"]]
        results[art["name"]] = {
            "precision": art["precision"], "backend": backends[art["name"]], "runs_on": runs_on[art["name"]],
            "file": art["file"], "accuracy": acc,
            "balanced_accuracy": round(balanced, 6), "reference_accuracy": ref,
            "reference": ref_source if ref is not None else
            ("none (not in baseline)" if base is not None else "none (the bundle has no fp32 artifact)"),
            "drop": drop, "drop_limit": round(drop_limit, 3), "drop_noise_pts": noise, "class_recall_drops": class_drops,
            # which images it got right: one bit each, in images_sha256's order (hex of numpy.packbits), so that
            # a later check against this report as --baseline knows the noise of its drop
            "right_images": np.packbits(right).tobytes().hex(),
            "manifest_val_accuracy": art.get("val_accuracy"),
            "agreement": agreement, "agreement_floor": agreement_floor,
            "score_ece": round(ece(softmax(logits, bundle.temperature), labels), 4) if finite else None,
            "max_abs_diff": float(np.abs(g - golden_logits).max()) if finite else None, "passed": not reasons,
            "reason": "; ".join(reasons) or "ok", "seconds": round(seconds[art["name"]], 2),
            # export already found it short of --max-drop: measured and shown, not gated (apps use it only when
            # asked), unless it is broken (non-finite) or a baseline gated it (a regression from a passing release)
            "gated": art.get("accepted", True) or not finite or (base is not None and art["name"] in base.accuracies
                                                                 and art["name"] not in base.not_gated)}
        if not art.get("accepted", True):
            results[art["name"]]["not_accepted"] = art.get("rejected", "below --max-drop even with every layer in float")
        if keep_predictions:
            results[art["name"]]["predictions"] = logits.argmax(1).tolist()
        r = results[art["name"]]
        verdict = ('PASS' if r['passed'] else 'FAIL') if r["gated"] else "NOT GATED (not accepted at export; would " + (
            'pass' if r['passed'] else 'fail') + ")"
        log(f"  {art['name']}: {verdict} accuracy {acc:.4f}"
            f"{'' if drop is None else f' (drop {drop:+.2f} pts)'}, golden agreement {agreement:.3f}, "
            f"max |diff| {r['max_abs_diff'] if r['max_abs_diff'] is None else format(r['max_abs_diff'], '.3g')}"
            + ("" if r["passed"] else f": {r['reason']}"))
    not_run = [a["name"] for a in bundle.artifacts if a["name"] not in results]
    for name in unknown:  # in the baseline, gone from the bundle: a regression, not a silent pass
        log(f"  {name}: FAIL: in the baseline but not in the bundle")
    for name in sorted(dropped & set(base.accuracies if base else ())):
        log(f"  {name}: in the baseline, left out of this bundle by `edge-tl slim`: not judged")
    for name in sorted((base.not_gated if base else set()) - {a["name"] for a in bundle.artifacts} - dropped):
        log(f"  {name}: in the baseline, not gated there (not accepted at export), not in this bundle: not judged")
    # name -> why: an engine that cannot run here, and no engine of its precision can (one for another
    # device beside this device's own is no failure)
    precision = {a["name"]: a["precision"] for a in bundle.artifacts if a["format"] == "engine"}
    running = {precision[n] for n in results if n in precision}
    engine_failures = {n: why for n, why in skipped_why.items()
                       if require_engines and n in precision and precision[n] not in running}
    for name, why in engine_failures.items():
        log(f"  {name}: FAIL (--require-engines: no {precision[name]} engine runs here): {why}")
    if require_engines and not precision:
        engine_failures[NO_ENGINE] = (f"the bundle has none (--require-engines): build them here with "
                                      f"`edge-tl engine {bundle.path}`")
        log(f"  {NO_ENGINE}: FAIL: {engine_failures[NO_ENGINE]}")
    # a constant answer's balanced accuracy (mean recall over the classes present); none on images of one class
    present = sum(n > 0 for n in class_counts)
    chance = 1 / present if present > 1 else None
    at_chance = [n for n, r in results.items() if chance is not None and r["balanced_accuracy"] <= chance + 1e-9]
    if note := chance_note({"at_chance": at_chance, "chance": chance, "artifacts": results}):
        log(f"  note: {note}")
    passed = (all(r["passed"] for r in results.values() if r["gated"]) and not unknown
              and (preprocess or {}).get("passed", True) and not engine_failures)
    report = {"passed": passed, "edge_tl": __version__, "bundle": str(bundle.path.resolve()),
              "manifest_sha256": bundle.digest, "release_id": bundle.release_id, "model": bundle.manifest.get("model"),
              "data": source, "image_count": len(labels), "images_sha256": images_sha, "unreadable": skipped,
              "class_counts": class_counts, "max_drop": max_drop, "min_agreement": min_agreement,
              "min_accuracy": min_accuracy, "baseline": None if base is None else str(baseline),
              "tensorrt_available": tensorrt_available(), "skipped": not_run, "skipped_reasons": skipped_why,
              "engine_failures": engine_failures, "missing": unknown, "artifacts": results,
              "chance": chance, "at_chance": at_chance, "classes_without_images": unchecked,
              "preprocess": preprocess}
    if keep_predictions:
        report.update(images=paths, labels=labels.tolist(), classes=bundle.classes)
    return report


def class_recall_drops(ref_right: np.ndarray, right: np.ndarray, labels: np.ndarray, classes: list[str],
                       max_class_drop: float) -> dict:
    """Per class with images: recall of the reference and of the artifact (right/wrong per image, same
    images), the drop in points, and its limit (``max_class_drop`` plus the paired noise on that class's
    images, as for the whole: capped, none under ``NOISE_MIN_IMAGES``)."""
    out = {}
    for c in np.unique(labels):
        mask = labels == c
        drop = (ref_right[mask].mean() - right[mask].mean()) * 100
        noise = paired_noise(ref_right[mask], right[mask])
        out[classes[int(c)]] = {"images": int(mask.sum()), "reference_recall": round(float(ref_right[mask].mean()), 4),
                                "recall": round(float(right[mask].mean()), 4), "drop": round(float(drop), 3),
                                "limit": round(max_class_drop + noise_allowance(noise, max_class_drop, int(mask.sum())), 3)}
    return out


def chance_note(report: dict) -> str | None:
    """One line when artifacts are no better than a constant answer (balanced accuracy at most 1 / the
    classes present): the model has not learned, or, where another artifact is above it, those are broken."""
    at, chance = report.get("at_chance") or [], report.get("chance")
    if not at or chance is None:  # none, or a check.json from before edge-tl measured it
        return None
    above = [n for n in report["artifacts"] if n not in at]
    head = (f"{', '.join(at)} no better than a constant answer (balanced accuracy at most {chance:.3f}, 1 / the "
            "classes present)")
    if above:
        return f"{head} while {', '.join(above)} is above it: {', '.join(at)} is broken; re-export the bundle"
    return (f"{head}: the model has not learned (more epochs or data, or check the labels), or these images "
            "differ from those it learned on (`edge-tl drift BUNDLE IMAGES` compares them with its validation images)")


def failures(report: dict) -> list[str]:
    """One line per failed part of a check report: artifact, baseline artifact gone, preprocessing."""
    lines = [f"{k}: {r['reason']}" for k, r in report["artifacts"].items() if not r["passed"] and r.get("gated", True)]
    lines += [f"{k}: in the baseline but not in the bundle" for k in report.get("missing", [])]
    lines += [f"{k}: {why}" for k, why in report.get("engine_failures", {}).items()]
    if (pre := report.get("preprocess")) and not pre["passed"]:
        lines.append(f"preprocess: {pre['reason']}")
    return lines


def _unpack_right(hex_bits: str, images: int) -> np.ndarray:
    """A report's ``right_images`` back to one boolean per image (a ValueError where it does not fit)."""
    bits = np.unpackbits(np.frombuffer(bytes.fromhex(hex_bits), np.uint8))
    if not images <= len(bits) < images + 8 or bits[images:].any():
        raise ValueError(f"right_images holds {len(bits)} bits for {images} images")
    return bits[:images].astype(bool)


def _digest(rows: list[str]) -> str:
    return hashlib.sha256("\n".join(rows).encode()).hexdigest()


class Baseline:
    """An earlier ``edge-tl check --json`` report: accuracy per artifact, and what identifies the
    images it was measured on (``images_sha256``: each file's sha256 and class; class counts in
    reports from before it)."""

    def __init__(self, path: Path, accuracies: dict[str, float], images_sha256: str | None, class_counts: list[int] | None,
                 not_gated: frozenset[str] = frozenset(), right: dict[str, np.ndarray] | None = None):
        self.path, self.accuracies, self.images_sha256, self.class_counts = path, accuracies, images_sha256, class_counts
        self.not_gated = not_gated  # artifacts that release's check measured without gating (not accepted at export)
        self.right = right or {}  # artifact -> right/wrong per image, in images_sha256's order (reports from before: none)
        self.image_count, self.source = None, None  # how many images and which source (golden.npz or a folder) it used

    @classmethod
    def load(cls, path: str | Path, bundle: Bundle) -> "Baseline":
        """The report at ``path``, refused when it failed, or has other classes or none of ``bundle``'s artifacts."""
        classes = bundle.classes
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            accuracies = {k: float(v["accuracy"]) for k, v in data["artifacts"].items()}
            counts, images = data.get("class_counts"), data.get("images_sha256")
            if not accuracies or not all(math.isfinite(a) and 0 <= a <= 1 for a in accuracies.values()):
                raise ValueError("artifact accuracies must be numbers between 0 and 1")
            if counts is None and images is None:
                raise ValueError("nothing says which images it was measured on: no images_sha256 or class_counts")
            counts = None if counts is None else [int(c) for c in counts]
            right = {k: _unpack_right(v["right_images"], int(data["image_count"]))
                     for k, v in data["artifacts"].items() if v.get("right_images") is not None}
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            why = f"no {exc} field" if isinstance(exc, KeyError) else exc
            raise UserError(f"{path}: not a baseline ({why}); save one with `edge-tl check BUNDLE --data DIR --json > "
                            "baseline.json`.") from None
        if data.get("passed") is False:
            failed = [k for k, v in data["artifacts"].items()
                      if isinstance(v, dict) and v.get("passed") is False and v.get("gated", True)]
            raise UserError(f"{path}: a check that FAILED ({', '.join(failed) or 'see its report'}); a "
                            "regressed release is no reference. Use the last passing release's report.")
        if counts is not None and len(counts) != len(classes):
            raise UserError(f"{path}: measured on {len(counts)} classes, the bundle has {len(classes)} ({classes}); "
                            "compare bundles of the same classes.")
        if not set(accuracies) & {a["name"] for a in bundle.artifacts}:
            raise UserError(f"{path}: none of its artifacts ({', '.join(sorted(accuracies))}) is in "
                            f"{bundle.path}, so nothing would be compared; the baseline must come from "
                            "`edge-tl check --json` on a bundle with the same artifacts.")
        not_gated = frozenset(k for k, v in data["artifacts"].items() if isinstance(v, dict) and v.get("gated") is False)
        base = cls(path, accuracies, images, counts, not_gated, right)
        base.image_count, base.source = data.get("image_count"), data.get("data")
        return base

    def check_can_match(self, listed: int, on_golden: bool, source: str) -> None:
        """Before any image runs, refuse a baseline that cannot have used these images: measured on the
        golden images and now on a folder (or the reverse), or on more images than the folder lists."""
        if isinstance(self.source, str) and self.source.startswith("golden.npz") != on_golden or (
                isinstance(self.image_count, int) and self.image_count > listed):
            raise UserError(f"{self.path}: measured on other images than this check's ({self.image_count} images of "
                            f"{self.source} vs {source}); compare on the same --data as the baseline.")

    def check_same_images(self, images_sha256: str, class_counts: list[int], source: str, log) -> None:
        """Refuse a comparison on other images."""
        if self.images_sha256 is not None and self.images_sha256 != images_sha256:
            raise UserError(f"{self.path}: measured on other images than this check's ({source}; images_sha256 "
                            f"{self.images_sha256[:12]}… vs {images_sha256[:12]}…); compare on the same --data as the "
                            "baseline (the same files; names may differ).")
        if self.class_counts is not None and self.class_counts != class_counts:
            raise UserError(f"{self.path}: measured on images with class counts {self.class_counts}, this check on "
                            f"{class_counts} ({source}); compare on the same --data as the baseline.")
        if self.images_sha256 is None:
            log(f"  note: {self.path} predates images_sha256; only its class counts show it used the same images")


def write_junit(report: dict, path: str | Path) -> Path:
    """JUnit XML: one test case per artifact, so CI systems show which one regressed; a report
    with an ``error`` (bad input, exit 2) is one erroring case that says why."""
    if "error" in report:
        return write_text(path, '<?xml version="1.0" encoding="UTF-8"?>\n<testsuite name="edge-tl check" tests="1" '
                          'failures="0" errors="1">\n  <testcase classname="edge-tl.check" name="bundle"><error '
                          f'message={quoteattr(report["error"])}/></testcase>\n</testsuite>\n')
    cases = []
    for name, r in report["artifacts"].items():
        body = "" if r["passed"] else f"<failure message={quoteattr(r['reason'])}>{escape(json.dumps(r))}</failure>"
        if not r.get("gated", True):
            body = f"<skipped message={quoteattr('not accepted at export, not gated: ' + r['not_accepted'])}/>"
        cases.append(f'  <testcase classname="edge-tl.check" name={quoteattr(name)} time="{r["seconds"]}">{body}</testcase>')
    for name in report.get("missing", []):
        cases.append(f'  <testcase classname="edge-tl.check" name={quoteattr(name)}><failure message="in the baseline '
                     f'but not in the bundle"/></testcase>')
    if pre := report.get("preprocess"):
        body = "" if pre["passed"] else f"<failure message={quoteattr(pre['reason'])}/>"
        cases.append(f'  <testcase classname="edge-tl.check" name="preprocess">{body}</testcase>')
    engine_failures = report.get("engine_failures", {})
    skipped = [n for n in report["skipped"] if n not in engine_failures]
    for name in skipped:
        why = report.get("skipped_reasons", {}).get(name, "not runnable on this machine")
        cases.append(f'  <testcase classname="edge-tl.check" name={quoteattr(name)}><skipped message={quoteattr(why)}/>'
                     '</testcase>')
    for name, why in engine_failures.items():
        cases.append(f'  <testcase classname="edge-tl.check" name={quoteattr(name)}><failure message={quoteattr(why)}/>'
                     '</testcase>')
    not_gated = sum(not r.get("gated", True) for r in report["artifacts"].values())
    failures = (sum(not r["passed"] and r.get("gated", True) for r in report["artifacts"].values())
                + len(report.get("missing", [])) + (not (report.get("preprocess") or {}).get("passed", True))
                + len(engine_failures))
    xml = (f'<?xml version="1.0" encoding="UTF-8"?>\n<testsuite name="edge-tl check" tests="{len(cases)}" '
           f'failures="{failures}" skipped="{len(skipped) + not_gated}">\n' + "\n".join(cases)
           + "\n</testsuite>\n")
    return write_text(path, xml)
