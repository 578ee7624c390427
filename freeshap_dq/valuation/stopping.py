"""Stopping criteria for permutation sampling, composable with ``|`` (either) and ``&`` (both).

A criterion is checked after every batch of permutations with the current result and answers
whether to stop. ``completion`` (0..1, or None) drives the progress bar.

    MaxPermutations(1000) | MaxTime(600)                 # whichever comes first
    MaxPermutations(50) & TopKStable(k=50, patience=20)  # at least 50, then until the top-50 settles

A rule is ``bounded`` when it is sure to fire: ``MaxPermutations`` and ``MaxTime`` are, ``a | b`` is when
either part is, ``a & b`` when both are. ``compute_values`` refuses an unbounded rule (a standard-error or
stability target alone may never be reached, and the run would never end).
"""

from __future__ import annotations

import time

import numpy as np

from freeshap_dq.errors import InputError
from freeshap_dq.result import ValuationResult


class StoppingCriterion:
    bounded = False

    def __call__(self, result: ValuationResult) -> bool:
        raise NotImplementedError

    def completion(self, result: ValuationResult) -> float | None:
        return None

    def reset(self) -> None:
        """Forget state before a new run (stateful criteria override)."""

    def __or__(self, other: StoppingCriterion) -> StoppingCriterion:
        return _Either(self, other)

    def __and__(self, other: StoppingCriterion) -> StoppingCriterion:
        return _Both(self, other)


class _Either(StoppingCriterion):
    def __init__(self, *parts: StoppingCriterion):
        self.parts = parts

    @property
    def bounded(self) -> bool:
        return any(p.bounded for p in self.parts)

    def __call__(self, result: ValuationResult) -> bool:
        return any([p(result) for p in self.parts])  # evaluate all: stateful parts must see every check

    def completion(self, result: ValuationResult) -> float | None:
        done = [c for c in (p.completion(result) for p in self.parts) if c is not None]
        return max(done) if done else None

    def reset(self) -> None:
        for p in self.parts:
            p.reset()

    def __repr__(self) -> str:
        return " | ".join(map(repr, self.parts))


class _Both(_Either):
    @property
    def bounded(self) -> bool:
        return all(p.bounded for p in self.parts)

    def __call__(self, result: ValuationResult) -> bool:
        return all([p(result) for p in self.parts])

    def completion(self, result: ValuationResult) -> float | None:
        done = [c for c in (p.completion(result) for p in self.parts) if c is not None]
        return min(done) if done else None

    def __repr__(self) -> str:
        return " & ".join(map(repr, self.parts))


class MaxPermutations(StoppingCriterion):
    bounded = True

    def __init__(self, count: int):
        if count < 1:
            raise InputError(f"MaxPermutations needs a positive count, got {count}.")
        self.count = count

    def __call__(self, result: ValuationResult) -> bool:
        return result.count >= self.count

    def completion(self, result: ValuationResult) -> float:
        return min(1.0, result.count / self.count)

    def __repr__(self) -> str:
        return f"MaxPermutations({self.count})"


class MaxTime(StoppingCriterion):
    """Stop once ``seconds`` have passed since the first check of this run."""

    bounded = True

    def __init__(self, seconds: float):
        if seconds <= 0:
            raise InputError(f"MaxTime needs a positive number of seconds, got {seconds}.")
        self.seconds = seconds
        self._start: float | None = None

    def __call__(self, result: ValuationResult) -> bool:
        if self._start is None:
            self._start = time.monotonic()
        return time.monotonic() - self._start >= self.seconds

    def completion(self, result: ValuationResult) -> float | None:
        return None if self._start is None else min(1.0, (time.monotonic() - self._start) / self.seconds)

    def reset(self) -> None:
        self._start = None

    def __repr__(self) -> str:
        return f"MaxTime({self.seconds})"


class StandardErrorBelow(StoppingCriterion):
    """Stop when the largest standard error of ``metric`` is at most ``threshold`` (and T >= min_count)."""

    def __init__(self, threshold: float, metric: str = "ce", min_count: int = 10):
        if threshold <= 0:
            raise InputError(f"StandardErrorBelow needs a positive threshold, got {threshold}.")
        self.threshold, self.metric, self.min_count = threshold, metric, max(2, min_count)

    def __call__(self, result: ValuationResult) -> bool:
        return result.count >= self.min_count and float(np.nanmax(result.stderr(self.metric))) <= self.threshold

    def __repr__(self) -> str:
        return f"StandardErrorBelow({self.threshold}, metric={self.metric!r})"


class _Stable(StoppingCriterion):
    """Stop when a summary of the values has not changed for ``patience`` consecutive checks."""

    def __init__(self, patience: int, metric: str):
        if patience < 1:
            raise InputError(f"patience must be at least 1, got {patience}.")
        self.patience, self.metric = patience, metric
        self._last: object = None
        self._unchanged = 0

    def summary(self, values: np.ndarray) -> object:
        raise NotImplementedError

    def __call__(self, result: ValuationResult) -> bool:
        if result.count == 0:
            return False
        current = self.summary(result.values(self.metric))
        self._unchanged = self._unchanged + 1 if current == self._last else 0
        self._last = current
        return self._unchanged >= self.patience

    def reset(self) -> None:
        self._last, self._unchanged = None, 0


class TopKStable(_Stable):
    """The set of the k most harmful examples is the same for ``patience`` consecutive checks."""

    def __init__(self, k: int, patience: int = 20, metric: str = "ce"):
        super().__init__(patience, metric)
        self.k = k

    def summary(self, values: np.ndarray) -> object:
        return frozenset(np.argsort(values, kind="stable")[: self.k].tolist())

    def __repr__(self) -> str:
        return f"TopKStable(k={self.k}, patience={self.patience}, metric={self.metric!r})"


class SignStable(_Stable):
    """No value changed sign for ``patience`` consecutive checks."""

    def __init__(self, patience: int = 20, metric: str = "ce"):
        super().__init__(patience, metric)

    def summary(self, values: np.ndarray) -> object:
        return np.signbit(values).tobytes()

    def __repr__(self) -> str:
        return f"SignStable(patience={self.patience}, metric={self.metric!r})"
