"""Per-class kernels (C x n x n): class c is regressed on kernel c — checked against one-kernel solves."""

import itertools
import math

import numpy as np
import pytest
import torch

from freeshap_dq import InputError, KernelError, KernelProblem, ValuationConfig, compute_values
from freeshap_dq.data.synthetic import rbf_kernel
from freeshap_dq.valuation.prefix_engine import PrefixEngine
from freeshap_dq.valuation.utility import KernelRegressionUtility

N, M, C = 9, 5, 3


def per_class_problem(seed: int = 0, same: bool = False) -> KernelProblem:
    rng = np.random.default_rng(seed)
    y = np.concatenate([np.arange(C), rng.integers(0, C, N + M - C)])
    x = rng.normal(size=(N + M, 4)) + 1.2 * np.eye(C, 4)[y]
    kernels = np.stack([rbf_kernel(x, x, bandwidth=1.0 if same else 0.8 + 0.5 * c) for c in range(C)])
    return KernelProblem(kernels[:, :N, :N], kernels[:, N:, :N], y[:N], y[N:])


def class_kernel(problem: KernelProblem, c: int) -> KernelProblem:
    return KernelProblem(problem.k_train[c], problem.k_test[c], problem.y_train, problem.y_test)


@pytest.fixture(scope="module")
def problem():
    return per_class_problem()


def test_predictions_are_one_regression_per_class_kernel(problem):
    config = ValuationConfig(ridge="0.05")
    utility = KernelRegressionUtility(problem, config)
    assert utility.per_class and problem.per_class
    subset = torch.tensor([0, 2, 3, 7, 8])
    scores = utility.predict(subset)
    for c in range(C):
        single = KernelRegressionUtility(class_kernel(problem, c), config)
        torch.testing.assert_close(scores[:, c], single.predict(subset)[:, c], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(utility.predict(torch.arange(N))[:, c], single.predict(torch.arange(N))[:, c])


def test_identical_class_kernels_give_the_single_kernel_values():
    stacked = per_class_problem(same=True)
    single = class_kernel(stacked, 0)
    for config in (ValuationConfig(permutations=6, tolerance=0.05, block_size=2, per_point=True),
                   ValuationConfig(method="exact"), ValuationConfig(method="loo", per_point=True)):
        a, b = compute_values(stacked, config), compute_values(single, config)
        assert a.manifest["ridge"] == pytest.approx(b.manifest["ridge"])
        for m in ("accuracy", "ce"):
            np.testing.assert_allclose(a.values(m), b.values(m), atol=1e-10)
            if config.per_point:
                np.testing.assert_allclose(a.point_values(m), b.point_values(m), atol=1e-10)


@pytest.mark.parametrize("tolerance, block", [(0.0, 128), (0.05, 2)])
def test_engine_prefix_scores_equal_direct_solves(problem, tolerance, block):
    utility = KernelRegressionUtility(problem, ValuationConfig(ridge="0.1"))
    perms = torch.stack([torch.randperm(N, generator=torch.Generator().manual_seed(s)) for s in (3, 4)])
    engine = PrefixEngine(utility, tolerance=0.0, block_size=block)
    if tolerance:
        engine.block_size, engine.tolerance = block, 1e-300  # blocked factorisation, no early stop
    prefixes = torch.cat([f for _, f in engine.prefix_scores(perms)], dim=1)
    for b, p in itertools.product(range(2), range(N)):
        torch.testing.assert_close(prefixes[b, p], utility.predict(perms[b, :p + 1]), rtol=1e-9, atol=1e-11)


def test_exact_shapley_equals_the_definition(problem):
    config = ValuationConfig(method="exact", ridge="0.1")
    values = compute_values(problem, config).values("ce")
    utility = KernelRegressionUtility(problem, config)
    u = {s: utility(list(s))[1] for k in range(N + 1) for s in itertools.combinations(range(N), k)}
    for i in (0, 4, 8):
        direct = sum(math.factorial(len(s)) * math.factorial(N - len(s) - 1) / math.factorial(N)
                     * (u[tuple(sorted(s + (i,)))] - u[s]) for s in u if i not in s)
        assert values[i] == pytest.approx(direct, abs=1e-10)


def test_closed_form_loo_and_auto_ridge_equal_refits(problem):
    config = ValuationConfig(method="loo", per_point=True)
    result = compute_values(problem, config)
    utility = KernelRegressionUtility(problem, config)
    full = utility.point_utilities_of(torch.arange(N))[1]
    for i in (0, 5):
        rest = torch.tensor([j for j in range(N) if j != i])
        np.testing.assert_allclose(result.point_values("ce")[i], (full - utility.point_utilities_of(rest)[1]).numpy(),
                                   atol=1e-9)
    lam, error = utility.ridge_choice.grid[3]  # PRESS of one grid point, by refitting without each point
    press = 0.0
    for i in range(N):
        rest = [j for j in range(N) if j != i]
        for c in range(C):
            k = utility.k_train[c]
            coef = torch.linalg.solve(k[rest][:, rest] + lam * torch.eye(N - 1, dtype=k.dtype), utility.targets[rest, c])
            press += float((utility.targets[i, c] - k[i, rest] @ coef) ** 2)
    assert error == pytest.approx(press / N, rel=1e-8)


def test_per_class_shape_errors_and_unsupported_options(problem):
    with pytest.raises(KernelError, match="2 per-class kernels for 3 classes"):
        KernelProblem(problem.k_train[:2], problem.k_test[:2], problem.y_train, problem.y_test)
    with pytest.raises(KernelError, match="one per class kernel"):
        KernelProblem(problem.k_train, problem.k_test[0], problem.y_train, problem.y_test)
    asym = problem.k_train.copy()
    asym[1, 2, 5] += 1.0
    with pytest.raises(KernelError, match=r"not symmetric: \|K\[2,5\]"):
        KernelProblem(asym, problem.k_test, problem.y_train, problem.y_test)
    with pytest.raises(InputError, match="--low-rank approximates one kernel"):
        compute_values(problem, ValuationConfig(permutations=2, low_rank=4))


def test_detectors_accept_per_class_kernels():
    from freeshap_dq.evaluation.detectors import cv_kernel_probabilities
    from freeshap_dq.evaluation.experiments import subproblem
    from freeshap_dq.valuation.utility import loo_probabilities

    stacked = per_class_problem(same=True)
    single = class_kernel(stacked, 0)
    np.testing.assert_allclose(cv_kernel_probabilities(stacked, 0.1, folds=3), cv_kernel_probabilities(single, 0.1, folds=3),
                               atol=1e-12)
    np.testing.assert_allclose(loo_probabilities(stacked, 0.1), loo_probabilities(single, 0.1), atol=1e-12)
    rows = np.array([0, 1, 2, 5, 7])
    part = subproblem(per_class_problem(), rows)
    assert part.k_train.shape == (C, 5, 5) and part.k_test.shape == (C, M, 5)
    np.testing.assert_array_equal(part.k_train[2], per_class_problem().k_train[2][np.ix_(rows, rows)])
