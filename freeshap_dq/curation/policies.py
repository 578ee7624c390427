"""Removal and selection policies on a values table.

The input is the table ``freeshap-dq value`` writes (``value``, ``value_ce``, ``stderr``,
``stderr_ce``; ``example_id``) joined with the labels. ``metric`` picks the utility the policy
ranks by (``ce`` = ``value_ce``, default; ``accuracy`` = ``value``).

Removal (``RemovalPolicy``), lowest values first, as many as the rule allows:
- ``fraction`` / ``count``: the bottom fraction or count;
- ``threshold``: every example with value < threshold;
- ``confident``: only examples that are harmful with confidence, value + z * stderr < 0
  (combines with the others: a candidate must pass every rule given);
- ``max_class_fraction``: never remove more than this fraction of any class, so no class is gutted.

Selection (``SelectionPolicy``), highest values first:
- ``count`` / ``fraction``: the top count or fraction;
- ``per_class``: at most this many per class (quotas);
- ``budget`` with ``cost``: keep adding the best examples while the summed cost fits.

Counts from a fraction follow one rule (:func:`count_of_fraction`): the nearest whole number of examples
to ``fraction * n``, halves rounded up, so ``0.29`` of 100 is 29 and ``0.07`` of 100 is 7. A count above n
is refused, and so is a removal that would leave a class without examples, unless ``allow_empty_class``.

Every decision carries a reason, so the manifest says why each example was removed or kept.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import pandas as pd

from freeshap_dq.config import option
from freeshap_dq.errors import InputError
from freeshap_dq.scores import DEFAULT_METRIC, DEFAULT_Z, confidently_harmful, harm_order, metric_columns, worth_order


@dataclass
class RemovalPolicy:
    fraction: float | None = option(None, "Remove the lowest-valued fraction of the training set (0-1).")
    count: int | None = option(None, "Remove the lowest-valued COUNT examples.")
    threshold: float | None = option(None, "Remove every example whose value is below this.")
    confident: bool = option(False, "Only remove examples with value + z * stderr < 0 (harmful with confidence).")
    z: float = option(DEFAULT_Z, f"z for --confident ({DEFAULT_Z} ~ 97.5% one-sided).")
    max_class_fraction: float = option(1.0, "Never remove more than this fraction of any class.")
    metric: str = option(DEFAULT_METRIC, "Value that ranks: ce (-cross-entropy utility) or accuracy.")
    allow_empty_class: bool = option(False, "Allow a removal that leaves a class without examples.")

    def __post_init__(self) -> None:
        _check_metric(self.metric)
        if self.fraction is None and self.count is None and self.threshold is None and not self.confident:
            raise InputError("say what to remove: --fraction, --count, --threshold and/or --confident.")
        if self.fraction is not None and not 0 < self.fraction < 1:
            raise InputError(f"--fraction must be between 0 and 1, got {self.fraction}.")
        if self.count is not None and self.count < 1:
            raise InputError(f"--count must be at least 1, got {self.count}.")
        if self.threshold is not None and not math.isfinite(self.threshold):
            raise InputError(f"--threshold must be a finite number, got {self.threshold}.")
        if not 0 < self.max_class_fraction <= 1:
            raise InputError(f"--max-class-fraction must be in (0, 1], got {self.max_class_fraction}.")
        if self.z < 0:
            raise InputError(f"--z must be >= 0, got {self.z}.")

    def apply(self, table: pd.DataFrame) -> pd.DataFrame:
        """``table`` (example_id, label, values...) -> the same rows plus ``removed`` and ``reason``."""
        value_col, se_col = metric_columns(self.metric)
        if self.confident and se_col not in table.columns:
            raise InputError(f"--confident needs the standard errors ({se_col!r}), and the values table has none; use "
                             f"the table written by freeshap-dq value, or drop --confident.")
        out = _ranked(table, value_col, harmful_first=True)
        n = len(out)
        limit = _limit(self.fraction, self.count, n, "remove")
        candidate = np.ones(n, dtype=bool)
        if self.threshold is not None:
            candidate &= out[value_col].to_numpy() < self.threshold
        if self.confident:
            candidate &= confidently_harmful(out[value_col].to_numpy(), out[se_col].to_numpy(), self.z)
        class_sizes = out["label"].value_counts()
        caps = {label: int(np.floor(self.max_class_fraction * size)) for label, size in class_sizes.items()}
        taken = {label: 0 for label in class_sizes.index}
        removed = np.zeros(n, dtype=bool)
        reasons = np.full(n, "kept", dtype=object)
        for i, (label, ok) in enumerate(zip(out["label"], candidate, strict=True)):
            if removed.sum() >= limit:
                break
            if not ok:
                continue
            if taken[label] >= caps[label]:
                reasons[i] = f"kept: class {label!r} at its cap ({caps[label]} of {class_sizes[label]})"
                continue
            taken[label] += 1
            removed[i] = True
            reasons[i] = self._reason(out.iloc[i], value_col, se_col)
        emptied = [label for label, size in class_sizes.items() if taken[label] == size]
        if emptied and not self.allow_empty_class:
            raise InputError(f"this removal would leave class(es) {', '.join(map(repr, emptied))} without examples "
                             f"(all {', '.join(str(class_sizes[c]) for c in emptied)} removed). Cap it with "
                             f"--max-class-fraction, remove fewer, or pass --allow-empty-class if that is intended.")
        out["removed"] = removed
        out["reason"] = reasons
        return out

    def _reason(self, row: pd.Series, value_col: str, se_col: str) -> str:
        parts = [f"{value_col} = {row[value_col]:.3g} (harm rank {int(row['policy_rank'])})"]
        if self.confident:
            parts.append(f"{value_col} + {self.z:g} x stderr = {row[value_col] + self.z * row[se_col]:.3g} < 0")
        if self.threshold is not None:
            parts.append(f"below threshold {self.threshold:g}")
        return "; ".join(parts)


@dataclass
class SelectionPolicy:
    count: int | None = option(None, "Keep the COUNT highest-valued examples.")
    fraction: float | None = option(None, "Keep the highest-valued fraction (0-1).")
    per_class: int | None = option(None, "Keep at most this many per class (quota).")
    budget: float | None = option(None, "Keep the best examples while their summed cost fits this budget.")
    metric: str = option(DEFAULT_METRIC, "Value that ranks: ce (-cross-entropy utility) or accuracy.")

    def __post_init__(self) -> None:
        _check_metric(self.metric)
        if self.count is None and self.fraction is None and self.per_class is None and self.budget is None:
            raise InputError("say what to keep: --count, --fraction, --per-class and/or --budget.")
        if self.fraction is not None and not 0 < self.fraction <= 1:
            raise InputError(f"--fraction must be in (0, 1], got {self.fraction}.")
        for name in ("count", "per_class"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise InputError(f"--{name.replace('_', '-')} must be at least 1, got {value}.")
        if self.budget is not None and self.budget <= 0:
            raise InputError(f"--budget must be positive, got {self.budget}.")

    def apply(self, table: pd.DataFrame, cost: pd.Series | None = None) -> pd.DataFrame:
        value_col, _ = metric_columns(self.metric)
        out = _ranked(table, value_col, harmful_first=False)
        n = len(out)
        limit = _limit(self.fraction, self.count, n, "keep")
        costs = np.ones(n) if cost is None else cost.reindex(out.index).to_numpy(dtype=float)
        if np.any(~np.isfinite(costs)) or np.any(costs < 0):
            raise InputError("costs must be finite and non-negative.")
        per_class: dict[Any, int] = {}
        spent, kept = 0.0, 0
        selected = np.zeros(n, dtype=bool)
        reasons = np.full(n, "not selected: below the cut", dtype=object)
        for i, label in enumerate(out["label"]):
            if kept >= limit:
                break
            if self.per_class is not None and per_class.get(label, 0) >= self.per_class:
                reasons[i] = f"not selected: class {label!r} quota {self.per_class} filled"
                continue
            if self.budget is not None and spent + costs[i] > self.budget:
                reasons[i] = f"not selected: cost {costs[i]:g} exceeds the remaining budget {self.budget - spent:g}"
                continue
            selected[i] = True
            per_class[label] = per_class.get(label, 0) + 1
            spent += costs[i]
            kept += 1
            reasons[i] = f"{value_col} = {out.iloc[i][value_col]:.3g} (value rank {int(out.iloc[i]['policy_rank'])})"
        out["selected"] = selected
        out["reason"] = reasons
        return out


ROUNDING_RULE = "the nearest whole number of examples to fraction x n, halves up"


def count_of_fraction(fraction: float, n: int) -> int:
    """How many of n examples a fraction means: the nearest whole number to ``fraction * n``, halves rounded up
    (after dropping float noise: 0.29 * 100 is 29, not 28)."""
    return int(math.floor(round(fraction * n, 9) + 0.5))


def _limit(fraction: float | None, count: int | None, n: int, verb: str) -> int:
    """How many of n examples a policy may remove or keep: the tighter of --fraction and --count (at most n)."""
    limit = n
    if fraction is not None:
        limit = min(limit, count_of_fraction(fraction, n))
    if count is not None:
        if count > n:
            raise InputError(f"--count {count} is more than the {n} examples in the data; cannot {verb} {count}. "
                             f"Give a count of at most {n}, or --fraction.")
        limit = min(limit, count)
    return limit


def policy_dict(policy: RemovalPolicy | SelectionPolicy) -> dict[str, Any]:
    return {"policy": type(policy).__name__, **asdict(policy)}


def _ranked(table: pd.DataFrame, value_col: str, harmful_first: bool) -> pd.DataFrame:
    missing = [c for c in ("example_id", "label", value_col) if c not in table.columns]
    if missing:
        raise InputError(f"the values table lacks column(s) {', '.join(missing)}; use the table written by "
                         f"freeshap-dq value.")
    if table[value_col].isna().any():
        raise InputError(f"the values table has missing {value_col} entries; recompute the values.")
    training_index = table["train_index"].to_numpy() if "train_index" in table.columns else None
    order = (harm_order if harmful_first else worth_order)(table[value_col].to_numpy(), training_index)
    out = table.iloc[order].copy()
    out["policy_rank"] = np.arange(1, len(out) + 1)
    return out


def _check_metric(metric: str) -> None:
    metric_columns(metric)
