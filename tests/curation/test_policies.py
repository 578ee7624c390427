import numpy as np
import pandas as pd
import pytest

from freeshap_dq import InputError
from freeshap_dq.curation.policies import RemovalPolicy, SelectionPolicy


@pytest.fixture
def table():
    # 10 examples: class a holds the 4 most harmful; stderr makes only some confidently harmful
    return pd.DataFrame({
        "example_id": [f"e{i}" for i in range(10)],
        "label": ["a", "a", "a", "a", "b", "b", "b", "b", "b", "b"],
        "value_ce": [-0.9, -0.8, -0.7, -0.6, -0.5, 0.1, 0.2, 0.3, 0.4, 0.5],
        "stderr_ce": [0.1, 0.5, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1],
        "value": np.linspace(-1, 1, 10), "stderr": 0.1,
    })


def removed(result):
    return sorted(result.loc[result["removed"], "example_id"])


def test_bottom_fraction_and_count(table):
    assert removed(RemovalPolicy(fraction=0.3).apply(table)) == ["e0", "e1", "e2"]
    assert removed(RemovalPolicy(count=2).apply(table)) == ["e0", "e1"]
    assert removed(RemovalPolicy(threshold=-0.65).apply(table)) == ["e0", "e1", "e2"]


def test_confidence_rule_skips_uncertain_harm(table):
    result = RemovalPolicy(confident=True, z=2).apply(table)
    assert removed(result) == ["e0", "e2", "e3", "e4"]  # e1: -0.8 + 2 * 0.5 > 0
    assert "< 0" in result.set_index("example_id").loc["e0", "reason"]


def test_per_class_cap_protects_a_class(table):
    result = RemovalPolicy(count=5, max_class_fraction=0.5).apply(table)
    assert removed(result) == ["e0", "e1", "e4", "e5", "e6"]
    reasons = result.set_index("example_id")["reason"]
    assert "at its cap (2 of 4)" in reasons["e2"]


def test_accuracy_metric_ranks_by_value(table):
    assert removed(RemovalPolicy(count=1, metric="accuracy").apply(table)) == ["e0"]


def test_selection_top_quota_and_budget(table):
    sel = lambda r: sorted(r.loc[r["selected"], "example_id"])  # noqa: E731
    assert sel(SelectionPolicy(count=3).apply(table)) == ["e7", "e8", "e9"]
    assert sel(SelectionPolicy(fraction=0.2).apply(table)) == ["e8", "e9"]
    assert sel(SelectionPolicy(per_class=1).apply(table)) == ["e3", "e9"]
    cost = pd.Series([1, 1, 1, 1, 1, 1, 1, 5, 1, 3], index=table.index)
    result = SelectionPolicy(budget=5).apply(table, cost=cost)
    assert sel(result) == ["e6", "e8", "e9"]  # e7 (cost 5) does not fit after e9 and e8; e6 does
    assert "exceeds the remaining budget" in result.set_index("example_id").loc["e7", "reason"]


@pytest.mark.parametrize("kwargs, message", [({}, "say what to remove"), ({"fraction": 1.5}, "--fraction"),
                                             ({"count": 0}, "--count"), ({"count": 1, "metric": "f1"}, "metric")])
def test_removal_validation(kwargs, message):
    with pytest.raises(InputError, match=message):
        RemovalPolicy(**kwargs)


def test_missing_columns_are_reported(table):
    with pytest.raises(InputError, match="lacks column"):
        RemovalPolicy(count=1).apply(table.drop(columns=["label"]))


def test_one_rounding_rule_for_fractions():
    from freeshap_dq.curation.policies import count_of_fraction

    # floor / ceil of float products were off by one: 0.29 * 100 = 28.999..., 0.07 * 100 = 7.000...1
    assert count_of_fraction(0.29, 100) == 29 and count_of_fraction(0.07, 100) == 7
    assert count_of_fraction(0.25, 10) == 3 and count_of_fraction(0.24, 10) == 2 and count_of_fraction(0.04, 10) == 0
    table = pd.DataFrame({"example_id": [f"e{i}" for i in range(100)], "label": ["a", "b"] * 50,
                          "value_ce": np.linspace(-1, 1, 100)})
    assert RemovalPolicy(fraction=0.29).apply(table)["removed"].sum() == 29
    assert SelectionPolicy(fraction=0.07).apply(table)["selected"].sum() == 7


def test_counts_above_n_and_emptied_classes_are_refused(table):
    with pytest.raises(InputError, match="--count 5000 is more than the 10 examples"):
        RemovalPolicy(count=5000).apply(table)
    with pytest.raises(InputError, match="--count 11 is more than the 10 examples"):
        SelectionPolicy(count=11).apply(table)
    with pytest.raises(InputError, match="leave class\\(es\\) 'a' without examples"):
        RemovalPolicy(count=4).apply(table)  # class a holds exactly the 4 most harmful
    assert removed(RemovalPolicy(count=4, allow_empty_class=True).apply(table)) == ["e0", "e1", "e2", "e3"]
    assert removed(RemovalPolicy(count=10, max_class_fraction=0.5).apply(table)) == ["e0", "e1", "e4", "e5", "e6"]
