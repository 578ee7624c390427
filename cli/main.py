"""``freeshap-dq`` command line. Data goes to stdout (or -o), logs and progress to stderr.

Exit codes: 0 success, 1 runtime failure, 2 bad input or usage (the message says what and where),
3 the --fail-on-harmful gate tripped, 130 interrupted (a checkpoint was written when
--checkpoint-dir is set: rerun the same command to resume).
"""

from __future__ import annotations

import signal
import sys
import threading
from pathlib import Path

import click

from freeshap_dq import __version__
from freeshap_dq.cli.common import (
    DATA_COLUMN_OPTIONS,
    EXIT_GATE,
    NTK_FIELDS,
    VERBOSITY,
    build_config,
    build_ntk_config,
    config_options,
    data_options,
    friendly_errors,
    load_problem,
    log,
    ntk_options,
    pop_data_options,
    refuse_unused,
    route_library_logs,
)
from freeshap_dq.config import ValuationConfig
from freeshap_dq.io import TABLE_FORMATS, check_outputs, table_format, write_json, write_table
from freeshap_dq.result import ValuationResult
from freeshap_dq.scores import DEFAULT_Z, confidently_harmful
from freeshap_dq.valuation.ray import EXECUTORS
from freeshap_dq.valuation.run import compute_values


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="freeshap-dq")
@click.option("-q", "--quiet", is_flag=True, help="Only errors on stderr.")
@click.option("-v", "--verbose", is_flag=True, help="Tracebacks for unexpected failures.")
def cli(quiet: bool, verbose: bool) -> None:
    """FreeShap data valuation: which training examples help or harm a text classifier."""
    VERBOSITY["level"] = 0 if quiet else (2 if verbose else 1)
    route_library_logs()
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _terminate)  # a scheduler's SIGTERM checkpoints like Ctrl-C


def _terminate(signum, frame):
    raise KeyboardInterrupt


@cli.command("value")
@click.option("--kernel", "kernel_path", type=click.Path(path_type=Path), default=None,
              help="Precomputed kernel .npz with k_train (n x n), k_test (m x n), y_train, y_test "
                   "[, label_names, train_ids, test_ids], or a kernel folder (freeshap-dq kernel -o NAME.kernel; "
                   "read memory-mapped). Or give --train/--test and a --model.")
@data_options(required=False)
@click.option("-o", "--output", default="-", show_default=True,
              help="Values table, one row per training example (.csv/.parquet/.json/.jsonl; - = stdout).")
@click.option("--format", "fmt", type=click.Choice(TABLE_FORMATS), default=None,
              help="Table format (default: from the extension of --output).")
@click.option("--save-result", type=click.Path(path_type=Path), default=None,
              help="Also save the full result (sums, per-point matrices, manifest): NAME.npz, or a result folder "
                   "(any other name) whose per-point matrices are accumulated on disk as the run goes, for n x m "
                   "larger than memory.")
@click.option("--checkpoint-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Write checkpoints here; rerunning the same command resumes from them.")
@click.option("--resume/--no-resume", default=True, show_default=True,
              help="Resume from a checkpoint in --checkpoint-dir if present.")
@click.option("--progress/--no-progress", default=None, help="Progress bar on stderr [default: when a terminal].")
@click.option("--fail-on-harmful", type=click.IntRange(min=0), default=None, metavar="N",
              help="CI gate: exit with code 3 (after writing the outputs) when more than N training examples are "
                   f"harmful with confidence (value + {DEFAULT_Z} x stderr < 0 on --rank-metric).")
@click.option("--executor", type=click.Choice(EXECUTORS), default="local", show_default=True,
              help="Where permutations run: this process, or Ray workers (pip install 'freeshap-dq[ray]'); "
                   "results are identical.")
@click.option("--ray-address", default=None, help="Ray cluster address (e.g. ray://head:10001) [default: start a local "
                                                  "Ray on this machine].")
@click.option("--workers", type=click.IntRange(min=1), default=None, help="Local Ray: worker processes [default: CPU count].")
@ntk_options
@config_options
@friendly_errors
def value_command(kernel_path, train_path, test_path, output, fmt, save_result, checkpoint_dir, resume, progress,
                  fail_on_harmful, executor, ray_address, workers, cache_dir, preset, **options):
    """Value every training example: on a precomputed kernel, or on data with a model's eNTK.

    \b
    Columns: train_index, [example_id,] value (accuracy utility, the paper's score),
    value_ce (-cross-entropy utility), stderr, stderr_ce, rank (1 = most harmful by
    --rank-metric), permutations.
    """
    if kernel_path is not None:
        refuse_unused("to a precomputed --kernel (they choose how the eNTK is computed from --train/--test data)",
                      *DATA_COLUMN_OPTIONS, *(name for name in NTK_FIELDS if name != "device"), "cache_dir")
    data = pop_data_options(options)
    ntk = build_ntk_config(options, options.get("device"))
    config = build_config(preset, options)
    table_format(output, fmt)
    if executor != "ray" and (workers is not None or ray_address is not None):
        raise click.UsageError(f"{'--workers' if workers is not None else '--ray-address'} applies to Ray workers; "
                               f"add --executor ray (or drop it).")
    result_is_folder = save_result is not None and save_result.suffix != ".npz"
    check_outputs({"-o/--output": output, "the manifest": None if output == "-" else output + ".manifest.json",
                   "--save-result": save_result},
                  {"--kernel": kernel_path, "--train": train_path, "--test": test_path},
                  folders=("--save-result",) if result_is_folder else ())
    if config.per_point and save_result is None:
        raise click.UsageError("--per-point values are an n x m matrix: give --save-result NAME.npz (in memory) or "
                               "--save-result NAME.result (a folder, accumulated on disk) to keep them.")
    problem, kernel_manifest = load_problem(kernel_path, train_path, test_path, data, ntk, cache_dir, progress)
    log(f"{problem.source}: n_train={problem.n_train} n_test={problem.n_test} classes={problem.n_classes}")
    streamed = config.per_point and save_result is not None and save_result.suffix != ".npz"
    if executor == "ray":
        if streamed:
            raise click.UsageError("per-point sums streamed to a result folder run in one process; use "
                                   "--executor local, or --save-result NAME.npz.")
        from freeshap_dq.valuation.ray import compute_values_ray

        result = compute_values_ray(problem, config, address=ray_address, workers=workers,
                                    checkpoint_dir=checkpoint_dir, resume=resume, progress=progress)
    elif streamed:
        _value_streamed(problem, config, kernel_manifest, save_result, checkpoint_dir, resume, progress)
        return _finish_value(ValuationResult.load(save_result), config, output, fmt, kernel_path, train_path,
                             test_path, save_result, fail_on_harmful)
    else:
        result = compute_values(problem, config, checkpoint_dir=checkpoint_dir, resume=resume, progress=progress)
    result.manifest["kernel"] = kernel_manifest
    if save_result is not None:
        result.save(save_result)
    _finish_value(result, config, output, fmt, kernel_path, train_path, test_path, save_result, fail_on_harmful)


def _value_streamed(problem, config, kernel_manifest, save_result: Path, checkpoint_dir, resume, progress) -> None:
    """Per-point sums on disk (checkpoint_dir/points, or a scratch folder beside the result), then the result folder."""
    import shutil
    import tempfile

    if not save_result.parent.exists():
        raise click.UsageError(f"{save_result}: the folder {save_result.parent} does not exist; create it first.")
    scratch = None if checkpoint_dir else Path(tempfile.mkdtemp(prefix=f".{save_result.name}.", suffix=".points",
                                                                 dir=save_result.parent))
    try:
        result = compute_values(problem, config, checkpoint_dir=checkpoint_dir, resume=resume, progress=progress,
                                point_dir=scratch or Path(checkpoint_dir) / "points")
        result.manifest["kernel"] = kernel_manifest
        result.save(save_result)
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)


def _finish_value(result, config, output, fmt, kernel_path, train_path, test_path, save_result, fail_on_harmful):
    df = result.to_dataframe(config.rank_metric)
    write_table(df, output, fmt)
    _log_summary(result, config)
    if output != "-":
        manifest_path = Path(output + ".manifest.json")
        inputs = {"kernel": str(kernel_path)} if kernel_path else {"train": str(train_path), "test": str(test_path)}
        write_json({"command": "value", "output": output, "inputs": inputs, "saved_result": save_result,
                    "count": result.count, "sources": result.sources, **result.manifest}, manifest_path)
        log(f"wrote {output}, {manifest_path}" + (f" and {save_result}" if save_result else ""))
    if fail_on_harmful is not None:
        metric = config.rank_metric
        harmful = int(confidently_harmful(result.values(metric), result.stderr(metric)).sum())
        if harmful > fail_on_harmful:
            click.echo(f"gate: {harmful} training examples are harmful with confidence (limit {fail_on_harmful}).",
                       err=True)
            sys.exit(EXIT_GATE)
        log(f"gate passed: {harmful} confidently harmful example(s), limit {fail_on_harmful}")


@cli.command("kernel")
@data_options(required=True)
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True,
              help="Kernel file: .npz (for freeshap-dq value --kernel) or .safetensors (+ .json manifest); or a "
                   "kernel folder NAME.kernel, computed by example blocks and written to disk panel by panel (for "
                   "kernels larger than memory; see --example-block).")
@click.option("--device", default=None, help="auto (CUDA when present), cpu, cuda or cuda:N. [default: auto]")
@click.option("--progress/--no-progress", default=None, help="Progress bar on stderr [default: when a terminal].")
@click.option("--distributed", is_flag=True,
              help="Run under torchrun: each process computes a share of the parameter chunks, an all-reduce sums "
                   "the Grams (gloo on CPU, NCCL on GPUs), rank 0 writes the kernel. With -o NAME.kernel the "
                   "processes share the row blocks instead and write them into the folder.")
@ntk_options
@friendly_errors
def kernel_command(train_path, test_path, output, device, progress, distributed, cache_dir, **options):
    """Compute (or take from the cache) a model's eNTK for a train and a test file."""
    data = pop_data_options(options)
    ntk = build_ntk_config(options, device)
    if output.suffix not in (".npz", ".safetensors", ".kernel"):
        raise click.UsageError(f"{output}: the kernel file must end in .npz or .safetensors, or name a kernel folder "
                               f"ending in .kernel.")
    manifest_path = {".safetensors": output.with_suffix(".json"), ".npz": Path(str(output) + ".manifest.json")}
    check_outputs({"-o/--output": output, "the manifest": manifest_path.get(output.suffix)},
                  {"--train": train_path, "--test": test_path},
                  folders=("-o/--output",) if output.suffix == ".kernel" else ())
    if output.suffix == ".kernel":
        _kernel_folder(train_path, test_path, output, ntk, data, progress, distributed, cache_dir)
        return
    if ntk.example_block or ntk.landmarks:
        raise click.UsageError(f"{'--landmarks' if ntk.landmarks else '--example-block'} writes a kernel folder by "
                               f"blocks: give -o NAME.kernel.")
    if distributed:
        from freeshap_dq.ntk.sharding import distributed_kernel

        with distributed_kernel(ntk) as (shard, ntk):
            if shard[0] > 0:
                VERBOSITY["level"] = 0
            problem, manifest = load_problem(None, train_path, test_path, data, ntk, cache_dir, progress, shard)
            if shard[0] != 0:
                return
    else:
        problem, manifest = load_problem(None, train_path, test_path, data, ntk, cache_dir, progress)
    if output.suffix == ".npz":
        problem.save(output)
        write_json({"command": "kernel", **manifest}, manifest_path[".npz"])
    else:
        from freeshap_dq.ntk.builder import save_kernel

        save_kernel(problem, manifest, output)
    log(f"wrote {output}: k_train {problem.k_train.shape}, k_test {problem.k_test.shape}, "
        f"{problem.n_classes} classes ({', '.join(problem.label_names)})")


def _kernel_folder(train_path, test_path, output: Path, ntk, data: dict, progress, distributed: bool, cache_dir) -> None:
    from freeshap_dq.data.tables import load_dataset
    from freeshap_dq.ntk.builder import build_kernel_folder

    if cache_dir is not None:
        raise click.UsageError("--cache-dir holds in-memory kernels; a kernel folder is its own cache (value it "
                               "with --kernel NAME.kernel). Drop --cache-dir.")
    train, test = load_dataset(train_path, **data), load_dataset(test_path, **data)
    if not distributed:
        build_kernel_folder(train, test, output, ntk, progress=progress, log=log)
        return
    from freeshap_dq.ntk.sharding import distributed_kernel

    with distributed_kernel(ntk) as (shard, ntk):  # the ranks share the row blocks of one folder
        if shard[0] > 0:
            VERBOSITY["level"] = 0
        build_kernel_folder(train, test, output, ntk, progress=progress, log=log, shard=shard)


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


from freeshap_dq.cli import cleanlab_cmd, curate, demo, evaluate_cmd, labelstudio_cmd, relabel_cmd  # noqa: E402,F401
