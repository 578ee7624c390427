import json

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from freeshap_dq.cli.main import cli
from freeshap_dq.data.synthetic import noisy_problem


@pytest.fixture
def run_dir(tmp_path):
    """A synthetic noisy problem written as data files + kernel, and its values (per-point result)."""
    data = noisy_problem(n_train=60, n_test=20, noise=0.2, seed=1)
    p = data.problem
    train = pd.DataFrame({"id": p.train_ids, "text": [f"train text {i}" for i in range(60)],
                          "label": [p.label_names[y] for y in p.y_train], "cost": np.arange(60) % 3 + 1})
    test = pd.DataFrame({"id": p.test_ids, "text": [f"test text {i}" for i in range(20)],
                         "label": [p.label_names[y] for y in p.y_test]})
    train.to_csv(tmp_path / "train.csv", index=False)
    test.to_parquet(tmp_path / "test.parquet")
    p.save(tmp_path / "K.npz")
    res = CliRunner().invoke(cli, ["value", "--kernel", str(tmp_path / "K.npz"), "-o", str(tmp_path / "values.csv"),
                                   "--permutations", "30", "--per-point", "--save-result", str(tmp_path / "r.npz")])
    assert res.exit_code == 0, res.output
    return tmp_path, data


def run(args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def test_prune_writes_cleaned_data_and_manifest(run_dir):
    d, data = run_dir
    res = run(["prune", "--values", d / "values.csv", "--data", d / "train.csv", "-o", d / "clean.csv",
               "--fraction", 0.2, "--max-class-fraction", 0.3])
    assert res.exit_code == 0, res.output
    clean = pd.read_csv(d / "clean.csv")
    manifest = json.loads((d / "clean.csv.manifest.json").read_text())
    removed = {e["example_id"] for e in manifest["examples"]}
    assert len(clean) == 60 - len(removed) and len(removed) == 12
    assert set(clean["id"]).isdisjoint(removed) and list(clean.columns) == ["id", "text", "label", "cost"]
    assert manifest["policy"]["fraction"] == 0.2 and all(e["reason"] for e in manifest["examples"])
    flipped = set(np.array(data.problem.train_ids)[data.flipped])
    assert len(removed & flipped) >= 6  # the noisy labels are found
    for label, before in manifest["counts"]["per_class_before"].items():
        assert before - manifest["counts"]["per_class_after"].get(label, 0) <= int(0.3 * before)


def test_prune_dry_run_writes_nothing(run_dir):
    d, _ = run_dir
    res = run(["prune", "--values", d / "values.csv", "--data", d / "train.csv", "-o", d / "clean.csv",
               "--confident", "--dry-run"])
    assert res.exit_code == 0 and "would remove" in res.output
    assert not (d / "clean.csv").exists() and not (d / "clean.csv.manifest.json").exists()


def test_select_with_quota_and_budget_in_another_format(run_dir):
    d, _ = run_dir
    res = run(["select", "--values", d / "values.csv", "--data", d / "train.csv", "-o", d / "best.jsonl",
               "--per-class", 5, "--budget", 12, "--cost-column", "cost"])
    assert res.exit_code == 0, res.output
    best = pd.read_json(d / "best.jsonl", lines=True)
    assert best["cost"].sum() <= 12 and best["label"].value_counts().max() <= 5
    manifest = json.loads((d / "best.jsonl.manifest.json").read_text())
    assert manifest["counts"]["selected"] == len(best)


@pytest.mark.parametrize("args, message", [
    (["--fraction", 0.1], "-o/--output"),
    (["-o", "x.csv"], "say what to remove"),
    (["-o", "x.csv", "--count", 3, "--label-column", "nope"], "no column 'nope'"),
])
def test_prune_errors(run_dir, args, message):
    d, _ = run_dir
    res = run(["prune", "--values", d / "values.csv", "--data", d / "train.csv"] + args)
    assert res.exit_code == 2 and message in res.output, res.output


def test_prune_refuses_values_of_other_data(run_dir):
    d, _ = run_dir
    other = pd.read_csv(d / "train.csv")
    other.loc[0, "id"] = "someone-else"
    other.to_csv(d / "other.csv", index=False)
    res = run(["prune", "--values", d / "values.csv", "--data", d / "other.csv", "-o", d / "x.csv", "--count", 2])
    assert res.exit_code == 2 and "do not describe the same examples" in res.output


def test_explain_top_k_per_test_example(run_dir):
    d, _ = run_dir
    res = run(["explain", "--result", d / "r.npz", "--train", d / "train.csv", "--test", d / "test.parquet",
               "--example", "test-00003", "--row", 1, "--top-k", 3, "-o", d / "why.csv"])
    assert res.exit_code == 0, res.output
    why = pd.read_csv(d / "why.csv")
    assert len(why) == 12 and set(why["test_id"]) == {"test-00003", "test-00000"}
    helpful = why[(why.test_id == "test-00003") & (why.kind == "helpful")]["value"].to_numpy()
    harmful = why[(why.test_id == "test-00003") & (why.kind == "harmful")]["value"].to_numpy()
    assert np.all(np.diff(helpful) <= 0) and np.all(np.diff(harmful) >= 0) and helpful[0] >= harmful[0]
    res = run(["explain", "--result", d / "r.npz", "--train", d / "train.csv", "--test", d / "test.parquet",
               "--example", "nope"])
    assert res.exit_code == 2 and "no test example with id 'nope'" in res.output


def test_per_point_result_folder_streams_to_disk_and_explains_the_same(run_dir):
    d, _ = run_dir
    from freeshap_dq import ValuationResult

    for extra in ([], ["--checkpoint-dir", d / "ckpt"]):
        res = run(["value", "--kernel", d / "K.npz", "-o", d / "values2.csv", "--permutations", 30, "--per-point",
                   "--save-result", d / "r.result", *extra])
        assert res.exit_code == 0, res.output
        folder, memory = ValuationResult.load(d / "r.result"), ValuationResult.load(d / "r.npz")
        assert isinstance(folder.point_sums["ce"], np.memmap)
        np.testing.assert_array_equal(folder.point_sums["ce"], memory.point_sums["ce"])
        assert [p.name for p in d.iterdir() if p.name.startswith(".")] == []  # the scratch folder is gone
    assert sorted(p.name for p in (d / "ckpt" / "points").iterdir())[:2] == ["points-30-accuracy.npy",
                                                                           "points-30-ce.npy"]
    args = ["--train", d / "train.csv", "--test", d / "test.parquet", "--example", "test-00003", "-o"]
    assert run(["explain", "--result", d / "r.result", *args, d / "a.csv"]).exit_code == 0
    assert run(["explain", "--result", d / "r.npz", *args, d / "b.csv"]).exit_code == 0
    pd.testing.assert_frame_equal(pd.read_csv(d / "a.csv"), pd.read_csv(d / "b.csv"))
    res = run(["value", "--kernel", d / "K.npz", "--per-point", "--save-result", d / "r.result", "--executor", "ray"])
    assert res.exit_code == 2 and "run in one process" in res.output


def test_fail_on_harmful_gate(run_dir):
    d, _ = run_dir
    base = ["value", "--kernel", d / "K.npz", "-o", d / "v.csv", "--permutations", 30]
    tripped = run(base + ["--fail-on-harmful", 0])
    assert tripped.exit_code == 3 and "harmful with confidence" in tripped.output and (d / "v.csv").exists()
    passed = run(base + ["--fail-on-harmful", 60])
    assert passed.exit_code == 0 and "gate passed" in passed.output


def test_quiet_silences_logs(run_dir):
    d, _ = run_dir
    res = CliRunner().invoke(cli, ["-q", "value", "--kernel", str(d / "K.npz"), "-o", str(d / "v.csv"),
                                   "--permutations", "3"])
    assert res.exit_code == 0 and res.stderr == ""


def test_unexpected_failure_exits_1_with_a_message(run_dir, monkeypatch):
    """A fault we cannot provoke with real inputs (e.g. the BLAS running out of memory) is simulated."""
    d, _ = run_dir
    import freeshap_dq.cli.main as main

    def broken(*args, **kwargs):
        raise RuntimeError("simulated allocation failure")

    monkeypatch.setattr(main, "compute_values", broken)
    res = run(["value", "--kernel", d / "K.npz", "-o", d / "v2.csv"])
    assert res.exit_code == 1 and "RuntimeError: simulated allocation failure" in res.output
    assert "Traceback" not in res.output and not (d / "v2.csv").exists()
    res = run(["-v", "value", "--kernel", d / "K.npz", "-o", d / "v2.csv"])
    assert res.exit_code == 1 and "Traceback" in res.output


def test_an_unexpected_failure_without_a_message_says_what_it_is(run_dir, monkeypatch):
    """evaluate's selection once died of a bare StopIteration: 'error: StopIteration: ' told the user nothing."""
    d, _ = run_dir
    import freeshap_dq.cli.main as main

    def broken(*args, **kwargs):
        raise StopIteration

    monkeypatch.setattr(main, "compute_values", broken)
    res = run(["value", "--kernel", d / "K.npz", "-o", d / "v3.csv"])
    assert res.exit_code == 1 and "StopIteration, an internal error of freeshap-dq with no message" in res.output
    assert "run with -v for the traceback" in res.output and not (d / "v3.csv").exists()


def test_prune_refuses_counts_above_n_and_emptying_a_class(run_dir):
    """prune --count 5000 on 60 rows removed everything, wrote a 0-row file and exited 0."""
    d, _ = run_dir
    res = run(["prune", "--values", d / "values.csv", "--data", d / "train.csv", "-o", d / "none.csv", "--count", 5000])
    assert res.exit_code == 2 and "--count 5000 is more than the 60 examples" in res.output
    res = run(["prune", "--values", d / "values.csv", "--data", d / "train.csv", "-o", d / "none.csv", "--count", 60])
    assert res.exit_code == 2 and "without examples" in res.output and "--allow-empty-class" in res.output
    assert not (d / "none.csv").exists()
    res = run(["prune", "--help"])
    assert "nearest whole number of examples" in res.output


def test_report_and_explain_join_by_id_and_refuse_data_of_another_run(run_dir):
    """report/explain attached texts and labels by row position: shuffled files gave other examples, and files of
    another run were accepted with exit 0."""
    d, data = run_dir
    train, test = pd.read_csv(d / "train.csv"), pd.read_parquet(d / "test.parquet")
    train.sample(frac=1.0, random_state=1).to_csv(d / "train.shuffled.csv", index=False)
    test.sample(frac=1.0, random_state=2).to_parquet(d / "test.shuffled.parquet")
    first_test = str(test["id"].iloc[0])

    def explain(train_file, test_file):
        res = run(["explain", "--result", d / "r.npz", "--train", d / train_file, "--test", d / test_file,
                   "--example", first_test, "--top-k", 3, "-o", d / "x.csv"])
        return res, (pd.read_csv(d / "x.csv") if res.exit_code == 0 else None)

    res, straight = explain("train.csv", "test.parquet")
    assert res.exit_code == 0, res.output
    res, shuffled = explain("train.shuffled.csv", "test.shuffled.parquet")
    assert res.exit_code == 0, res.output
    pd.testing.assert_frame_equal(straight, shuffled)

    report = lambda name: run(["report", "--result", d / "r.npz", "--data", d / name, "--top", 3])  # noqa: E731
    assert report("train.csv").output == report("train.shuffled.csv").output

    other = train.assign(id=[f"other-{i}" for i in range(len(train))])
    other.to_csv(d / "other.csv", index=False)
    res = report("other.csv")
    assert res.exit_code == 2 and "example id" in res.output and "is in" in res.output
    other_test = test.assign(id=[f"t-other-{i}" for i in range(len(test))])
    other_test.to_parquet(d / "other_test.parquet")
    res, _ = explain("train.csv", "other_test.parquet")
    assert res.exit_code == 2 and "does not hold the test examples" in res.output


def test_prune_outputs_appear_together_or_not_at_all(run_dir):
    """prune -o c.csv --manifest nodir/m.json exited 2 with c.csv on disk; -o x.xlsx wrote CSV text."""
    d, _ = run_dir
    base = ["prune", "--values", d / "values.csv", "--data", d / "train.csv", "--count", 3]
    res = run(base + ["-o", d / "c.csv", "--manifest", d / "nodir" / "m.json"])
    assert res.exit_code == 2 and "does not exist" in res.output and not (d / "c.csv").exists()
    res = run(base + ["-o", d / "x.xlsx"])
    assert res.exit_code == 2 and "unknown format '.xlsx'" in res.output and not (d / "x.xlsx").exists()
    res = run(base + ["-o", d / "train.csv"])
    assert res.exit_code == 2 and "is also the input --data" in res.output
