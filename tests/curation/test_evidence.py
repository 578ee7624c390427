import numpy as np
import pytest
from problems import random_problem

from freeshap_dq import ValuationConfig, compute_values
from freeshap_dq.curation.evidence import evidence_table, harm_evidence
from freeshap_dq.data.tables import TextDataset
from freeshap_dq.errors import InputError


def test_evidence_counts_and_orders_the_hurt_validation_examples_as_a_direct_loop():
    rng = np.random.default_rng(0)
    points = rng.normal(size=(6, 9))
    points[2, 3] = points[2, 5] = -5.0  # a tie: the earlier test position first
    evidence = harm_evidence(points, range(6), k=3)
    for i in range(6):
        negative = [(j, points[i, j]) for j in range(9) if points[i, j] < 0]
        expected = sorted(negative, key=lambda jv: (jv[1], jv[0]))[:3]
        assert evidence[i].hurts == len(negative)
        assert [j for j, _ in evidence[i].worst] == [j for j, _ in expected]
    assert [j for j, _ in evidence[2].worst][:2] == [3, 5]
    helps_everywhere = harm_evidence(np.ones((1, 4)), [0])[0]
    assert helps_everywhere.hurts == 0 and helps_everywhere.worst == ()


def test_evidence_table_joins_by_id_and_names_the_validation_texts():
    p = random_problem(n=8, m=5, n_classes=2, train_ids=np.array([f"e{i}" for i in range(8)]),
                       test_ids=np.array([f"t{i}" for i in range(5)]), label_names=("neg", "pos"))
    result = compute_values(p, ValuationConfig(permutations=6, per_point=True))
    train = TextDataset([f"train {i}" for i in range(8)], [p.label_names[y] for y in p.y_train], list(p.train_ids))
    test = TextDataset([f"validation {j}" for j in range(5)], [p.label_names[y] for y in p.y_test], list(p.test_ids))
    table = evidence_table(result, train.reordered(list(range(8))[::-1]), test)
    points = result.point_values("ce")
    assert table["example_id"].tolist() == list(p.train_ids)
    assert table["freeshap_hurts"].tolist() == [int((points[i] < 0).sum()) for i in range(8)]
    i = int(np.argmin(points.min(axis=1)))
    worst = int(np.argmin(points[i]))
    assert points[i, worst] < 0
    assert f"most: “validation {worst}” (label {test.labels[worst]}" in table["freeshap_why"][i]
    with pytest.raises(InputError, match="no per-point values"):
        evidence_table(compute_values(p, ValuationConfig(permutations=3)), train, test)
