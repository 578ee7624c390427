r"""Why a test prediction is right or wrong: the training examples that helped and hurt it most.

For test example *j*, the per-point values :math:`v_{ij}` (``value --per-point``) say how much training
example *i* raised (> 0) or lowered (< 0) the utility of *j* alone; the most helpful are the highest,
the most harmful the lowest (ties by training position, the rule of :mod:`freeshap_dq.scores`). Beside
them: the test example's label, whether kernel regression on all training data gets it right and the
probability it gives that label (:math:`e^{-\mathrm{CE}}`, from the result's manifest), and whether each
training example is confidently harmful over the whole validation set (value + z·stderr < 0).
"""

from __future__ import annotations

import math
import textwrap
from dataclasses import dataclass

import numpy as np
import pandas as pd

from freeshap_dq.curation.evidence import clip_text
from freeshap_dq.data.tables import TextDataset
from freeshap_dq.scores import DEFAULT_METRIC, DEFAULT_Z, confidently_harmful, harm_order, worth_order

KINDS = ("helpful", "harmful")


@dataclass(frozen=True)
class Explanation:
    test_row: int
    correct: bool | None  # kernel regression on all training data; None when the result does not record it
    p_label: float | None  # the probability it gives the test example's label
    picks: dict[str, list[tuple[int, float]]]  # kind -> (training row, v_ij), best first


def explain(result, rows: list[int], top_k: int = 5, metric: str = DEFAULT_METRIC) -> list[Explanation]:
    """The top-k helpful and harmful training examples of each test row of ``result`` (per-point values)."""
    full = result.manifest.get("full_data_test_points") or {}
    out = []
    for t in rows:
        column = result.point_column(t, metric)
        picks = {"helpful": [(int(i), float(column[i])) for i in worth_order(column)[:top_k]],
                 "harmful": [(int(i), float(column[i])) for i in harm_order(column)[:top_k]]}
        correct = bool(full["accuracy"][t] > 0.5) if "accuracy" in full else None
        p_label = math.exp(full["ce"][t]) if "ce" in full else None
        out.append(Explanation(t, correct, p_label, picks))
    return out


def flagged_harmful(result, metric: str = DEFAULT_METRIC, z: float = DEFAULT_Z) -> np.ndarray:
    return confidently_harmful(result.values(metric), result.stderr(metric), z)


def explanation_table(explanations: list[Explanation], train: TextDataset, test: TextDataset,
                      flagged: np.ndarray) -> pd.DataFrame:
    """One row per (test example, kind, rank): for machines (``--format csv|json`` or ``-o FILE``)."""
    records = []
    for e in explanations:
        t = e.test_row
        for kind in KINDS:
            for rank, (i, value) in enumerate(e.picks[kind], 1):
                records.append({"test_id": test.ids[t], "test_text": test.texts[t], "test_label": test.labels[t],
                                "test_correct": e.correct, "test_p_label": e.p_label, "kind": kind, "rank": rank,
                                "train_id": train.ids[i], "train_text": train.texts[i],
                                "train_label": train.labels[i], "value": value,
                                "flagged_harmful": bool(flagged[i])})
    return pd.DataFrame.from_records(records)


def explanation_text(explanations: list[Explanation], train: TextDataset, test: TextDataset, flagged: np.ndarray,
                     metric: str = DEFAULT_METRIC, width: int = 100) -> str:
    """For a terminal: each test example once (text, label, prediction), then its helpful and harmful examples."""
    utility = "-cross-entropy" if metric == "ce" else "accuracy"
    blocks = []
    for e in explanations:
        t = e.test_row
        lines = [f"Test example {test.ids[t]} (label {test.labels[t]})"]
        lines += textwrap.wrap(" ".join(str(test.texts[t]).split()), width, initial_indent="  ",
                               subsequent_indent="  ")
        if e.correct is None:
            lines.append("  Kernel regression on all training data: not recorded in this result (saved by an older "
                         "version).")
        else:
            lines.append(f"  Kernel regression on all training data: {'right' if e.correct else 'WRONG'}, "
                         f"p({test.labels[t]}) = {e.p_label:.2f}")
        for kind in KINDS:
            lines.append(f"  Most {kind} training examples (per-point value, {utility} utility of this example):")
            id_width = max((len(train.ids[i]) for i, _ in e.picks[kind]), default=2)
            for rank, (i, value) in enumerate(e.picks[kind], 1):
                mark = "  [flagged harmful]" if flagged[i] else ""
                lines.append(f"    {rank:>2}. {train.ids[i]:<{id_width}}  {train.labels[i]:<10} {f'{value:+.3g}':>9}  "
                             f"“{clip_text(train.texts[i], 60)}”{mark}")
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)
