import numpy as np
import pytest

from freeshap_dq.errors import InputError
from freeshap_dq.evaluation.noise import flip_labels


def test_symmetric_rate_seeding_and_targets():
    y = np.arange(1000) % 4
    noisy, flipped = flip_labels(y, 4, 0.1, seed=7)
    assert flipped.sum() == 100 and np.all(noisy[flipped] != y[flipped]) and np.all(noisy[~flipped] == y[~flipped])
    again, flipped_again = flip_labels(y, 4, 0.1, seed=7)
    assert np.array_equal(again, noisy) and np.array_equal(flipped_again, flipped)
    other, _ = flip_labels(y, 4, 0.1, seed=8)
    assert not np.array_equal(other, noisy)
    shifts = (noisy[flipped] - y[flipped]) % 4
    assert set(shifts) == {1, 2, 3}  # uniform over the other classes


def test_class_conditional_flips_only_the_first_half_of_classes_forward():
    y = np.arange(300) % 3
    noisy, flipped = flip_labels(y, 3, 0.2, seed=0, mode="class-conditional")
    assert flipped.sum() == 60 and set(y[flipped]) <= {0, 1}
    assert np.all(noisy[flipped] == (y[flipped] + 1) % 3)
    binary = np.array([0] * 10 + [1] * 90)
    _, capped = flip_labels(binary, 2, 0.3, seed=0, mode="class-conditional")
    assert capped.sum() == 10  # no more than the source class holds


def test_bad_arguments():
    with pytest.raises(InputError, match="noise mode"):
        flip_labels(np.zeros(4, int), 2, 0.1, 0, mode="pairwise")
    with pytest.raises(InputError, match=r"\[0, 1\)"):
        flip_labels(np.zeros(4, int), 2, 1.0, 0)
