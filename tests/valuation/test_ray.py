import os
import signal
import subprocess
import threading
import time

import numpy as np
import pytest
import torch

from freeshap_dq import CheckpointError, ValuationConfig, compute_values
from freeshap_dq.data.synthetic import noisy_problem
from freeshap_dq.valuation.ray import merge_groups, permutation_groups, resolved_config, run_group

CONFIG = ValuationConfig(permutations=24, tolerance=0.05, per_point=True, reduce_every=5, start=3)


def assert_identical(a, b):
    for m in ("accuracy", "ce"):
        np.testing.assert_array_equal(a.sums[m], b.sums[m])
        np.testing.assert_array_equal(a.sq_sums[m], b.sq_sums[m])
        if a.point_sums is not None or b.point_sums is not None:
            np.testing.assert_array_equal(a.point_sums[m], b.point_sums[m])
    np.testing.assert_array_equal(a.evaluated, b.evaluated)
    assert a.count == b.count


@pytest.fixture(scope="module")
def problem():
    return noisy_problem(n_train=60, n_test=20, noise=0.1, seed=0).problem


def test_one_actor_per_gpu_when_the_cluster_has_gpus():
    from freeshap_dq.valuation.ray import actor_plan

    assert actor_plan({"CPU": 16, "GPU": 4}, "auto", None, 10) == (4, {"num_cpus": 1, "num_gpus": 1})
    assert actor_plan({"CPU": 16, "GPU": 4}, "auto", None, 2) == (2, {"num_cpus": 1, "num_gpus": 1})
    assert actor_plan({"CPU": 16, "GPU": 4}, "cpu", None, 10) == (10, {"num_cpus": 1})
    assert actor_plan({"CPU": 2}, "auto", None, 10) == (2, {"num_cpus": 1})
    assert actor_plan({"CPU": 2}, "auto", 5, 10) == (5, {"num_cpus": 1})


def test_groups_are_cut_at_multiples_of_the_group_size():
    assert permutation_groups(3, 24, 5) == [(3, 2), (5, 5), (10, 5), (15, 5), (20, 5), (25, 2)]
    assert permutation_groups(0, 10, 5) == [(0, 5), (5, 5)]
    assert permutation_groups(7, 1, 32) == [(7, 1)]


def test_groups_merged_in_order_are_bit_identical_to_one_process(problem):
    local = compute_values(problem, CONFIG)
    config = resolved_config(problem, CONFIG)
    parts = [run_group(problem, config, first, count) for first, count in permutation_groups(3, 24, 5)]
    assert_identical(merge_groups(parts, config), local)


ray = pytest.importorskip("ray", reason="install the [ray] extra (make test does)") if not os.environ.get("CI") \
    else __import__("ray")


@pytest.fixture(scope="module")
def local_ray():
    from freeshap_dq.valuation.ray import compute_values_ray  # noqa: F401

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield
    ray.shutdown()


def test_ray_with_two_workers_equals_one_process(problem, local_ray):
    from freeshap_dq.valuation.ray import compute_values_ray

    threads = torch.get_num_threads()
    result = compute_values_ray(problem, CONFIG, threads=threads)
    assert_identical(result, compute_values(problem, CONFIG))
    assert result.manifest["executor"] == "ray" and result.manifest["groups"] == 6
    assert result.manifest["worker_resources"] == {"num_cpus": 1}


def test_ray_workers_open_a_kernel_folder_by_path(problem, local_ray, tmp_path):
    from freeshap_dq import KernelProblem
    from freeshap_dq.kernels.folder import save_kernel_folder, save_landmark_folder
    from freeshap_dq.kernels.landmarks import LandmarkKernel
    from freeshap_dq.valuation.ray import compute_values_ray

    save_kernel_folder(problem, tmp_path / "K.kernel")
    folder = KernelProblem.load(tmp_path / "K.kernel")
    config = ValuationConfig(permutations=6, reduce_every=2, low_rank=20, per_point=True, ridge="0.1")
    assert_identical(compute_values_ray(folder, config, threads=torch.get_num_threads()), compute_values(folder, config))
    save_landmark_folder(LandmarkKernel.from_problem(problem, [2, 7, 11, 30, 41]), tmp_path / "L.kernel")
    landmarks = KernelProblem.load(tmp_path / "L.kernel")  # a landmark kernel: --low-rank comes from the folder
    config = ValuationConfig(permutations=4, reduce_every=2, ridge="0.1")
    assert_identical(compute_values_ray(landmarks, config, threads=torch.get_num_threads()),
                     compute_values(landmarks, config))


def test_a_killed_worker_is_replaced_and_its_group_recomputed(local_ray):
    from freeshap_dq.valuation.ray import compute_values_ray

    big = noisy_problem(n_train=250, n_test=40, noise=0.1, seed=1).problem
    config = ValuationConfig(permutations=60, reduce_every=4)
    out = {}
    runner = threading.Thread(target=lambda: out.update(r=compute_values_ray(big, config, threads=1)))
    runner.start()
    killed = None
    deadline = time.monotonic() + 60
    while killed is None and time.monotonic() < deadline and runner.is_alive():
        busy = subprocess.run(["pgrep", "-f", "ray::GroupRunner"], capture_output=True, text=True).stdout.split()
        if busy:
            killed = int(busy[0])
            os.kill(killed, signal.SIGKILL)
        time.sleep(0.05)
    runner.join(timeout=120)
    assert killed is not None, "no worker was caught running a group"
    torch_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert_identical(out["r"], compute_values(big, config))
    finally:
        torch.set_num_threads(torch_threads)


def test_group_checkpoints_resume_and_refuse_other_runs(problem, local_ray, tmp_path):
    from freeshap_dq.valuation.ray import compute_values_ray

    threads = torch.get_num_threads()
    first = compute_values_ray(problem, CONFIG, threads=threads, checkpoint_dir=tmp_path)
    files = sorted((tmp_path / "groups").glob("group-*.npz"))
    assert len(files) == 6
    for path in files[1::2]:  # as if the run had died with half the groups written
        path.unlink()
    assert_identical(compute_values_ray(problem, CONFIG, threads=threads, checkpoint_dir=tmp_path), first)
    with pytest.raises(CheckpointError, match="belongs to another run"):
        compute_values_ray(problem, ValuationConfig(permutations=24, tolerance=0.1, reduce_every=5, start=3),
                           checkpoint_dir=tmp_path)


def test_adaptive_stopping_is_refused_on_ray(problem):
    from freeshap_dq import InputError
    from freeshap_dq.valuation.ray import compute_values_ray

    with pytest.raises(InputError, match="fixed number of permutations"):
        compute_values_ray(problem, ValuationConfig(permutations=5, max_seconds=10))


def test_cli_value_with_the_ray_executor_writes_the_same_table(problem, local_ray, tmp_path):
    import pandas as pd
    from click.testing import CliRunner

    from freeshap_dq.cli.main import cli

    problem.save(tmp_path / "K.npz")
    for executor in ("local", "ray"):
        res = CliRunner().invoke(cli, ["value", "--kernel", str(tmp_path / "K.npz"), "--executor", executor,
                                       "--permutations", "12", "--reduce-every", "4", "-o",
                                       str(tmp_path / f"{executor}.csv")])
        assert res.exit_code == 0, res.output
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "local.csv"), pd.read_csv(tmp_path / "ray.csv"))
