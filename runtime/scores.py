"""Scores a device app can threshold: softmax with a temperature fitted on the validation split.

A fine-tuned classifier's softmax is rarely calibrated (label smoothing makes it under-confident,
long training over-confident), so "reject below 0.8" means something else for every model.
Temperature scaling (Guo et al., 2017) divides the logits by one number T, chosen to minimise
the validation negative log-likelihood: the ranking, and so top-1 accuracy and every check,
stay exactly as they are; only the scores move toward the frequencies of being right.
"""

from __future__ import annotations

import numpy as np

MIN_IMAGES = 50  # fewer validation images than this fit T to noise: the scores stay plain softmax
T_RANGE = (0.2, 5.0)
BINS = 15


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Row-wise softmax of ``logits / temperature``, float64."""
    z = np.asarray(logits, np.float64) / temperature
    p = np.exp(z - z.max(1, keepdims=True))
    return p / p.sum(1, keepdims=True)


def nll(logits: np.ndarray, labels: np.ndarray, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of the true labels."""
    p = softmax(logits, temperature)[np.arange(len(labels)), labels]
    return float(-np.log(np.maximum(p, 1e-300)).mean())


def ece(probs: np.ndarray, labels: np.ndarray, bins: int = BINS) -> float:
    """Expected calibration error of the top-1 score: |accuracy - mean score| over equal-width
    score bins, weighted by the images in each (0 = a score of 0.8 is right 80 % of the time)."""
    score, right = probs.max(1), probs.argmax(1) == labels
    which = np.minimum((score * bins).astype(int), bins - 1)
    return float(sum(abs(right[which == b].mean() - score[which == b].mean()) * (which == b).sum()
                     for b in range(bins) if (which == b).any()) / max(len(labels), 1))


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> dict:
    """The T in ``T_RANGE`` of least validation NLL (a 0.7 %-step log grid: the NLL is smooth and
    has one minimum in 1/T), with NLL and ECE before and after; T = 1 under ``MIN_IMAGES``."""
    labels = np.asarray(labels)
    record = {"method": "temperature scaling, validation NLL", "images": int(len(labels))}
    before = {"nll": nll(logits, labels), "ece": ece(softmax(logits), labels)} if len(labels) else {}
    if len(labels) < MIN_IMAGES:
        return {**record, "temperature": 1.0, "skipped": f"only {len(labels)} validation images (< {MIN_IMAGES})",
                **{k: [round(v, 4)] * 2 for k, v in before.items()}}
    grid = np.geomspace(*T_RANGE, 481)
    t = round(float(grid[int(np.argmin([nll(logits, labels, g) for g in grid]))]), 4)  # as the manifest keeps it
    return {**record, "temperature": t,
            "nll": [round(before["nll"], 4), round(nll(logits, labels, t), 4)],
            "ece": [round(before["ece"], 4), round(ece(softmax(logits, t), labels), 4)]}
