import numpy as np
import pytest
import torch
from problems import random_problem
from test_utility import direct_scores

from freeshap_dq import ValuationConfig
from freeshap_dq.valuation.prefix_engine import PrefixEngine
from freeshap_dq.valuation.utility import KernelRegressionUtility

RIDGE = 0.05


@pytest.fixture
def utility():
    return KernelRegressionUtility(random_problem(n=23, m=7), ValuationConfig(ridge=str(RIDGE)))


def perms_for(n, count, seed=0):
    rng = np.random.default_rng(seed)
    return torch.as_tensor(np.stack([rng.permutation(n) for _ in range(count)]))


@pytest.mark.parametrize("tolerance, block", [(0.0, 128), (1e-9, 5), (1e-9, 1), (1e-9, 23)])
def test_every_prefix_matches_a_direct_solve(utility, tolerance, block):
    engine = PrefixEngine(utility, tolerance=tolerance, block_size=block)
    perms = perms_for(23, 2)
    for start, scores in engine.prefix_scores(perms):
        for b in range(2):
            for j in range(scores.shape[1]):
                p = start + j + 1
                expected = direct_scores(utility.problem, perms[b, :p].numpy(), RIDGE)
                np.testing.assert_allclose(scores[b, j].numpy(), expected, atol=1e-8, rtol=0)


def utilities_along(utility, perm):
    """Reference: U(S_0..S_n) by direct solves, as (n+1, 2) array."""
    return np.array([utility.empty] + [utility(perm[:p]) for p in range(1, len(perm) + 1)])


def test_marginals_equal_differences_of_direct_utilities(utility):
    perm = perms_for(23, 1, seed=3)
    out = PrefixEngine(utility).run(perm)
    ref = np.diff(utilities_along(utility, perm[0].numpy()), axis=0)
    np.testing.assert_allclose(out.accuracy[0].numpy(), ref[:, 0], atol=1e-12)
    np.testing.assert_allclose(out.ce[0].numpy(), ref[:, 1], atol=1e-10)


def test_efficiency_without_truncation(utility):
    out = PrefixEngine(utility).run(perms_for(23, 4))
    full, empty = utility.full, utility.empty
    np.testing.assert_allclose(out.accuracy.sum(1).numpy(), full[0] - empty[0], atol=1e-12)
    np.testing.assert_allclose(out.ce.sum(1).numpy(), full[1] - empty[1], atol=1e-10)
    assert (out.evaluated == 23).all()


def test_per_point_mean_equals_aggregate(utility):
    out = PrefixEngine(utility, per_point=True, tolerance=0.1, block_size=4).run(perms_for(23, 3))
    np.testing.assert_allclose(out.point_accuracy.mean(-1).numpy(), out.accuracy.numpy(), atol=1e-14)
    np.testing.assert_allclose(out.point_ce.mean(-1).numpy(), out.ce.numpy(), atol=1e-14)


def test_batched_equals_one_by_one(utility):
    perms = perms_for(23, 4)
    engine = PrefixEngine(utility, tolerance=0.2, block_size=3, per_point=True)
    together = engine.run(perms)
    for b in range(4):
        alone = engine.run(perms[b:b + 1])
        np.testing.assert_allclose(together.ce[b].numpy(), alone.ce[0].numpy(), atol=1e-12)
        np.testing.assert_allclose(together.point_accuracy[b].numpy(), alone.point_accuracy[0].numpy())
        assert together.evaluated[b] == alone.evaluated[0]


def reference_stop(utilities, full, empty, tol):
    """The reference rule, literally: count consecutive prefixes within tolerance; stop at the 2nd."""
    threshold = tol * np.abs(np.asarray(full) - np.asarray(empty))
    streak = 0
    for p in range(1, len(utilities)):
        within = np.all(np.abs(utilities[p] - np.asarray(full)) <= threshold)
        streak = streak + 1 if within else 0
        if streak == 2:
            return p
    return len(utilities) - 1


def test_reference_rule_on_a_toy_sequence():
    full, empty = (1.0, -0.2), (0.5, -0.7)
    seq = np.array([empty, (0.9, -0.3), (0.99, -0.21), (0.7, -0.25), (0.98, -0.2), (0.99, -0.19), (1.0, -0.2)])
    assert reference_stop(seq, full, empty, tol=0.05) == 5  # prefixes 4 and 5 are the first consecutive pair
    assert reference_stop(seq, full, empty, tol=0.0) == 6


@pytest.mark.parametrize("block", [1, 2, 3, 7, 64])
@pytest.mark.parametrize("tol", [0.02, 0.1, 0.3])
def test_truncation_matches_reference_rule(utility, block, tol):
    perms = perms_for(23, 5, seed=11)
    out = PrefixEngine(utility, tolerance=tol, block_size=block).run(perms)
    for b in range(5):
        utils = utilities_along(utility, perms[b].numpy())
        stop = reference_stop(utils, utility.full, utility.empty, tol)
        assert int(out.evaluated[b]) == stop
        expected = np.diff(utils, axis=0)[:, 1].copy()
        expected[stop:] = 0
        np.testing.assert_allclose(out.ce[b].numpy(), expected, atol=1e-10)
    assert int(out.evaluated.min()) < 23  # the tolerances above do truncate this problem
