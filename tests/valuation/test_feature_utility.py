import numpy as np
import pytest
import torch

from freeshap_dq import ValuationConfig, compute_values
from freeshap_dq.data.synthetic import noisy_problem
from freeshap_dq.kernels.folder import save_kernel_folder
from freeshap_dq.kernels.problem import KernelProblem
from freeshap_dq.valuation import utility as regression
from freeshap_dq.valuation.feature_utility import FeatureSpaceUtility
from freeshap_dq.valuation.utility import KernelRegressionUtility


@pytest.fixture(scope="module")
def problems(tmp_path_factory):
    problem = noisy_problem(n_train=60, n_test=15, noise=0.1, seed=5).problem
    folder = tmp_path_factory.mktemp("k") / "K.kernel"
    save_kernel_folder(problem, folder)
    return problem, KernelProblem.load(folder)


@pytest.mark.parametrize("ridge", ["auto", "0.05", "rel:0.01"])
def test_full_rank_feature_utility_matches_the_kernel_utility(problems, ridge):
    problem, on_disk = problems
    config = ValuationConfig(low_rank=problem.n_train, ridge=ridge, kernel_scale=2.0, jitter=1e-3)
    features = FeatureSpaceUtility(on_disk, config)
    kernel = KernelRegressionUtility(problem, config)
    assert features.ridge == pytest.approx(kernel.ridge, rel=1e-12)
    if ridge == "auto":  # the feature-space LOO criterion is the kernel one on Phi Phi' = K
        np.testing.assert_allclose([e for _, e in features.ridge_choice.grid],
                                   [e for _, e in kernel.ridge_choice.grid], rtol=1e-6)
    for ours, theirs in zip(features.full_point, kernel.full_point, strict=True):
        torch.testing.assert_close(ours, theirs, rtol=1e-8, atol=1e-9)
    assert features.features.captured == pytest.approx(1.0)


def test_on_disk_low_rank_values_never_build_the_kernel_utility(problems, monkeypatch):
    problem, on_disk = problems
    config = ValuationConfig(permutations=6, low_rank=25, tolerance=0.05, per_point=True, block_size=8, ridge="0.1")
    in_memory = compute_values(problem, config)

    def refuse(*args, **kwargs):
        raise AssertionError("the n x n kernel utility was built for an on-disk low-rank run")

    monkeypatch.setattr(regression.KernelRegressionUtility, "__init__", refuse)
    from_disk = compute_values(on_disk, config)
    for m in ("accuracy", "ce"):
        np.testing.assert_allclose(from_disk.sums[m], in_memory.sums[m], atol=1e-10)
        np.testing.assert_allclose(from_disk.point_sums[m], in_memory.point_sums[m], atol=1e-10)
    np.testing.assert_array_equal(from_disk.evaluated, in_memory.evaluated)
    assert from_disk.manifest["low_rank"]["rank"] == 25
    assert from_disk.manifest["kernel_fingerprint"] == in_memory.manifest["kernel_fingerprint"]


def test_a_kernel_folder_too_big_for_memory_is_refused_unless_nystrom(problems, monkeypatch):
    from freeshap_dq import InputError
    from freeshap_dq.valuation import setup as valuation

    _, on_disk = problems
    monkeypatch.setattr(valuation, "available_memory", lambda: 4096)

    with pytest.raises(InputError, match="needs about 0.0 GiB in memory.*--low-rank r with --low-rank-method nystrom"):
        compute_values(on_disk, ValuationConfig(permutations=2))
    with pytest.raises(InputError, match="the eigen low-rank set-up"):
        compute_values(on_disk, ValuationConfig(permutations=2, low_rank=5, low_rank_method="eigen"))
    assert compute_values(on_disk, ValuationConfig(permutations=2, low_rank=5)).count == 2


def test_a_landmark_kernel_gives_the_nystrom_values_of_the_full_kernel(problems, tmp_path):
    from freeshap_dq import InputError
    from freeshap_dq.kernels.folder import save_landmark_folder
    from freeshap_dq.kernels.landmarks import LandmarkKernel
    from freeshap_dq.kernels.nystrom import nystrom_landmarks

    problem, on_disk = problems
    config = ValuationConfig(permutations=5, low_rank=20, tolerance=0.05, per_point=True, block_size=8, seed=4)
    reference = compute_values(on_disk, config)
    landmark = LandmarkKernel.from_problem(problem, nystrom_landmarks(problem.n_train, 20, 4))
    save_landmark_folder(landmark, tmp_path / "L.kernel", manifest={"model": "none"})
    stored = KernelProblem.load(tmp_path / "L.kernel")
    assert isinstance(stored, LandmarkKernel) and stored.on_disk and stored.rank == 20
    assert stored.fingerprint() == landmark.fingerprint()
    for candidate in (landmark, stored):
        result = compute_values(candidate, ValuationConfig(**{**config.to_dict(), "low_rank": 0}))
        assert result.manifest["config"]["low_rank"] == 20 and result.manifest["low_rank"]["rank"] == 20
        for m in ("accuracy", "ce"):
            np.testing.assert_allclose(result.sums[m], reference.sums[m], atol=1e-10)
            np.testing.assert_allclose(result.point_sums[m], reference.point_sums[m], atol=1e-10)
    assert reference.manifest["ridge"] == pytest.approx(compute_values(stored, config).manifest["ridge"])
    for bad, message in ((dict(method="exact"), "needs the whole kernel"), (dict(method="loo"), "needs the whole kernel"),
                         (dict(low_rank=7), "must be 20|exactly those"), (dict(low_rank_method="eigen"), "exactly those")):
        with pytest.raises(InputError, match=message):
            compute_values(stored, ValuationConfig(permutations=2, **bad))


def test_landmark_kernel_validation(problems):
    from freeshap_dq import KernelError
    from freeshap_dq.kernels.landmarks import LandmarkKernel

    problem, _ = problems
    good = LandmarkKernel.from_problem(problem, [1, 5, 9, 30])
    cols = good.k_train_landmarks.copy()
    cols[5, 2] += 1.0  # K[L, L] no longer symmetric
    for changes, message in ((dict(k_train_landmarks=cols), "not symmetric"),
                             (dict(k_test_landmarks=good.k_test_landmarks[:, :3]), "expected"),
                             (dict(landmarks=np.array([5, 1, 9, 30])), "distinct sorted"),
                             (dict(diagonal_values=good.diagonal_values * 2), "disagrees with the stored diagonal")):
        fields = {k: getattr(good, k) for k in ("k_train_landmarks", "k_test_landmarks", "landmarks", "diagonal_values",
                                                 "y_train", "y_test")}
        with pytest.raises(KernelError, match=message):
            LandmarkKernel(**{**fields, **changes})
