import itertools

import numpy as np
import pytest
import torch
from problems import random_problem

from freeshap_dq import (
    CheckpointError,
    InputError,
    MaxPermutations,
    MaxTime,
    SignStable,
    StandardErrorBelow,
    TopKStable,
    ValuationConfig,
    ValuationResult,
    compute_values,
)
from freeshap_dq.valuation.checkpoint import load_partial
from freeshap_dq.valuation.prefix_engine import PrefixEngine
from freeshap_dq.valuation.semivalues import (
    banzhaf_probabilities,
    beta_probabilities,
    exact_semivalues,
    position_weights,
    shapley_probabilities,
)
from freeshap_dq.valuation.utility import KernelRegressionUtility

CFG = dict(ridge="0.05")


def permutation_average(utility, probabilities, per_point=False):
    """Average weighted marginals over all n! permutations (the definition of a semivalue)."""
    n = utility.problem.n_train
    perms = torch.as_tensor(list(itertools.permutations(range(n))))
    out = PrefixEngine(utility, per_point=per_point).run(perms)
    w = torch.as_tensor(position_weights(probabilities))
    values = {}
    for metric, marg in (("accuracy", out.accuracy), ("ce", out.ce)):
        total = torch.zeros(n, dtype=torch.float64)
        for b in range(perms.shape[0]):
            total.index_add_(0, perms[b], marg[b] * w)
        values[metric] = (total / perms.shape[0]).numpy()
    return values


@pytest.mark.parametrize("probabilities", [shapley_probabilities(6), beta_probabilities(6, 16, 1),
                                           beta_probabilities(6, 4, 1), banzhaf_probabilities(6)],
                         ids=["shapley", "beta16", "beta4", "banzhaf"])
def test_exact_enumeration_equals_average_over_all_permutations(probabilities):
    utility = KernelRegressionUtility(random_problem(n=6, m=5), ValuationConfig(**CFG))
    exact, _ = exact_semivalues(utility, probabilities)
    by_perms = permutation_average(utility, probabilities)
    for metric in ("accuracy", "ce"):
        np.testing.assert_allclose(exact[metric], by_perms[metric], atol=1e-12)


def test_beta_probabilities_are_a_distribution_and_beta11_is_shapley():
    np.testing.assert_allclose(beta_probabilities(9, 1, 1), np.full(9, 1 / 9), atol=1e-14)
    p = beta_probabilities(30, 16, 1)
    assert p.sum() == pytest.approx(1.0) and p[0] > p[1] > p[-1]


def test_exact_method_is_efficient_and_per_point_consistent():
    p = random_problem(n=8, m=5)
    result = compute_values(p, ValuationConfig(method="exact", per_point=True, **CFG))
    full, empty = result.manifest["utility_full"], result.manifest["utility_empty"]
    assert result.values("ce").sum() == pytest.approx(full["ce"] - empty["ce"], abs=1e-12)
    assert result.values("accuracy").sum() == pytest.approx(full["accuracy"] - empty["accuracy"], abs=1e-12)
    np.testing.assert_allclose(result.point_values("ce").mean(1), result.values("ce"), atol=1e-14)


def test_exact_refuses_large_n():
    with pytest.raises(InputError, match="above the limit"):
        compute_values(random_problem(n=17, m=3), ValuationConfig(method="exact", **CFG))


def test_monte_carlo_converges_to_exact():
    p = random_problem(n=7, m=6, seed=4)
    exact = compute_values(p, ValuationConfig(method="exact", **CFG))
    mc = compute_values(p, ValuationConfig(permutations=1500, **CFG))
    for metric in ("accuracy", "ce"):
        z = np.abs(mc.values(metric) - exact.values(metric)) / np.maximum(mc.stderr(metric), 1e-12)
        assert z.max() < 4.5, (metric, z)
    few = compute_values(p, ValuationConfig(permutations=30, **CFG))
    assert np.abs(few.values("ce") - exact.values("ce")).max() > np.abs(mc.values("ce") - exact.values("ce")).max()


def test_beta_method_matches_exact_beta_semivalue():
    p = random_problem(n=7, m=6, seed=2)
    utility = KernelRegressionUtility(p, ValuationConfig(**CFG))
    exact, _ = exact_semivalues(utility, beta_probabilities(7, 4, 1))
    mc = compute_values(p, ValuationConfig(method="beta", beta_alpha=4, beta_beta=1, permutations=2000, **CFG))
    z = np.abs(mc.values("ce") - exact["ce"]) / mc.stderr("ce")
    assert z.max() < 4.5 and mc.method == "beta(4,1)-shapley"


def test_banzhaf_method_matches_exact_banzhaf():
    p = random_problem(n=7, m=6, seed=2)
    utility = KernelRegressionUtility(p, ValuationConfig(**CFG))
    exact, _ = exact_semivalues(utility, banzhaf_probabilities(7))
    direct = np.zeros(7)  # textbook definition: average marginal over all 2^(n-1) subsets without i
    for i in range(7):
        others = [j for j in range(7) if j != i]
        for r in range(7):
            for s in itertools.combinations(others, r):
                direct[i] += utility(list(s) + [i])[1] - utility(list(s))[1]
    np.testing.assert_allclose(exact["ce"], direct / 2**6, atol=1e-12)
    mc = compute_values(p, ValuationConfig(method="banzhaf", permutations=3000, **CFG))
    assert (np.abs(mc.values("ce") - exact["ce"]) / mc.stderr("ce")).max() < 4.5


def test_tmc_values_per_point_mean_equals_aggregate_and_efficiency():
    p = random_problem(n=20, m=9)
    r = compute_values(p, ValuationConfig(permutations=10, per_point=True, **CFG))
    np.testing.assert_allclose(r.point_values("ce").mean(1), r.values("ce"), atol=1e-14)
    full, empty = r.manifest["utility_full"], r.manifest["utility_empty"]
    assert r.values("ce").sum() == pytest.approx(full["ce"] - empty["ce"], abs=1e-10)
    truncated = compute_values(p, ValuationConfig(permutations=10, per_point=True, tolerance=0.2, block_size=3, **CFG))
    np.testing.assert_allclose(truncated.point_values("ce").mean(1), truncated.values("ce"), atol=1e-14)
    assert truncated.truncation_summary()["truncated_permutations"] > 0


def test_same_seed_same_values_other_seed_other_values():
    p = random_problem(n=15, m=5)
    a = compute_values(p, ValuationConfig(permutations=8, seed=3, **CFG))
    b = compute_values(p, ValuationConfig(permutations=8, seed=3, **CFG))
    c = compute_values(p, ValuationConfig(permutations=8, seed=4, **CFG))
    np.testing.assert_array_equal(a.sums["ce"], b.sums["ce"])
    assert not np.array_equal(a.sums["ce"], c.sums["ce"])


def test_merge_of_parts_equals_one_longer_run():
    p = random_problem(n=15, m=5)
    whole = compute_values(p, ValuationConfig(permutations=12, per_point=True, **CFG))
    first = compute_values(p, ValuationConfig(permutations=5, per_point=True, **CFG))
    second = compute_values(p, ValuationConfig(permutations=7, start=5, per_point=True, **CFG))
    merged = first + second
    assert merged.count == 12 and len(merged.evaluated) == 12
    for metric in ("accuracy", "ce"):
        np.testing.assert_allclose(merged.values(metric), whole.values(metric), rtol=1e-12, atol=1e-15)
        np.testing.assert_allclose(merged.stderr(metric), whole.stderr(metric), rtol=1e-9, atol=1e-15)
        np.testing.assert_allclose(merged.point_values(metric), whole.point_values(metric), atol=1e-15)
    with pytest.raises(InputError, match="counted twice|count them twice"):
        first + whole
    other_seed = compute_values(p, ValuationConfig(permutations=5, seed=9, per_point=True, **CFG))
    both = first + other_seed
    np.testing.assert_allclose(both.values("ce"), (first.sums["ce"] + other_seed.sums["ce"]) / 10)
    with pytest.raises(InputError, match="different ridge"):
        first + compute_values(p, ValuationConfig(permutations=5, seed=7, per_point=True, ridge="0.3"))


def test_save_load_roundtrip(tmp_path):
    p = random_problem(n=10, m=4, train_ids=np.array([f"id{i}" for i in range(10)]))
    r = compute_values(p, ValuationConfig(permutations=6, per_point=True, **CFG))
    r.save(tmp_path / "r.npz")
    back = ValuationResult.load(tmp_path / "r.npz")
    assert back.count == 6 and back.method == r.method and back.sources == r.sources
    np.testing.assert_array_equal(back.point_values("ce"), r.point_values("ce"))
    assert back.manifest["config"] == r.manifest["config"]
    assert back.to_dataframe().equals(r.to_dataframe())
    assert list(back.to_dataframe()["example_id"][:2]) == ["id0", "id1"]
    with np.load(tmp_path / "r.npz", allow_pickle=False) as data:  # loadable without pickle
        assert "manifest" in data.files
    (tmp_path / "bad.npz").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="not a freeshap-dq result"):
        ValuationResult.load(tmp_path / "bad.npz")


def test_dataframe_columns_and_rank():
    p = random_problem(n=10, m=4)
    df = compute_values(p, ValuationConfig(permutations=5, **CFG)).to_dataframe()
    assert list(df.columns) == ["train_index", "value", "value_ce", "stderr", "stderr_ce", "rank", "permutations"]
    assert df.loc[df["value_ce"].idxmin(), "rank"] == 1
    assert sorted(df["rank"]) == list(range(1, 11))


def test_resume_from_checkpoint_is_bit_identical(tmp_path):
    p = random_problem(n=18, m=6)
    cfg = ValuationConfig(permutations=20, per_point=True, checkpoint_every=3, tolerance=0.05, block_size=4,
                          reduce_every=3, **CFG)
    straight = compute_values(p, cfg)
    # first session stops after 7 permutations (as if killed), second resumes to 20
    compute_values(p, cfg, stopping=MaxPermutations(7), checkpoint_dir=tmp_path)
    completed, open_group = ValuationResult.load(tmp_path / "checkpoint.npz"), load_partial(tmp_path / "checkpoint.npz")
    assert completed.count == 6 and open_group["count"] == 1  # groups of 3: two closed, one open
    resumed = compute_values(p, cfg, checkpoint_dir=tmp_path)
    assert resumed.count == 20
    for metric in ("accuracy", "ce"):
        np.testing.assert_array_equal(resumed.sums[metric], straight.sums[metric])
        np.testing.assert_array_equal(resumed.sq_sums[metric], straight.sq_sums[metric])
        np.testing.assert_array_equal(resumed.point_sums[metric], straight.point_sums[metric])
    np.testing.assert_array_equal(resumed.evaluated, straight.evaluated)


def test_checkpoint_refuses_other_settings_or_kernel(tmp_path):
    p = random_problem(n=10, m=4)
    compute_values(p, ValuationConfig(permutations=3, **CFG), checkpoint_dir=tmp_path)
    with pytest.raises(CheckpointError, match="ridge: '0.05' -> '0.5'"):
        compute_values(p, ValuationConfig(permutations=3, ridge="0.5"), checkpoint_dir=tmp_path)
    with pytest.raises(CheckpointError, match="different kernel"):
        compute_values(random_problem(n=10, m=4, seed=5), ValuationConfig(permutations=3, **CFG),
                       checkpoint_dir=tmp_path)
    fresh = compute_values(p, ValuationConfig(permutations=3, ridge="0.5"), checkpoint_dir=tmp_path, resume=False)
    assert fresh.count == 3


def test_stopping_criteria_compose():
    p = random_problem(n=12, m=5)
    cfg = ValuationConfig(**CFG)
    r = compute_values(p, cfg, stopping=MaxPermutations(4) | MaxPermutations(9))
    assert r.count == 4
    r = compute_values(p, cfg, stopping=MaxPermutations(4) & MaxPermutations(9))
    assert r.count == 9
    r = compute_values(p, cfg, stopping=StandardErrorBelow(1e-3, metric="ce", min_count=5) | MaxPermutations(5000))
    assert 5 <= r.count < 5000 and r.stderr("ce").max() <= 1e-3
    r = compute_values(p, cfg, stopping=TopKStable(k=3, patience=5) | MaxPermutations(500))
    assert r.count < 500
    r = compute_values(p, cfg, stopping=(SignStable(patience=5) & MaxPermutations(10)) | MaxPermutations(500))
    assert 10 <= r.count < 500
    r = compute_values(p, cfg, stopping=MaxTime(0.2) | MaxPermutations(10**6))
    assert 0 < r.count < 10**6


def test_a_stopping_rule_that_may_never_fire_is_refused_before_any_work():
    p = random_problem(n=12, m=5)
    cfg = ValuationConfig(**CFG)
    for unbounded in (StandardErrorBelow(1e-12), TopKStable(k=3) & MaxPermutations(10),
                      SignStable() | StandardErrorBelow(1e-9)):
        with pytest.raises(InputError, match="may never fire.*MaxPermutations"):
            compute_values(p, cfg, stopping=unbounded)
    assert compute_values(p, cfg, stopping=StandardErrorBelow(1e-12) | (MaxTime(0.01) & MaxPermutations(6))).count >= 6


def test_time_and_stderr_limits_from_config():
    p = random_problem(n=12, m=5)
    r = compute_values(p, ValuationConfig(permutations=10**6, max_seconds=0.2, **CFG))
    assert 0 < r.count < 10**6
    r = compute_values(p, ValuationConfig(permutations=10**6, stderr_target=2e-3, **CFG))
    assert r.stderr("ce").max() <= 2e-3


@pytest.mark.parametrize("kwargs, message", [
    ({"method": "magic"}, "method 'magic'"), ({"permutations": 0}, "permutations"), ({"tolerance": 1.5}, "tolerance"),
    ({"ridge": "-3"}, "ridge"), ({"empty_utility": "x"}, "empty_utility"), ({"beta_alpha": 0}, "beta"),
])
def test_config_validation(kwargs, message):
    with pytest.raises(InputError, match=message):
        ValuationConfig(**kwargs)


@pytest.mark.parametrize("tolerance", [0.0, 0.05])
def test_semivalues_of_one_run_equal_their_own_runs_bit_for_bit(problem, tolerance):
    from dataclasses import replace

    from freeshap_dq.valuation.run import compute_semivalues

    config = ValuationConfig(permutations=23, batch_size=5, seed=3, tolerance=tolerance)
    shared = compute_semivalues(problem, config, ("tmc", "beta", "banzhaf"), progress=False)
    for method, result in shared.items():
        alone = compute_values(problem, replace(config, method=method), progress=False)
        assert result.method == alone.method and result.count == alone.count == 23
        for metric in ("accuracy", "ce"):
            np.testing.assert_array_equal(result.values(metric), alone.values(metric))
            np.testing.assert_array_equal(result.stderr(metric), alone.stderr(metric))
        assert {k: v for k, v in result.manifest.items() if k != "elapsed_seconds"} == \
            {k: v for k, v in alone.manifest.items() if k != "elapsed_seconds"}
    assert not np.array_equal(shared["tmc"].values("ce"), shared["beta"].values("ce"))


def test_semivalues_refuse_what_a_shared_run_cannot_do(problem):
    from freeshap_dq.valuation.run import compute_semivalues

    with pytest.raises(InputError, match="permutation methods only"):
        compute_semivalues(problem, ValuationConfig(), ("tmc", "loo"))
    with pytest.raises(InputError, match="plain runs"):
        compute_semivalues(problem, ValuationConfig(per_point=True), ("tmc", "beta"))
