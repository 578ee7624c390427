"""Apply reviewed labels to a dataset: the corrected table and a record of every change.

The relabel table needs ``example_id`` and ``reviewed_label``; ``given_label`` (the label the reviewer
saw) is checked against the data's current label so that a stale review never silently overwrites a
newer edit; ``annotator``, ``lead_time`` and ``task_id`` are carried into the change record.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from freeshap_dq.data.tables import TextDataset
from freeshap_dq.errors import InputError

CONFLICT_ACTIONS = ("error", "skip", "apply")


@dataclass
class RelabelOutcome:
    corrected: pd.DataFrame
    changes: pd.DataFrame
    counts: dict[str, int]


def apply_relabels(raw: pd.DataFrame, data: TextDataset, relabels: pd.DataFrame, label_column: str,
                   where: str = "the relabel table", allow_new_labels: bool = False,
                   on_conflict: str = "error") -> RelabelOutcome:
    """``raw`` is the data table ``data`` was read from (same rows); returns it with reviewed labels applied."""
    if on_conflict not in CONFLICT_ACTIONS:
        raise InputError(f"on_conflict must be one of {', '.join(CONFLICT_ACTIONS)}, got {on_conflict!r}.")
    reviews = _validated(relabels, where)
    row_of = {example_id: row for row, example_id in enumerate(data.ids)}
    unknown = [(i, e) for i, e in enumerate(reviews["example_id"]) if e not in row_of]
    if unknown:
        shown = ", ".join(f"{e!r} (row {i + 1})" for i, e in unknown[:3])
        raise InputError(f"{where}: example id(s) {shown} are not in {data.source}; give the data the review was "
                         f"pushed from (and the same --id-column).")
    known_labels = set(data.labels)
    new_labels = sorted(set(reviews["reviewed_label"]) - known_labels)
    if new_labels and not allow_new_labels:
        raise InputError(f"{where}: reviewed label(s) {', '.join(map(repr, new_labels))} do not occur in "
                         f"{data.source} (labels: {', '.join(sorted(known_labels))}); pass --allow-new-labels if "
                         f"they are meant to be new classes.")

    records, conflicts = [], 0
    corrected = raw.copy()
    for i, review in enumerate(reviews.to_dict(orient="records")):
        row = row_of[review["example_id"]]
        current = data.labels[row]
        seen = review.get("given_label")
        if seen is not None and seen != current:
            conflicts += 1
            if on_conflict == "error":
                raise InputError(f"{where} row {i + 1}: example {review['example_id']!r} has label {current!r} in "
                                 f"{data.source} but the reviewer saw {seen!r}: the data changed after the push. "
                                 f"Push again, or pass --on-conflict skip (or apply).")
            if on_conflict == "skip":
                continue
        if review["reviewed_label"] == current:
            continue
        corrected.iloc[row, corrected.columns.get_loc(label_column)] = _like(raw[label_column],
                                                                             review["reviewed_label"])
        records.append({"example_id": review["example_id"], "row": row + 1, "from_label": current,
                        "to_label": review["reviewed_label"],
                        **{k: _plain(review.get(k)) for k in ("annotator", "lead_time", "task_id") if k in review}})
    changes = pd.DataFrame.from_records(records, columns=["example_id", "row", "from_label", "to_label", "annotator",
                                                          "lead_time", "task_id"])
    counts = {"rows": len(raw), "reviewed": len(reviews), "changed": len(changes),
              "confirmed": len(reviews) - len(changes) - (conflicts if on_conflict == "skip" else 0),
              "conflicts": conflicts, "conflicts_skipped": conflicts if on_conflict == "skip" else 0}
    return RelabelOutcome(corrected, changes, counts)


def _validated(relabels: pd.DataFrame, where: str) -> pd.DataFrame:
    missing = [c for c in ("example_id", "reviewed_label") if c not in relabels.columns]
    if missing:
        raise InputError(f"{where}: no column(s) {', '.join(missing)} (columns: {', '.join(map(str, relabels.columns))}"
                         f"); use the table written by freeshap-dq labelstudio pull.")
    reviews = relabels.copy()
    for column in ("example_id", "reviewed_label", "given_label"):
        if column in reviews.columns:
            empty = reviews[column].isna() | (reviews[column].astype(str).str.strip() == "")
            if column != "given_label" and empty.any():
                raise InputError(f"{where}: row {int(np.flatnonzero(empty.to_numpy())[0]) + 1} has no {column}.")
            reviews[column] = [None if e else _text(v) for v, e in zip(reviews[column], empty, strict=True)]
    duplicated = reviews["example_id"].duplicated(keep=False)
    if duplicated.any():
        rows = np.flatnonzero(duplicated.to_numpy())[:2] + 1
        raise InputError(f"{where}: example id {reviews['example_id'].iloc[rows[0] - 1]!r} appears in rows "
                         f"{rows[0]} and {rows[1]}; keep one review per example.")
    return reviews


def _text(value) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _like(column: pd.Series, label: str):
    """The reviewed label in the column's own type (integer labels stay integers)."""
    if pd.api.types.is_integer_dtype(column):
        try:
            return int(label)
        except ValueError:
            raise InputError(f"reviewed label {label!r} is not an integer but the label column holds integers."
                             ) from None
    if pd.api.types.is_float_dtype(column):
        return float(label)
    return label


def _plain(value):
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return None
    return value.item() if hasattr(value, "item") else value
