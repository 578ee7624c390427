"""``freeshap-dq`` command line. Data goes to stdout (or -o), logs and progress to stderr.

Exit codes: 0 success, 2 bad input (message says what and where), 130 interrupted (a
checkpoint was written when --checkpoint-dir is set: rerun the same command to resume).
"""

from __future__ import annotations

import dataclasses
import functools
import sys
from pathlib import Path

import click
import numpy as np

from .. import __version__
from ..config import METHODS, PRESETS, ValuationConfig
from ..errors import FreeShapError
from ..io import table_format, write_table
from ..kernel import KernelProblem
from ..result import ValuationResult
from ..valuation import compute_values

CONFIG_FIELDS = {f.name: f for f in dataclasses.fields(ValuationConfig)}
CHOICES = {"method": METHODS, "empty_utility": ("random", "zero"),
           "rank_metric": ("ce", "accuracy")}


def log(message: str) -> None:
    click.echo(message, err=True)


def friendly_errors(func):
    """Turn our own errors into 'error: ...' on stderr with exit code 2; Ctrl-C into exit 130."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except FreeShapError as exc:
            log(f"error: {exc}")
            sys.exit(2)
        except KeyboardInterrupt:
            log("interrupted. With --checkpoint-dir, rerun the same command to resume where it stopped.")
            sys.exit(130)

    return wrapper


def config_options(func):
    """One option per ValuationConfig field (help from the dataclass) plus --preset."""
    for name in reversed(list(CONFIG_FIELDS)):
        f = CONFIG_FIELDS[name]
        flag = "--" + name.replace("_", "-")
        help_text = f"{f.metadata['help']} [default: {f.default}]"
        if isinstance(f.default, bool):
            func = click.option(f"{flag}/--no-{name.replace('_', '-')}", name, default=None, help=help_text)(func)
        elif name in CHOICES:
            func = click.option(flag, name, type=click.Choice(CHOICES[name]), default=None, help=help_text)(func)
        else:
            func = click.option(flag, name, type=type(f.default), default=None, help=help_text)(func)
    return click.option("--preset", type=click.Choice(sorted(PRESETS)), default="default", show_default=True,
                        help="Starting values for the options: 'paper' reproduces the reference "
                             "(tolerance 0.05, kernel/1e4, ridge 1e-6, accuracy ranking).")(func)


def build_config(preset: str, options: dict) -> ValuationConfig:
    given = {k: options.pop(k) for k in list(options) if k in CONFIG_FIELDS}
    return ValuationConfig.preset(preset, **{k: v for k, v in given.items() if v is not None})


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="freeshap-dq")
def cli() -> None:
    """FreeShap data valuation: which training examples help or harm a text classifier."""


@cli.command("value")
@click.option("--kernel", "kernel_path", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="Precomputed kernel .npz with k_train (n x n), k_test (m x n), y_train, y_test "
                   "[, label_names, train_ids, test_ids].")
@click.option("-o", "--output", default="-", show_default=True,
              help="Values table, one row per training example (.csv/.parquet/.json/.jsonl; - = stdout).")
@click.option("--format", "fmt", type=click.Choice(["csv", "parquet", "json", "jsonl"]), default=None,
              help="Table format (default: from the extension of --output).")
@click.option("--save-result", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also save the full result (sums, per-point matrices, manifest) as .npz.")
@click.option("--checkpoint-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Write checkpoints here; rerunning the same command resumes from them.")
@click.option("--resume/--no-resume", default=True, show_default=True,
              help="Resume from a checkpoint in --checkpoint-dir if present.")
@click.option("--progress/--no-progress", default=None, help="Progress bar on stderr [default: when a terminal].")
@config_options
@friendly_errors
def value_command(kernel_path, output, fmt, save_result, checkpoint_dir, resume, progress, preset, **options):
    """Value every training example on a precomputed kernel.

    \b
    Columns: train_index, [example_id,] value (accuracy utility, the paper's score),
    value_ce (-cross-entropy utility), stderr, stderr_ce, rank (1 = most harmful by
    --rank-metric), permutations.
    """
    config = build_config(preset, options)
    table_format(output, fmt)
    if config.per_point and save_result is None:
        raise click.UsageError("--per-point values are an n x m matrix: give --save-result PATH.npz to keep them.")
    problem = KernelProblem.load(kernel_path)
    log(f"kernel {kernel_path}: n_train={problem.n_train} n_test={problem.n_test} classes={problem.n_classes}")
    result = compute_values(problem, config, checkpoint_dir=checkpoint_dir, resume=resume, progress=progress)
    df = result.to_dataframe(config.rank_metric)
    if save_result is not None:
        result.save(save_result)
    write_table(df, output, fmt)
    _log_summary(result, config)
    if output != "-":
        log(f"wrote {output}" + (f" and {save_result}" if save_result else ""))


def _log_summary(result: ValuationResult, config: ValuationConfig) -> None:
    man = result.manifest
    log(f"{result.method}: {result.count} permutation(s), ridge {man['ridge']:.4g} ({man['ridge_mode']}), "
        f"{man.get('elapsed_seconds', 0):.2f} s on {man['device']}")
    full, empty = man["utility_full"], man["utility_empty"]
    log(f"utility U(N): accuracy {full['accuracy']:.4f}, -CE {full['ce']:.4f};  "
        f"U(empty): accuracy {empty['accuracy']:.4f}, -CE {empty['ce']:.4f}")
    trunc = result.truncation_summary()
    if trunc and trunc["truncated_permutations"]:
        log(f"truncation: {trunc['truncated_permutations']} permutation(s) stopped early; "
            f"mean fraction evaluated {trunc['mean_fraction_evaluated']:.2f}")


@cli.command("demo")
@click.option("--output-dir", type=click.Path(file_okay=False, path_type=Path),
              default=Path("freeshap-demo-output"), show_default=True, help="Where outputs are written.")
@click.option("--n-train", default=600, show_default=True, help="Training examples.")
@click.option("--n-test", default=300, show_default=True, help="Test examples.")
@click.option("--noise", default=0.1, show_default=True, help="Fraction of training labels flipped.")
@click.option("--permutations", default=100, show_default=True, help="Permutations.")
@click.option("--seed", default=0, show_default=True, help="Seed for data, flips and permutations.")
@click.option("--progress/--no-progress", default=None, help="Progress bar on stderr [default: when a terminal].")
@friendly_errors
def demo_command(output_dir, n_train, n_test, noise, permutations, seed, progress):
    """End-to-end run on a synthetic kernel with flipped labels (the text-data demo comes with the eNTK)."""
    from ..synthetic import auroc, noisy_problem

    output_dir.mkdir(parents=True, exist_ok=True)
    data = noisy_problem(n_train=n_train, n_test=n_test, noise=noise, seed=seed)
    kernel_path = output_dir / "kernel.npz"
    data.problem.save(kernel_path)
    log(f"synthetic problem: {n_train} train / {n_test} test, {int(data.flipped.sum())} training labels flipped")
    config = ValuationConfig(permutations=permutations, seed=seed)
    result = compute_values(data.problem, config, checkpoint_dir=output_dir / "checkpoints", resume=False,
                            progress=progress)
    df = result.to_dataframe()
    df["label"] = [data.problem.label_names[y] for y in data.problem.y_train]
    df["flipped"] = data.flipped
    values_path = output_dir / "values.csv"
    write_table(df, str(values_path))
    result.save(output_dir / "result.npz")
    _log_summary(result, config)

    bottom = df.nsmallest(max(1, int(round(noise * n_train))), "value_ce")
    caught = int(bottom["flipped"].sum())
    click.echo(f"\nMost harmful training examples (lowest -CE value):")
    click.echo(df.nsmallest(10, "value_ce")[["example_id", "label", "flipped", "value", "value_ce", "stderr_ce"]]
               .to_string(index=False))
    click.echo(f"\nThe bottom {len(bottom)} by value contain {caught} of the {int(data.flipped.sum())} flipped labels "
               f"({caught / max(1, int(data.flipped.sum())):.0%}; random inspection would find "
               f"{noise:.0%}).")
    click.echo(f"AUROC for finding flipped labels: -CE utility {auroc(df['value_ce'].to_numpy(), data.flipped):.3f}, "
               f"accuracy utility {auroc(df['value'].to_numpy(), data.flipped):.3f}")
    click.echo(f"\nOutputs in {output_dir}/: values.csv (table), result.npz (full result + manifest), "
               f"kernel.npz (try: freeshap-dq value --kernel {kernel_path} -o values.parquet)")


def main() -> None:  # pragma: no cover
    cli()


if __name__ == "__main__":  # pragma: no cover
    np.set_printoptions(precision=4)
    main()
