import dataclasses

import numpy as np
import pytest

from freeshap_dq import ValuationConfig
from freeshap_dq.data.synthetic import noisy_problem
from freeshap_dq.evaluation.detectors import (
    calibrated_self_confidence,
    combine,
    cv_kernel_probabilities,
    normalised_rank,
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


def test_per_class_kernels_are_read_class_by_class(noisy):
    """With one kernel per class (--kernel-mode per-class) class c's leave-one-out and cross-validated scores come from
    kernel c: the same direct solves as above, one kernel per column."""
    problem = noisy.problem
    k = problem.k_train
    stack = np.stack([k, k + 0.5 * np.outer(np.diag(k), np.diag(k)) / np.diag(k).mean()])
    k_test = np.stack([problem.k_test, problem.k_test * 1.5])
    per_class = dataclasses.replace(problem, k_train=stack, k_test=k_test)
    run = run_detectors(per_class, ValuationConfig(permutations=20, ridge="1.0"), beta=False)
    y, targets = problem.y_train, one_hot(problem.y_train, 2)
    for i in (3, 50):
        rest = np.delete(np.arange(problem.n_train), i)
        scores = np.array([stack[c][i, rest] @ np.linalg.solve(stack[c][np.ix_(rest, rest)] + np.eye(len(rest)),
                                                              targets[rest, c]) for c in range(2)])
        scores = np.clip(scores, 1e-6, None)
        assert -run.suspicion["self_confidence"][i] == pytest.approx(scores[y[i]] / scores.sum(), rel=1e-8)
    one_kernel = run_detectors(dataclasses.replace(problem, k_train=stack[0], k_test=k_test[0]),
                               ValuationConfig(permutations=20, ridge="1.0"), beta=False)
    assert not np.allclose(run.suspicion["freeshap_ce"], one_kernel.suspicion["freeshap_ce"])


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


def test_label_asymmetry_p_value_is_bowkers_test():
    from scipy.stats import chi2

    from freeshap_dq.evaluation.detectors import label_asymmetry_p_value

    # two classes: McNemar's test on the 12 (given 0, predicted 1) against the 4 (given 1, predicted 0)
    given = np.repeat([0, 0, 1, 1], [50, 12, 4, 50])
    predicted = np.repeat([0, 1, 0, 1], [50, 12, 4, 50])
    assert np.isclose(label_asymmetry_p_value(given, predicted, 2), chi2.sf((12 - 4) ** 2 / 16, 1), rtol=1e-10)
    # three classes: the pairs (0, 1) and (1, 2) disagree, (0, 2) never does and adds no degree of freedom
    table = np.array([[40, 9, 0], [1, 40, 7], [0, 7, 40]])
    given = np.repeat(np.repeat(np.arange(3), 3), table.ravel())
    predicted = np.repeat(np.tile(np.arange(3), 3), table.ravel())
    expected = chi2.sf((9 - 1) ** 2 / 10 + 0.0, 2)
    assert np.isclose(label_asymmetry_p_value(given, predicted, 3), expected, rtol=1e-10)
    assert label_asymmetry_p_value(given, given, 3) == 1.0
    assert label_asymmetry_p_value(np.array([0, 1, 1, 0]), np.array([1, 0, 1, 0]), 2) == pytest.approx(1.0)


def test_combined_falls_back_to_freeshap_when_the_labels_look_shifted():
    from freeshap_dq.evaluation.detectors import combined_suspicion, normalised_rank

    rng = np.random.default_rng(0)
    freeshap, calibrated = rng.random(400), rng.random(400)
    balanced, shifted = np.repeat([0, 1], 200), np.repeat([0, 1], [140, 260])
    test = np.repeat([0, 1], 100)
    np.testing.assert_allclose(combined_suspicion(freeshap, calibrated, balanced, test, balanced, 2),
                               combine(freeshap, calibrated))
    np.testing.assert_allclose(combined_suspicion(freeshap, calibrated, shifted, test, shifted, 2),
                               normalised_rank(freeshap))


def test_combined_falls_back_to_freeshap_when_the_disagreements_are_one_directional():
    """Flips c -> c + 1 around a cycle of 3 classes leave the class shares level (the shift test cannot see them);
    the disagreements with the predictions run one way only."""
    from freeshap_dq.evaluation.detectors import (
        combined_suspicion,
        label_asymmetry_p_value,
        label_shift_p_value,
        normalised_rank,
    )

    rng = np.random.default_rng(1)
    freeshap, calibrated = rng.random(600), rng.random(600)
    truth = np.repeat([0, 1, 2], 200)
    cycled = truth.copy()
    flip = rng.choice(600, 60, replace=False)
    cycled[flip] = (truth[flip] + 1) % 3
    both_ways = truth.copy()
    both_ways[flip] = (truth[flip] + rng.integers(1, 3, 60)) % 3
    test = np.repeat([0, 1, 2], 100)
    assert label_shift_p_value(cycled, test, 3) > 0.5
    assert label_asymmetry_p_value(cycled, truth, 3) < 1e-6 < label_asymmetry_p_value(both_ways, truth, 3)
    np.testing.assert_allclose(combined_suspicion(freeshap, calibrated, cycled, test, truth, 3),
                               normalised_rank(freeshap))
    np.testing.assert_allclose(combined_suspicion(freeshap, calibrated, both_ways, test, truth, 3),
                               combine(freeshap, calibrated))


@pytest.mark.parametrize("mode", ["symmetric", "class-conditional"])
def test_run_detectors_tests_the_kernels_own_predictions(mode):
    """``combined`` reads the closed-form leave-one-out predictions: FreeShap alone exactly when the disagreements
    between the given labels and those predictions are one-directional."""
    from freeshap_dq.evaluation.detectors import ASYMMETRY_P, label_asymmetry_p_value, one_directional
    from freeshap_dq.evaluation.noise import flip_labels

    clean = noisy_problem(n_train=400, n_test=100, noise=0.0, seed=0).problem
    y, _ = flip_labels(clean.y_train, 2, 0.2, seed=0, mode=mode)
    problem = dataclasses.replace(clean, y_train=y)
    run = run_detectors(problem, ValuationConfig(permutations=10, ridge="rel:10"), beta=False)
    predicted = run.loo_prediction
    np.testing.assert_array_equal(predicted, run.loo_probs.argmax(1))
    assert (label_asymmetry_p_value(y, predicted, 2) < ASYMMETRY_P) == (mode == "class-conditional")
    fallback = one_directional(y, problem.y_test, predicted, 2)
    assert fallback == (mode == "class-conditional")
    expected = (normalised_rank(run.suspicion["freeshap_ce"]) if fallback else
                combine(run.suspicion["freeshap_ce"], run.suspicion["self_confidence_calibrated"]))
    np.testing.assert_allclose(run.suspicion["combined"], expected)
