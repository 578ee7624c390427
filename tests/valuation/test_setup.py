"""The set-up refuses what cannot run before any kernel is read or any utility is built."""

import dataclasses

import numpy as np
import pytest
from problems import random_problem

from freeshap_dq import InputError, KernelProblem, ValuationConfig, compute_values
from freeshap_dq.config import METHODS, VALUE_FIELDS, field_choices
from freeshap_dq.kernels.landmarks import LandmarkKernel
from freeshap_dq.kernels.nystrom import nystrom_landmarks
from freeshap_dq.valuation import feature_utility, utility
from freeshap_dq.valuation.checkpoint import RESUME_KEYS
from freeshap_dq.valuation.methods import PERMUTATION_METHODS, REGISTRY, method_name
from freeshap_dq.valuation.setup import plan


@pytest.fixture
def no_utility(monkeypatch):
    """Building any utility (the step that reads the kernel) fails the test."""
    def refuse(self, *args, **kwargs):
        raise AssertionError("a utility was built before the refusal")

    monkeypatch.setattr(utility.KernelRegressionUtility, "__init__", refuse)
    monkeypatch.setattr(feature_utility.FeatureSpaceUtility, "__init__", refuse)


def per_class(problem: KernelProblem) -> KernelProblem:
    c = problem.n_classes
    return KernelProblem(np.stack([problem.k_train] * c), np.stack([problem.k_test] * c), problem.y_train,
                         problem.y_test)


def test_refusals_come_before_the_kernel_is_touched(no_utility):
    problem = random_problem()
    with pytest.raises(InputError, match="--low-rank approximates one kernel"):
        compute_values(per_class(problem), ValuationConfig(permutations=2, low_rank=4))
    with pytest.raises(InputError, match="exact enumeration needs 2\\^n"):
        compute_values(random_problem(n=20), ValuationConfig(method="exact"))
    landmarks = LandmarkKernel.from_problem(problem, nystrom_landmarks(problem.n_train, 4, 0))
    with pytest.raises(InputError, match="needs the whole kernel"):
        compute_values(landmarks, ValuationConfig(method="loo"))
    with pytest.raises(InputError, match="valued with the Nystrom kernel of exactly those"):
        compute_values(landmarks, ValuationConfig(low_rank=3))


def test_plan_fits_a_landmark_kernel_and_leaves_a_whole_kernel_alone():
    problem = random_problem()
    config = ValuationConfig(permutations=3)
    assert plan(problem, config) == config
    landmarks = LandmarkKernel.from_problem(problem, nystrom_landmarks(problem.n_train, 4, 0))
    fitted = plan(landmarks, config)
    assert (fitted.low_rank, fitted.low_rank_method) == (4, "nystrom")
    assert landmarks.landmark_rank == 4 and problem.landmark_rank is None


def test_the_registry_and_derived_lists_follow_the_declarations():
    assert set(REGISTRY) == set(METHODS)
    assert set(PERMUTATION_METHODS) == {"tmc", "beta", "banzhaf"}
    assert method_name(ValuationConfig(method="beta", beta_alpha=4, beta_beta=2)) == "beta(4,2)-shapley"
    assert RESUME_KEYS == VALUE_FIELDS
    declared = {f.name for f in dataclasses.fields(ValuationConfig) if f.metadata["changes_values"]}
    assert set(VALUE_FIELDS) == declared and "permutations" not in declared and "seed" in declared
    assert field_choices(ValuationConfig)["method"] == METHODS
    with pytest.raises(InputError, match="low_rank_method 'svd' is unknown; choose one of nystrom, eigen"):
        ValuationConfig(low_rank_method="svd")


def test_a_field_declared_as_not_changing_values_does_not_change_them():
    """Every ValuationConfig field outside VALUE_FIELDS (how long, how fast, where) leaves the values alone."""
    problem = random_problem()
    base = ValuationConfig(permutations=6, reduce_every=3)
    reference = compute_values(problem, base)
    changed = {"permutations": None, "rank_metric": "accuracy", "device": "cpu", "batch_size": 4,
               "max_seconds": 600.0, "stderr_target": 1e-9, "checkpoint_every": 1}
    free = {f.name for f in dataclasses.fields(ValuationConfig)} - set(VALUE_FIELDS)
    assert free == set(changed), "a new field needs a line here: does it change values?"
    for name, value in changed.items():
        if value is None:
            continue
        other = compute_values(problem, dataclasses.replace(base, **{name: value}))
        for metric in ("accuracy", "ce"):
            np.testing.assert_array_equal(other.values(metric), reference.values(metric), err_msg=name)
