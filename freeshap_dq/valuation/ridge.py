r"""The ridge :math:`\lambda` of the kernel-regression utility, resolved from its specification.

``ridge`` (see :mod:`freeshap_dq.config`), in the units of the scaled kernel:

- a number: that absolute value;
- ``rel:X``: :math:`X \cdot \overline{\operatorname{diag} K}`;
- ``auto``: the :math:`\lambda = \overline{\operatorname{diag} K} \cdot 10^{k/2}`, k = -6..4, with the lowest
  closed-form leave-one-out mean squared error on the *training* labels (test labels are never used).
  The error of a candidate is the utility's own: the exact kernel's PRESS
  (:func:`freeshap_dq.valuation.utility.loo_train_scores`) or the rank-r model's
  (:class:`freeshap_dq.valuation.feature_utility.FeatureSpaceUtility`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from freeshap_dq.config import parse_ridge

AUTO_RIDGE_GRID = tuple(10.0 ** (k / 2) for k in range(-6, 5))  # 1e-3 .. 1e2 x mean(diag K), half-decades


@dataclass
class RidgeChoice:
    value: float
    mode: str
    grid: tuple[tuple[float, float], ...] = ()  # (lambda, LOO mean squared error) for auto


def choose_ridge(spec: str, mean_diag: float, loo_error: Callable[[float], float]) -> RidgeChoice:
    """Resolve ``spec`` for a kernel whose mean diagonal is ``mean_diag``; ``loo_error(lambda)`` is called
    only for ``auto``, once per grid point."""
    mode, value = parse_ridge(spec)
    if mode == "absolute":
        return RidgeChoice(value, mode)
    if mode == "relative":
        return RidgeChoice(value * mean_diag, mode)
    grid = tuple((factor * mean_diag, loo_error(factor * mean_diag)) for factor in AUTO_RIDGE_GRID)
    best = min(grid, key=lambda item: item[1])
    return RidgeChoice(best[0], "auto", grid)
