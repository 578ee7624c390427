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
from ..ntk.builder import ADAPTERS, NTKConfig
from ..ntk.compute import KERNEL_MODES
from ..errors import FreeShapError
from ..io import table_format, write_table
from ..kernel import KernelProblem
from ..result import ValuationResult
from ..valuation import compute_values

CONFIG_FIELDS = {f.name: f for f in dataclasses.fields(ValuationConfig)}
NTK_FIELDS = {f.name: f for f in dataclasses.fields(NTKConfig)}
CHOICES = {"method": METHODS, "empty_utility": ("random", "zero"), "rank_metric": ("ce", "accuracy"),
           "adapter": ADAPTERS, "kernel": KERNEL_MODES, "pooling": ("mean", "cls")}
OPTION_NAMES = {"kernel": "--kernel-mode"}  # --kernel is the precomputed kernel file


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


def dataclass_options(fields: dict, skip: tuple[str, ...] = ()):
    """One option per dataclass field, help text from the field's metadata, default None = not given."""

    def decorate(func):
        for name in reversed([n for n in fields if n not in skip]):
            f = fields[name]
            flag = OPTION_NAMES.get(name, "--" + name.replace("_", "-"))
            help_text = f"{f.metadata['help']} [default: {f.default}]"
            if isinstance(f.default, bool):
                func = click.option(f"{flag}/--no-{flag[2:]}", name, default=None, help=help_text)(func)
            elif name in CHOICES:
                func = click.option(flag, name, type=click.Choice(CHOICES[name]), default=None, help=help_text)(func)
            else:
                func = click.option(flag, name, type=type(f.default), default=None, help=help_text)(func)
        return func

    return decorate


def config_options(func):
    """ValuationConfig options plus --preset."""
    func = dataclass_options(CONFIG_FIELDS)(func)
    return click.option("--preset", type=click.Choice(sorted(PRESETS)), default="default", show_default=True,
                        help="Starting values for the options: 'paper' reproduces the reference "
                             "(tolerance 0.05, kernel/1e4, ridge 1e-6, accuracy ranking).")(func)


def data_options(required: bool):
    def decorate(func):
        for flag, default, help_text in reversed([
            ("--text-column", "text", "Column with the text."),
            ("--pair-column", None, "Column with the second text of sentence pairs."),
            ("--label-column", "label", "Column with the label."),
            ("--id-column", "id", "Column with unique example ids (row numbers when absent)."),
        ]):
            func = click.option(flag, default=default, show_default=default is not None, help=help_text)(func)
        path = click.Path(dir_okay=False, path_type=Path)
        func = click.option("--test", "test_path", type=path, required=required,
                            help="Test/validation data (.csv/.tsv/.jsonl/.json/.parquet).")(func)
        return click.option("--train", "train_path", type=path, required=required,
                            help="Training data (.csv/.tsv/.jsonl/.json/.parquet).")(func)

    return decorate


def ntk_options(func):
    func = dataclass_options(NTK_FIELDS, skip=("device",))(func)
    return click.option("--cache-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
                        help="Reuse kernels computed before with the same model, settings and data.")(func)


def build_ntk_config(options: dict, device: str | None) -> NTKConfig:
    given = {k: options.pop(k) for k in list(options) if k in NTK_FIELDS}
    if device is not None:
        given["device"] = device
    return NTKConfig(**{k: v for k, v in given.items() if v is not None})


def load_problem(kernel_path, train_path, test_path, data: dict, ntk: NTKConfig, cache_dir, progress):
    """(KernelProblem, kernel manifest) from a kernel file, or from data + model (eNTK computed or cached)."""
    if kernel_path is not None:
        if train_path is not None or test_path is not None:
            raise click.UsageError("give either --kernel or --train/--test, not both.")
        return KernelProblem.load(kernel_path), {"kernel_file": str(kernel_path)}
    if train_path is None or test_path is None:
        raise click.UsageError("give --kernel K.npz, or both --train and --test data files.")
    from ..data import load_dataset
    from ..ntk.builder import build_kernel

    train = load_dataset(train_path, **data)
    test = load_dataset(test_path, **data)
    return build_kernel(train, test, ntk, cache_dir=cache_dir, progress=progress, log=log, return_manifest=True)


def pop_data_options(options: dict) -> dict:
    return {k: options.pop(k) for k in ("text_column", "label_column", "id_column", "pair_column")}


def build_config(preset: str, options: dict) -> ValuationConfig:
    given = {k: options.pop(k) for k in list(options) if k in CONFIG_FIELDS}
    return ValuationConfig.preset(preset, **{k: v for k, v in given.items() if v is not None})


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="freeshap-dq")
def cli() -> None:
    """FreeShap data valuation: which training examples help or harm a text classifier."""


@cli.command("value")
@click.option("--kernel", "kernel_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Precomputed kernel .npz with k_train (n x n), k_test (m x n), y_train, y_test "
                   "[, label_names, train_ids, test_ids]. Or give --train/--test and a --model.")
@data_options(required=False)
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
@ntk_options
@config_options
@friendly_errors
def value_command(kernel_path, train_path, test_path, output, fmt, save_result, checkpoint_dir, resume, progress,
                  cache_dir, preset, **options):
    """Value every training example: on a precomputed kernel, or on data with a model's eNTK.

    \b
    Columns: train_index, [example_id,] value (accuracy utility, the paper's score),
    value_ce (-cross-entropy utility), stderr, stderr_ce, rank (1 = most harmful by
    --rank-metric), permutations.
    """
    data = pop_data_options(options)
    ntk = build_ntk_config(options, options.get("device"))
    config = build_config(preset, options)
    table_format(output, fmt)
    if config.per_point and save_result is None:
        raise click.UsageError("--per-point values are an n x m matrix: give --save-result PATH.npz to keep them.")
    problem, kernel_manifest = load_problem(kernel_path, train_path, test_path, data, ntk, cache_dir, progress)
    log(f"{problem.source}: n_train={problem.n_train} n_test={problem.n_test} classes={problem.n_classes}")
    result = compute_values(problem, config, checkpoint_dir=checkpoint_dir, resume=resume, progress=progress)
    result.manifest["kernel"] = kernel_manifest
    df = result.to_dataframe(config.rank_metric)
    if save_result is not None:
        result.save(save_result)
    write_table(df, output, fmt)
    _log_summary(result, config)
    if output != "-":
        log(f"wrote {output}" + (f" and {save_result}" if save_result else ""))


@cli.command("kernel")
@data_options(required=True)
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="Kernel file: .npz (for freeshap-dq value --kernel) or .safetensors (+ .json manifest).")
@click.option("--device", default=None, help="auto (CUDA when present), cpu, cuda or cuda:N. [default: auto]")
@click.option("--progress/--no-progress", default=None, help="Progress bar on stderr [default: when a terminal].")
@ntk_options
@friendly_errors
def kernel_command(train_path, test_path, output, device, progress, cache_dir, **options):
    """Compute (or take from the cache) a model's eNTK for a train and a test file."""
    data = pop_data_options(options)
    ntk = build_ntk_config(options, device)
    if output.suffix not in (".npz", ".safetensors"):
        raise click.UsageError(f"{output}: the kernel file must end in .npz or .safetensors.")
    problem, manifest = load_problem(None, train_path, test_path, data, ntk, cache_dir, progress)
    if output.suffix == ".npz":
        problem.save(output)
    else:
        from ..ntk.builder import save_kernel

        save_kernel(problem, manifest, output)
    log(f"wrote {output}: k_train {problem.k_train.shape}, k_test {problem.k_test.shape}, "
        f"labels {', '.join(problem.label_names)}")


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
