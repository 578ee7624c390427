import numpy as np
import pytest

from freeshap_dq.evaluation.metrics import (
    auprc,
    auroc,
    detection_curve,
    detection_metrics,
    f1,
    fnr_at_noise_rate,
    recall_at,
    two_means_split,
)

SUSPICION = np.array([0.9, 0.8, 0.1, 0.7, 0.2])
WRONG = np.array([True, False, False, True, False])


def test_hand_computed_case():
    assert auroc(SUSPICION, WRONG) == pytest.approx(5 / 6)  # 0.9 beats 3 clean, 0.7 beats 2 of 3
    assert auprc(SUSPICION, WRONG) == pytest.approx((1 + 2 / 3) / 2)  # hits at ranks 1 and 3
    assert recall_at(SUSPICION, WRONG, 0.2) == 0.5 and recall_at(SUSPICION, WRONG, 0.6) == 1.0
    assert fnr_at_noise_rate(SUSPICION, WRONG) == 0.5  # inspect 2: one of the two wrong labels missed
    assert list(two_means_split(SUSPICION)) == [True, True, False, True, False]
    assert f1(two_means_split(SUSPICION), WRONG) == pytest.approx(0.8)  # precision 2/3, recall 1


def test_perfect_reversed_and_tied_rankings():
    wrong = np.array([True, True, False, False, False, False])
    perfect = np.array([6.0, 5, 4, 3, 2, 1])
    assert auroc(perfect, wrong) == 1.0 and auprc(perfect, wrong) == 1.0 and fnr_at_noise_rate(perfect, wrong) == 0
    assert auroc(-perfect, wrong) == 0.0
    assert auroc(np.ones(6), wrong) == 0.5
    metrics = detection_metrics(perfect, wrong)
    assert metrics["recall@20%"] == 1.0 and metrics["f1_2means"] <= 1.0 and set(metrics) >= {"auroc", "fnr@noise"}


def test_detection_curve_ends_at_full_recall():
    x, y = detection_curve(SUSPICION, WRONG)
    assert x[0] == 0 and x[-1] == 1 and y[-1] == 1 and list(y[:2]) == [0, 0.5] and np.all(np.diff(y) >= 0)
