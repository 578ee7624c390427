import os

import numpy as np
import pytest

from freeshap_dq import CheckpointError, ValuationConfig, ValuationResult, compute_values
from freeshap_dq.data.synthetic import noisy_problem
from freeshap_dq.valuation import accumulator


@pytest.fixture(scope="module")
def problem():
    return noisy_problem(n_train=40, n_test=9, noise=0.1, seed=2).problem


CASES = {
    "tmc-truncated": dict(tolerance=0.05, block_size=6),
    "beta-weights": dict(method="beta", beta_alpha=4.0, beta_beta=1.0),
    "low-rank": dict(low_rank=10, block_size=7),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_streamed_per_point_sums_equal_the_in_memory_ones(problem, tmp_path, case):
    config = ValuationConfig(permutations=7, per_point=True, reduce_every=3, seed=5, **CASES[case])
    in_memory = compute_values(problem, config)
    streamed = compute_values(problem, config, point_dir=tmp_path / "points")
    for m in ("accuracy", "ce"):
        assert isinstance(streamed.point_sums[m], np.memmap)
        np.testing.assert_array_equal(streamed.point_sums[m], in_memory.point_sums[m])
        np.testing.assert_array_equal(streamed.sums[m], in_memory.sums[m])
    # 7 permutations = groups of 3, 3 and an open 1: the last completed set and the total remain on disk
    assert sorted(p.name for p in (tmp_path / "points").glob("points-[0-9]*")) == [
        "points-6-accuracy.npy", "points-6-ce.npy", "points-7-accuracy.npy", "points-7-ce.npy"]


def test_result_folder_links_the_streamed_files_and_reads_columns(problem, tmp_path):
    config = ValuationConfig(permutations=4, per_point=True, reduce_every=2)
    result = compute_values(problem, config, point_dir=tmp_path / "points")
    result.save(tmp_path / "R.result")
    source = tmp_path / "points" / "points-4-ce.npy"
    assert os.stat(tmp_path / "R.result" / "point_sum_ce.npy").st_ino == os.stat(source).st_ino
    loaded = ValuationResult.load(tmp_path / "R.result")
    assert isinstance(loaded.point_sums["ce"], np.memmap) and loaded.count == 4
    np.testing.assert_array_equal(loaded.point_column(3, "ce"), result.point_values("ce")[:, 3])
    np.testing.assert_array_equal(loaded.values("ce"), result.values("ce"))
    in_memory = compute_values(problem, config)
    in_memory.save(tmp_path / "M.result")  # an in-memory result saved as a folder: written, not linked
    np.testing.assert_array_equal(ValuationResult.load(tmp_path / "M.result").point_sums["ce"], in_memory.point_sums["ce"])
    (tmp_path / "junk").mkdir()
    with pytest.raises(CheckpointError, match="not a freeshap-dq result"):
        ValuationResult.load(tmp_path / "junk")


def test_interrupted_streamed_run_resumes_to_the_same_result(problem, tmp_path, monkeypatch):
    config = ValuationConfig(permutations=10, per_point=True, reduce_every=3, tolerance=0.05, seed=9)
    reference = compute_values(problem, config)
    saves = {"n": 0}
    original = accumulator.Accumulator.save_checkpoint

    def crash_on_third_save(self, path):
        saves["n"] += 1
        if saves["n"] == 3:  # after the group 6..8 was closed on disk, before the checkpoint names it
            raise KeyboardInterrupt
        original(self, path)

    monkeypatch.setattr(accumulator.Accumulator, "save_checkpoint", crash_on_third_save)
    with pytest.raises(KeyboardInterrupt):
        compute_values(problem, config, checkpoint_dir=tmp_path / "ckpt", point_dir=tmp_path / "ckpt" / "points")
    monkeypatch.setattr(accumulator.Accumulator, "save_checkpoint", original)
    assert ValuationResult.load(tmp_path / "ckpt" / "checkpoint.npz").count == 6
    resumed = compute_values(problem, config, checkpoint_dir=tmp_path / "ckpt", point_dir=tmp_path / "ckpt" / "points")
    assert resumed.count == 10
    for m in ("accuracy", "ce"):
        np.testing.assert_array_equal(resumed.point_sums[m], reference.point_sums[m])
        np.testing.assert_array_equal(resumed.sums[m], reference.sums[m])


def test_checkpoints_of_the_other_kind_are_refused(problem, tmp_path):
    config = ValuationConfig(permutations=4, per_point=True, reduce_every=2)
    compute_values(problem, config, checkpoint_dir=tmp_path / "disk", point_dir=tmp_path / "disk" / "points")
    with pytest.raises(CheckpointError, match="keeps its per-point sums on disk"):
        compute_values(problem, config, checkpoint_dir=tmp_path / "disk")
    compute_values(problem, config, checkpoint_dir=tmp_path / "ram")
    with pytest.raises(CheckpointError, match="keeps its per-point sums in memory"):
        compute_values(problem, config, checkpoint_dir=tmp_path / "ram", point_dir=tmp_path / "ram" / "points")
    for path in (tmp_path / "disk" / "points").glob("points-4-*"):
        path.unlink()
    with pytest.raises(CheckpointError, match="per-point file.*missing"):
        compute_values(problem, config, checkpoint_dir=tmp_path / "disk", point_dir=tmp_path / "disk" / "points")
