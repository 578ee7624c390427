import json

import pandas as pd
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
    res = CliRunner().invoke(cli, ["report", "--result", str(out / "result.npz"), "--data", str(out / "train.csv"),
                                   "--html", str(tmp_path / "r.html")])
    assert res.exit_code == 0 and "Most harmful" in res.output and (tmp_path / "r.html").exists()


def test_demo_needs_both_files(tmp_path):
    res = CliRunner().invoke(cli, ["demo", "--train", str(tmp_path / "x.csv"), "--output-dir", str(tmp_path)])
    assert res.exit_code == 2 and "both --train and --test" in res.output
