r"""Semivalues from permutation marginals, and exact values by subset enumeration.

A semivalue puts probability :math:`p(s)` on the size s = 0..n-1 of the coalition an element
joins: :math:`\phi_i = \sum_s p(s)\, \mathbb{E}_{|S|=s}[U(S \cup i) - U(S)]`. Shapley is
:math:`p(s) = 1/n`. Beta(:math:`\alpha, \beta`) Shapley (Kwon & Zou, 2022) is the beta-binomial

.. math::  p(s) = \binom{n-1}{s} \frac{B(s + \beta,\; n - 1 - s + \alpha)}{B(\alpha, \beta)}

so Beta(16, 1) stresses small coalitions. Banzhaf weighs every subset equally,
:math:`p(s) = \binom{n-1}{s} / 2^{n-1}`. In a uniform permutation an element's position s is
uniform and its predecessors are a uniform s-subset, so weighting the marginal at position s by
:math:`n\,p(s)` gives an unbiased estimate of any semivalue from the same permutations.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import torch

from freeshap_dq.errors import InputError
from freeshap_dq.valuation.utility import DTYPE, KernelRegressionUtility, point_utilities, solve_scores

MAX_EXACT_N = 16


def shapley_probabilities(n: int) -> np.ndarray:
    return np.full(n, 1.0 / n)


def beta_probabilities(n: int, alpha: float, beta: float) -> np.ndarray:
    s = np.arange(n)
    log_choose = np.array([math.lgamma(n) - math.lgamma(k + 1) - math.lgamma(n - k) for k in s])
    log_beta = lambda a, b: math.lgamma(a) + math.lgamma(b) - math.lgamma(a + b)  # noqa: E731
    log_p = log_choose + np.array([log_beta(k + beta, n - 1 - k + alpha) for k in s]) - log_beta(alpha, beta)
    return np.exp(log_p)


def banzhaf_probabilities(n: int) -> np.ndarray:
    s = np.arange(n)
    log_choose = np.array([math.lgamma(n) - math.lgamma(k + 1) - math.lgamma(n - k) for k in s])
    return np.exp(log_choose - (n - 1) * math.log(2.0))


def position_weights(probabilities: np.ndarray) -> np.ndarray:
    """Importance weights n * p(s) for the marginal at position s of a permutation."""
    return probabilities * probabilities.shape[0]


def check_enumerable(n: int) -> None:
    if n > MAX_EXACT_N:
        raise InputError(f"exact enumeration needs 2^n subset fits; n = {n} is above the limit of {MAX_EXACT_N}. "
                         f"Use method tmc.")


def exact_semivalues(utility: KernelRegressionUtility, probabilities: np.ndarray,
                     per_point: bool = False) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray] | None]:
    """Exact semivalues by enumerating all 2^n subsets (n <= 16), per metric (and per point)."""
    n = utility.problem.n_train
    check_enumerable(n)
    m = utility.problem.n_test
    table_acc = torch.empty(2**n, m, dtype=DTYPE, device=utility.device)
    table_ce = torch.empty_like(table_acc)
    table_acc[0], table_ce[0] = utility.empty_point
    for size in range(1, n + 1):
        subsets = torch.tensor(list(itertools.combinations(range(n), size)), device=utility.device)
        masks = (2 ** subsets).sum(dim=1)
        k_ss = utility.k_stack[:, subsets.unsqueeze(-1), subsets.unsqueeze(-2)].movedim(0, 1)  # (count, K, s, s)
        k_ts = utility.k_test_stack[:, :, subsets].permute(2, 0, 1, 3)  # (count, K, m, s)
        scores = solve_scores(k_ss, k_ts, utility.targets[subsets], utility.ridge)  # (count, m, C)
        table_acc[masks], table_ce[masks] = point_utilities(scores, utility.y_test)

    all_masks = torch.arange(2**n, device=utility.device)
    sizes = torch.tensor([bin(k).count("1") for k in range(2**n)], device=utility.device)
    choose = torch.tensor([math.comb(n - 1, s) for s in range(n)], dtype=DTYPE, device=utility.device)
    weight_by_size = torch.as_tensor(probabilities, dtype=DTYPE, device=utility.device) / choose
    point_values = {}
    for metric, table in (("accuracy", table_acc), ("ce", table_ce)):
        values = torch.zeros(n, m, dtype=DTYPE, device=utility.device)
        for i in range(n):
            without = all_masks[(all_masks >> i) & 1 == 0]
            w = weight_by_size[sizes[without]].unsqueeze(-1)
            values[i] = (w * (table[without + 2**i] - table[without])).sum(dim=0)
        point_values[metric] = values.cpu().numpy()
    values = {k: v.mean(axis=1) for k, v in point_values.items()}
    return values, point_values if per_point else None
