r"""Detection metrics on *suspicion* scores: higher = more likely a wrong label.

- AUROC: probability that a random wrong label scores above a random clean one (ties 1/2).
- AUPRC: average precision, :math:`\sum_k (R_k - R_{k-1}) P_k` over the ranking (ties broken by
  index, most suspicious first).
- recall at f: share of the wrong labels among the top ``ceil(f n)``.
- FNR at the noise rate: inspecting exactly as many examples as there are wrong labels, the share
  of wrong labels missed (= 1 - precision there).
- 2-means F1: split the scores into two clusters by 1-D k-means (Lloyd from the extremes), flag
  the high cluster, F1 against the wrong labels.
"""

from __future__ import annotations

import math

import numpy as np


def average_ranks(x: np.ndarray) -> np.ndarray:
    """Ranks 1..n of ``x`` ascending, tied entries sharing their average rank."""
    order = np.argsort(x, kind="stable")
    ranks = np.empty(len(x))
    sorted_x = x[order]
    i = 0
    while i < len(x):
        j = i
        while j + 1 < len(x) and sorted_x[j + 1] == sorted_x[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def auroc(suspicion: np.ndarray, positives: np.ndarray) -> float:
    """Probability that a random positive is *more* suspicious than a random negative (ties count 1/2)."""
    positives = np.asarray(positives, dtype=bool)
    ranks = average_ranks(np.asarray(suspicion, dtype=float))
    n_pos, n_neg = positives.sum(), (~positives).sum()
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    return float((ranks[positives].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def ranking(suspicion: np.ndarray) -> np.ndarray:
    """Indices, most suspicious first; ties by index."""
    s = np.asarray(suspicion, dtype=float)
    return np.lexsort((np.arange(len(s)), -s))


def auprc(suspicion: np.ndarray, positives: np.ndarray) -> float:
    hits = np.asarray(positives, dtype=bool)[ranking(suspicion)]
    if not hits.any():
        return float("nan")
    precision = np.cumsum(hits) / np.arange(1, len(hits) + 1)
    return float(precision[hits].sum() / hits.sum())


def recall_at(suspicion: np.ndarray, positives: np.ndarray, fraction: float) -> float:
    positives = np.asarray(positives, dtype=bool)
    k = math.ceil(fraction * len(positives))
    return float(positives[ranking(suspicion)[:k]].sum() / max(positives.sum(), 1))


def fnr_at_noise_rate(suspicion: np.ndarray, positives: np.ndarray) -> float:
    positives = np.asarray(positives, dtype=bool)
    k = int(positives.sum())
    return float(1 - positives[ranking(suspicion)[:k]].sum() / max(k, 1))


def two_means_split(x: np.ndarray, iterations: int = 100) -> np.ndarray:
    """1-D 2-means; True for the cluster with the higher centre."""
    x = np.asarray(x, dtype=float)
    low, high = x.min(), x.max()
    if low == high:
        return np.zeros(len(x), dtype=bool)
    for _ in range(iterations):
        upper = np.abs(x - high) < np.abs(x - low)
        new_low, new_high = x[~upper].mean(), x[upper].mean()
        if new_low == low and new_high == high:
            break
        low, high = new_low, new_high
    return upper


def f1(flagged: np.ndarray, positives: np.ndarray) -> float:
    flagged, positives = np.asarray(flagged, dtype=bool), np.asarray(positives, dtype=bool)
    tp = (flagged & positives).sum()
    if tp == 0:
        return 0.0
    precision, recall = tp / flagged.sum(), tp / positives.sum()
    return float(2 * precision * recall / (precision + recall))


def detection_metrics(suspicion: np.ndarray, positives: np.ndarray,
                      fractions: tuple[float, ...] = (0.05, 0.1, 0.2)) -> dict[str, float]:
    out = {"auroc": auroc(suspicion, positives), "auprc": auprc(suspicion, positives)}
    for f in fractions:
        out[f"recall@{round(100 * f)}%"] = recall_at(suspicion, positives, f)
    out["f1_2means"] = f1(two_means_split(suspicion), positives)
    out["fnr@noise"] = fnr_at_noise_rate(suspicion, positives)
    return out


def detection_curve(suspicion: np.ndarray, positives: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(fraction inspected, recall) along the ranking."""
    hits = np.asarray(positives, dtype=bool)[ranking(suspicion)]
    inspected = np.arange(0, len(hits) + 1) / len(hits)
    return inspected, np.concatenate([[0.0], np.cumsum(hits) / max(hits.sum(), 1)])
