"""Bad options and inputs get a named error and exit 2 before any work — never a traceback or a silent default."""

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner
from problems import random_problem

from freeshap_dq import KernelError, KernelProblem
from freeshap_dq.cli.main import cli


@pytest.fixture
def files(tmp_path):
    p = random_problem(n=10, m=4, n_classes=2, train_ids=np.array([f"e{i}" for i in range(10)]))
    p.save(tmp_path / "K.npz")
    pd.DataFrame({"id": [f"e{i}" for i in range(10)], "text": [f"text {i}" for i in range(10)],
                  "label": [str(y) for y in p.y_train]}).to_csv(tmp_path / "train.csv", index=False)
    res = CliRunner().invoke(cli, ["value", "--kernel", str(tmp_path / "K.npz"), "--permutations", "4", "-o",
                                   str(tmp_path / "values.csv")])
    assert res.exit_code == 0, res.output
    return tmp_path


def run(args):
    return CliRunner().invoke(cli, [str(a) for a in args])


@pytest.mark.parametrize("args, message", [
    (["--seed", -1], "seed must be >= 0"),
    (["--max-seconds", -1], "max_seconds must be a finite number >= 0"),
    (["--stderr-target", -0.5], "stderr_target must be a finite number >= 0"),
    (["--fail-on-harmful", -1], "--fail-on-harmful"),
    (["--workers", 2], "--workers applies to Ray workers"),
    (["--ray-address", "ray://x:1"], "--ray-address applies to Ray workers"),
])
def test_value_options_are_checked(files, args, message):
    res = run(["value", "--kernel", files / "K.npz", "--permutations", 2, "-o", files / "v.csv"] + args)
    assert res.exit_code == 2 and message in res.output and "Traceback" not in res.output, res.output
    assert not (files / "v.csv").exists()


def test_curation_inputs_are_checked(files):
    prune = ["prune", "--values", files / "values.csv", "--data", files / "train.csv", "-o", files / "c.csv"]
    res = run(prune + ["--threshold", "nan"])
    assert res.exit_code == 2 and "--threshold must be a finite number" in res.output
    pd.read_csv(files / "values.csv").drop(columns=["stderr_ce"]).to_csv(files / "no_se.csv", index=False)
    res = run(["prune", "--values", files / "no_se.csv", "--data", files / "train.csv", "-o", files / "c.csv",
               "--confident"])
    assert res.exit_code == 2 and "--confident needs the standard errors" in res.output
    values = pd.read_csv(files / "values.csv")
    pd.concat([values, values.iloc[[3]]]).to_csv(files / "dup.csv", index=False)
    res = run(["prune", "--values", files / "dup.csv", "--data", files / "train.csv", "-o", files / "c.csv",
               "--count", 1])
    assert res.exit_code == 2 and "row 11 repeats" in res.output
    res = run(prune + ["--count", 1, "--id-column", "uid"])
    assert res.exit_code == 2 and "no id column 'uid'" in res.output
    data = pd.read_csv(files / "train.csv")
    data.loc[2, "id"] = None
    data.to_csv(files / "empty_id.csv", index=False)
    res = run(["prune", "--values", files / "values.csv", "--data", files / "empty_id.csv", "-o", files / "c.csv",
               "--count", 1])
    assert res.exit_code == 2 and "row 3 has an empty id" in res.output
    assert not (files / "c.csv").exists()


def test_kernel_arrays_are_checked():
    p = random_problem(n=6, m=3, n_classes=2)
    with pytest.raises(KernelError, match="complex numbers"):
        KernelProblem(p.k_train + 1j * 0.1, p.k_test, p.y_train, p.y_test)
    with pytest.raises(KernelError, match="lists 'a' twice"):
        KernelProblem(p.k_train, p.k_test, p.y_train, p.y_test, label_names=("a", "a"))
    with pytest.raises(KernelError, match="1-dimensional"):
        KernelProblem(p.k_train, p.k_test, p.y_train, p.y_test, label_names=np.array([["a", "b"]]))


def test_ntk_options_the_adapter_ignores_and_texts_too_long_for_the_model(tmp_path, tiny_bert_path):
    train, test = tmp_path / "tr.csv", tmp_path / "te.csv"
    pd.DataFrame({"text": ["good film", "bad film", " ".join(["word"] * 100), "fine"],
                  "label": ["pos", "neg", "pos", "neg"]}).to_csv(train, index=False)
    pd.DataFrame({"text": ["good", "bad"], "label": ["pos", "neg"]}).to_csv(test, index=False)
    base = ["kernel", "--train", train, "--test", test, "--model", tiny_bert_path, "-o", tmp_path / "K.npz"]
    res = run(base + ["--label-words", "bad,good"])
    assert res.exit_code == 2 and "--label-words is for the prompt-mlm and causal-lm adapters" in res.output
    res = run(base + ["--max-length", 128])
    assert res.exit_code == 2 and "row 3 has" in res.output and "more than the 64 positions" in res.output
    assert not (tmp_path / "K.npz").exists()
    assert run(base + ["--max-length", 64]).exit_code == 0
