import numpy as np
import pandas as pd
import pytest

from freeshap_dq import InputError, ValuationConfig, compute_values
from freeshap_dq.curation.policies import RemovalPolicy, SelectionPolicy
from freeshap_dq.scores import (
    DEFAULT_Z,
    confidently_harmful,
    confidently_helpful,
    harm_order,
    harm_rank,
    metric_columns,
    value_to_score,
    worth_order,
)


def test_harm_rank_breaks_ties_by_training_index():
    values = np.array([0.0, -1.0, 0.0, -1.0, 2.0])
    assert harm_rank(values).tolist() == [3, 1, 4, 2, 5]
    assert harm_order(values).tolist() == [1, 3, 0, 2, 4]
    assert worth_order(values).tolist() == [4, 0, 2, 1, 3]
    # rows given in another order keep the ranks of their training index
    shuffled = np.array([3, 0, 4, 1, 2])
    assert harm_rank(values[shuffled], training_index=shuffled).tolist() == harm_rank(values)[shuffled].tolist()


def test_confident_rules_treat_a_missing_stderr_as_never_confident():
    values = np.array([-1.0, -1.0, -1.0, 1.0, 1.0])
    stderr = np.array([0.1, 1.0, np.nan, 0.1, np.nan])
    assert confidently_harmful(values, stderr).tolist() == [True, False, False, False, False]
    assert confidently_helpful(values, stderr).tolist() == [False, False, False, True, False]
    assert confidently_harmful(values, stderr, z=0.5).tolist() == [True, True, False, False, False]
    assert DEFAULT_Z == 1.96


def test_metric_columns_and_score():
    assert metric_columns("ce") == ("value_ce", "stderr_ce")
    assert metric_columns("accuracy") == ("value", "stderr")
    with pytest.raises(InputError, match="unknown"):
        metric_columns("f1")
    scores, scale = value_to_score(np.array([-2.0, 0.0, 1.0, 3.0]))
    assert scale == 2.0 and scores[1] == 0.5 and np.all(np.diff(scores) > 0) and np.all((scores > 0) & (scores < 1))


def test_every_table_ranks_tied_values_as_values_csv(problem):
    """values.csv, the policies and the Label Studio review fields agree on rank 1..n, ties included."""
    result = compute_values(problem, ValuationConfig(permutations=1, rank_metric="accuracy"))
    df = result.to_dataframe()
    assert df["value"].duplicated().any(), "the fixture should produce tied accuracy values"
    # ids whose string order differs from the training index
    df["example_id"] = [f"id-{(7 * i) % len(df):03d}" for i in range(len(df))]
    df["label"] = problem.y_train
    shuffled = df.sample(frac=1.0, random_state=3).reset_index(drop=True)
    removal = RemovalPolicy(count=len(df) - 1, metric="accuracy", allow_empty_class=True).apply(shuffled)
    assert removal.set_index("train_index")["policy_rank"].sort_index().tolist() == df["rank"].tolist()
    selection = SelectionPolicy(count=3, metric="accuracy").apply(shuffled)
    assert selection["train_index"].tolist()[:3] == worth_order(df["value"].to_numpy()).tolist()[:3]

    labelstudio = pytest.importorskip("freeshap_dq.integrations.labelstudio")
    table = shuffled.assign(text=["t"] * len(df), label=shuffled["label"].astype(str))
    review = labelstudio.review_table(table, metric="accuracy")
    ranks = pd.Series(review["freeshap_rank"].to_numpy(), index=review["example_id"])
    assert ranks.loc[df["example_id"]].tolist() == df["rank"].tolist()
