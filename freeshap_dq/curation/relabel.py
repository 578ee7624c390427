"""Apply reviewed labels to a dataset: the corrected table and a record of every change.

The relabel table needs ``example_id`` and ``reviewed_label``. Optional columns, as ``labelstudio pull``
writes them:

- ``given_label``, the label the reviewer saw, is checked against the data's current label so that a stale
  review never silently overwrites a newer edit; when the data already carries the reviewed label the
  review was applied before and is a no-op (applying twice changes nothing);
- ``content_fingerprint``, what the reviewer read (:func:`~freeshap_dq.data.tables.content_fingerprint`),
  must match the data row with that id: a review whose example now has another text (ids that were row
  numbers, rows removed between push and apply) is refused, naming the id;
- ``decision``: ``conflict`` rows (reviewers disagreed) and ``skipped`` rows carry no label and change
  nothing; they are counted and listed;
- ``annotator``, ``lead_time``, ``task_id`` and ``votes`` are carried into the change record.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np
import pandas as pd

from freeshap_dq.data.tables import TextDataset, align_to_ids
from freeshap_dq.errors import InputError

CONFLICT_ACTIONS = ("error", "skip", "apply")
AGREEMENT_POLICIES = ("unanimous", "majority", "latest")
DECISIONS = ("changed", "confirmed", "conflict", "skipped")  # what a review table row says; the last two apply nothing
UNDECIDED = ("conflict", "skipped")


def agreed_label(labels: list[str], policy: str = "unanimous") -> str | None:
    """One label from the reviewers' labels (each reviewer's latest, oldest first), or None when they disagree
    under ``policy``: ``unanimous`` needs every reviewer to agree, ``majority`` a label chosen by more reviewers
    than any other (a tie disagrees), ``latest`` takes the latest whatever the others chose."""
    if policy not in AGREEMENT_POLICIES:
        raise InputError(f"agreement must be one of {', '.join(AGREEMENT_POLICIES)}, got {policy!r}.")
    if not labels:
        return None
    if policy == "latest":
        return labels[-1]
    tally = pd.Series(labels).value_counts()
    if len(tally) == 1 or (policy == "majority" and tally.iloc[0] > tally.iloc[1]):
        return str(tally.index[0])
    return None


@dataclass
class RelabelOutcome:
    corrected: pd.DataFrame
    changes: pd.DataFrame
    counts: dict[str, int]
    undecided: dict[str, list[str]] = field(default_factory=dict)  # decision -> example ids (conflict, skipped)
    already_applied: list[str] = field(default_factory=list)


def apply_relabels(raw: pd.DataFrame, data: TextDataset, relabels: pd.DataFrame, label_column: str,
                   where: str = "the relabel table", allow_new_labels: bool = False,
                   on_conflict: str = "error") -> RelabelOutcome:
    """``raw`` is the data table ``data`` was read from (same rows); returns it with reviewed labels applied."""
    if on_conflict not in CONFLICT_ACTIONS:
        raise InputError(f"on_conflict must be one of {', '.join(CONFLICT_ACTIONS)}, got {on_conflict!r}.")
    reviews, undecided = _validated(relabels, where)
    row_of = {example_id: row for row, example_id in enumerate(data.ids)}
    unknown = [(i, e) for i, e in zip(reviews["__row"], reviews["example_id"], strict=True) if e not in row_of]
    if unknown:
        shown = ", ".join(f"{e!r} (row {i})" for i, e in unknown[:3])
        raise InputError(f"{where}: example id(s) {shown} are not in {data.source}; give the data the review was "
                         f"pushed from (and the same --id-column).")
    fingerprints = data.content_fingerprints() if "content_fingerprint" in reviews.columns else None
    if fingerprints is not None and on_conflict != "skip":
        _refuse_moved_content(reviews, data, row_of, fingerprints, where)
    known_labels = set(data.labels)
    new_labels = sorted(set(reviews["reviewed_label"]) - known_labels)
    if new_labels and not allow_new_labels:
        raise InputError(f"{where}: reviewed label(s) {', '.join(map(repr, new_labels))} do not occur in "
                         f"{data.source} (labels: {', '.join(sorted(known_labels))}); pass --allow-new-labels if "
                         f"they are meant to be new classes.")

    records, conflicts, skipped, moved, already = [], 0, 0, 0, []
    corrected = raw.copy()
    for review in reviews.to_dict(orient="records"):
        row = row_of[review["example_id"]]
        current = data.labels[row]
        if fingerprints is not None and review.get("content_fingerprint") not in (None, fingerprints[row]):
            moved += 1  # another text now: refused above unless --on-conflict skip
            continue
        seen = review.get("given_label")
        if seen is not None and seen != current:
            if review["reviewed_label"] == current:
                already.append(review["example_id"])
                continue
            conflicts += 1
            if on_conflict == "error":
                raise InputError(f"{where} row {review['__row']}: example {review['example_id']!r} has label {current!r} in "
                                 f"{data.source} but the reviewer saw {seen!r} and chose {review['reviewed_label']!r}"
                                 f": the data changed after the push. Push again, or pass --on-conflict skip (or "
                                 f"apply).")
            if on_conflict == "skip":
                skipped += 1
                continue
        if review["reviewed_label"] == current:
            continue
        corrected.iloc[row, corrected.columns.get_loc(label_column)] = _like(raw[label_column],
                                                                             review["reviewed_label"])
        records.append({"example_id": review["example_id"], "row": row + 1, "from_label": current,
                        "to_label": review["reviewed_label"],
                        **{k: _plain(review.get(k)) for k in CARRIED if k in review}})
    changes = pd.DataFrame.from_records(records, columns=["example_id", "row", "from_label", "to_label", *CARRIED])
    counts = {"rows": len(raw), "reviewed": len(reviews) + sum(map(len, undecided.values())), "changed": len(changes),
              "confirmed": len(reviews) - len(changes) - skipped - moved - len(already),
              "already_applied": len(already), "conflicts": conflicts, "conflicts_skipped": skipped,
              "other_text_skipped": moved,
              **{f"{decision}_not_applied": len(ids) for decision, ids in undecided.items()}}
    return RelabelOutcome(corrected, changes, counts, undecided, already)


CARRIED = ("annotator", "lead_time", "task_id", "votes")


def _refuse_moved_content(reviews: pd.DataFrame, data: TextDataset, row_of: dict, fingerprints: list[str],
                          where: str) -> None:
    for review in reviews.to_dict(orient="records"):
        row = row_of[review["example_id"]]
        if review["content_fingerprint"] is not None and review["content_fingerprint"] != fingerprints[row]:
            raise InputError(f"{where} row {review['__row']}: example {review['example_id']!r} has another text in "
                             f"{data.source} (row {row + 1}: {data.texts[row][:60]!r}) than the reviewer read: the "
                             f"review is about another example (ids that are row numbers move when rows are removed "
                             f"or reordered). Apply it to the data it was pushed from, or pass --on-conflict skip to "
                             f"leave such reviews out; --on-conflict apply never applies them.")


def _validated(relabels: pd.DataFrame, where: str) -> tuple[pd.DataFrame, dict[str, list[str]]]:
    """The reviews that carry a label, and the example ids of the undecided rows by decision."""
    missing = [c for c in ("example_id", "reviewed_label") if c not in relabels.columns]
    if missing:
        raise InputError(f"{where}: no column(s) {', '.join(missing)} (columns: {', '.join(map(str, relabels.columns))}"
                         f"); use the table written by freeshap-dq labelstudio pull.")
    reviews = relabels.copy()
    reviews["__row"] = np.arange(1, len(reviews) + 1)
    undecided: dict[str, list[str]] = {}
    if "decision" in reviews.columns:
        decision = reviews["decision"].astype(str).str.strip()
        unknown = sorted(set(decision) - set(DECISIONS))
        if unknown:
            raise InputError(f"{where}: decision(s) {', '.join(map(repr, unknown))} are unknown; a decision is one "
                             f"of {', '.join(DECISIONS)}.")
        aside = decision.isin(UNDECIDED).to_numpy()
        undecided = {d: [_text(e) for e in reviews.loc[(decision == d).to_numpy(), "example_id"]] for d in UNDECIDED}
        reviews = reviews[~aside].reset_index(drop=True)
    for column in ("example_id", "reviewed_label", "given_label", "content_fingerprint"):
        if column in reviews.columns:
            empty = reviews[column].isna() | (reviews[column].astype(str).str.strip() == "")
            if column in ("example_id", "reviewed_label") and empty.any():
                raise InputError(f"{where}: row {reviews['__row'].iloc[int(np.flatnonzero(empty.to_numpy())[0])]} "
                                 f"has no {column}.")
            reviews[column] = [None if e else _text(v) for v, e in zip(reviews[column], empty, strict=True)]
    duplicated = reviews["example_id"].duplicated(keep=False)
    if duplicated.any():
        first, second = np.flatnonzero(duplicated.to_numpy())[:2]
        raise InputError(f"{where}: example id {reviews['example_id'].iloc[first]!r} appears in rows "
                         f"{reviews['__row'].iloc[first]} and {reviews['__row'].iloc[second]}; keep one review per "
                         f"example.")
    return reviews, undecided


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


def relabelled_problem(problem, data: TextDataset, owner: str = "the kernel"):
    """``problem`` (a :class:`~freeshap_dq.kernels.problem.KernelProblem`) with the training labels of ``data``,
    joined by example id. The kernel is reused as it is: an eNTK depends on the texts, not on the labels (the
    encoder-head and prompt kernels of this package never read the labels). Labels the kernel's classes do not
    include are refused: a new class needs a new kernel."""
    if problem.train_ids is None and len(data) != problem.n_train:
        raise InputError(f"{data.source} has {len(data)} rows but {owner} has {problem.n_train} training examples.")
    aligned = align_to_ids(data, problem.train_ids, "training", owner)
    names = [str(n) for n in problem.label_names] or [str(c) for c in range(problem.n_classes)]
    unknown = sorted(set(aligned.labels) - set(names))
    if unknown:
        raise InputError(f"{data.source} has label(s) {', '.join(map(repr, unknown))} that {owner} does not know "
                         f"(classes: {', '.join(names)}); compute the kernel again for the new classes.")
    index = {name: c for c, name in enumerate(names)}
    return replace(problem, y_train=np.array([index[label] for label in aligned.labels], dtype=np.int64)), aligned
