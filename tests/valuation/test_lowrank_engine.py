import numpy as np
import pytest
import torch

from freeshap_dq import InputError, ValuationConfig, compute_values
from freeshap_dq.data.synthetic import noisy_problem
from freeshap_dq.kernels.nystrom import low_rank_features
from freeshap_dq.valuation.lowrank_engine import LowRankPrefixEngine
from freeshap_dq.valuation.utility import KernelRegressionUtility


@pytest.fixture(scope="module")
def problem():
    return noisy_problem(n_train=50, n_test=20, noise=0.1, seed=3).problem


@pytest.mark.parametrize("method", ["eigen", "nystrom"])
@pytest.mark.parametrize("tolerance", [0.0, 0.05])
def test_full_rank_equals_the_exact_engine(problem, method, tolerance):
    base = dict(permutations=5, tolerance=tolerance, per_point=True, block_size=7)
    exact = compute_values(problem, ValuationConfig(**base))
    low = compute_values(problem, ValuationConfig(**base, low_rank=problem.n_train, low_rank_method=method))
    for m in ("accuracy", "ce"):
        np.testing.assert_allclose(low.sums[m], exact.sums[m], atol=1e-9)
        np.testing.assert_allclose(low.point_sums[m], exact.point_sums[m], atol=1e-9)
    np.testing.assert_array_equal(low.evaluated, exact.evaluated)
    assert low.manifest["low_rank"]["rank"] == problem.n_train
    assert low.manifest["low_rank"]["trace_captured"] == pytest.approx(1.0)


def test_prefix_scores_match_direct_solves_and_refresh_does_not_matter(problem):
    utility = KernelRegressionUtility(problem, ValuationConfig())
    features = low_rank_features(utility.k_train, utility.k_test, 12, "nystrom", seed=1)
    perms = torch.stack([torch.randperm(problem.n_train, generator=torch.Generator().manual_seed(s)) for s in (0, 1)])
    runs = []
    for refresh in (1, 10_000):
        engine = LowRankPrefixEngine(utility, features, refresh=refresh, block_size=9)
        runs.append(torch.cat([f for _, f in engine.prefix_scores(perms)], dim=1))
    torch.testing.assert_close(runs[0], runs[1], rtol=1e-9, atol=1e-10)
    for p in (0, 7, 30, 49):  # F_p = Psi (Phi_S' Phi_S + lambda I)^-1 Phi_S' Y_S, solved directly
        subset = perms[1, :p + 1]
        phi = features.phi[subset]
        direct = features.psi @ torch.linalg.solve(phi.T @ phi + utility.ridge * torch.eye(12, dtype=phi.dtype),
                                                   phi.T @ utility.targets[subset])
        torch.testing.assert_close(runs[0][1, p], direct, rtol=1e-8, atol=1e-10)


def test_values_approach_the_exact_ones_as_the_rank_grows(problem):
    exact = compute_values(problem, ValuationConfig(permutations=20)).values("ce")
    errors = [np.abs(compute_values(problem, ValuationConfig(permutations=20, low_rank=r, low_rank_method="eigen"))
                     .values("ce") - exact).max() for r in (5, 20, 50)]
    assert errors[0] > errors[1] > errors[2] and errors[2] < 1e-9


def test_bad_low_rank_settings():
    with pytest.raises(InputError, match="low_rank_method"):
        ValuationConfig(low_rank=4, low_rank_method="svd")
    with pytest.raises(InputError, match="between 1 and n"):
        low_rank_features(torch.eye(3, dtype=torch.float64), torch.zeros(1, 3, dtype=torch.float64), 5)
