"""Field monitoring without labels: the last predictions against the validation reference in the manifest.

A calibrated score says how often the model is right on images *like its training data*; it is no
out-of-distribution detector. On the ELPV demo model, uniform noise, cells turned by 20° and
unrelated photos all came out with a *higher* mean top score than the test images (a review's
measurement, benchmarks/README.md "Field monitoring"), so a per-image score threshold misses them.
What moves under drift is the make-up of many predictions: which classes come out, how many score
low, and the input's brightness and contrast. Export stores class, score, brightness and contrast
per validation image (``reference`` in the manifest); a :class:`FieldMonitor` compares a window of field predictions
with windows resampled from that reference, one statistic at a time.
"""

from __future__ import annotations

import operator
import threading
from collections import deque

import numpy as np

from edge_tl.errors import UserError

from .scores import softmax

REFERENCE_IMAGES = 512  # validation images kept per statistic (evenly spaced): ~20 KB of manifest
# fewer validation images say too little about the tails the ranges are cut from: at 20, bootstrap
# ranges missed 4-19x more often than asked (a review's simulation); at 296, as asked
MIN_REFERENCE = 100
GRID_STEP = 4  # input statistics on every 4th row and column: 1/16 of the pixels, ~20 µs per 224-px image
RESAMPLES = 20000
# per statistic, for images like the validation split: a monitor judges a window every few minutes
# for months, so even 4 statistics x 1 % would alarm every ~25 windows; and field images come in
# runs (one module, one shift) that spread more than independent draws, so the range is wide
FALSE_ALARM = 0.001
MIN_FALSE_ALARM = 10 / RESAMPLES  # a rarer tail is past what RESAMPLES draws can place
SCORE_DECIMALS = 4  # the reference's scores are kept to 4 decimals; field scores are compared so
LOW_SCORE_QUANTILE = 0.1  # a share of low scores, not their mean: a few very low ones swing a mean (digits: 7x the
# asked false alarms at 160 reference images), a share stays binomial
# a statistic is unusual only when also this far from the reference (shares: absolute; brightness and
# contrast: relative to the reference's mean): the validation split chose the best epoch and the
# temperature, so fresh images of the same kind score a little lower (the session-25 demo model: 74 %
# test vs 79 % validation accuracy, 17.6 % low scores on its 654 test images against 10 %), and a
# window of hundreds of images is precise enough to flag that; a change worth an alarm is larger
TOLERANCE = {"class_mix": 0.1, "low_scores": 0.1, "brightness": 0.05, "contrast": 0.05}
UNSEEN_PSEUDOCOUNT = 0.5  # Jeffreys: a class the reference never predicted may still come out, rarely
STATS = {"class_mix": "distance of the predicted-class mix from the reference's (total variation, 0-1)",
         "low_scores": "share of top scores under {low_score:.4f} (the reference images' 10 % quantile)",
         "brightness": "mean of the images' mean grey level (0-255, model input)",
         "contrast": "mean of the images' grey-level standard deviation (model input)"}


def input_stats(pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per image of uint8 N×H×W×3 model inputs: (mean, standard deviation) of the grey levels of every
    channel on every ``GRID_STEP``-th row and column."""
    grid = np.asarray(pixels)[:, ::GRID_STEP, ::GRID_STEP].reshape(len(pixels), -1).astype(np.float32)
    return grid.mean(1), grid.std(1)


def reference_record(pixels: np.ndarray, logits: np.ndarray, temperature: float) -> dict:
    """The manifest's ``reference``: per validation image (at most ``REFERENCE_IMAGES``, evenly spaced),
    its predicted class, calibrated top score and input brightness and contrast."""
    idx = np.unique(np.linspace(0, len(pixels) - 1, min(REFERENCE_IMAGES, len(pixels))).round().astype(int))
    p = softmax(np.asarray(logits)[idx], temperature)
    mean, std = input_stats(np.asarray(pixels)[idx])
    return {"images": int(len(idx)), "source": "validation split, FP32 model", "grid_step": GRID_STEP,
            "predicted": p.argmax(1).tolist(), "score": np.round(p.max(1), SCORE_DECIMALS).tolist(),
            "brightness": np.round(mean, 2).tolist(), "contrast": np.round(std, 2).tolist()}


def _resampled_means(ref: dict[str, np.ndarray], size: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Mean brightness and contrast of ``RESAMPLES`` samples of ``size`` images drawn from the reference with
    replacement, in chunks of ~4M draws."""
    out: dict[str, list] = {"brightness": [], "contrast": []}
    chunk = max(1, min(RESAMPLES, (4 << 20) // size))
    for start in range(0, RESAMPLES, chunk):
        draw = rng.integers(0, len(ref["predicted"]), (min(chunk, RESAMPLES - start), size))
        for k in out:
            out[k].append(ref[k][draw].mean(1))
    return {k: np.concatenate(v) for k, v in out.items()}


def check_reference(reference: dict | None, window, false_alarm: float) -> int:
    """Refuse a reference, window or false-alarm level the monitor cannot judge with; the window as an int."""
    if not reference or not reference.get("predicted"):
        raise UserError("this bundle has no validation reference (exported before edge-tl stored one): "
                        "re-export it to monitor drift.")
    if len(reference["predicted"]) < MIN_REFERENCE:
        raise UserError(f"the bundle's reference holds {len(reference['predicted'])} validation images: too few "
                        f"to tell drift from chance ({MIN_REFERENCE} or more; export from data with a larger "
                        "val/ split, or more images).")
    try:
        window = operator.index(window)
    except TypeError:
        window = None
    if window is None or window < 10:
        raise UserError("window: use 10 or more predictions (a few say nothing about a mix).")
    if not MIN_FALSE_ALARM <= false_alarm < 0.5:
        raise UserError(f"false alarm {false_alarm!r}: a fraction from {MIN_FALSE_ALARM:g} (what "
                        f"{RESAMPLES} resamples can place) to 0.5; default {FALSE_ALARM:g}.")
    return window


def _row(prediction, n_classes: int) -> tuple:
    """(class index, score at the reference's decimals, brightness, contrast) of a Prediction or its dict."""
    get = prediction.get if isinstance(prediction, dict) else lambda k: getattr(prediction, k, None)
    row = (get("index"), get("score"), get("brightness"), get("contrast"))
    if any(v is None for v in row):
        raise UserError("a prediction without brightness and contrast (one from Predictor.decode of logits): "
                        "monitor predictions from predict, predict_batch or predict_files.")
    if not 0 <= row[0] < n_classes:
        raise UserError(f"a prediction of class index {row[0]}: this bundle has {n_classes} classes "
                        "(a prediction of another bundle?).")
    return (int(row[0]), round(float(row[1]), SCORE_DECIMALS), float(row[2]), float(row[3]))


def reference_of(predictions, n_classes: int) -> dict:
    """A reference from the predictions of images known to be good (the first weeks on site, say),
    in place of the validation split's: that split chose the checkpoint and the temperature, so its
    scores read a little high against any fresh images, and a field reference matches the site."""
    rows = [_row(p, n_classes) for p in predictions]
    return {"images": len(rows), "source": "predictions of images given as good",
            **{k: [r[i] for r in rows] for i, k in enumerate(("predicted", "score", "brightness", "contrast"))}}


class FieldMonitor:
    """The last ``window`` predictions against the bundle's validation reference.

    ``add`` each :class:`~edge_tl.runtime.Prediction` (from ``Predictor.predict``, which carries the
    input's brightness and contrast); ``report()`` gives each statistic's value over the window, the
    range that windows of the same size drawn from the reference stay in ``1 - false_alarm`` of the
    time, and ``unusual``: outside that range and more than ``TOLERANCE`` from the reference's value;
    ``drift``: any statistic is unusual. Safe to share between threads.
    """

    def __init__(self, reference: dict, classes: list[str], window: int = 50, false_alarm: float = FALSE_ALARM):
        window = check_reference(reference, window, false_alarm)
        self.classes, self.window, self.false_alarm = list(classes), window, false_alarm
        ref = {k: np.asarray(reference[k]) for k in ("predicted", "score", "brightness", "contrast")}
        n, counts = len(ref["predicted"]), np.bincount(ref["predicted"], minlength=len(self.classes))
        self.mix = counts / n
        # the reference is itself a sample: a window of images like it differs from it by the spread of
        # both samples (for a window as large as the reference, twice the variance of the window's alone)
        rng = np.random.default_rng(0)
        q = false_alarm / 2
        # class mix, and the share of low scores: both samples drawn from one distribution drawn from the
        # reference's counts (a Dirichlet-multinomial), so a class (or a low score) the reference never
        # showed may still appear now and then
        mixes = rng.dirichlet(counts + UNSEEN_PSEUDOCOUNT, RESAMPLES)
        tv = 0.5 * np.abs(rng.multinomial(window, mixes) / window - rng.multinomial(n, mixes) / n).sum(1)
        self.ranges = {"class_mix": (0.0, float(np.quantile(tv, 1 - false_alarm)))}
        self.low_score = float(np.quantile(ref["score"], LOW_SCORE_QUANTILE))
        low = int((ref["score"] < self.low_score).sum())
        shares = rng.beta(low + UNSEEN_PSEUDOCOUNT, n - low + UNSEEN_PSEUDOCOUNT, RESAMPLES)
        diff = rng.binomial(window, shares) / window - rng.binomial(n, shares) / n
        self.ranges["low_scores"] = (max(0.0, low / n + float(np.quantile(diff, q))),
                                     min(1.0, low / n + float(np.quantile(diff, 1 - q))))
        window_s, reference_s = _resampled_means(ref, window, rng), _resampled_means(ref, n, rng)
        for k in ("brightness", "contrast"):
            diff = window_s[k] - reference_s[k]
            centre = float(ref[k].mean())
            self.ranges[k] = (centre + float(np.quantile(diff, q)), centre + float(np.quantile(diff, 1 - q)))
        self.reference_images = n
        self.centres = {"class_mix": 0.0, "low_scores": low / n, **{k: float(ref[k].mean()) for k in ("brightness", "contrast")}}
        self.tolerances = {k: t * (self.centres[k] if k in ("brightness", "contrast") else 1) for k, t in TOLERANCE.items()}
        self._recent: deque = deque(maxlen=window)
        self._lock = threading.Lock()

    @classmethod
    def for_predictor(cls, predictor, window: int = 50, false_alarm: float = FALSE_ALARM) -> "FieldMonitor":
        return cls(predictor.bundle.manifest.get("reference"), predictor.classes, window, false_alarm)

    def add(self, prediction) -> None:
        """One prediction (``Predictor.predict``'s, or a dict of ``predict --json``'s line)."""
        row = _row(prediction, len(self.classes))
        with self._lock:
            self._recent.append(row)

    def report(self) -> dict:
        """Over the last ``window`` predictions (``None`` values until it is full): each statistic's value,
        reference range and whether it is outside; ``drift``: any is; ``mix``: predicted share per class."""
        with self._lock:
            rows = np.asarray(self._recent, np.float64).reshape(-1, 4)
        full = len(rows) == self.window
        out = {"window": self.window, "predictions": len(rows), "false_alarm": self.false_alarm,
               "reference_images": self.reference_images, "drift": None, "statistics": {}}
        if full:
            shares = np.bincount(rows[:, 0].astype(int), minlength=len(self.classes)) / len(rows)
            values = {"class_mix": 0.5 * np.abs(shares - self.mix).sum(),
                      "low_scores": (rows[:, 1] < self.low_score).mean(),
                      "brightness": rows[:, 2].mean(), "contrast": rows[:, 3].mean()}
            out["mix"] = dict(zip(self.classes, np.round(shares, 4).tolist()))
        for k, meaning in STATS.items():
            low, high = self.ranges[k]
            value = float(values[k]) if full else None
            far = value is not None and abs(value - self.centres[k]) > self.tolerances[k]
            out["statistics"][k] = {"value": value, "range": [round(low, 4), round(high, 4)],
                                    "reference": round(self.centres[k], 4), "tolerance": round(self.tolerances[k], 4),
                                    "meaning": meaning.format(low_score=self.low_score),
                                    "unusual": None if value is None else far and not low <= value <= high}
        if full:
            out["drift"] = any(s["unusual"] for s in out["statistics"].values())
        return out


def _predict_all(predictor, files: list) -> tuple[list, list]:
    from .images import UnreadableImage

    predictions, unreadable = [], []
    for path, pred in predictor.predict_files(files, topk=1):
        if isinstance(pred, UnreadableImage):
            unreadable.append({"image": str(path), "error": str(pred)})
        else:
            predictions.append(pred)
    return predictions, unreadable


def monitor_files(predictor, files: list, false_alarm: float = FALSE_ALARM, reference_files: list | None = None) -> dict:
    """One :class:`FieldMonitor` report over all of ``files`` (a day's field images, say) as one window,
    against the bundle's validation reference or the predictions of ``reference_files`` (images known
    to be good); ``unreadable``: the files that could not be read (skipped). A bundle or
    ``false_alarm`` the monitor cannot use is refused before any image is read."""
    reference = predictor.bundle.manifest.get("reference")
    if reference_files is None:
        check_reference(reference, 10, false_alarm)
    else:
        good, bad = _predict_all(predictor, reference_files)
        reference = reference_of(good, len(predictor.classes))
        check_reference(reference, 10, false_alarm)
    predictions, unreadable = _predict_all(predictor, files)
    if len(predictions) < 10:
        why = f"; {len(unreadable)} unreadable, the first: {unreadable[0]['error']}" if unreadable else ""
        raise UserError(f"{len(predictions)} readable images{why}. Drift is judged on 10 or more (a day's images, say).")
    monitor = FieldMonitor(reference, predictor.classes, len(predictions), false_alarm)
    for pred in predictions:
        monitor.add(pred)
    return {**monitor.report(), "unreadable": unreadable, "reference_source": reference.get("source")}
