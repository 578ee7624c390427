"""``freeshap-dq relabel apply``: write the dataset with reviewed labels and a change manifest."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import click

from freeshap_dq import __version__
from freeshap_dq.cli.common import DATA_PATH, column_options, friendly_errors, log, pop_data_options
from freeshap_dq.cli.main import cli
from freeshap_dq.curation.relabel import CONFLICT_ACTIONS, apply_relabels
from freeshap_dq.data.tables import data_table_format, dataset_from_frame, read_table, write_data_table
from freeshap_dq.io import check_outputs, write_json

PATH = click.Path(dir_okay=False, path_type=Path)


@cli.group("relabel")
def relabel_group() -> None:
    """Apply reviewed labels (e.g. from freeshap-dq labelstudio pull) to a dataset."""


@relabel_group.command("apply")
@click.option("--data", "data_path", type=DATA_PATH, required=True, help="The dataset to correct.")
@column_options
@click.option("--relabels", "relabels_path", type=PATH, required=True,
              help="Relabel table (example_id, reviewed_label[, given_label, annotator, ...]).")
@click.option("-o", "--output", type=PATH, default=None,
              help="Corrected dataset (same format as --data unless the extension says otherwise).")
@click.option("--manifest", "manifest_path", type=PATH, default=None,
              help="Change manifest [default: OUTPUT.manifest.json].")
@click.option("--allow-new-labels", is_flag=True, help="Accept reviewed labels the dataset does not have yet.")
@click.option("--on-conflict", type=click.Choice(CONFLICT_ACTIONS), default="error", show_default=True,
              help="When the data's label is no longer the one the reviewer saw.")
@click.option("--dry-run", is_flag=True, help="Show the changes; write nothing.")
@friendly_errors
def apply_command(data_path, relabels_path, output, manifest_path, allow_new_labels, on_conflict, dry_run,
                  **columns):
    """Write DATA with the reviewed labels, and a manifest of every change (who, from, to)."""
    if output is None and not dry_run:
        raise click.UsageError("give -o/--output for the corrected dataset, or --dry-run to only look.")
    if not dry_run:
        manifest_path = manifest_path or output.with_name(output.name + ".manifest.json")
        check_outputs({"-o/--output": output, "--manifest": manifest_path},
                      {"--data": data_path, "--relabels": relabels_path})
        data_table_format(output, like=data_path)
    options = pop_data_options(columns)
    raw = read_table(data_path)
    data = dataset_from_frame(raw, str(data_path), **options)
    outcome = apply_relabels(raw, data, read_table(relabels_path), options["label_column"], str(relabels_path),
                             allow_new_labels, on_conflict)
    counts = outcome.counts
    log(f"{counts['reviewed']} reviews: {counts['changed']} labels changed, {counts['confirmed']} confirmed"
        + (f", {counts['conflicts']} conflicts ({on_conflict})" if counts["conflicts"] else "")
        + (f", {counts['other_text_skipped']} about another text skipped" if counts["other_text_skipped"] else ""))
    if outcome.already_applied:
        log(f"{len(outcome.already_applied)} reviewed labels are in the data already (applied before): "
            f"{_ids(outcome.already_applied)}; nothing to do for them")
    for decision, ids in outcome.undecided.items():
        if ids:
            what = ("reviewers disagree; resolve them in Label Studio, or pull with --agreement majority / latest"
                    if decision == "conflict" else "the reviewers skipped them")
            log(f"{len(ids)} {decision} rows not applied ({what}): {_ids(ids)}")
    if dry_run:
        click.echo(outcome.changes.to_string(index=False) if len(outcome.changes) else "(no changes)")
        return
    write_data_table(outcome.corrected, output, like=data_path)
    label_column = options["label_column"]
    write_json({"command": "relabel apply", "freeshap_dq": __version__,
                "created": dt.datetime.now(dt.timezone.utc).isoformat(), "data": str(data_path),
                "relabels": str(relabels_path), "output": str(output), "label_column": label_column,
                "on_conflict": on_conflict, "counts": counts, "already_applied": outcome.already_applied,
                "not_applied": outcome.undecided,
                "per_class_before": raw[label_column].astype(str).value_counts().to_dict(),
                "per_class_after": outcome.corrected[label_column].astype(str).value_counts().to_dict(),
                "changes": outcome.changes.to_dict(orient="records")}, manifest_path)
    log(f"wrote {output} and {manifest_path}")


def _ids(ids: list[str], shown: int = 5) -> str:
    return ", ".join(ids[:shown]) + (f" and {len(ids) - shown} more" if len(ids) > shown else "")
