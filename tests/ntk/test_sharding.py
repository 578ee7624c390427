"""torchrun with 2 gloo processes gives the same kernel as one process."""

import os
import shutil
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from freeshap_dq.cli.main import cli

TORCHRUN = shutil.which("torchrun", path=os.path.dirname(sys.executable))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("shard-data")
    rng = np.random.default_rng(0)
    words = ["good", "bad", "film", "plot", "great", "awful", "scene"]
    for name, n in (("train", 10), ("test", 4)):
        pd.DataFrame({"id": [f"{name}{i}" for i in range(n)],
                      "text": [" ".join(rng.choice(words, 4)) for _ in range(n)],
                      "label": ["a", "b"] * (n // 2)}).to_csv(d / f"{name}.csv", index=False)
    return d


def one_process_then_two_ranks(args: list[str], one, two) -> None:
    """``freeshap-dq kernel ARGS -o one`` in this process, then the same under torchrun with 2 gloo ranks."""
    res = CliRunner().invoke(cli, args + ["-o", str(one)])
    assert res.exit_code == 0, res.output
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run([TORCHRUN, "--standalone", "--nproc_per_node", "2", "-m", "freeshap_dq.cli", *args,
                          "-o", str(two), "--distributed"], env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr


def kernel_args(data, model, *extra: str) -> list[str]:
    return ["kernel", "--train", str(data / "train.csv"), "--test", str(data / "test.csv"), "--model", str(model),
            "--device", "cpu", *extra]


@pytest.mark.skipif(TORCHRUN is None, reason="torchrun is not installed beside this Python")
def test_two_gloo_ranks_give_the_one_process_kernel(data, tiny_bert_path, tmp_path):
    one_process_then_two_ranks(kernel_args(data, tiny_bert_path, "--trainable", "all", "--max-memory", "64MiB",
                                           "--grad-batch-size", "4"), tmp_path / "one.npz", tmp_path / "two.npz")
    # fp32 gradients (1 thread per rank vs 2 here): the same tolerance as every eNTK-vs-autograd test
    one, two = np.load(tmp_path / "one.npz"), np.load(tmp_path / "two.npz")
    np.testing.assert_allclose(two["k_train"], one["k_train"], rtol=1e-5)
    np.testing.assert_allclose(two["k_test"], one["k_test"], rtol=1e-5)


@pytest.mark.skipif(TORCHRUN is None, reason="torchrun is not installed beside this Python")
def test_two_gloo_ranks_share_the_row_blocks_of_a_kernel_folder(data, tiny_bert_path, tmp_path):
    from freeshap_dq import KernelProblem

    one_process_then_two_ranks(kernel_args(data, tiny_bert_path, "--trainable", "top:2", "--example-block", "4"),
                               tmp_path / "one.kernel", tmp_path / "two.kernel")
    one, two = KernelProblem.load(tmp_path / "one.kernel"), KernelProblem.load(tmp_path / "two.kernel")
    np.testing.assert_allclose(two.k_train, one.k_train, rtol=1e-5)
    np.testing.assert_allclose(two.k_test, one.k_test, rtol=1e-5)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one.kernel", "two.kernel"]  # no temporary left


@pytest.mark.skipif(TORCHRUN is None, reason="torchrun is not installed beside this Python")
def test_two_gloo_ranks_share_the_row_blocks_of_a_landmark_kernel(data, tiny_bert_path, tmp_path):
    from freeshap_dq import KernelProblem

    one_process_then_two_ranks(kernel_args(data, tiny_bert_path, "--trainable", "top:1", "--example-block", "3",
                                           "--landmarks", "4"), tmp_path / "one.kernel", tmp_path / "two.kernel")
    one, two = KernelProblem.load(tmp_path / "one.kernel"), KernelProblem.load(tmp_path / "two.kernel")
    np.testing.assert_array_equal(one.landmarks, two.landmarks)
    for name in ("k_train_landmarks", "k_test_landmarks", "diagonal_values"):
        np.testing.assert_allclose(getattr(two, name), getattr(one, name), rtol=1e-5)


def test_row_blocks_are_balanced_over_ranks():
    from freeshap_dq.ntk.blocked import assign_blocks

    cost = {(0, 4): 4, (4, 8): 8, (8, 12): 12, (12, 16): 16, (16, 20): 16}
    shares = assign_blocks(cost, 2)
    assert sorted(b for share in shares for b in share) == sorted(cost)
    assert [sum(cost[b] for b in share) for share in shares] == [28, 28]
    assert assign_blocks(cost, 1) == [sorted(cost)]


def test_distributed_outside_torchrun_says_how(data, tiny_bert_path, tmp_path, monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    res = CliRunner().invoke(cli, ["kernel", "--train", str(data / "train.csv"), "--test", str(data / "test.csv"),
                                   "--model", str(tiny_bert_path), "-o", str(tmp_path / "k.npz"), "--distributed"])
    assert res.exit_code == 2 and "runs under torchrun" in res.output and not (tmp_path / "k.npz").exists()
