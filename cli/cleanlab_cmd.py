"""``freeshap-dq cleanlab audit|export``: FreeShap beside cleanlab's own issue types."""

from __future__ import annotations

import math
import shutil
import tempfile
from pathlib import Path

import click

from freeshap_dq.cli.common import (
    ARTIFACT_PATH,
    DATA_COLUMN_OPTIONS,
    NTK_FIELDS,
    build_ntk_config,
    data_options,
    friendly_errors,
    load_problem,
    log,
    metric_option,
    ntk_options,
    optional_adapter,
    pop_data_options,
    refuse_unused,
    z_option,
)
from freeshap_dq.cli.main import cli
from freeshap_dq.config import ValuationConfig
from freeshap_dq.errors import InputError
from freeshap_dq.io import check_outputs, replace_folder, table_format, write_table
from freeshap_dq.result import ValuationResult
from freeshap_dq.valuation.run import compute_values


def _cleanlab():
    return optional_adapter("cleanlab", "cleanlab", "cleanlab")


@cli.group("cleanlab")
def cleanlab_group() -> None:
    """cleanlab Datalab audits with FreeShap as an issue type."""


@cleanlab_group.command("audit")
@click.option("--kernel", "kernel_path", type=ARTIFACT_PATH, default=None,
              help="Precomputed kernel .npz or kernel folder (or --train/--test).")
@data_options(required=False)
@click.option("--result", "result_path", type=ARTIFACT_PATH, default=None,
              help="FreeShap result .npz from freeshap-dq value --save-result [default: compute one now].")
@click.option("--permutations", type=click.IntRange(min=1), default=200, show_default=True, help="When computing values now.")
@click.option("--lab-dir", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Folder to save the Datalab in (Datalab.load reads it; import freeshap_dq.integrations first).")
@click.option("-o", "--output", default="-", show_default=True, help="Combined table (.csv/.parquet/.json/.jsonl).")
@metric_option()
@z_option("Flag when value + z*stderr < 0.")
@click.option("--threshold", type=float, default=None, help="Flag when value < threshold instead.")
@click.option("--data-valuation", is_flag=True, help="Also run cleanlab's KNN-Shapley data_valuation.")
@click.option("--force-data-valuation", is_flag=True, help="Run it even when its dense n x n matrix may not fit.")
@click.option("--progress/--no-progress", default=None, help="Progress bars on stderr [default: when a terminal].")
@ntk_options
@friendly_errors
def audit_command(kernel_path, train_path, test_path, result_path, permutations, lab_dir, output, metric, z,
                  threshold, data_valuation, force_data_valuation, progress, cache_dir, **options):
    """One audit: cleanlab label issues (+ KNN-Shapley) and FreeShap, a combined table and lab.report()."""
    if threshold is not None and not math.isfinite(threshold):
        raise click.UsageError(f"--threshold must be a finite number, got {threshold}.")
    if kernel_path is not None:
        refuse_unused("to a precomputed --kernel (they choose how the eNTK is computed from --train/--test data)",
                      *DATA_COLUMN_OPTIONS, *(name for name in NTK_FIELDS if name != "device"), "cache_dir")
    if result_path is not None:
        refuse_unused("with --result (the values are already computed)", "permutations")
    if threshold is not None:
        refuse_unused("with --threshold (it replaces the value + z x stderr rule)", "z")
    if not data_valuation:
        refuse_unused("without --data-valuation", "force_data_valuation")
    check_outputs({"-o/--output": output, "--lab-dir": lab_dir},
                  {"--kernel": kernel_path, "--train": train_path, "--test": test_path, "--result": result_path},
                  folders=("--lab-dir",))
    table_format(output)
    adapter = _cleanlab()
    data = pop_data_options(options)
    problem, _ = load_problem(kernel_path, train_path, test_path, data, build_ntk_config(options, None), cache_dir,
                              progress)
    if problem.landmark_rank is not None:
        raise InputError(f"{kernel_path}: a landmark kernel holds only some columns of the kernel; the audit's "
                         f"out-of-sample probabilities and KNN graph need the whole kernel (freeshap-dq kernel without "
                         f"--landmarks).")
    if result_path is not None:
        result = ValuationResult.load(result_path)
        if result.manifest.get("kernel_fingerprint") not in (None, problem.fingerprint()):
            raise InputError(f"{result_path} was computed on another kernel than the one given.")
    else:
        result = compute_values(problem, ValuationConfig(permutations=permutations), progress=progress)
    lab, table = adapter.combined_audit(problem, result, metric=metric, z=z, threshold=threshold,
                                        data_valuation=data_valuation, force=force_data_valuation)
    scratch = Path(tempfile.mkdtemp(prefix=f".{lab_dir.name}.", suffix=".tmp", dir=lab_dir.resolve().parent))
    try:  # the Datalab and the table appear together: the folder is moved into place after the table is written
        lab.save(str(scratch), force=True)
        write_table(table, output)
        replace_folder(scratch, lab_dir)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    click.echo(lab.report(num_examples=5, verbosity=1) if output != "-" else "", err=output == "-", nl=False)
    both = int(table["flagged_by_both"].sum())
    log(f"{int(table['is_label_issue'].sum())} label issues (cleanlab), {int(table['is_freeshap_issue'].sum())} "
        f"FreeShap issues, {both} flagged by both; Datalab saved in {lab_dir}")


@cleanlab_group.command("export")
@click.option("--lab-dir", type=click.Path(file_okay=False, exists=True, path_type=Path), required=True,
              help="A Datalab folder saved by freeshap-dq cleanlab audit (or by you).")
@click.option("--issue-type", default=None, help="Only this issue type (e.g. freeshap, label) [default: all].")
@click.option("-o", "--output", default="-", show_default=True, help="Issues table (.csv/.parquet/.json/.jsonl).")
@friendly_errors
def export_command(lab_dir, issue_type, output):
    """Export the issues of a saved Datalab (FreeShap included) as a table."""
    check_outputs({"-o/--output": output})
    table_format(output)
    _cleanlab()
    from cleanlab import Datalab

    lab = Datalab.load(str(lab_dir))
    known = set(lab.get_issue_summary()["issue_type"])
    if issue_type is not None and issue_type not in known:
        raise InputError(f"{lab_dir} has no issue type {issue_type!r}; it has {', '.join(sorted(known))}.")
    issues = lab.get_issues(issue_type) if issue_type else lab.get_issues()
    write_table(issues.reset_index(names="row"), output)
