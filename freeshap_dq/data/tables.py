"""Labelled text tables: loading, validation, and one label mapping shared by train and test.

Formats by extension: ``.csv``, ``.tsv``, ``.jsonl``/``.json``, ``.parquet``, or a folder written
by Hugging Face ``datasets``' ``save_to_disk`` (one split; needs the ``datasets`` package). Columns by name:
text (required), an optional second text for sentence pairs, label (required), an optional id
(row numbers when absent). Errors name the file, the column, the row and what to do.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from freeshap_dq.errors import InputError

READERS = {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".json": "json", ".parquet": "parquet"}


@dataclass
class TextDataset:
    texts: list[str]
    labels: list[str]
    ids: list[str]
    pairs: list[str] | None = None
    source: str = "<memory>"
    row_number_ids: bool = False  # the table had no id column: removing or reordering rows moves the ids

    def __len__(self) -> int:
        return len(self.texts)

    def reordered(self, rows: list[int]) -> TextDataset:
        """These examples in the order of ``rows`` (positions)."""
        pick = lambda values: [values[i] for i in rows]  # noqa: E731
        return TextDataset(pick(self.texts), pick(self.labels), pick(self.ids),
                           None if self.pairs is None else pick(self.pairs), self.source, self.row_number_ids)

    def content_fingerprints(self) -> list[str]:
        """:func:`content_fingerprint` of every example, in row order."""
        pairs = self.pairs or [None] * len(self)
        return [content_fingerprint(t, p) for t, p in zip(self.texts, pairs, strict=True)]

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        for row in zip(self.ids, self.texts, self.pairs or [""] * len(self), self.labels, strict=True):
            h.update("\x1f".join(map(str, row)).encode())
            h.update(b"\x1e")
        return h.hexdigest()[:32]


def content_fingerprint(text: str, pair: str | None = None) -> str:
    """What a reviewer reads for one example (its text and, for sentence pairs, the second text) as a short hash.
    A review belongs to an example only while this is unchanged: the label may be fixed, the text may not move."""
    return hashlib.sha256(f"{text}\x1f{'' if pair is None else pair}".encode()).hexdigest()[:16]


def align_to_ids(data: TextDataset, ids, role: str, owner: str, fingerprint: str | None = None) -> TextDataset:
    """``data`` in the order of ``ids`` — the examples a result (``owner``) was computed for — joined by example
    id, never by row position; refused, naming the first id found on one side only, when the ids differ, and
    when ``fingerprint`` (the data the result was computed from) is given and the texts or labels differ.
    Without ids (a kernel file that had none) only the row count can be checked."""
    if ids is None:
        return data
    wanted = [str(i) for i in ids]
    position = {example_id: row for row, example_id in enumerate(data.ids)}
    only_result = next((i for i in wanted if i not in position), None)
    known = set(wanted)
    only_data = next((i for i in data.ids if i not in known), None)
    if only_result is not None or only_data is not None:
        first, side = (only_result, f"{owner} but not in {data.source}") if only_result is not None else (
            only_data, f"{data.source} but not in {owner}")
        raise InputError(f"{data.source} does not hold the {role} examples of {owner}: example id {first!r} is in "
                         f"{side} ({len(wanted)} {role} examples there, {len(data)} rows here). Give the {role} data "
                         f"the run used.")
    aligned = data.reordered([position[i] for i in wanted])
    if fingerprint is not None and aligned.fingerprint() != fingerprint:
        raise InputError(f"{data.source} holds the {role} example ids of {owner}, but their texts or labels differ "
                         f"from the data it was computed from (data fingerprint {aligned.fingerprint()} vs "
                         f"{fingerprint}). Give the {role} data the run used, or value the edited data again.")
    return aligned


def read_table(path: str | Path) -> pd.DataFrame:
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: no such file.")
    if path.is_dir():
        return _read_saved_dataset(path)
    kind = READERS.get(path.suffix.lower())
    if kind is None:
        raise InputError(f"{path}: unknown format {path.suffix!r}; use .csv, .tsv, .jsonl, .json or .parquet.")
    try:
        if kind in ("csv", "tsv"):
            return pd.read_csv(path, sep="\t" if kind == "tsv" else ",", dtype=str, keep_default_na=False,
                               na_values=[""], encoding="utf-8")
        if kind == "jsonl":
            return pd.read_json(path, lines=True, dtype=False)
        if kind == "json":
            return pd.read_json(path, dtype=False)
        return pd.read_parquet(path)
    except UnicodeDecodeError:
        raise InputError(f"{path}: not valid UTF-8 ({_first_invalid_utf8(path)}); re-save the file as UTF-8.") from None
    except Exception as exc:
        raise InputError(f"{path}: cannot be read as {kind} ({type(exc).__name__}: {exc}).") from None


def _first_invalid_utf8(path: Path) -> str:
    """Where a file first breaks UTF-8: its byte offset in the file and its line (the parser's own offset is
    relative to a buffer)."""
    data = path.read_bytes()
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        return f"byte 0x{data[exc.start]:02x} at offset {exc.start}, line {line} of the file"
    return "the error is in a part the parser decoded"


def _read_saved_dataset(path: Path) -> pd.DataFrame:
    if not ((path / "state.json").exists() or (path / "dataset_dict.json").exists()):
        raise InputError(f"{path} is a folder but not a Hugging Face dataset saved with save_to_disk; give a data "
                         f"file (.csv, .tsv, .jsonl, .json, .parquet) or such a folder.")
    if (path / "dataset_dict.json").exists():
        splits = [p.name for p in path.iterdir() if p.is_dir()]
        raise InputError(f"{path} holds several splits ({', '.join(sorted(splits))}); give one, e.g. {path / sorted(splits)[0]}.")
    try:
        from datasets import load_from_disk
    except ImportError:
        raise InputError(f"{path} is a Hugging Face dataset folder; reading it needs the datasets package "
                         f"(pip install datasets).") from None
    return load_from_disk(str(path)).to_pandas()


MISSING_LOOKING = frozenset({"nan", "none", "null", "na", "n/a", "missing", "?"})


def load_dataset(path: str | Path, text_column: str = "text", label_column: str = "label",
                 id_column: str | None = "id", pair_column: str | None = None,
                 allow_label_variants: bool = False, id_required: bool = False) -> TextDataset:
    return dataset_from_frame(read_table(path), str(path), text_column, label_column, id_column, pair_column,
                              allow_label_variants, id_required)


def dataset_from_frame(df: pd.DataFrame, where: str, text_column: str = "text", label_column: str = "label",
                       id_column: str | None = "id", pair_column: str | None = None,
                       allow_label_variants: bool = False, id_required: bool = False) -> TextDataset:
    """Validate a table already read (``where`` names it in messages) and take the columns asked for.

    Labels that differ only by case or surrounding spaces (``fresh`` / ``Fresh`` / ``fresh ``), and labels that
    look like a missing value (``NaN``, ``None``, ...), would silently become classes of their own: they are
    refused unless ``allow_label_variants``. Ids come from ``id_column`` (an empty cell is refused); when the
    table has no such column the row numbers are the ids, unless ``id_required`` (a column the user named)."""
    for column, option in ((text_column, "--text-column"), (label_column, "--label-column"),
                           (pair_column, "--pair-column")):
        if column is not None and column not in df.columns:
            raise InputError(f"{where}: no column {column!r} (columns: {', '.join(map(str, df.columns))}); "
                             f"choose one with {option}.")
    if len(df) == 0:
        raise InputError(f"{where}: the table has no rows.")
    texts = _text_column(df, text_column, where)
    pairs = _text_column(df, pair_column, where) if pair_column else None
    labels = df[label_column]
    missing = labels.isna()
    if missing.any():
        row = int(np.flatnonzero(missing.to_numpy())[0])
        raise InputError(f"{where}: row {row + 1} has no label in column {label_column!r}.")
    labels = [str(v) for v in labels]
    if not allow_label_variants:
        check_label_variants(labels, where, label_column)
    if id_required and id_column not in df.columns:
        raise InputError(f"{where}: no id column {id_column!r} (columns: {', '.join(map(str, df.columns))}); choose "
                         f"one with --id-column, or leave it out to number the rows.")
    if id_column and id_column in df.columns:
        empty = df[id_column].isna().to_numpy() | (df[id_column].astype(str).str.strip() == "").to_numpy()
        if empty.any():
            raise InputError(f"{where}: row {int(empty.argmax()) + 1} has an empty id in column {id_column!r}; "
                             f"every example needs its own id.")
        ids = [str(v) for v in df[id_column]]
        seen: dict[str, int] = {}
        for row, value in enumerate(ids):
            if value in seen:
                raise InputError(f"{where}: id {value!r} appears in rows {seen[value] + 1} and {row + 1} of column "
                                 f"{id_column!r}; ids must be unique.")
            seen[value] = row
        return TextDataset(texts, labels, ids, pairs, source=where)
    return TextDataset(texts, labels, [str(i) for i in range(len(df))], pairs, source=where, row_number_ids=True)


def check_label_variants(labels: list[str], where: str, column: str) -> None:
    """Refuse labels that differ only by case or surrounding spaces, or that look like a missing value."""
    first_row: dict[str, int] = {}
    by_key: dict[str, str] = {}
    for row, label in enumerate(labels):
        first_row.setdefault(label, row)
        if label.strip().casefold() in MISSING_LOOKING:
            raise InputError(f"{where}: row {row + 1} has label {label!r} in column {column!r}, which looks like a "
                             f"missing value and would become a class of its own. Fill it in or drop the row, or pass "
                             f"--allow-label-variants if it is a real class.")
        key = label.strip().casefold()
        other = by_key.setdefault(key, label)
        if other != label:
            raise InputError(f"{where}: labels {other!r} (row {first_row[other] + 1}) and {label!r} (row {row + 1}) "
                             f"in column {column!r} differ only by case or surrounding spaces, and would be two "
                             f"classes. Make them one label, or pass --allow-label-variants if they are different "
                             f"classes.")


def _text_column(df: pd.DataFrame, column: str, where: str) -> list[str]:
    values = df[column]
    for row, value in enumerate(values):
        if value is None or (isinstance(value, float) and np.isnan(value)) or not str(value).strip():
            raise InputError(f"{where}: row {row + 1} has an empty {column!r}; fill it in or drop the row.")
    return [str(v) for v in values]


def label_mapping(train: TextDataset, test: TextDataset) -> tuple[str, ...]:
    """Sorted label names from the training set; test labels must all occur in training."""
    names = tuple(sorted(set(train.labels), key=_natural_key))
    if len(names) < 2:
        raise InputError(f"{train.source}: every training example has label {names[0]!r}; valuing data needs "
                         f"at least two classes.")
    known = set(names)
    for row, label in enumerate(test.labels):
        if label not in known:
            raise InputError(f"{test.source}: row {row + 1} has label {label!r}, which no training example has "
                             f"(training labels: {', '.join(names)}).")
    return names


def encode_labels(data: TextDataset, names: tuple[str, ...]) -> np.ndarray:
    index = {name: i for i, name in enumerate(names)}
    return np.array([index[label] for label in data.labels], dtype=np.int64)


def _natural_key(label: str):
    try:
        return (0, float(label), label)
    except ValueError:
        return (1, 0.0, label)


def data_table_format(path: str | Path, like: str | Path | None = None) -> str:
    """The format a data table is written in: its extension's; without one, that of ``like`` (the input)."""
    path = Path(path)
    suffix = path.suffix.lower() or (Path(like).suffix.lower() if like else "")
    kind = READERS.get(suffix)
    if kind is None:
        raise InputError(f"{path}: unknown format {path.suffix or '(no extension)'!r}; use .csv, .tsv, .jsonl, .json "
                         f"or .parquet.")
    return kind


def write_data_table(df: pd.DataFrame, path: str | Path, like: str | Path | None = None) -> None:
    """Write a data table atomically in the format of ``path`` (or of ``like``, the input file, when ``path``
    has no extension)."""
    from freeshap_dq.io import atomic_write

    kind = data_table_format(path, like)
    with atomic_write(path) as tmp:
        if kind == "csv":
            df.to_csv(tmp, index=False)
        elif kind == "tsv":
            df.to_csv(tmp, sep="\t", index=False)
        elif kind == "jsonl":
            df.to_json(tmp, orient="records", lines=True, force_ascii=False)
        elif kind == "json":
            df.to_json(tmp, orient="records", indent=1, force_ascii=False)
        else:
            df.to_parquet(tmp, index=False)
