import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner
from problems import random_problem

from freeshap_dq import ValuationResult
from freeshap_dq.cli.main import cli


@pytest.fixture
def kernel_file(tmp_path):
    path = tmp_path / "K.npz"
    random_problem(n=14, m=6, label_names=("a", "b", "c"), train_ids=np.arange(500, 514)).save(path)
    return path


def run(args):
    result = CliRunner().invoke(cli, [str(a) for a in args])
    return result


@pytest.mark.parametrize("name", ["v.csv", "v.parquet", "v.json", "v.jsonl"])
def test_value_writes_table_by_extension(tmp_path, kernel_file, name):
    out = tmp_path / name
    res = run(["value", "--kernel", kernel_file, "-o", out, "--permutations", 5, "--ridge", "0.05"])
    assert res.exit_code == 0, res.output
    reader = {"csv": pd.read_csv, "parquet": pd.read_parquet, "json": pd.read_json,
              "jsonl": lambda p: pd.read_json(p, lines=True)}[name.split(".")[1]]
    df = reader(out)
    assert list(df.columns) == ["train_index", "example_id", "value", "value_ce", "stderr", "stderr_ce", "rank",
                                "permutations"]
    assert len(df) == 14 and df["example_id"].iloc[0] == 500 and (df["permutations"] == 5).all()
    manifest = json.loads((tmp_path / (name + ".manifest.json")).read_text())
    assert manifest["config"]["permutations"] == 5 and manifest["kernel_fingerprint"] and manifest["versions"]["torch"]
    assert manifest["inputs"]["kernel"] == str(kernel_file) and manifest["elapsed_seconds"] >= 0


def test_value_to_stdout_and_summary_to_stderr(kernel_file):
    res = CliRunner().invoke(cli, ["value", "--kernel", str(kernel_file), "--permutations", "3"])
    assert res.exit_code == 0
    assert res.stdout.startswith("train_index,example_id,value,value_ce")
    assert "ridge" in res.stderr and "ridge" not in res.stdout


def test_value_methods_and_per_point_result(tmp_path, kernel_file):
    for method in ("exact", "loo", "beta", "tmc"):
        res = run(["value", "--kernel", kernel_file, "-o", tmp_path / f"{method}.csv", "--method", method,
                   "--permutations", 4, "--per-point", "--save-result", tmp_path / f"{method}.npz"])
        assert res.exit_code == 0, res.output
        saved = ValuationResult.load(tmp_path / f"{method}.npz")
        assert saved.point_values("ce").shape == (14, 6)


def test_paper_preset_and_overrides(tmp_path, kernel_file):
    res = run(["value", "--kernel", kernel_file, "-o", tmp_path / "v.csv", "--preset", "paper",
               "--permutations", 3, "--save-result", tmp_path / "r.npz"])
    assert res.exit_code == 0, res.output
    cfg = ValuationResult.load(tmp_path / "r.npz").manifest["config"]
    assert (cfg["tolerance"], cfg["kernel_scale"], cfg["ridge"], cfg["permutations"]) == (0.05, 1e-4, "1e-6", 3)


@pytest.mark.parametrize("args, message", [
    (["--kernel", "nope.npz"], "no such kernel file"),
    (["--ridge", "-1"], "ridge must be a positive"),
    (["-o", "values.txt"], "cannot tell the output format"),
    (["--per-point"], "--save-result"),
    (["--method", "exact", "--permutations", "2"], None),
])
def test_value_bad_input_exits_nonzero_with_message(tmp_path, kernel_file, args, message):
    base = ["value", "--kernel", kernel_file, "-o", tmp_path / "v.csv"]
    res = run(base + args)
    if message is None:
        assert res.exit_code == 0
        return
    assert res.exit_code == 2 and message in res.output, res.output
    assert "Traceback" not in res.output and not (tmp_path / "v.csv").exists()


def test_missing_output_folder_is_reported(tmp_path, kernel_file):
    res = run(["value", "--kernel", kernel_file, "-o", tmp_path / "no" / "such" / "v.csv", "--permutations", 2])
    assert res.exit_code == 2 and "does not exist" in res.output


def test_sigkill_then_resume_gives_identical_values(tmp_path):
    """A run killed with SIGKILL mid-way resumes from its checkpoint and ends bit-identical."""
    kernel = tmp_path / "K.npz"
    random_problem(n=300, m=150, n_classes=2, seed=1).save(kernel)
    common = ["value", "--kernel", str(kernel), "--permutations", "120", "--per-point", "--ridge", "0.1",
              "--checkpoint-every", "2", "--no-progress"]
    cmd = [sys.executable, "-m", "freeshap_dq.cli"]
    ckpt = tmp_path / "ckpt"
    proc = subprocess.Popen(cmd + common + ["--checkpoint-dir", str(ckpt), "-o", str(tmp_path / "a.csv"),
                                            "--save-result", str(tmp_path / "a.npz")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None:  # a checkpoint with a completed group (not sleep:
        try:                                                      # a loaded machine runs slower)
            if ValuationResult.load(ckpt / "checkpoint.npz").count > 0:
                break
        except Exception:
            pass
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    _, err = proc.communicate()
    assert (ckpt / "checkpoint.npz").exists(), f"no checkpoint was written; the run said: {err.decode()[-2000:]}"
    killed_at = ValuationResult.load(ckpt / "checkpoint.npz").count
    assert 0 < killed_at < 120, "the run finished before it could be killed; make the problem bigger"
    assert not (tmp_path / "a.csv").exists()
    # at most a hidden temp file of an interrupted write is left; it is never read as a checkpoint
    assert all(f == "checkpoint.npz" or f.startswith(".checkpoint.npz.") for f in os.listdir(ckpt))
    resumed = subprocess.run(cmd + common + ["--checkpoint-dir", str(ckpt), "-o", str(tmp_path / "a.csv"),
                                             "--save-result", str(tmp_path / "a.npz")], capture_output=True)
    assert resumed.returncode == 0, resumed.stderr.decode()
    straight = subprocess.run(cmd + common + ["-o", str(tmp_path / "b.csv"), "--save-result",
                                              str(tmp_path / "b.npz")], capture_output=True)
    assert straight.returncode == 0
    a, b = ValuationResult.load(tmp_path / "a.npz"), ValuationResult.load(tmp_path / "b.npz")
    assert a.count == b.count == 120
    for metric in ("accuracy", "ce"):
        np.testing.assert_array_equal(a.sums[metric], b.sums[metric])
        np.testing.assert_array_equal(a.point_sums[metric], b.point_sums[metric])
    assert (tmp_path / "a.csv").read_text() == (tmp_path / "b.csv").read_text()


def default_interrupt():
    """A background CI shell starts children with SIGINT ignored; give the CLI a normal Ctrl-C."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_interrupt_writes_a_checkpoint_and_exits_130(tmp_path, sig):
    kernel = tmp_path / "K.npz"
    random_problem(n=300, m=150, n_classes=2, seed=1).save(kernel)
    ckpt = tmp_path / "ckpt"
    proc = subprocess.Popen([sys.executable, "-m", "freeshap_dq.cli", "value", "--kernel", str(kernel),
                             "--permutations", "100000", "--per-point", "--save-result", str(tmp_path / "r.npz"),
                             "--checkpoint-every", "100000", "--checkpoint-dir", str(ckpt), "--progress",
                             "--ridge", "0.1", "-o", str(tmp_path / "v.csv")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, preexec_fn=default_interrupt)
    try:
        seen = b""
        # the progress bar has counted past two groups of 32 (not a fixed sleep: a loaded machine runs slower)
        while not any(int(n) >= 64 for n in re.findall(rb"(\d+)/100000", seen)):
            chunk = proc.stderr.read1(4096)
            assert chunk, f"the run ended early: {seen.decode()[-2000:]}"
            seen += chunk
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130, err.decode()
    assert "rerun the same command to resume" in err.decode()
    assert ValuationResult.load(ckpt / "checkpoint.npz").count > 0
    assert "of 100000 permutations; the checkpoint in" in err.decode()  # how far it got, and where it is kept
    assert not (tmp_path / "v.csv").exists()


def test_ctrl_c_while_starting_exits_130_without_a_traceback(tmp_path):
    """A Ctrl-C in the first seconds (torch still importing) printed a full traceback."""
    random_problem(n=10, m=4).save(tmp_path / "K.npz")
    proc = subprocess.Popen([sys.executable, "-m", "freeshap_dq.cli", "value", "--kernel", str(tmp_path / "K.npz"),
                             "-o", str(tmp_path / "v.csv")], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            preexec_fn=default_interrupt)
    time.sleep(0.3)  # inside the imports
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and b"Traceback" not in err, err.decode()[-2000:]
    assert not (tmp_path / "v.csv").exists()


def test_device_reaches_the_valuation_settings(tmp_path):
    """--device was dropped before the valuation settings were built: the manifest said auto whatever was asked."""
    import torch

    random_problem(n=10, m=4).save(tmp_path / "K.npz")
    res = CliRunner().invoke(cli, ["value", "--kernel", str(tmp_path / "K.npz"), "--permutations", "2", "--device",
                                   "cpu", "-o", str(tmp_path / "v.csv")])
    assert res.exit_code == 0, res.output
    manifest = json.loads((tmp_path / "v.csv.manifest.json").read_text())
    assert manifest["config"]["device"] == "cpu" and manifest["device"] == "cpu"
    if not torch.cuda.is_available():
        res = CliRunner().invoke(cli, ["value", "--kernel", str(tmp_path / "K.npz"), "--permutations", "2",
                                       "--device", "cuda", "-o", str(tmp_path / "w.csv")])
        assert res.exit_code == 2 and "CUDA is not available" in res.output and not (tmp_path / "w.csv").exists()


def test_a_resumed_run_says_so_and_refuses_a_smaller_permutation_count(tmp_path):
    """A checkpoint of 12 permutations rerun with --permutations 5 said 12 in the table and nothing else."""
    random_problem(n=10, m=4).save(tmp_path / "K.npz")
    base = ["value", "--kernel", str(tmp_path / "K.npz"), "--checkpoint-dir", str(tmp_path / "ck")]
    res = CliRunner().invoke(cli, base + ["--permutations", "12", "-o", str(tmp_path / "a.csv")])
    assert res.exit_code == 0, res.output
    res = CliRunner().invoke(cli, base + ["--permutations", "5", "-o", str(tmp_path / "b.csv")])
    assert res.exit_code == 2 and "already holds 12 permutations" in res.output and "--permutations 12" in res.output
    assert not (tmp_path / "b.csv").exists()
    res = CliRunner().invoke(cli, base + ["--permutations", "16", "-o", str(tmp_path / "c.csv")])
    assert res.exit_code == 0 and "resuming from the checkpoint" in res.output and "12 of 16" in res.output
    assert (pd.read_csv(tmp_path / "c.csv")["permutations"] == 16).all()


def test_output_paths_are_checked_before_any_work(tmp_path):
    """-o nodir/v.csv failed after every permutation; -o an existing folder crashed; -o the input overwrote it;
    --save-result v.csv -o v.csv left a folder named v.csv."""
    random_problem(n=10, m=4).save(tmp_path / "K.npz")
    (tmp_path / "adir").mkdir()
    value = ["value", "--kernel", str(tmp_path / "K.npz"), "--permutations", "2"]
    cases = [(["-o", str(tmp_path / "nodir" / "v.csv")], "does not exist; create it first"),
             (["-o", str(tmp_path / "adir"), "--format", "csv"], "a folder is there"),
             (["-o", str(tmp_path / "K.npz"), "--format", "csv"], "is also the input --kernel"),
             (["-o", str(tmp_path / "v.csv"), "--save-result", str(tmp_path / "v.csv")], "are both")]
    for args, message in cases:
        res = CliRunner().invoke(cli, value + args)
        assert res.exit_code == 2 and message in res.output, (args, res.output)
        assert "Traceback" not in res.output and "tmc-shapley" not in res.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["K.npz", "adir"]
    np.testing.assert_array_equal(np.load(tmp_path / "K.npz")["k_train"], random_problem(n=10, m=4).k_train)
