"""Every option of a command reaches what it controls.

For each option a run with a non-default value must either change what the command writes (the table, the
manifest, a file it names) or be refused with a message that names the option — never be accepted and
ignored (``value --device`` was dropped before the valuation settings were built; ``value --kernel K.npz
--trainable all`` ignored the eNTK option). A new option fails ``test_every_option_is_swept`` until it has a
case here or a documented reason in ``NOT_SWEPT``.
"""

import json

import click
import numpy as np
import pandas as pd
import pytest
import torch
from click.testing import CliRunner
from problems import random_problem
from tiny_models import tiny_bert

from freeshap_dq.cli.main import cli
from freeshap_dq.config import ValuationConfig
from freeshap_dq.ntk.precision import native_bf16

IGNORED_MANIFEST_KEYS = {"elapsed_seconds", "versions", "output", "saved_result"}

# command -> option -> why a run of this sweep does not cover it (covered elsewhere, or not a behaviour)
NOT_SWEPT = {
    "value": {
        "output": "the output itself (every case writes and reads it)",
        "kernel_path": "the input of every case",
        "train_path": "the eNTK path: tests/cli/test_cli_ntk.py values data with a tiny model",
        "test_path": "as --train",
        "progress": "stderr only: a progress bar",
        "resume": "tests/cli/test_cli.py resumes and refuses checkpoints",
        "executor": "tests/valuation/test_ray.py: Ray gives the same values and records the executor",
        "help": "click's own",
    },
    "prune": {"values_path": "input", "data_path": "input", "output": "output", "help": "click's own",
              "dry_run": "writes nothing by design (tests/cli/test_cli_curate.py)"},
    "select": {"values_path": "input", "data_path": "input", "output": "output", "help": "click's own",
               "dry_run": "writes nothing by design (tests/cli/test_cli_curate.py)"},
}
OTHER_COMMANDS = {  # commands this sweep does not run, and where their options are exercised
    "kernel": "tests/cli/test_kernel_option_sweep.py",
    "report": "test_report_explain_and_relabel_options_change_the_output_or_are_refused, below",
    "explain": "as report", "relabel": "as report (relabel apply)",
    "labelstudio": "test_push_and_pull_options_reach_the_server_or_are_refused in tests/integrations/"
                   "test_labelstudio.py (it needs the suite's Label Studio server)",
}

CONFIG_VALUES = {"method": "beta", "permutations": 3, "tolerance": 0.05, "ridge": "rel:1", "kernel_scale": 2.0,
                 "jitter": 0.01, "empty_utility": "zero", "rank_metric": "accuracy", "per_point": True, "seed": 3,
                 "start": 2, "beta_alpha": 4.0, "beta_beta": 2.0, "device": "cpu", "block_size": 16,
                 "batch_size": 2, "max_seconds": 100.0, "stderr_target": 1e-9, "checkpoint_every": 2,
                 "low_rank": 4, "low_rank_method": "eigen", "reduce_every": 4}


@pytest.fixture(scope="module")
def kernel(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sweep")
    random_problem(n=10, m=4, n_classes=2, train_ids=np.array([f"e{i}" for i in range(10)])).save(folder / "K.npz")
    return folder / "K.npz"


def value(kernel, out, *args):
    res = CliRunner().invoke(cli, ["value", "--kernel", str(kernel), "--permutations", "4", "-o", str(out),
                                   *map(str, args)])
    manifest = json.loads(out.with_name(out.name + ".manifest.json").read_text()) if res.exit_code == 0 else None
    return res, manifest


def flag(command: click.Command, name: str) -> str:
    param = next(p for p in command.params if p.name == name)
    return next(o for o in param.opts if o.startswith("--"))


def commands():
    """(name, command) for every command, a group's subcommands as 'group sub'."""
    for name, command in cli.commands.items():
        if isinstance(command, click.Group):
            yield from ((f"{name} {sub}", c) for sub, c in command.commands.items())
        else:
            yield name, command


def test_every_option_is_swept():
    for name, command in commands():
        if name.split()[0] in OTHER_COMMANDS:
            continue
        swept = set(NOT_SWEPT[name]) | set(SWEEPS[name])
        missing = sorted(p.name for p in command.params if p.name not in swept)
        assert not missing, f"freeshap-dq {name}: options with no sweep case or reason: {missing}"


def test_value_config_options_reach_the_manifest(kernel, tmp_path):
    command = cli.commands["value"]
    for name, setting in CONFIG_VALUES.items():
        args = [flag(command, name)] if setting is True else [flag(command, name), setting]
        if name == "per_point":
            args += ["--save-result", tmp_path / "r.npz"]
        res, manifest = value(kernel, tmp_path / f"{name}.csv", *args)
        assert res.exit_code == 0, (name, res.output)
        assert manifest["config"][name] == setting, f"--{name} did not reach the valuation settings"


def test_value_preset_reaches_the_manifest(kernel, tmp_path):
    res, manifest = value(kernel, tmp_path / "p.csv", "--preset", "paper")
    assert res.exit_code == 0 and manifest["config"]["tolerance"] == 0.05 and manifest["config"]["ridge"] == "1e-6"


def changed(before: dict, after: dict) -> set[str]:
    keys = (set(before) | set(after)) - IGNORED_MANIFEST_KEYS
    return {k for k in keys if before.get(k) != after.get(k)}


def sweep_value(kernel, tmp_path):
    """Options other than the valuation settings: each changes the manifest or a file, or is refused by name."""
    base_res, base = value(kernel, tmp_path / "base.csv")
    assert base_res.exit_code == 0, base_res.output
    ntk_flags = [p for p in cli.commands["value"].params if p.name in NTK_VALUES]
    for param in ntk_flags:  # eNTK options cannot apply to a precomputed kernel: refused by name
        res, _ = value(kernel, tmp_path / "n.csv", param.opts[0], NTK_VALUES[param.name])
        assert res.exit_code == 2 and param.opts[0] in res.output, (param.name, res.output)
    for option, setting in (("--text-column", "t"), ("--pair-column", "p"), ("--label-column", "l"),
                            ("--id-column", "uid"), ("--allow-label-variants", None), ("--cache-dir", tmp_path)):
        res, _ = value(kernel, tmp_path / "d.csv", *([option] if setting is None else [option, setting]))
        assert res.exit_code == 2 and option in res.output, (option, res.output)
    res, manifest = value(kernel, tmp_path / "j.json", "--format", "json")
    assert res.exit_code == 0 and json.loads((tmp_path / "j.json").read_text())[0]["train_index"] == 0
    res, manifest = value(kernel, tmp_path / "s.csv", "--save-result", tmp_path / "s.npz")
    assert res.exit_code == 0 and (tmp_path / "s.npz").exists()
    res, manifest = value(kernel, tmp_path / "c.csv", "--checkpoint-dir", tmp_path / "ck")
    assert res.exit_code == 0 and (tmp_path / "ck" / "checkpoint.npz").exists()
    res, _ = value(kernel, tmp_path / "g.csv", "--fail-on-harmful", 0)
    assert res.exit_code in (0, 3) and ("gate" in res.output)
    for option, setting in (("--workers", 2), ("--ray-address", "ray://x:1")):
        res, _ = value(kernel, tmp_path / "w.csv", option, setting)
        assert res.exit_code == 2 and option in res.output
    assert pd.read_csv(tmp_path / "base.csv").shape[0] == 10


NTK_VALUES = {"model": "smollm2", "adapter": "prompt-mlm", "trainable": "all", "pooling": "cls", "head_seed": 1,
              "head": "random",
              "kernel": "sum", "max_length": 64, "template": "{text} {mask}", "label_words": "a,b", "lora_rank": 4,
              "max_memory": "1GiB", "grad_batch_size": 2, "gradients": "vmap", "example_block": 4, "landmarks": 4,
              "landmark_seed": 1, "sketch": 8, "sketch_seed": 1, "precision": "bf16"}


def test_value_options_change_what_is_written_or_are_refused(kernel, tmp_path):
    sweep_value(kernel, tmp_path)


@pytest.fixture(scope="module")
def curation(kernel, tmp_path_factory):
    folder = tmp_path_factory.mktemp("curate")
    p = random_problem(n=10, m=4, n_classes=2)
    pd.DataFrame({"id": [f"e{i}" for i in range(10)], "text": [f"t {i}" for i in range(10)],
                  "label": [f"c{y}" for y in p.y_train], "cost": [1, 2] * 5}).to_csv(folder / "train.csv", index=False)
    res = CliRunner().invoke(cli, ["value", "--kernel", str(kernel), "--permutations", "6", "-o",
                                   str(folder / "values.csv")])
    assert res.exit_code == 0, res.output
    return folder


def curate(folder, command, out, *args):
    res = CliRunner().invoke(cli, [command, "--values", str(folder / "values.csv"), "--data",
                                   str(folder / "train.csv"), "-o", str(out), *map(str, args)])
    manifest_file = out.with_name(out.name + ".manifest.json")
    manifest = json.loads(manifest_file.read_text()) if res.exit_code == 0 and manifest_file.exists() else None
    return res, manifest


PRUNE_CASES = {"fraction": [0.2], "count": [2], "threshold": [0.0], "confident": [], "z": [0.5],
               "max_class_fraction": [0.2], "allow_empty_class": [], "metric": ["accuracy"],
               "manifest_path": None, "text_column": None, "pair_column": None, "label_column": None,
               "id_column": None, "allow_label_variants": None}
SELECT_CASES = {"count": [3], "fraction": [0.3], "per_class": [2], "budget": [4.0], "cost_column": ["cost", "--budget", 4],
                "metric": ["accuracy"], "manifest_path": None, "text_column": None, "pair_column": None,
                "label_column": None, "id_column": None, "allow_label_variants": None}
SWEEPS = {"value": {**{k: None for k in CONFIG_VALUES}, "preset": None, **{k: None for k in NTK_VALUES},
                    "cache_dir": None, "text_column": None, "pair_column": None, "label_column": None,
                    "id_column": None, "allow_label_variants": None, "fmt": None, "save_result": None,
                    "checkpoint_dir": None, "fail_on_harmful": None, "workers": None, "ray_address": None},
          "prune": PRUNE_CASES, "select": SELECT_CASES}


@pytest.mark.parametrize("command, base_args, cases", [
    ("prune", ["--count", 1], PRUNE_CASES), ("select", ["--count", 2], SELECT_CASES)])
def test_curation_options_change_the_manifest(curation, tmp_path, command, base_args, cases):
    res, base = curate(curation, command, tmp_path / "base.csv", *base_args)
    assert res.exit_code == 0, res.output
    for name, args in cases.items():
        if args is None:
            continue
        option = flag(cli.commands[command], name)
        extra = base_args if name not in ("count", "fraction") else []
        res, manifest = curate(curation, command, tmp_path / f"{name}.csv", *extra, option, *args)
        assert res.exit_code == 0, (name, res.output)
        assert manifest["policy"] != base["policy"] or manifest["counts"] != base["counts"], name
        if name == "cost_column":
            assert manifest["cost_column"] == "cost"
    # the columns and the manifest path: a named column must exist, the manifest goes where it is told
    for name, value_ in (("text_column", "nope"), ("label_column", "nope"), ("id_column", "nope"),
                         ("pair_column", "nope")):
        res, _ = curate(curation, command, tmp_path / "x.csv", *base_args, flag(cli.commands[command], name), value_)
        assert res.exit_code == 2 and "nope" in res.output, (name, res.output)
    res, _ = curate(curation, command, tmp_path / "y.csv", *base_args, "--manifest", tmp_path / "m.json")
    assert res.exit_code == 0 and (tmp_path / "m.json").exists()
    train = pd.read_csv(curation / "train.csv")
    train.loc[0, "label"] = train.loc[1, "label"].upper()
    train.to_csv(tmp_path / "variant.csv", index=False)
    args = [command, "--values", curation / "values.csv", "--data", tmp_path / "variant.csv", "-o", tmp_path / "v.csv",
            *base_args]
    assert CliRunner().invoke(cli, list(map(str, args))).exit_code == 2
    assert CliRunner().invoke(cli, list(map(str, args + ["--allow-label-variants"]))).exit_code == 0


def test_config_values_cover_every_field():
    import dataclasses

    assert set(CONFIG_VALUES) == {f.name for f in dataclasses.fields(ValuationConfig)}


def test_report_explain_and_relabel_options_change_the_output_or_are_refused(tmp_path):
    """The reading commands: each option changes what is printed or written, or is refused by name."""
    p = random_problem(n=12, m=4, n_classes=2, train_ids=np.array([f"e{i}" for i in range(12)]),
                       test_ids=np.array([f"t{i}" for i in range(4)]), label_names=("neg", "pos"))
    p.save(tmp_path / "K.npz")
    pd.DataFrame({"id": p.train_ids, "text": [f"train {i}" for i in range(12)],
                  "label": [p.label_names[y] for y in p.y_train]}).to_csv(tmp_path / "train.csv", index=False)
    pd.DataFrame({"id": p.test_ids, "text": [f"test {i}" for i in range(4)],
                  "label": [p.label_names[y] for y in p.y_test]}).to_csv(tmp_path / "test.csv", index=False)
    res = CliRunner().invoke(cli, ["value", "--kernel", str(tmp_path / "K.npz"), "--permutations", "8", "--per-point",
                                   "--save-result", str(tmp_path / "r.npz"), "-o", str(tmp_path / "v.csv")])
    assert res.exit_code == 0, res.output
    invoke = lambda *args: CliRunner().invoke(cli, [str(a) for a in args])  # noqa: E731

    report = ["report", "--result", tmp_path / "r.npz"]
    base = invoke(*report).output
    assert invoke(*report, "--top", 2).output != base
    assert "train 0" in invoke(*report, "--data", tmp_path / "train.csv").output and "train 0" not in base
    assert invoke(*report, "--html", tmp_path / "r.html").exit_code == 0 and (tmp_path / "r.html").exists()
    for option in ("--text-column", "--label-column", "--id-column", "--pair-column"):
        res = invoke(*report, option, "x")
        assert res.exit_code == 2 and option in res.output, option  # was: accepted and ignored without --data
    assert invoke(*report, "--top", 0).exit_code == 2
    covered = {"result_path", "top", "data_path", "html_path", "text_column", "label_column", "id_column",
               "pair_column", "allow_label_variants"}
    assert {q.name for q in cli.commands["report"].params} == covered

    explain = ["explain", "--result", tmp_path / "r.npz", "--train", tmp_path / "train.csv", "--test",
               tmp_path / "test.csv", "-o", tmp_path / "x.csv"]
    def table(*args):
        res = invoke(*explain, *args)
        assert res.exit_code == 0, res.output
        return pd.read_csv(tmp_path / "x.csv")
    base = table("--example", "t0")
    assert not table("--example", "t1").equals(base) and not table("--row", 2).equals(base)
    assert len(table("--example", "t0", "--top-k", 2)) != len(base)
    assert not table("--example", "t0", "--metric", "accuracy")["value"].equals(base["value"])
    assert invoke(*explain, "--example", "t0", "--id-column", "nope").exit_code == 2
    assert not table("--example", "t0", "--z", 0)["flagged_harmful"].equals(base["flagged_harmful"])
    terminal = ["explain", "--result", tmp_path / "r.npz", "--train", tmp_path / "train.csv", "--test",
                tmp_path / "test.csv", "--example", "t0"]
    text, csv, as_json = (invoke(*terminal, *args).output for args in ((), ("--format", "csv"), ("--format", "json")))
    assert "Most harmful training examples" in text and text.count("test 0") == 1
    assert csv.startswith("test_id,") and json.loads(as_json)[0]["test_id"] == "t0"
    assert invoke(*explain, "--example", "t0", "--format", "csv").exit_code == 2  # a file's format is its extension
    covered = {"result_path", "train_path", "test_path", "examples", "rows", "top_k", "metric", "output", "z", "fmt",
               "text_column", "label_column", "id_column", "pair_column", "allow_label_variants"}
    assert {q.name for q in cli.commands["explain"].params} == covered

    pd.DataFrame({"example_id": ["e0"], "reviewed_label": ["pos" if p.y_train[0] == 0 else "neg"],
                  "given_label": [p.label_names[p.y_train[0]]]}).to_csv(tmp_path / "rel.csv", index=False)
    relabel = ["relabel", "apply", "--data", tmp_path / "train.csv", "--relabels", tmp_path / "rel.csv"]
    assert invoke(*relabel, "-o", tmp_path / "fixed.csv").exit_code == 0
    assert pd.read_csv(tmp_path / "fixed.csv")["label"][0] != pd.read_csv(tmp_path / "train.csv")["label"][0]
    assert invoke(*relabel, "-o", tmp_path / "f2.csv", "--manifest", tmp_path / "m.json").exit_code == 0
    assert (tmp_path / "m.json").exists()
    dry = invoke(*relabel, "--dry-run")
    assert dry.exit_code == 0 and "e0" in dry.output and not (tmp_path / "m2.json").exists()
    pd.DataFrame({"example_id": ["e0"], "reviewed_label": ["maybe"]}).to_csv(tmp_path / "new.csv", index=False)
    new_label = ["relabel", "apply", "--data", tmp_path / "train.csv", "--relabels", tmp_path / "new.csv", "-o",
                 tmp_path / "f3.csv"]
    assert invoke(*new_label).exit_code == 2 and invoke(*new_label, "--allow-new-labels").exit_code == 0
    stale = pd.DataFrame({"example_id": ["e0"], "reviewed_label": ["pos"], "given_label": ["other"]})
    stale.to_csv(tmp_path / "stale.csv", index=False)
    conflict = ["relabel", "apply", "--data", tmp_path / "train.csv", "--relabels", tmp_path / "stale.csv", "-o",
                tmp_path / "f4.csv"]
    assert invoke(*conflict).exit_code == 2 and invoke(*conflict, "--on-conflict", "skip").exit_code == 0
    covered = {"data_path", "relabels_path", "output", "manifest_path", "allow_new_labels", "on_conflict", "dry_run",
               "text_column", "label_column", "id_column", "pair_column", "allow_label_variants"}
    assert {q.name for q in cli.commands["relabel"].commands["apply"].params} == covered


DEMO_TEXTS = ["a great movie", "a dull plot", "it was great", "it was bad", "very good indeed", "terrible",
              "i loved every minute", "long and tedious", "brilliant", "boring film", "funny and clever", "a mess"]
DEMO_CASES = {"noise": ["--noise", 0.5], "trainable": ["--trainable", "head-only"], "permutations": ["--permutations", 5],
              "seed": ["--seed", 2], "model": None, "text_column": None, "pair_column": None, "label_column": None,
              "id_column": None, "allow_label_variants": None, "n_train": None, "n_test": None, "max_length": None,
              "max_memory": ["--max-memory", "64MiB"]}
SWEEPS["demo"] = DEMO_CASES
NOT_SWEPT["demo"] = {"output_dir": "the output itself", "train_path": "the input of every case", "test_path": "as --train",
                     "progress": "stderr only: a progress bar", "help": "click's own"}


def demo_files(folder, columns=("id", "text", "label"), labels=None, pairs=False):
    labels = labels or ["pos", "neg"] * 6
    train = dict(zip(columns, ([f"r{i}" for i in range(12)], DEMO_TEXTS, labels), strict=True))
    test = dict(zip(columns, (["s0", "s1"], ["great fun", "dull"], ["pos", "neg"]), strict=True))
    if pairs:
        train["second"], test["second"] = list(reversed(DEMO_TEXTS)), ["a mess", "brilliant"]
    pd.DataFrame(train).to_csv(folder / "tr.csv", index=False)
    pd.DataFrame(test).to_csv(folder / "te.csv", index=False)
    return ["--train", folder / "tr.csv", "--test", folder / "te.csv"]


def test_demo_options_change_the_manifest_or_the_outputs(tmp_path, tiny_bert_path):
    out = tmp_path / "out"  # one folder: the eNTK cache is shared across the runs
    base_args = ["--model", tiny_bert_path, "--permutations", 8, "--noise", 0.25, "--no-progress", "--output-dir", out]

    def demo(*args):
        res = CliRunner().invoke(cli, ["demo", *map(str, base_args), *map(str, args)])
        if res.exit_code != 0:
            return res, None, None
        manifest = json.loads((out / "manifest.json").read_text())
        manifest["summary"].pop("seconds")
        return res, manifest, pd.read_csv(out / "values.csv")

    files = demo_files(tmp_path)
    res, base, base_values = demo(*files)
    assert res.exit_code == 0, res.output
    for name, args in DEMO_CASES.items():
        if args is not None:
            res, manifest, _ = demo(*files, *args)
            assert res.exit_code == 0 and manifest != base, (name, res.output)
    other_model = tiny_bert(tmp_path / "other-bert", seed=5)
    _, manifest, values = demo(*files, "--model", other_model)
    assert manifest["ntk"]["model"] == str(other_model) and not values["value_ce"].equals(base_values["value_ce"])

    folder = tmp_path / "renamed"
    folder.mkdir()
    renamed = demo_files(folder, columns=("uid", "body", "gold"))
    res, _, values = demo(*renamed, "--text-column", "body", "--label-column", "gold", "--id-column", "uid")
    assert res.exit_code == 0, res.output
    assert values["example_id"].tolist() == base_values["example_id"].tolist()
    assert values["value_ce"].tolist() == base_values["value_ce"].tolist()  # same data under other column names
    for option in ("--text-column", "--label-column", "--id-column", "--pair-column"):
        res, _, _ = demo(*files, option, "nope")
        assert res.exit_code == 2 and "nope" in res.output, option
    folder = tmp_path / "pairs"
    folder.mkdir()
    res, _, values = demo(*demo_files(folder, pairs=True), "--pair-column", "second")
    assert res.exit_code == 0 and not values["value_ce"].equals(base_values["value_ce"]), res.output
    folder = tmp_path / "variants"
    folder.mkdir()
    variants = demo_files(folder, labels=["pos", "neg"] * 5 + ["Pos", "neg"])
    assert demo(*variants)[0].exit_code == 2
    res, manifest, _ = demo(*variants, "--allow-label-variants")
    assert res.exit_code == 0 and manifest["kernel"]["label_names"] == ["Pos", "neg", "pos"], res.output

    res, _, _ = demo("--n-train", 12, "--n-test", 6)  # the Rotten Tomatoes default: longer than 64 positions
    assert res.exit_code == 2 and "--max-length 64" in res.output  # advice the demo can now follow
    res, manifest, _ = demo("--n-train", 12, "--n-test", 6, "--max-length", 64)
    assert res.exit_code == 0, res.output
    assert manifest["ntk"]["max_length"] == 64
    assert (manifest["summary"]["n_train"], manifest["summary"]["n_test"]) == (12, 6)
    res, manifest, _ = demo("--n-train", 14, "--n-test", 6, "--max-length", 64)
    assert res.exit_code == 0 and manifest["summary"]["n_train"] == 14


EVALUATE_CASES = {"n_train": ["--n-train", 30], "n_test": ["--n-test", 10], "noise": ["--noise", 0.2],
                  "noise_modes": ["--noise-modes", "class-conditional"], "seeds": ["--seeds", "1"],
                  "permutations": ["--permutations", 30], "ridge": ["--ridge", "1e-3"],
                  "experiments": ["--experiments", "fidelity"], "trainable": ["--trainable", "top:1"],
                  "robustness_sizes": ["--experiments", "robustness", "--robustness-sizes", "12"],
                  "robustness_resamples": ["--experiments", "robustness", "--robustness-resamples", "3"],
                  "robustness_targets": ["--experiments", "robustness", "--robustness-targets", "3"],
                  "adapter": ["--adapter", "prompt-mlm", "--label-words", "neg=bad,pos=good"],
                  "max_length": ["--max-length", 8], "head": ["--head", "random"], "kernel": ["--kernel-mode", "sum"],
                  "sketch": ["--sketch", 4], "label_words": None, "model": None,
                  "precision": ["--precision", "fp32" if native_bf16(torch.device("cpu")) else "bf16"],  # not auto's
                  "train": None, "test": None}
SWEEPS["evaluate"] = EVALUATE_CASES
NOT_SWEPT["evaluate"] = {"dataset": "the packaged datasets: tests/data/test_datasets.py; with --train it is refused "
                                    "(test_evaluate_refuses_bad_numbers_before_any_work)",
                         "output_dir": "the output itself", "progress": "stderr only: a progress bar",
                         "max_memory": "how the eNTK is chunked, not what it is: tests/ntk/test_blocked.py compares "
                                       "kernels built under budgets from 10KiB to 256MiB", "help": "click's own"}


def test_evaluate_options_change_the_results_or_are_refused(tmp_path, tiny_bert_path):
    rng = np.random.default_rng(0)
    words = {"pos": ["good", "great", "brilliant"], "neg": ["bad", "dull", "terrible"]}
    for name, n in (("train", 40), ("test", 20)):
        labels = ["pos", "neg"] * (n // 2)
        texts = [" ".join([*rng.choice(words[label], 2), "movie"]) for label in labels]
        pd.DataFrame({"id": [f"{name}{i}" for i in range(n)], "text": texts, "label": labels}).to_csv(
            tmp_path / f"{name}.csv", index=False)
    out = tmp_path / "out"
    base_args = ["--train", tmp_path / "train.csv", "--test", tmp_path / "test.csv", "--model", tiny_bert_path,
                 "--trainable", "head-only", "--seeds", "0", "--noise-modes", "symmetric", "--permutations", 10,
                 "--robustness-sizes", 10, "--robustness-resamples", 2, "--robustness-targets", 4, "--experiments",
                 "detection", "--no-progress", "-o", out]

    def evaluate(*args):
        res = CliRunner().invoke(cli, ["evaluate", *map(str, base_args), *map(str, args)])
        if res.exit_code != 0:
            return res, None, None
        manifest = json.loads((out / "manifest.json").read_text())
        return res, {k: manifest[k] for k in ("n_train", "n_test", "kernel")}, pd.read_csv(out / "results.csv")

    res, base_manifest, base = evaluate()
    assert res.exit_code == 0, res.output
    for name, args in EVALUATE_CASES.items():
        if args is not None:
            res, manifest, results = evaluate(*args)
            assert res.exit_code == 0, (name, res.output)
            assert manifest != base_manifest or not results.equals(base), f"--{name} changed nothing"
    res, _, _ = evaluate("--label-words", "neg=bad,pos=good")
    assert res.exit_code == 2 and "--label-words" in res.output
    _, _, results = evaluate("--model", tiny_bert(tmp_path / "other-bert", seed=5))
    assert not results.equals(base)
    res, _, _ = evaluate("--train", tmp_path / "nope.csv")
    assert res.exit_code == 2 and "nope.csv" in res.output


def test_evaluate_refuses_bad_numbers_before_any_work(tmp_path):
    """Each was a Python error after the eNTK (or a robustness size silently skipped with exit 0)."""
    for args, message in ((["--n-test", 0], "--n-test"), (["--n-train", -5], "--n-train"),
                          (["--permutations", 0], "permutations"), (["--ridge", "foo"], "ridge"),
                          (["--robustness-sizes", "5,x"], "--robustness-sizes"), (["--robustness-sizes", 4],
                                                                                  "--robustness-targets"),
                          (["--robustness-resamples", 1], "--robustness-resamples"),
                          (["--robustness-targets", -1], "--robustness-targets"), (["--seeds", -1], "--seeds"),
                          (["--seeds", "0,0"], "more than once"), (["--noise-modes", "symmetric,symmetric"], "once"),
                          (["--max-memory", "lots"], "lots"), (["--trainable", "nonsense"], "nonsense"),
                          (["--dataset", "newsgroups", "--train", "a.csv", "--test", "b.csv"], "--dataset"),
                          (["--dataset", "imdb"], "imdb"), (["--head", "trained"], "trained"),
                          (["--kernel-mode", "per_class"], "per_class")):
        res = CliRunner().invoke(cli, ["evaluate", "-o", str(tmp_path / "o"), *map(str, args)])
        assert res.exit_code == 2 and message in res.output, (args, res.output)
        assert "Traceback" not in res.output and not (tmp_path / "o").exists(), args


AUDIT_CASES = {"permutations": ["--permutations", 8], "metric": ["--metric", "accuracy"], "z": ["--z", 0.0],
               "threshold": ["--threshold", 0.0], "data_valuation": ["--data-valuation"], "result_path": None,
               **{k: None for k in NTK_VALUES}, "cache_dir": None, "text_column": None, "pair_column": None,
               "label_column": None, "id_column": None, "allow_label_variants": None, "train_path": None,
               "test_path": None}
NOT_SWEPT["cleanlab audit"] = {
    "kernel_path": "the input of every case", "lab_dir": "an output (every case writes it)",
    "output": "the output itself", "progress": "stderr only: a progress bar", "help": "click's own",
    "force_data_valuation": "lifts the dense-matrix memory refusal only (test_knn_shapley_memory_guard in "
                            "tests/integrations/test_cleanlab.py); refused without --data-valuation"}
SWEEPS["cleanlab audit"] = AUDIT_CASES
SWEEPS["cleanlab export"] = {"issue_type": None}
NOT_SWEPT["cleanlab export"] = {"lab_dir": "the input", "output": "the output itself", "help": "click's own"}


def test_cleanlab_options_change_the_table_or_are_refused(tmp_path, tiny_bert_path):
    pytest.importorskip("cleanlab")
    from freeshap_dq.data.synthetic import noisy_problem

    noisy_problem(n_train=60, n_test=20, noise=0.1, seed=2).problem.save(tmp_path / "K.npz")
    invoke = lambda *args: CliRunner().invoke(cli, [str(a) for a in args])  # noqa: E731

    def audit(*args, kernel=("--kernel", tmp_path / "K.npz")):
        res = invoke("cleanlab", "audit", *kernel, "--lab-dir", tmp_path / "lab", "-o", tmp_path / "a.csv",
                     "--no-progress", *args)
        return res, pd.read_csv(tmp_path / "a.csv") if res.exit_code == 0 else None

    res, base = audit("--permutations", 4)
    assert res.exit_code == 0, res.output
    for name, args in AUDIT_CASES.items():
        if args is not None:
            res, table = audit(*(["--permutations", 4] if name != "permutations" else []), *args)
            assert res.exit_code == 0 and not table.equals(base), (name, res.output)
    assert "data_valuation_score" in set(audit("--permutations", 4, "--data-valuation")[1].columns) - set(base.columns)
    res = invoke("value", "--kernel", tmp_path / "K.npz", "--permutations", 6, "--save-result", tmp_path / "r.npz",
                 "-o", tmp_path / "v.csv")
    assert res.exit_code == 0, res.output
    res, table = audit("--result", tmp_path / "r.npz")
    values = pd.read_csv(tmp_path / "v.csv").set_index("example_id")["value_ce"]
    assert res.exit_code == 0 and table.set_index("example_id")["freeshap_value"].reindex(values.index).equals(values)
    for param in cli.commands["cleanlab"].commands["audit"].params:  # eNTK and data options need --train/--test
        if param.name in NTK_VALUES or param.name in ("cache_dir", "text_column", "pair_column", "label_column",
                                                      "id_column", "allow_label_variants"):
            setting = NTK_VALUES.get(param.name, "x")
            res, _ = audit("--permutations", 4, *([param.opts[0]] if param.is_flag else [param.opts[0], setting]))
            assert res.exit_code == 2 and param.opts[0] in res.output, (param.name, res.output)

    words = ["a great movie", "a dull plot", "it was great", "it was bad", "very good indeed", "terrible"] * 4
    frame = pd.DataFrame({"uid": [f"r{i}" for i in range(24)], "body": words, "gold": ["pos", "neg"] * 12})
    frame.to_csv(tmp_path / "tr.csv", index=False)
    frame.iloc[:6].to_csv(tmp_path / "te.csv", index=False)
    files = ("--train", tmp_path / "tr.csv", "--test", tmp_path / "te.csv")
    ntk = ["--model", tiny_bert_path, "--text-column", "body", "--label-column", "gold", "--id-column", "uid",
           "--permutations", 4, "--cache-dir", tmp_path / "cache"]
    res, head_only = audit(*ntk, "--trainable", "head-only", kernel=files)
    assert res.exit_code == 0, res.output
    assert sorted(head_only["example_id"]) == sorted(frame["uid"]) and any((tmp_path / "cache").iterdir())
    res, top1 = audit(*ntk, "--trainable", "top:1", kernel=files)
    by_id = lambda table: table.set_index("example_id")["freeshap_value"].sort_index()  # noqa: E731
    assert res.exit_code == 0 and not by_id(top1).equals(by_id(head_only))
    res, _ = audit(*ntk, "--text-column", "nope", kernel=files)
    assert res.exit_code == 2 and "nope" in res.output

    audit("--permutations", 4)
    everything = invoke("cleanlab", "export", "--lab-dir", tmp_path / "lab", "-o", tmp_path / "all.csv")
    only = invoke("cleanlab", "export", "--lab-dir", tmp_path / "lab", "--issue-type", "freeshap", "-o",
                  tmp_path / "fs.csv")
    assert everything.exit_code == only.exit_code == 0
    assert set(pd.read_csv(tmp_path / "fs.csv").columns) < set(pd.read_csv(tmp_path / "all.csv").columns)


def test_cleanlab_audit_writes_the_datalab_and_the_table_together(tmp_path, monkeypatch):
    """The Datalab was saved before the table was written: a table that could not be written left a new lab."""
    pytest.importorskip("cleanlab")
    from freeshap_dq.data.synthetic import noisy_problem

    noisy_problem(n_train=60, n_test=20, noise=0.1, seed=2).problem.save(tmp_path / "K.npz")
    res = CliRunner().invoke(cli, ["cleanlab", "audit", "--kernel", str(tmp_path / "K.npz"), "--permutations", "3",
                                   "--lab-dir", str(tmp_path / "lab"), "-o", str(tmp_path / "a.csv")])
    assert res.exit_code == 0, res.output
    contents = lambda: {p: p.read_bytes() for p in (tmp_path / "lab").rglob("*") if p.is_file()}  # noqa: E731
    before = contents()
    (tmp_path / "a.csv").unlink()
    (tmp_path / "a.csv").mkdir()  # the table's path turns into a folder after the checks: writing it fails
    monkeypatch.setattr("freeshap_dq.cli.cleanlab_cmd.check_outputs", lambda *a, **k: None)
    res = CliRunner().invoke(cli, ["cleanlab", "audit", "--kernel", str(tmp_path / "K.npz"), "--permutations", "5",
                                   "--lab-dir", str(tmp_path / "lab"), "-o", str(tmp_path / "a.csv")])
    assert res.exit_code != 0
    assert contents() == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".lab.")]
