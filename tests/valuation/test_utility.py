import math

import numpy as np
import pytest
import torch
from problems import random_problem

from freeshap_dq import InputError, ValuationConfig, compute_values
from freeshap_dq.config import parse_ridge
from freeshap_dq.kernels.problem import KernelProblem
from freeshap_dq.valuation.utility import KernelRegressionUtility


def direct_scores(p: KernelProblem, subset, ridge):
    """Textbook kernel regression with numpy: K_TS (K_SS + ridge I)^-1 Y_S."""
    s = np.asarray(subset)
    y = np.eye(p.n_classes)[p.y_train[s]]
    return p.k_test[:, s] @ np.linalg.solve(p.k_train[np.ix_(s, s)] + ridge * np.eye(len(s)), y)


def test_utility_matches_textbook_definition(problem):
    u = KernelRegressionUtility(problem, ValuationConfig(ridge="0.05"))
    subset = [0, 3, 4, 7, 9]
    f = direct_scores(problem, subset, 0.05)
    acc = np.mean(f.argmax(1) == problem.y_test)
    logits = f - f.max(1, keepdims=True)
    ce = np.mean(np.log(np.exp(logits).sum(1)) - logits[np.arange(problem.n_test), problem.y_test])
    assert u(subset) == pytest.approx((acc, -ce), abs=1e-12)


def test_empty_set_utilities(problem):
    random = KernelRegressionUtility(problem, ValuationConfig(ridge="0.1"))
    assert random.empty == pytest.approx((1 / 3, -math.log(3)))
    zero = KernelRegressionUtility(problem, ValuationConfig(ridge="0.1", empty_utility="zero"))
    assert zero.empty == pytest.approx((np.mean(problem.y_test == 0), -math.log(3)))
    assert random([]) == random.empty


def test_paper_scaling_equals_raw_kernel_with_scaled_ridge(problem):
    paper = compute_values(problem, ValuationConfig.preset("paper", permutations=5, tolerance=0))
    raw = compute_values(problem, ValuationConfig(permutations=5, ridge="1e-2"))
    assert paper.manifest["ridge"] == 1e-6
    for metric in ("accuracy", "ce"):
        np.testing.assert_allclose(paper.values(metric), raw.values(metric), rtol=1e-9, atol=1e-12)


def test_relative_ridge_scales_with_the_kernel(problem):
    u = KernelRegressionUtility(problem, ValuationConfig(ridge="rel:2"))
    assert u.ridge == pytest.approx(2 * problem.mean_diag())


def test_auto_ridge_uses_loo_on_training_labels_only(problem):
    u = KernelRegressionUtility(problem, ValuationConfig(ridge="auto"))
    grid = u.ridge_choice.grid
    assert len(grid) == 11 and u.ridge == min(grid, key=lambda g: g[1])[0]
    other_test_labels = KernelProblem(problem.k_train, problem.k_test, problem.y_train,
                                      np.roll(problem.y_test, 1))
    assert KernelRegressionUtility(other_test_labels, ValuationConfig()).ridge == u.ridge
    # each grid entry equals the LOO squared error computed by n explicit refits
    lam, loo_error = grid[5]
    errors = []
    for i in range(problem.n_train):
        rest = np.delete(np.arange(problem.n_train), i)
        y = np.eye(3)[problem.y_train[rest]]
        f = problem.k_train[i, rest] @ np.linalg.solve(problem.k_train[np.ix_(rest, rest)] + lam * np.eye(11), y)
        errors.append(((np.eye(3)[problem.y_train[i]] - f) ** 2).sum())
    assert loo_error == pytest.approx(np.mean(errors), rel=1e-9)


def test_closed_form_loo_equals_refits():
    p = random_problem(n=10, m=5)
    u = KernelRegressionUtility(p, ValuationConfig(ridge="0.2"))
    acc, ce = (t.numpy() for t in u.leave_one_out_point_values(chunk=3))
    full = u.full_point
    for i in range(p.n_train):
        rest = np.delete(np.arange(10), i)
        a, c = u.point_utilities_of(torch.as_tensor(rest))
        np.testing.assert_allclose(ce[i], (full[1] - c).numpy(), atol=1e-10)
        np.testing.assert_array_equal(acc[i], (full[0] - a).numpy())
    result = compute_values(p, ValuationConfig(method="loo", ridge="0.2", per_point=True))
    np.testing.assert_allclose(result.values("ce"), ce.mean(1), atol=1e-12)
    assert np.all(result.stderr("ce") == 0)


@pytest.mark.parametrize("spec, expected", [("auto", ("auto", 0.0)), ("rel:10", ("relative", 10.0)),
                                            ("0.01", ("absolute", 0.01)), (1e-6, ("absolute", 1e-6))])
def test_parse_ridge(spec, expected):
    assert parse_ridge(spec) == expected


@pytest.mark.parametrize("spec", ["-1", "0", "rel:x", "nan", "inf", "banana"])
def test_parse_ridge_rejects_nonsense(spec):
    with pytest.raises(InputError, match="ridge"):
        parse_ridge(spec)
