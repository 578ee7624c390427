"""``freeshap-dq evaluate``: the evaluation harness (docs/evaluation.md)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import click

from freeshap_dq.cli.common import dataclass_options, friendly_errors, log
from freeshap_dq.cli.main import cli
from freeshap_dq.evaluation import EvaluationConfig, run_evaluation

FIELDS = {f.name: f for f in dataclasses.fields(EvaluationConfig)}


@cli.command("evaluate")
@dataclass_options(FIELDS)
@click.option("-o", "--output-dir", type=click.Path(file_okay=False, path_type=Path), default=Path("freeshap-eval"),
              show_default=True, help="Folder for results.csv, results.md, plots and manifest.json.")
@click.option("--progress/--no-progress", default=None, help="Progress bars on stderr [default: when a terminal].")
@friendly_errors
def evaluate_command(output_dir, progress, **options):
    """Does FreeShap find wrong labels better than the baselines? Detection, removal, selection, sign
    robustness and fidelity on one dataset and model, several seeds, in one seeded run."""
    config = EvaluationConfig(**{k: v for k, v in options.items() if v is not None})
    results = run_evaluation(config, output_dir, progress=progress, log=log)
    log(f"{len(results)} result rows; wrote {output_dir / 'results.csv'}, results.md, plots and manifest.json")
    click.echo((output_dir / "results.md").read_text())
