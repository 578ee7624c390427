r"""Valuation results: values, standard errors, counts; mergeable; saved without pickle.

A Monte-Carlo result keeps sufficient statistics per training example i and metric:
:math:`s_i = \sum_t x_{ti}` and :math:`q_i = \sum_t x_{ti}^2` over T permutations, so

.. math::  v_i = s_i / T, \qquad \mathrm{se}_i = \sqrt{(q_i - T v_i^2) / (T (T-1))}

and two results merge exactly by adding sums and counts (``a + b``). Per-point results add
an n x m sum per metric (mean only). Exact methods (enumeration, closed-form LOO) have
standard error 0.

Metrics: ``accuracy`` (the paper's primary utility) and ``ce`` (the -cross-entropy utility).
Positive values help, negative values harm.

On disk: one ``.npz`` (``allow_pickle=False``) whose ``manifest`` entry is UTF-8 JSON with
the configuration, kernel fingerprint, ridge, permutation sources and utilities. Or a result
folder (any path not ending in ``.npz``): the same ``result.npz`` without the per-point matrices,
which sit beside it as ``point_sum_<metric>.npy`` and load memory-mapped — for per-point results
larger than memory (``compute_values(..., point_dir=...)`` streams them to disk).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from freeshap_dq.config import METRICS
from freeshap_dq.data.tables import TextDataset, align_to_ids
from freeshap_dq.errors import CheckpointError, InputError
from freeshap_dq.io import OBJECT_ARRAYS, atomic_write, describe_file, replace_folder
from freeshap_dq.scores import METRIC_COLUMNS, harm_rank

FORMAT_VERSION = 1
FOLDER_RESULT = "result.npz"


@dataclass
class ValuationResult:
    method: str
    sums: dict[str, np.ndarray]
    sq_sums: dict[str, np.ndarray]
    count: int
    point_sums: dict[str, np.ndarray] | None = None
    evaluated: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    sources: list[dict[str, int]] = field(default_factory=list)
    exact: bool = False
    manifest: dict[str, Any] = field(default_factory=dict)
    train_ids: np.ndarray | None = None
    test_ids: np.ndarray | None = None  # the columns of the per-point values, and what a test file must hold

    @classmethod
    def empty(cls, method: str, n_train: int, n_test: int, per_point: bool, **kw: Any) -> ValuationResult:
        zeros = lambda *shape: {m: np.zeros(shape) for m in METRICS}  # noqa: E731
        return cls(method=method, sums=zeros(n_train), sq_sums=zeros(n_train), count=0,
                   point_sums=zeros(n_train, n_test) if per_point else None, **kw)

    @classmethod
    def from_exact(cls, method: str, values: dict[str, np.ndarray],
                   point_values: dict[str, np.ndarray] | None = None, **kw: Any) -> ValuationResult:
        return cls(method=method, sums={k: np.asarray(v, float) for k, v in values.items()},
                   sq_sums={k: np.asarray(v, float) ** 2 for k, v in values.items()}, count=1,
                   point_sums=None if point_values is None else {
                       k: np.asarray(v, float) for k, v in point_values.items()},
                   exact=True, **kw)

    @property
    def n_train(self) -> int:
        return int(self.sums["accuracy"].shape[0])

    @property
    def per_point(self) -> bool:
        return self.point_sums is not None

    def values(self, metric: str = "accuracy") -> np.ndarray:
        _check_metric(metric)
        if self.count == 0:
            return np.full(self.n_train, np.nan)
        return self.sums[metric] / self.count

    def stderr(self, metric: str = "accuracy") -> np.ndarray:
        _check_metric(metric)
        if self.exact:
            return np.zeros(self.n_train)
        if self.count < 2:
            return np.full(self.n_train, np.nan)
        mean = self.values(metric)
        var = np.maximum(self.sq_sums[metric] - self.count * mean**2, 0.0) / (self.count - 1)
        return np.sqrt(var / self.count)

    def point_values(self, metric: str = "accuracy") -> np.ndarray:
        """n x m: value of training example i for test example t."""
        _check_metric(metric)
        if self.point_sums is None:
            raise InputError("this result has no per-point values; run with per_point=True (--per-point).")
        return self.point_sums[metric] / max(self.count, 1)

    def point_column(self, test_index: int, metric: str = "accuracy") -> np.ndarray:
        """Values of every training example for one test example (reads one column of a memory-mapped result)."""
        _check_metric(metric)
        if self.point_sums is None:
            raise InputError("this result has no per-point values; run with per_point=True (--per-point).")
        return np.asarray(self.point_sums[metric][:, test_index], dtype=float) / max(self.count, 1)

    def harm_rank(self, metric: str = "ce") -> np.ndarray:
        """1 = most harmful (lowest value); ties broken by training index (:func:`freeshap_dq.scores.harm_rank`)."""
        return harm_rank(self.values(metric))

    def to_dataframe(self, rank_metric: str | None = None) -> pd.DataFrame:
        rank_metric = rank_metric or self.manifest.get("config", {}).get("rank_metric", "ce")
        df = pd.DataFrame({"train_index": np.arange(self.n_train)})
        if self.train_ids is not None:
            df["example_id"] = self.train_ids
        for metric, (value_column, _) in METRIC_COLUMNS.items():
            df[value_column] = self.values(metric)
        for metric, (_, stderr_column) in METRIC_COLUMNS.items():
            df[stderr_column] = self.stderr(metric)
        df["rank"] = self.harm_rank(rank_metric)
        df["permutations"] = self.count
        return df

    def align(self, data: TextDataset, role: str = "training", owner: str = "the result") -> TextDataset:
        """``data`` in this result's order, joined by example id (``role``: 'training' or 'test'); refused when
        its ids, or (for a result of an eNTK computed from data) its texts and labels, are not the ones this result
        was computed for. ``owner`` names the result in messages."""
        ids = self.train_ids if role == "training" else self.test_ids
        kernel = self.manifest.get("kernel") or {}
        fingerprint = kernel.get("train_fingerprint" if role == "training" else "test_fingerprint")
        expected = self.n_train if role == "training" else self.manifest.get("n_test")
        if ids is None and expected is not None and len(data) != expected:
            raise InputError(f"{data.source} has {len(data)} rows but {owner} values {expected} {role} examples; give "
                             f"the {role} data the run used.")
        return align_to_ids(data, ids, role, owner, fingerprint)

    def truncation_summary(self) -> dict[str, float]:
        if self.evaluated.size == 0:
            return {}
        frac = self.evaluated / self.n_train
        return {"mean_fraction_evaluated": float(frac.mean()), "min_fraction_evaluated": float(frac.min()),
                "truncated_permutations": int((self.evaluated < self.n_train).sum())}

    def __add__(self, other: ValuationResult) -> ValuationResult:
        if not isinstance(other, ValuationResult):
            return NotImplemented
        if self.method != other.method or self.n_train != other.n_train or self.exact or other.exact:
            raise InputError(f"cannot merge results of {self.method!r} (n={self.n_train}) and "
                             f"{other.method!r} (n={other.n_train}); only Monte-Carlo results of one method merge.")
        for key in ("kernel_fingerprint", "ridge"):
            a, b = self.manifest.get(key), other.manifest.get(key)
            if a is not None and b is not None and a != b:
                raise InputError(f"cannot merge results computed with different {key} ({a} vs {b}).")
        _check_disjoint(self.sources, other.sources)
        return ValuationResult.sum([self, other], manifest={**self.manifest, "merged": True})

    @classmethod
    def sum(cls, parts: list[ValuationResult], *, sources: list[dict[str, int]] | None = None,
            manifest: dict[str, Any] | None = None) -> ValuationResult:
        """The result of all of ``parts``' permutations: sufficient statistics added in the order given (the
        order is part of bit-identity: the accumulator, ``+`` and Ray all add groups in permutation order).
        ``sources`` and ``manifest`` default to the parts' concatenated sources and the first part's manifest."""
        first = parts[0]
        if any(p.per_point != first.per_point for p in parts):
            raise InputError("cannot merge a per-point result with an aggregate one.")

        def total(key: str) -> dict[str, np.ndarray] | None:
            if getattr(first, key) is None:
                return None
            out = {m: np.array(v, dtype=np.float64) for m, v in getattr(first, key).items()}
            for part in parts[1:]:
                for m in out:
                    out[m] += getattr(part, key)[m]
            return out

        return cls(method=first.method, sums=total("sums"), sq_sums=total("sq_sums"),
                   count=sum(p.count for p in parts), point_sums=total("point_sums"),
                   evaluated=np.concatenate([p.evaluated for p in parts]).astype(np.int64),
                   sources=sources if sources is not None else [s for p in parts for s in p.sources],
                   exact=False, manifest=dict(first.manifest if manifest is None else manifest),
                   train_ids=first.train_ids, test_ids=first.test_ids)

    def save(self, path: str | os.PathLike, extra: dict[str, np.ndarray] | None = None) -> None:
        """A ``.npz`` file, or a result folder for any other path (see the module docstring)."""
        if Path(path).suffix != ".npz":
            self._save_folder(Path(path))
            return
        self._save_npz(path, extra, with_points=True)

    def _save_npz(self, path, extra, with_points: bool) -> None:
        arrays: dict[str, np.ndarray] = {"evaluated": self.evaluated}
        for metric in METRICS:
            arrays[f"sum_{metric}"] = self.sums[metric]
            arrays[f"sqsum_{metric}"] = self.sq_sums[metric]
            if self.point_sums is not None and with_points:
                arrays[f"point_sum_{metric}"] = self.point_sums[metric]
        for key in ("train_ids", "test_ids"):
            if getattr(self, key) is not None:
                arrays[key] = np.asarray(getattr(self, key))
        header = {"format_version": FORMAT_VERSION, "method": self.method, "count": self.count,
                  "exact": self.exact, "sources": self.sources, **self.manifest}
        arrays["manifest"] = np.frombuffer(json.dumps(header, default=_json_default).encode(), dtype=np.uint8)
        arrays.update(extra or {})
        with atomic_write(path) as tmp:
            with open(tmp, "wb") as fh:
                np.savez(fh, **arrays)

    def _save_folder(self, path: Path) -> None:
        if path.exists() and not (path / FOLDER_RESULT).exists():
            raise InputError(f"{path}: exists and is not a result folder; choose another path.")
        if not path.parent.exists():
            raise InputError(f"{path}: the folder {path.parent} does not exist; create it first.")
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
        try:
            self._save_npz(tmp / FOLDER_RESULT, None, with_points=False)
            for metric, sums in (self.point_sums or {}).items():
                target = tmp / f"point_sum_{metric}.npy"
                source = _whole_npy_file(sums)
                if source is not None:
                    try:
                        os.link(source, target)  # same file system: no copy of an n x m matrix
                        continue
                    except OSError:
                        pass
                    shutil.copyfile(source, target)
                else:
                    np.save(target, np.asarray(sums), allow_pickle=False)
            replace_folder(tmp, path)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    @classmethod
    def load(cls, path: str | os.PathLike) -> ValuationResult:
        """A ``.npz`` result or a result folder (its per-point matrices memory-mapped, read-only)."""
        if Path(path).is_dir():
            if not (Path(path) / FOLDER_RESULT).exists():
                raise CheckpointError(f"{path}: a folder without {FOLDER_RESULT} is not a freeshap-dq result.")
            result = cls.load(Path(path) / FOLDER_RESULT)
            files = {m: Path(path) / f"point_sum_{m}.npy" for m in METRICS}
            if all(f.exists() for f in files.values()):
                result.point_sums = {m: np.load(f, mmap_mode="r", allow_pickle=False) for m, f in files.items()}
            return result
        if not Path(path).exists():
            raise CheckpointError(f"{path}: no such result file.")
        kind = describe_file(path)
        if kind != "a zip archive":
            raise CheckpointError(f"{path}: not a freeshap-dq result: it is {kind}. Give the .npz or result folder "
                                  f"written by freeshap-dq value --save-result (a values table is not a result).")
        try:
            with np.load(path, allow_pickle=False) as data:
                arrays = {k: data[k] for k in data.files}
            header = json.loads(arrays.pop("manifest").tobytes().decode())
        except ValueError as exc:
            if "pickle" in str(exc):
                raise CheckpointError(f"{path}: {OBJECT_ARRAYS}; it was not written by freeshap-dq.") from None
            raise CheckpointError(f"{path}: not a freeshap-dq result file ({type(exc).__name__}: {exc}).") from None
        except Exception as exc:
            raise CheckpointError(f"{path}: not a freeshap-dq result file ({type(exc).__name__}: {exc}).") from None
        if header.get("format_version") != FORMAT_VERSION:
            raise CheckpointError(f"{path}: result format {header.get('format_version')} is not supported.")
        per_point = "point_sum_accuracy" in arrays
        method, count, exact, sources = (header.pop(k) for k in ("method", "count", "exact", "sources"))
        header.pop("format_version")
        return cls(
            method=method, sums={m: arrays[f"sum_{m}"] for m in METRICS},
            sq_sums={m: arrays[f"sqsum_{m}"] for m in METRICS}, count=int(count),
            point_sums={m: arrays[f"point_sum_{m}"] for m in METRICS} if per_point else None,
            evaluated=arrays["evaluated"], sources=[dict(s) for s in sources], exact=bool(exact), manifest=header,
            train_ids=arrays.get("train_ids"), test_ids=arrays.get("test_ids"),
        )


def _check_metric(metric: str) -> None:
    if metric not in METRICS:
        raise InputError(f"metric {metric!r} is unknown; choose one of {', '.join(METRICS)}.")


def _check_disjoint(a: list[dict[str, int]], b: list[dict[str, int]]) -> None:
    for x in a:
        for y in b:
            if x["seed"] == y["seed"] and x["start"] < y["start"] + y["count"] and y["start"] < x["start"] + x["count"]:
                raise InputError(
                    f"cannot merge: both results contain permutations {max(x['start'], y['start'])}.. of seed "
                    f"{x['seed']}; merging would count them twice. Use another seed or --start."
                )


def _whole_npy_file(array: np.ndarray) -> str | None:
    """The .npy file a memory map spans entirely (so it can be linked instead of rewritten), else None."""
    source = getattr(array, "filename", None)
    if not isinstance(array, np.memmap) or not source or not str(source).endswith(".npy") \
            or not array.flags.c_contiguous or array.dtype != np.float64:
        return None
    try:
        return source if os.path.getsize(source) == array.offset + array.nbytes else None
    except OSError:
        return None


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")
