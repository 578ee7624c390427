r"""What a value means downstream: the one home of every rule that reads values.

- **Metric columns.** A values table holds ``value`` / ``stderr`` (accuracy utility, the paper's score)
  and ``value_ce`` / ``stderr_ce`` (the -cross-entropy utility); :data:`METRIC_COLUMNS` maps a metric to
  its two columns.
- **Harm rank.** Rank 1 is the most harmful example: the lowest value, ties broken by the training index
  (the example's position in the kernel and in ``values.csv``), never by an id string:
  :func:`harm_order` / :func:`harm_rank`. Every table and adapter (values.csv, policies, the report,
  cleanlab, Label Studio) ranks with these, so a reviewer's rank is the rank in ``values.csv``.
- **Confidently harmful.** :math:`v_i + z\,\mathrm{se}_i < 0` with :data:`DEFAULT_Z` = 1.96 (about
  97.5 % one-sided); a missing standard error (one permutation) is never confident:
  :func:`confidently_harmful` and its mirror :func:`confidently_helpful`.
- **Quality score.** :func:`value_to_score` maps values monotonically to [0, 1], 0.5 at zero and lower =
  more harmful (cleanlab's convention for data valuation scores).
"""

from __future__ import annotations

import numpy as np

from freeshap_dq.config import METRICS, RANKING_METRIC
from freeshap_dq.errors import InputError

DEFAULT_Z = 1.96
DEFAULT_METRIC = RANKING_METRIC  # the shipped detector's utility (freeshap_dq.config)
METRIC_COLUMNS: dict[str, tuple[str, str]] = {"accuracy": ("value", "stderr"), "ce": ("value_ce", "stderr_ce")}


def metric_columns(metric: str) -> tuple[str, str]:
    """(value column, stderr column) of ``metric`` in a values table."""
    if metric not in METRIC_COLUMNS:
        raise InputError(f"metric {metric!r} is unknown; choose one of {', '.join(METRICS)}.")
    return METRIC_COLUMNS[metric]


def harm_order(values: np.ndarray, training_index: np.ndarray | None = None) -> np.ndarray:
    """Positions of ``values`` from the most harmful (lowest value) on; ties by ``training_index``
    (default: the position itself)."""
    values = np.asarray(values, dtype=float)
    index = np.arange(len(values)) if training_index is None else np.asarray(training_index)
    return np.lexsort((index, values))


def harm_rank(values: np.ndarray, training_index: np.ndarray | None = None) -> np.ndarray:
    """1 = most harmful, per position of ``values`` (see :func:`harm_order`)."""
    rank = np.empty(len(values), dtype=np.int64)
    rank[harm_order(values, training_index)] = np.arange(1, len(values) + 1)
    return rank


def worth_order(values: np.ndarray, training_index: np.ndarray | None = None) -> np.ndarray:
    """Positions from the most helpful (highest value) on; ties by ``training_index``, as :func:`harm_order`."""
    values = np.asarray(values, dtype=float)
    index = np.arange(len(values)) if training_index is None else np.asarray(training_index)
    return np.lexsort((index, -values))


def _stderr_or_inf(stderr: np.ndarray) -> np.ndarray:
    stderr = np.asarray(stderr, dtype=float)
    return np.where(np.isnan(stderr), np.inf, stderr)


def confidently_harmful(values: np.ndarray, stderr: np.ndarray, z: float = DEFAULT_Z) -> np.ndarray:
    """``value + z * stderr < 0`` per example; a missing (NaN) standard error is never confident."""
    return np.asarray(values, dtype=float) + z * _stderr_or_inf(stderr) < 0


def confidently_helpful(values: np.ndarray, stderr: np.ndarray, z: float = DEFAULT_Z) -> np.ndarray:
    """``value - z * stderr > 0`` per example; a missing (NaN) standard error is never confident."""
    return np.asarray(values, dtype=float) - z * _stderr_or_inf(stderr) > 0


def value_to_score(values: np.ndarray, scale: float | None = None) -> tuple[np.ndarray, float]:
    """Monotone map of values to a [0, 1] quality, 0.5 at zero and lower = more harmful.

    ``0.5 (1 + tanh(v / scale))`` with ``scale`` the median |v| over non-zero values unless given
    (cleanlab's convention for data valuation scores); returns (scores, scale used).
    """
    values = np.asarray(values, dtype=float)
    if scale is None:
        nonzero = np.abs(values[values != 0])
        scale = float(np.median(nonzero)) if nonzero.size else 1.0
    return 0.5 * (1.0 + np.tanh(values / scale)), scale
