r"""Why a training example is flagged: the validation examples it hurts most.

With per-point values (``value --per-point``) example *i* has a value :math:`v_{ij}` for the utility of
each test (validation) example *j* alone; its dataset value is their mean, :math:`v_i = \frac1m \sum_j
v_{ij}`. The evidence a reviewer reads is where that mean comes from: how many validation examples the
example hurts (:math:`v_{ij} < 0`) and the ones it hurts most (lowest :math:`v_{ij}`, ties by test
position, the harm order of :mod:`freeshap_dq.scores`).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import pandas as pd

from freeshap_dq.data.tables import TextDataset
from freeshap_dq.errors import InputError
from freeshap_dq.scores import DEFAULT_METRIC, harm_order


@dataclass(frozen=True)
class HarmEvidence:
    hurts: int  # validation examples with v_ij < 0
    n_test: int
    worst: tuple[tuple[int, float], ...]  # (test row, v_ij), most hurt first, only those with v_ij < 0

    def describe(self, test: TextDataset, width: int = 80) -> str:
        """One paragraph for a reviewer: the count, then the most hurt validation examples with their labels."""
        head = f"Hurts {self.hurts} of {self.n_test} validation examples"
        if not self.worst:
            return head + "."
        shown = "; ".join(f"“{clip_text(test.texts[j], width)}” (label {test.labels[j]}, {value:+.2g})"
                          for j, value in self.worst)
        return f"{head}, most: {shown}."


def harm_evidence(points: np.ndarray, rows: Iterable[int], k: int = 3) -> dict[int, HarmEvidence]:
    """Evidence for the training rows ``rows`` of the n x m per-point value matrix ``points``."""
    points = np.asarray(points)
    out = {}
    for i in rows:
        row = np.asarray(points[i], dtype=float)
        worst = [(int(j), float(row[j])) for j in harm_order(row)[:k] if row[j] < 0]
        out[int(i)] = HarmEvidence(int(np.sum(row < 0)), len(row), tuple(worst))
    return out


def clip_text(text: str, width: int) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= width else text[:width - 1] + "…"


def evidence_table(result, train: TextDataset, test: TextDataset, metric: str = DEFAULT_METRIC, k: int = 3,
                   owner: str = "the result") -> pd.DataFrame:
    """example_id, value, freeshap_hurts and freeshap_why for every training example of ``result`` (a
    :class:`~freeshap_dq.result.ValuationResult` with per-point values), the data joined to it by id."""
    if not result.per_point:
        raise InputError(f"{owner} has no per-point values, so it cannot say which validation examples an example "
                         f"hurts; run freeshap-dq value --per-point --save-result R.npz.")
    train, test = result.align(train, "training", owner), result.align(test, "test", owner)
    evidence = harm_evidence(result.point_values(metric), range(result.n_train), k)
    return pd.DataFrame({"example_id": train.ids, "value": result.values(metric),
                         "freeshap_hurts": [evidence[i].hurts for i in range(result.n_train)],
                         "freeshap_why": [evidence[i].describe(test) for i in range(result.n_train)]})
