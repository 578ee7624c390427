from dataclasses import replace

import numpy as np
import pytest

from freeshap_dq.data.synthetic import noisy_problem
from freeshap_dq.evaluation.logreg import tuned_logreg_pred_probs
from freeshap_dq.evaluation.metrics import auroc
from freeshap_dq.evaluation.oracles import ORACLES, oracle_suspicions


@pytest.fixture(scope="module")
def noisy():
    return noisy_problem(n_train=90, n_test=30, n_classes=3, noise=0.2, seed=4)


def test_oracle_kernel_is_the_clean_label_fit_without_the_example(noisy):
    """Refit on every other example's clean label, predict the left-out one: the probability of its given label."""
    problem, clean = noisy.problem, noisy.clean_labels
    oracle = oracle_suspicions(problem, clean, ridge=0.5)["oracle_kernel"]
    k, given = problem.k_train, problem.y_train
    for i in (0, *np.flatnonzero(noisy.flipped)[:3]):
        rest = np.delete(np.arange(problem.n_train), i)
        coef = np.linalg.solve(k[np.ix_(rest, rest)] + 0.5 * np.eye(len(rest)), np.eye(3)[clean[rest]])
        scores = np.clip(k[i, rest] @ coef, 1e-6, None)
        assert -oracle[i] == pytest.approx(scores[given[i]] / scores.sum(), rel=1e-8)


def test_the_oracles_read_the_clean_labels_not_the_given_ones(noisy):
    """Flipping another example's given label moves a self-confidence fitted to the given labels, never the oracle."""
    problem, clean = noisy.problem, noisy.clean_labels
    rng = np.random.default_rng(0)
    features = np.eye(3)[clean] * 2.0 + rng.normal(scale=0.3, size=(problem.n_train, 3))
    probs = tuned_logreg_pred_probs(features, clean, seed=0)
    before = oracle_suspicions(problem, clean, ridge=0.5, clean_logreg_probs=probs)
    assert set(before) == set(ORACLES)
    relabelled = problem.y_train.copy()
    relabelled[5:40] = (relabelled[5:40] + 1) % 3
    after = oracle_suspicions(replace(problem, y_train=relabelled), clean, ridge=0.5, clean_logreg_probs=probs)
    untouched = np.r_[0:5, 40:problem.n_train]
    for name in ORACLES:
        np.testing.assert_allclose(after[name][untouched], before[name][untouched], rtol=1e-12)
        assert not np.allclose(after[name][5:40], before[name][5:40])
    rows = np.arange(problem.n_train)
    np.testing.assert_allclose(before["oracle_logreg"],
                               -tuned_logreg_pred_probs(features, clean, seed=0)[rows, problem.y_train])
    assert auroc(before["oracle_logreg"], noisy.flipped) > 0.95  # the features separate the clean classes


def test_clean_labels_must_match_the_training_set(noisy):
    with pytest.raises(ValueError, match="89 clean labels for 90"):
        oracle_suspicions(noisy.problem, noisy.clean_labels[:-1], ridge=0.5)
