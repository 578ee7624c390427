import dataclasses

import numpy as np
import pytest

from freeshap_dq import ValuationConfig
from freeshap_dq.data.synthetic import noisy_problem
from freeshap_dq.evaluation.detectors import (
    calibrated_self_confidence,
    combine,
    cv_kernel_probabilities,
    run_detectors,
)
from freeshap_dq.evaluation.metrics import auroc


@pytest.fixture(scope="module")
def noisy():
    return noisy_problem(n_train=120, n_test=60, noise=0.15, seed=2)


def one_hot(y, c):
    return np.eye(c)[y]


def test_self_confidence_and_cv_match_direct_solves(noisy):
    problem = noisy.problem
    run = run_detectors(problem, ValuationConfig(permutations=40, ridge="1.0"), beta=False)
    k, y, targets = problem.k_train, problem.y_train, one_hot(problem.y_train, 2)
    for i in (0, 17, 99):  # refit without i, predict i
        rest = np.delete(np.arange(problem.n_train), i)
        coef = np.linalg.solve(k[np.ix_(rest, rest)] + np.eye(len(rest)), targets[rest])
        scores = np.clip(k[i, rest] @ coef, 1e-6, None)
        assert -run.suspicion["self_confidence"][i] == pytest.approx(scores[y[i]] / scores.sum(), rel=1e-8)
    probs = cv_kernel_probabilities(problem, 1.0, folds=4, seed=3)
    fold = np.random.default_rng(3).permutation(problem.n_train) % 4
    held, fit = np.flatnonzero(fold == 0), np.flatnonzero(fold != 0)
    coef = np.linalg.solve(k[np.ix_(fit, fit)] + np.eye(len(fit)), targets[fit])
    direct = np.clip(k[np.ix_(held, fit)] @ coef, 1e-6, None)
    assert np.allclose(probs[held], direct / direct.sum(1, keepdims=True), rtol=1e-8)


def test_detectors_find_the_flips_and_random_does_not(noisy):
    run = run_detectors(noisy.problem, ValuationConfig(permutations=60), seed=1)
    scores = {name: auroc(s, noisy.flipped) for name, s in run.suspicion.items()}
    assert set(scores) == {"freeshap_ce", "freeshap_accuracy", "beta_shapley", "loo", "self_confidence", "cv_kernel",
                           "self_confidence_calibrated", "combined", "random"}
    for name in ("freeshap_ce", "self_confidence", "self_confidence_calibrated", "combined", "beta_shapley"):
        assert scores[name] > 0.75, (name, scores)
    assert abs(scores["random"] - 0.5) < 0.2


def test_calibrated_self_confidence_subtracts_the_class_mean():
    probs = np.array([[0.9, 0.1], [0.7, 0.3], [0.2, 0.8], [0.4, 0.6]])
    y = np.array([0, 0, 1, 0])
    # class 0 threshold: mean(0.9, 0.7, 0.4) = 2/3; class 1: 0.8
    assert np.allclose(calibrated_self_confidence(probs, y), [0.9 - 2 / 3, 0.7 - 2 / 3, 0.0, 0.4 - 2 / 3])


def test_calibration_rescues_self_confidence_under_class_conditional_noise():
    from freeshap_dq.evaluation.noise import flip_labels

    clean = noisy_problem(n_train=300, n_test=60, noise=0.0, seed=5).problem
    y, flipped = flip_labels(clean.y_train, 2, 0.15, seed=0, mode="class-conditional")
    run = run_detectors(dataclasses.replace(clean, y_train=y), ValuationConfig(permutations=10, ridge="rel:10"),
                        beta=False)
    raw, calibrated = (auroc(run.suspicion[k], flipped) for k in ("self_confidence", "self_confidence_calibrated"))
    assert calibrated > raw + 0.02, (raw, calibrated)


def test_combine_averages_normalised_ranks():
    assert np.allclose(combine(np.array([1.0, 2, 3]), np.array([3.0, 2, 1])), [0.5, 0.5, 0.5])
    assert np.allclose(combine(np.array([10.0, 20, 30])), [0, 0.5, 1])


def test_beta_uses_the_same_permutations(noisy):
    config = ValuationConfig(permutations=20, seed=4)
    run = run_detectors(noisy.problem, config)
    assert run.results["beta_shapley"].sources == run.results["freeshap"].sources
    assert dataclasses.replace(config).seed == 4


def test_label_shift_p_value_matches_the_chi_square_test():
    from scipy.stats import chi2_contingency

    from freeshap_dq.evaluation.detectors import label_shift_p_value

    y_train = np.repeat([0, 1, 2], [120, 150, 180])
    y_test = np.repeat([0, 1, 2], [100, 100, 100])
    expected = chi2_contingency(np.stack([np.bincount(y_train), np.bincount(y_test)]), correction=False).pvalue
    assert np.isclose(label_shift_p_value(y_train, y_test, 3), expected, rtol=1e-10)
    assert label_shift_p_value(np.repeat([0, 1], 50), np.repeat([0, 1], 20), 2) == pytest.approx(1.0)
    assert label_shift_p_value(np.zeros(10, int), np.zeros(5, int), 2) == 1.0


def test_combined_falls_back_to_freeshap_when_the_labels_look_shifted():
    from freeshap_dq.evaluation.detectors import combined_suspicion, normalised_rank

    rng = np.random.default_rng(0)
    freeshap, calibrated = rng.random(400), rng.random(400)
    balanced, shifted = np.repeat([0, 1], 200), np.repeat([0, 1], [140, 260])
    test = np.repeat([0, 1], 100)
    np.testing.assert_allclose(combined_suspicion(freeshap, calibrated, balanced, test, 2),
                               combine(freeshap, calibrated))
    np.testing.assert_allclose(combined_suspicion(freeshap, calibrated, shifted, test, 2), normalised_rank(freeshap))
