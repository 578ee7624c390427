import json

import pandas as pd
import pytest
from click.testing import CliRunner

from freeshap_dq.cli.main import cli

TEXTS = ["a great movie", "a dull plot", "it was great", "it was bad", "very good indeed", "terrible",
         "i loved every minute", "long and tedious", "brilliant", "boring film", "funny and clever", "a mess"]


def test_demo_pipeline_end_to_end_on_a_tiny_model(tmp_path, tiny_bert_path):
    labels = ["pos", "neg"] * 6
    pd.DataFrame({"id": [f"r{i}" for i in range(12)], "text": TEXTS, "label": labels}).to_csv(tmp_path / "tr.csv",
                                                                                               index=False)
    pd.DataFrame({"text": ["great fun", "dull"], "label": ["pos", "neg"]}).to_csv(tmp_path / "te.csv", index=False)
    out = tmp_path / "out"
    res = CliRunner().invoke(cli, ["demo", "--train", str(tmp_path / "tr.csv"), "--test", str(tmp_path / "te.csv"),
                                   "--model", str(tiny_bert_path), "--noise", "0.25", "--permutations", "20",
                                   "--output-dir", str(out), "--no-progress"])
    assert res.exit_code == 0, res.output
    res_demo = res
    assert "flipped labels" in res.output and "AUROC" in res.output
    for name in ("values.csv", "report.html", "report.txt", "result.npz", "manifest.json", "train.csv", "test.csv"):
        assert (out / name).exists(), name
    values = pd.read_csv(out / "values.csv")
    assert len(values) == 12 and values["flipped"].sum() == 3
    summary = json.loads((out / "manifest.json").read_text())["summary"]
    assert summary["flipped"] == 3 and 0 <= summary["auroc_ce"] <= 1
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 3 and "Most harmful" in html
    # the outputs feed the next commands
    res = CliRunner().invoke(cli, ["prune", "--values", str(out / "values.csv"), "--data", str(out / "train.csv"),
                                   "--count", "2", "-o", str(tmp_path / "clean.csv")])
    assert res.exit_code == 0, res.output
    assert len(pd.read_csv(tmp_path / "clean.csv")) == 10
    command = next(line for line in res_demo.output.splitlines() if "freeshap-dq explain" in line)
    args = command.split("freeshap-dq ", 1)[1].split()  # the printed command works (the result has per-point values)
    explained = CliRunner().invoke(cli, args)
    assert explained.exit_code == 0 and "Most harmful training examples" in explained.output, explained.output
    assert "Kernel regression on all training data: " in explained.output and "not recorded" not in explained.output
    res = CliRunner().invoke(cli, ["report", "--result", str(out / "result.npz"), "--data", str(out / "train.csv"),
                                   "--html", str(tmp_path / "r.html")])
    assert res.exit_code == 0 and "Most harmful" in res.output and (tmp_path / "r.html").exists()


def test_demo_needs_both_files(tmp_path):
    res = CliRunner().invoke(cli, ["demo", "--train", str(tmp_path / "x.csv"), "--output-dir", str(tmp_path)])
    assert res.exit_code == 2 and "both --train and --test" in res.output


def _demo_files(tmp_path):
    pd.DataFrame({"id": [f"r{i}" for i in range(12)], "text": TEXTS, "label": ["pos", "neg"] * 6}).to_csv(
        tmp_path / "tr.csv", index=False)
    pd.DataFrame({"text": ["great fun", "dull"], "label": ["pos", "neg"]}).to_csv(tmp_path / "te.csv", index=False)
    return ["demo", "--train", str(tmp_path / "tr.csv"), "--test", str(tmp_path / "te.csv"), "--permutations", "8",
            "--no-progress", "--noise", "0.25"]


def test_a_rerun_with_other_settings_replaces_the_outputs_as_a_whole(tmp_path, tiny_bert_path, monkeypatch):
    """A rerun with another --seed in the same folder exited 2 (advising options demo lacks) after rewriting
    train.csv, leaving values.csv of the old run beside it."""
    args = _demo_files(tmp_path) + ["--model", str(tiny_bert_path), "--output-dir", str(tmp_path / "out")]
    out = tmp_path / "out"
    assert CliRunner().invoke(cli, args + ["--seed", "1"]).exit_code == 0
    first = {name: (out / name).read_bytes() for name in ("train.csv", "values.csv", "manifest.json")}
    res = CliRunner().invoke(cli, args + ["--seed", "2"])
    assert res.exit_code == 0, res.output
    train, values = pd.read_csv(out / "train.csv"), pd.read_csv(out / "values.csv")
    assert train["label"].tolist() == values["label"].tolist() and train["id"].tolist() == values["example_id"].tolist()
    assert json.loads((out / "manifest.json").read_text())["valuation"]["seed"] == 2
    assert (out / "train.csv").read_bytes() != first["train.csv"]
    # a run that fails on the way leaves the previous run's outputs as they were, and nothing of its own
    from freeshap_dq.cli import demo

    def broken(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(demo, "html_report", broken)
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    assert CliRunner().invoke(cli, args + ["--seed", "3"]).exit_code == 1
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]


@pytest.mark.parametrize("extra, message", [(["--noise", "1.5"], "--noise"), (["--noise", "-0.1"], "--noise"),
                                            (["--seed", "-1"], "--seed")])
def test_demo_refuses_bad_numbers(tmp_path, extra, message):
    res = CliRunner().invoke(cli, _demo_files(tmp_path) + ["--output-dir", str(tmp_path / "o")] + extra)
    assert res.exit_code == 2 and message in res.output and not (tmp_path / "o").exists()


def test_demo_on_a_single_class_file_says_why(tmp_path):
    args = _demo_files(tmp_path)
    pd.DataFrame({"text": TEXTS, "label": ["pos"] * 12}).to_csv(tmp_path / "tr.csv", index=False)
    res = CliRunner().invoke(cli, args + ["--output-dir", str(tmp_path / "o")])
    assert res.exit_code == 2 and "needs at least two" in res.output and "Traceback" not in res.output


def test_demo_refuses_options_that_do_not_apply(tmp_path):
    """--n-train with --train (or a column option without it) was accepted and ignored."""
    res = CliRunner().invoke(cli, _demo_files(tmp_path) + ["--n-train", "50", "--output-dir", str(tmp_path / "o")])
    assert res.exit_code == 2 and "--n-train does not apply with --train/--test" in res.output
    res = CliRunner().invoke(cli, ["demo", "--text-column", "body", "--output-dir", str(tmp_path / "o")])
    assert res.exit_code == 2 and "--text-column does not apply without --train/--test" in res.output
    assert not (tmp_path / "o").exists()
