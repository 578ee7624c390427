"""``prune``, ``select`` and ``explain``: act on values; thin layers over ``freeshap_dq.curation.policies``."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import click
import numpy as np
import pandas as pd

from freeshap_dq import __version__
from freeshap_dq.cli.common import (
    ARTIFACT_PATH,
    DATA_PATH,
    column_options,
    friendly_errors,
    log,
    metric_option,
    pop_data_options,
    z_option,
)
from freeshap_dq.cli.main import cli
from freeshap_dq.curation.explain import explain, explanation_table, explanation_text, flagged_harmful
from freeshap_dq.curation.policies import ROUNDING_RULE, RemovalPolicy, SelectionPolicy, policy_dict
from freeshap_dq.data.tables import (
    TextDataset,
    data_table_format,
    dataset_from_frame,
    load_dataset,
    read_table,
    write_data_table,
)
from freeshap_dq.errors import InputError
from freeshap_dq.io import check_outputs, table_format, write_json, write_table
from freeshap_dq.result import ValuationResult

PATH = click.Path(dir_okay=False, path_type=Path)


def curate_options(kind: str):
    """The options prune and select share: inputs, outputs, manifest, metric, dry run."""
    noun = {"prune": "Cleaned dataset", "select": "Selected subset"}[kind]
    what = {"prune": "removed", "select": "selected"}[kind]

    def decorate(func):
        for option in reversed([
            click.option("--values", "values_path", type=PATH, required=True, help="Values table from freeshap-dq value."),
            click.option("--data", "data_path", type=DATA_PATH, required=True, help="The training data the values are for."),
            column_options,
            click.option("-o", "--output", type=PATH, default=None, help=f"{noun} (same format as --data unless the "
                         "extension says otherwise). Required unless --dry-run."),
            click.option("--manifest", "manifest_path", type=PATH, default=None,
                         help=f"Where to write what was {what} and why [default: OUTPUT.manifest.json]."),
            metric_option(),
            click.option("--dry-run", is_flag=True, help=f"Show what would be {what}; write nothing."),
        ]):
            func = option(func)
        return func

    return decorate


def join_values(values_path: Path, data: TextDataset) -> pd.DataFrame:
    """The values table joined to the training data by example id (or by row when it has no ids)."""
    values = read_table(values_path)
    for column in ("value", "value_ce", "stderr", "stderr_ce", "train_index", "rank", "permutations"):
        if column in values.columns:
            values[column] = pd.to_numeric(values[column], errors="coerce")
            if column in ("value", "value_ce") and values[column].isna().any():
                row = int(values[column].isna().to_numpy().argmax()) + 1
                raise InputError(f"{values_path}: row {row} of column {column!r} is not a number.")
    for column in ("example_id", "train_index"):
        if column in values.columns and values[column].duplicated().any():
            row = int(values[column].duplicated().to_numpy().argmax()) + 1
            raise InputError(f"{values_path}: row {row} repeats {column} {values[column].iloc[row - 1]!r}; a values "
                             f"table has one row per training example. Use the table written by freeshap-dq value.")
    if "example_id" in values.columns:
        values["example_id"] = values["example_id"].astype(str)
        known, given = set(data.ids), set(values["example_id"])
        if known != given:
            missing = sorted(known - given)[:3] or sorted(given - known)[:3]
            side = "the data but not the values" if known - given else "the values but not the data"
            raise InputError(f"{values_path} and {data.source} do not describe the same examples: id(s) "
                             f"{', '.join(map(repr, missing))} are in {side}. Use the values computed for this file.")
        table = values.set_index("example_id").loc[data.ids].reset_index()
    elif "train_index" in values.columns:
        if len(values) != len(data) or sorted(values["train_index"]) != list(range(len(data))):
            raise InputError(f"{values_path} has {len(values)} rows but {data.source} has {len(data)}; use the "
                             f"values computed for this file.")
        table = values.sort_values("train_index").reset_index(drop=True)
        table.insert(0, "example_id", data.ids)
    else:
        raise InputError(f"{values_path}: no example_id or train_index column; use the table from freeshap-dq value.")
    table["label"] = data.labels
    table["row"] = np.arange(len(data))
    return table


def _manifest(kind: str, policy, data_path, values_path, decisions: pd.DataFrame, flag: str, output,
              cost_column: str | None) -> dict:
    cols = [c for c in ("example_id", "label", "value", "value_ce", "stderr", "stderr_ce", "reason") if c in decisions]
    chosen = decisions[decisions[flag]]
    before = decisions["label"].value_counts().to_dict()
    after = decisions[~decisions[flag] if kind == "prune" else decisions[flag]]["label"].value_counts().to_dict()
    return {"command": kind, "freeshap_dq": __version__, "created": dt.datetime.now(dt.timezone.utc).isoformat(),
            "policy": policy_dict(policy), "data": str(data_path), "values": str(values_path),
            **({"cost_column": cost_column} if kind == "select" else {}),
            "output": None if output is None else str(output),
            "counts": {"input": len(decisions), flag: int(decisions[flag].sum()),
                       "per_class_before": before, "per_class_after": after},
            "examples": chosen[cols].to_dict(orient="records")}


def _report_decisions(decisions: pd.DataFrame, flag: str, verb: str) -> None:
    count = int(decisions[flag].sum())
    per_class = decisions[decisions[flag]]["label"].value_counts().to_dict()
    log(f"{verb} {count} of {len(decisions)} examples" + (f" (per class: {per_class})" if count else ""))


@cli.command("prune")
@curate_options("prune")
@click.option("--fraction", type=float, default=None,
              help=f"Remove the lowest-valued fraction (0-1): {ROUNDING_RULE}.")
@click.option("--count", type=int, default=None, help="Remove the lowest-valued COUNT examples (at most n).")
@click.option("--threshold", type=float, default=None, help="Remove examples whose value is below this.")
@click.option("--confident", is_flag=True, help="Only remove examples with value + z*stderr < 0.")
@z_option("z for --confident.")
@click.option("--max-class-fraction", type=float, default=1.0, show_default=True,
              help="Never remove more than this fraction of any class.")
@click.option("--allow-empty-class", is_flag=True, help="Allow removing every example of a class (refused otherwise).")
@friendly_errors
def prune_command(values_path, data_path, output, manifest_path, fraction, count, threshold, confident, z,
                  max_class_fraction, allow_empty_class, metric, dry_run, **columns):
    """Remove harmful training examples; write the cleaned dataset and a manifest of what went and why."""
    policy = RemovalPolicy(fraction, count, threshold, confident, z, max_class_fraction, metric, allow_empty_class)
    _curate("prune", policy, values_path, data_path, output, manifest_path, dry_run, columns)


@cli.command("select")
@curate_options("select")
@click.option("--count", type=int, default=None, help="Keep the COUNT highest-valued examples (at most n).")
@click.option("--fraction", type=float, default=None,
              help=f"Keep the highest-valued fraction (0-1): {ROUNDING_RULE}.")
@click.option("--per-class", type=int, default=None, help="At most this many per class (quota).")
@click.option("--budget", type=float, default=None, help="Summed cost may not exceed this.")
@click.option("--cost-column", default=None, help="Column of --data with each example's cost [default: 1 each].")
@friendly_errors
def select_command(values_path, data_path, output, manifest_path, count, fraction, per_class, budget, cost_column,
                   metric, dry_run, **columns):
    """Keep the most valuable training examples; write the subset and a manifest."""
    if cost_column is not None and budget is None:
        raise click.UsageError("--cost-column gives each example's cost for --budget; add --budget (or drop it).")
    policy = SelectionPolicy(count, fraction, per_class, budget, metric)
    _curate("select", policy, values_path, data_path, output, manifest_path, dry_run, columns, cost_column)


def _curate(kind, policy, values_path, data_path, output, manifest_path, dry_run, columns, cost_column=None):
    if output is None and not dry_run:
        raise click.UsageError("give -o/--output for the result, or --dry-run to only look.")
    manifest_path = manifest_path or (output.with_name(output.name + ".manifest.json") if output else None)
    if not dry_run:
        check_outputs({"-o/--output": output, "--manifest": manifest_path},
                      {"--data": data_path, "--values": values_path})
        data_table_format(output, like=data_path)
    raw = read_table(data_path)
    data = dataset_from_frame(raw, str(data_path), **pop_data_options(columns))
    table = join_values(values_path, data)
    if kind == "prune":
        decisions, flag, verb = policy.apply(table), "removed", "would remove" if dry_run else "removed"
    else:
        cost = None
        if cost_column is not None:
            if cost_column not in raw.columns:
                raise InputError(f"{data_path}: no column {cost_column!r} for --cost-column.")
            cost = pd.to_numeric(raw[cost_column], errors="coerce").set_axis(table.index)
            if cost.isna().any():
                raise InputError(f"{data_path}: column {cost_column!r} row {int(cost.isna().argmax()) + 1} is not a number.")
        decisions, flag, verb = policy.apply(table, cost), "selected", "would select" if dry_run else "selected"
    _report_decisions(decisions, flag, verb)
    if dry_run:
        cols = [c for c in ("example_id", "label", "value_ce", "value", "reason") if c in decisions.columns]
        shown = decisions[decisions[flag]][cols]
        click.echo(shown.to_string(index=False) if len(shown) else "(nothing)")
        return
    rows = decisions.loc[~decisions[flag] if kind == "prune" else decisions[flag], "row"].sort_values().to_numpy()
    write_data_table(raw.iloc[rows], output, like=data_path)
    write_json(_manifest(kind, policy, data_path, values_path, decisions, flag, output, cost_column), manifest_path)
    log(f"wrote {output} ({len(rows)} rows) and {manifest_path}")


@cli.command("explain")
@click.option("--result", "result_path", type=ARTIFACT_PATH, required=True,
              help="Result .npz or result folder saved by freeshap-dq value --per-point --save-result.")
@click.option("--train", "train_path", type=DATA_PATH, required=True, help="The training data of the run.")
@click.option("--test", "test_path", type=DATA_PATH, required=True, help="The test data of the run.")
@column_options
@click.option("--example", "examples", multiple=True, help="Test example id to explain (repeatable).")
@click.option("--row", "rows", type=int, multiple=True, help="Test example row number, from 1 (repeatable).")
@click.option("--top-k", type=int, default=5, show_default=True, help="Helpful and harmful examples to show.")
@metric_option("Per-test-point value to rank by.")
@z_option("z of 'flagged harmful' (value + z*stderr < 0 over the whole validation set).")
@click.option("-o", "--output", default="-", show_default=True,
              help="Table (.csv/.parquet/.json/.jsonl), or - for the terminal.")
@click.option("--format", "fmt", type=click.Choice(["text", "csv", "json"]), default=None,
              help="On the terminal: text (default, readable) or csv / json (one row per test example, kind and "
                   "rank); a file's format follows its extension.")
@friendly_errors
def explain_command(result_path, train_path, test_path, examples, rows, top_k, metric, z, output, fmt, **columns):
    """Which training examples made these test predictions right or wrong: top-k helpful and harmful."""
    if fmt is not None and output != "-":
        raise click.UsageError("--format is for the terminal (-o -); a file's format follows its extension.")
    check_outputs({"-o/--output": output}, {"--result": result_path, "--train": train_path, "--test": test_path})
    table_format(output)
    if top_k < 1:
        raise InputError("--top-k must be at least 1.")
    opts = pop_data_options(columns)
    train, test = load_dataset(train_path, **opts), load_dataset(test_path, **opts)
    result = ValuationResult.load(result_path)
    if result.point_sums is None:
        raise InputError(f"{result_path} has no per-point values; run freeshap-dq value --per-point --save-result.")
    shape = result.point_sums[metric].shape
    train, test = result.align(train, "training", str(result_path)), result.align(test, "test", str(result_path))
    if shape != (len(train), len(test)):
        raise InputError(f"{result_path} values {shape[0]} training x {shape[1]} test examples, but the "
                         f"data files have {len(train)} and {len(test)}; give the files the run used.")
    explanations = explain(result, _test_rows(test, examples, rows), top_k, metric)
    flagged = flagged_harmful(result, metric, z)
    if output == "-" and fmt in (None, "text"):
        click.echo(explanation_text(explanations, train, test, flagged, metric))
        return
    table = explanation_table(explanations, train, test, flagged)
    if output == "-" and fmt == "json":
        click.echo(table.to_json(orient="records", indent=1, force_ascii=False))
    else:
        write_table(table, output)


def _test_rows(test: TextDataset, examples, rows) -> list[int]:
    if not examples and not rows:
        raise click.UsageError("name test examples with --example ID or --row N.")
    index = {example_id: i for i, example_id in enumerate(test.ids)}
    out = []
    for example_id in examples:
        if example_id not in index:
            raise InputError(f"{test.source}: no test example with id {example_id!r}.")
        out.append(index[example_id])
    for row in rows:
        if not 1 <= row <= len(test):
            raise InputError(f"{test.source}: row {row} is out of range (1..{len(test)}).")
        out.append(row - 1)
    return out
