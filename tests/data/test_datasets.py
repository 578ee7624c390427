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
