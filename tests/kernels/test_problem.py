import numpy as np
import pytest
from problems import random_problem

from freeshap_dq import KernelError, KernelProblem, ValuationConfig
from freeshap_dq.valuation.utility import KernelRegressionUtility


def arrays(p):
    return dict(k_train=p.k_train, k_test=p.k_test, y_train=p.y_train, y_test=p.y_test)


def rebuild(p, **changes):
    return KernelProblem(**{**arrays(p), **changes})


def test_valid_problem_properties(problem):
    assert (problem.n_train, problem.n_test, problem.n_classes) == (12, 6, 3)
    assert problem.fingerprint() == random_problem().fingerprint()
    assert problem.fingerprint() != random_problem(seed=1).fingerprint()


@pytest.mark.parametrize("changes, message", [
    (lambda p: {"k_train": p.k_train[:-1]}, "k_train has shape"),
    (lambda p: {"k_test": p.k_test[:, :-1]}, "k_test has shape"),
    (lambda p: {"k_train": np.where(np.eye(12, dtype=bool), np.nan, p.k_train)}, "non-finite"),
    (lambda p: {"k_train": p.k_train + np.triu(np.ones((12, 12)), 1) * 0.1}, "not symmetric"),
    (lambda p: {"y_train": np.r_[p.y_train[:-1], 7], "label_names": ("a", "b", "c")}, "y_train[11] = 7"),
    (lambda p: {"y_test": np.r_[p.y_test[:-1], 3]}, "y_test[5] = 3 is a class that never occurs"),
    (lambda p: {"y_test": np.r_[-1, p.y_test[1:]]}, "y_test[0] = -1"),
    (lambda p: {"y_train": np.zeros(12, dtype=int)}, "single class"),
    (lambda p: {"y_train": p.y_train + 0.5}, "integer class ids"),
    (lambda p: {"y_test": np.zeros(0, dtype=int), "k_test": np.zeros((0, 12))}, "test set is empty"),
    (lambda p: {"y_train": np.zeros(0, dtype=int), "k_train": np.zeros((0, 0)), "k_test": np.zeros((6, 0))},
     "training set is empty"),
    (lambda p: {"k_train": p.k_train - 2 * np.eye(12)}, "negative diagonal"),
])
def test_bad_arrays_give_specific_errors(problem, changes, message):
    with pytest.raises(KernelError, match=message.replace("[", r"\[").replace("]", r"\]")):
        rebuild(problem, **changes(problem))


def test_label_names_bound_the_classes(problem):
    with pytest.raises(KernelError, match="label_names has 2 entries"):
        rebuild(problem, label_names=("a", "b"))


def test_duplicate_ids_are_rejected(problem):
    ids = np.arange(12)
    ids[3] = 0
    with pytest.raises(KernelError, match="duplicate id 0"):
        rebuild(problem, train_ids=ids)


def test_not_psd_kernel_is_refused_and_jitter_repairs_it(problem):
    eigval, eigvec = np.linalg.eigh(problem.k_train)
    eigval[0] = -0.05
    k = (eigvec * eigval) @ eigvec.T
    bad = rebuild(problem, k_train=(k + k.T) / 2)
    with pytest.raises(KernelError, match="not positive semidefinite.*--jitter"):
        KernelRegressionUtility(bad, ValuationConfig(ridge="0.1"))
    mean_diag = bad.mean_diag()
    KernelRegressionUtility(bad, ValuationConfig(ridge="0.1", jitter=0.06 / mean_diag))


def test_roundtrip_and_file_errors(tmp_path, problem):
    named = rebuild(problem, label_names=("neg", "neu", "pos"), train_ids=np.arange(100, 112))
    path = tmp_path / "k.npz"
    named.save(path)
    loaded = KernelProblem.load(path)
    assert loaded.label_names == ("neg", "neu", "pos")
    np.testing.assert_array_equal(loaded.train_ids, np.arange(100, 112))
    assert loaded.fingerprint() == named.fingerprint()

    with pytest.raises(KernelError, match="no such kernel file"):
        KernelProblem.load(tmp_path / "missing.npz")
    np.savez(tmp_path / "partial.npz", k_train=problem.k_train)
    with pytest.raises(KernelError, match="missing array.*k_test"):
        KernelProblem.load(tmp_path / "partial.npz")
    np.savez(tmp_path / "objects.npz", **arrays(problem), label_names=np.array([{"a": 1}], dtype=object))
    with pytest.raises(KernelError, match="without pickle"):
        KernelProblem.load(tmp_path / "objects.npz")
    (tmp_path / "junk.npz").write_text("not a zip")
    with pytest.raises(KernelError, match="not a readable .npz"):
        KernelProblem.load(tmp_path / "junk.npz")


def test_a_gap_in_label_ids_without_label_names_is_refused():
    """A stray y_train value of 5 in a 2-class problem made a 6-class problem."""
    p = random_problem(n=8, m=4, n_classes=2)
    y = p.y_train.copy()
    y[3] = 5
    with pytest.raises(KernelError, match=r"id\(s\) 2, 3, 4 never occur while y_train\[3\] = 5.*6-class"):
        KernelProblem(p.k_train, p.k_test, y, p.y_test)
    names = KernelProblem(p.k_train, p.k_test, y, p.y_test, label_names=tuple("abcdef"))
    assert names.n_classes == 6  # declared classes are kept


def test_an_all_zero_kernel_is_named_not_advised_a_jitter(tmp_path):
    """An all-zero kernel got the advice to add a jitter (it cannot help); a fixed ridge gave all-zero values."""
    from freeshap_dq.kernels.landmarks import LandmarkKernel

    p = random_problem(n=8, m=4, n_classes=2)
    with pytest.raises(KernelError, match="k_train is all zeros.*no ridge or jitter changes that"):
        KernelProblem(np.zeros((8, 8)), np.zeros((4, 8)), p.y_train, p.y_test)
    np.save(tmp_path / "zero.npy", np.zeros((8, 8)))
    with pytest.raises(KernelError, match="all zeros"):
        KernelProblem(np.load(tmp_path / "zero.npy", mmap_mode="r"), np.zeros((4, 8)), p.y_train, p.y_test)
    with pytest.raises(KernelError, match="all zeros"):
        LandmarkKernel(np.zeros((8, 2)), np.zeros((4, 2)), np.array([0, 1]), np.zeros(8), p.y_train, p.y_test)
