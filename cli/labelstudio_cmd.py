"""``freeshap-dq labelstudio push|pull``: review the most harmful examples in Label Studio."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import re
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
    optional_adapter,
    pop_data_options,
    z_option,
)
from freeshap_dq.cli.curate import join_values
from freeshap_dq.cli.main import cli
from freeshap_dq.curation.policies import RemovalPolicy
from freeshap_dq.curation.relabel import AGREEMENT_POLICIES
from freeshap_dq.data.tables import dataset_from_frame, load_dataset, read_table
from freeshap_dq.errors import InputError
from freeshap_dq.io import check_outputs, table_format, write_json, write_table
from freeshap_dq.result import ValuationResult
from freeshap_dq.scores import DEFAULT_Z, metric_columns

PATH = click.Path(dir_okay=False, path_type=Path)


def _adapter():
    return optional_adapter("labelstudio", "labelstudio", "the Label Studio SDK")


def connection_options(func):
    for option in reversed([
        click.option("--url", default=None, help="Label Studio address [default: $LABEL_STUDIO_URL]."),
        click.option("--api-key", default=None,
                     help="API key [default: $LABEL_STUDIO_API_KEY; prefer the variable: options show in process "
                          "lists]."),
        click.option("--timeout", type=click.FloatRange(min=0, min_open=True), default=60.0, show_default=True,
                     help="Seconds per request."),
        click.option("--project", "title", default=None, help="Project title (found, or created by push)."),
        click.option("--project-id", type=int, default=None, help="Project id (instead of --project)."),
    ]):
        func = option(func)
    return func


def _client(adapter, url, api_key, timeout):
    client = adapter.Client(adapter.Connection.resolve(url, api_key, timeout))
    log(f"connected to {client.url} as {client.check()}")
    return client


def _open_project(client, title, project_id, advice: str):
    """The project named by id or by title, which must exist."""
    project = client.project(project_id) if project_id is not None else client.find_project(title)
    if project is None:
        raise InputError(f"{client.url} has no project titled {title!r}; {advice}.")
    return project


def _project_choice(title, project_id, default_title=None):
    if title is not None and project_id is not None:
        raise click.UsageError("give --project TITLE or --project-id N, not both.")
    title = title if title is not None or project_id is not None else default_title
    if title is None and project_id is None:
        raise click.UsageError("give --project TITLE or --project-id N.")
    if title is not None and len(title.strip()) < 3:
        raise InputError(f"--project {title!r}: Label Studio needs a title of at least 3 characters.")
    return title, project_id


@cli.group("labelstudio")
def labelstudio_group() -> None:
    """Queue the most harmful examples for review in Label Studio; pull the reviewed labels back."""


@labelstudio_group.command("push")
@click.option("--values", "values_path", type=PATH, required=True, help="Values table from freeshap-dq value.")
@click.option("--data", "data_path", type=DATA_PATH, required=True, help="The training data the values are for.")
@column_options
@click.option("--audit", "audit_path", type=PATH, default=None,
              help="Table from freeshap-dq cleanlab audit: adds label quality, label issues, suggested labels.")
@click.option("--result", "result_path", type=ARTIFACT_PATH, default=None,
              help="Result with per-point values (freeshap-dq value --per-point --save-result) of the same run: each "
                   "task then shows which validation examples it hurts most (needs --test).")
@click.option("--test", "test_path", type=DATA_PATH, default=None, help="The validation data of --result.")
@connection_options
@click.option("--count", type=int, default=None, help="Push the COUNT most harmful examples.")
@click.option("--fraction", type=float, default=None,
              help="Push the most harmful fraction (0-1) [default: 0.1 when no other rule is given].")
@click.option("--threshold", type=float, default=None, help="Push examples whose value is below this.")
@click.option("--confident", is_flag=True, help="Only examples with value + z*stderr < 0.")
@z_option("z for --confident and the flagged field.")
@click.option("--both", is_flag=True, help="Only examples flagged by both FreeShap and cleanlab (needs --audit).")
@metric_option()
@click.option("--run-id", default=None, help="Model version of this run's predictions [default: from the values "
              "file's content, so pushing the same values again changes nothing].")
@click.option("--batch-size", type=click.IntRange(min=1), default=200, show_default=True,
              help="Tasks per import request.")
@click.option("--state", "state_path", type=PATH, default=None,
              help="Local map example_id <-> task id and resume record, one per project [default: beside the values "
                   "file, PROJECT-TITLE.labelstudio.json]; pull --state reads the project from it.")
@click.option("--dry-run", is_flag=True, help="Show what would be pushed; contact no server (the connection, "
              "project, state and batch options are then not used).")
@click.option("--progress/--no-progress", default=None, help="Progress bars on stderr [default: when a terminal].")
@friendly_errors
def push_command(values_path, data_path, audit_path, result_path, test_path, url, api_key, timeout, title, project_id,
                 count, fraction, threshold, confident, z, both, metric, run_id, batch_size, state_path, dry_run,
                 progress, **columns):
    """Push review tasks (most harmful first) with scores, a pre-filled prediction and sorted views."""
    if not dry_run:  # a dry run contacts no server: no project, no state
        title, project_id = _project_choice(title, project_id, default_title=f"FreeShap review: {Path(data_path).stem}")
        state_path = state_path or values_path.with_name(state_name(title, project_id))
        check_outputs({"--state": state_path}, {"--values": values_path, "--data": data_path, "--audit": audit_path,
                                                "--result": result_path, "--test": test_path})
    if (result_path is None) != (test_path is None):
        raise click.UsageError("--result and --test go together: the validation examples are named from --test.")
    adapter = _adapter()
    raw = read_table(data_path)
    options = pop_data_options(columns)
    data = dataset_from_frame(raw, str(data_path), **options)
    joined = join_values(values_path, data)
    evidence = None
    if result_path is not None:
        evidence = _evidence(result_path, data, load_dataset(test_path, **options), joined, metric, values_path)
    joined["text"] = data.texts
    if data.pairs is not None:
        joined["pair"] = data.pairs
    if both and audit_path is None:
        raise click.UsageError("--both needs --audit (the table of freeshap-dq cleanlab audit).")
    audit = read_table(audit_path) if audit_path is not None else None
    review = adapter.review_table(joined, metric=metric, z=z, audit=audit, evidence=evidence)
    selected = _selection(joined, review, count, fraction, threshold, confident, z, both, metric)
    run = adapter.ReviewRun(run_id or _run_id(values_path, metric), metric, {
        "values": values_path.name, "data": Path(data_path).name,
        "audit": audit_path.name if audit_path is not None else None, "freeshap_dq": __version__})
    log(f"{int(selected.sum())} of {len(review)} examples selected for review (run {run.run_id})")
    if dry_run:
        audit_columns = ["cleanlab_label_quality", "cleanlab_label_issue"] if audit is not None else []
        audit_columns += ["freeshap_hurts"] if evidence is not None else []
        shown = review[selected.to_numpy()][["freeshap_rank", "example_id", "given_label", "suggested_label",
                                             "freeshap_value", "freeshap_score", *audit_columns]]
        click.echo(shown.to_string(index=False) if len(shown) else "(nothing)")
        return
    client = _client(adapter, url, api_key, timeout)
    report = adapter.push(client, review, selected, run, title=title, project_id=project_id, state_path=state_path,
                          batch_size=batch_size, progress=progress, row_number_ids=data.row_number_ids)
    verb = "created" if report.created_project else "updated"
    log(f"{verb} project {report.project_id} ({report.project_title!r}): {report.imported} tasks imported, "
        f"{report.refreshed} refreshed (unreviewed, imported again with this run's numbers), {report.updated} "
        f"reviewed tasks updated, {report.unchanged} unchanged, {report.predictions_added} predictions added"
        + (f", {report.duplicates_removed} duplicate tasks of an interrupted push removed"
           if report.duplicates_removed else "")
        + (f"; model version switched to {run.run_id}" if report.switched_model_version else ""))
    if report.predictions_moved:
        log(f"{report.predictions_moved} tasks now pre-select their current given label (it was fixed since the "
            f"last push)")
    if report.texts_replaced:
        log(f"note: {report.texts_replaced} unreviewed tasks now show another text under the same example id")
    if data.row_number_ids and not report.created_project:
        log(f"warning: {data_path} has no id column, so its example ids are row numbers: removing, adding or "
            f"reordering rows between pushes moves the ids. Reviewed tasks are protected (such a push is refused); "
            f"give the data an id column to keep reviews and examples together.")
    if report.not_in_values:
        log(f"note: {report.not_in_values} tasks of the project have example ids these values do not cover; "
            f"they were left as they are")
    log(f"views: {', '.join(report.views)}; task map in {state_path}")
    click.echo(f"{client.url}/projects/{report.project_id}/data")


def _evidence(result_path, data, test, joined, metric, values_path) -> pd.DataFrame:
    """Per example: how many validation examples it hurts and which most, checked to be the run of the values."""
    from freeshap_dq.curation.evidence import evidence_table

    table = evidence_table(ValuationResult.load(result_path), data, test, metric, owner=str(result_path))
    column, _ = metric_columns(metric)
    mine = joined.set_index("example_id")[column].reindex(table["example_id"]).to_numpy(dtype=float)
    differs = ~np.isclose(table["value"].to_numpy(), mine, rtol=1e-6, atol=1e-12)
    if differs.any():
        i = int(np.flatnonzero(differs)[0])
        raise InputError(f"{result_path} and {values_path} are not the same run: example {table['example_id'][i]!r} "
                         f"has value {table['value'][i]:.6g} in one and {mine[i]:.6g} in the other. Give the result "
                         f"saved with these values (freeshap-dq value --per-point --save-result).")
    return table.drop(columns=["value"])


def state_name(title: str | None, project_id: int | None) -> str:
    """The default state file of a project (every push into one project shares it)."""
    if title is None:
        return f"project-{project_id}.labelstudio.json"
    slug = re.sub(r"[^A-Za-z0-9]+", "-", title).strip("-").lower()
    return f"{slug or 'project'}.labelstudio.json"


def _project_of_state(state_path: Path, url: str | None) -> tuple[int, str | None]:
    try:
        state = json.loads(state_path.read_text())
        project_id = int(state["project_id"])
    except (OSError, ValueError, KeyError, TypeError):
        raise InputError(f"{state_path}: not the state file of a push (it names no project); give --project.") from None
    if url is None and state.get("url"):
        log(f"project {project_id} ({state.get('project_title', '?')!r}) on {state['url']}, from {state_path}")
        return project_id, state["url"]
    return project_id, url


def _selection(joined, review, count, fraction, threshold, confident, z, both, metric) -> pd.Series:
    """Which rows of ``review`` to import: the removal rules pick candidates; --both narrows to double flags."""
    rules_given = any(v is not None for v in (count, fraction, threshold)) or confident
    if not rules_given and not both:
        fraction = 0.1
    if rules_given or not both:
        decisions = RemovalPolicy(fraction, count, threshold, confident, z, 1.0, metric, allow_empty_class=True).apply(joined)
        chosen = set(decisions.loc[decisions["removed"], "example_id"])
    else:
        chosen = set(review["example_id"])
    mask = review["example_id"].isin(chosen)
    if both:
        mask &= review["freeshap_flagged"] & review["cleanlab_label_issue"]
    return mask.reset_index(drop=True)


def _run_id(values_path: Path, metric: str) -> str:
    digest = hashlib.sha256(values_path.read_bytes() + metric.encode()).hexdigest()
    return f"freeshap-{digest[:12]}"


@labelstudio_group.command("pull")
@connection_options
@click.option("-o", "--output", required=True, help="Relabel table (.csv/.parquet/.json/.jsonl; - = stdout).")
@click.option("--manifest", "manifest_path", type=PATH, default=None,
              help="Counts and the ids of conflicts and skips [default: OUTPUT.manifest.json; none for stdout].")
@click.option("--agreement", type=click.Choice(AGREEMENT_POLICIES), default="unanimous", show_default=True,
              help="When reviewers disagree: unanimous lists the task as a conflict (not applied), majority takes "
                   "the label most reviewers chose (a tie is a conflict), latest the latest annotation.")
@click.option("--state", "state_path", type=click.Path(dir_okay=False, exists=True, path_type=Path), default=None,
              help="A push's state file: the project (and the server address) to pull from, instead of --project.")
@friendly_errors
def pull_command(url, api_key, timeout, title, project_id, output, manifest_path, agreement, state_path):
    """Reviewed labels -> a relabel table: one row per task someone reviewed or skipped, with its decision
    (changed, confirmed, conflict, skipped), the votes and what the reviewers read (content_fingerprint)."""
    if manifest_path is None and output != "-":
        manifest_path = Path(output).with_name(Path(output).name + ".manifest.json")
    check_outputs({"-o/--output": output, "--manifest": manifest_path})
    table_format(output)
    adapter = _adapter()
    if state_path is not None:
        if title is not None or project_id is not None:
            raise click.UsageError("give --state or --project / --project-id, not both.")
        project_id, url = _project_of_state(state_path, url)
    title, project_id = _project_choice(title, project_id)
    client = _client(adapter, url, api_key, timeout)
    project = _open_project(client, title, project_id, "check --project or use --project-id")
    table, counts = adapter.pull(client, project, agreement=agreement)
    write_table(table, output)
    if manifest_path is not None:
        by_decision = {d: table.loc[table["decision"] == d, "example_id"].tolist() for d in ("conflict", "skipped")}
        write_json({"command": "labelstudio pull", "freeshap_dq": __version__,
                    "created": dt.datetime.now(dt.timezone.utc).isoformat(), "url": client.url,
                    "project": {"id": project.id, "title": project.title}, "agreement": agreement,
                    "output": str(output), "counts": counts, **by_decision}, manifest_path)
    log(f"project {project.id}: {counts['reviewed']} of {counts['tasks']} tasks reviewed: {counts['changed']} labels "
        f"changed, {counts['confirmed']} confirmed, {counts['conflict']} conflicts ({agreement}), {counts['skipped']} "
        f"skipped" + (f", {counts['without_choice']} annotations without a label choice"
                      if counts["without_choice"] else "")
        + (f"; wrote {output}" + (f" and {manifest_path}" if manifest_path else "") if output != "-" else ""))
    if counts["conflict"]:
        shown = table.loc[table["decision"] == "conflict"].head(3)
        log("conflicts (not applied by relabel apply): " + "; ".join(
            f"{row.example_id} ({row.votes})" for row in shown.itertuples()))



@labelstudio_group.command("sync")
@click.option("--data", "data_path", type=DATA_PATH, required=True,
              help="The training data as it is now (the previous round's OUTPUT_DIR/train.csv).")
@column_options
@click.option("--kernel", "kernel_path", type=ARTIFACT_PATH, required=True,
              help="The kernel of the data (freeshap-dq kernel): it depends on the texts, not the labels, so it is "
                   "reused with the corrected labels.")
@connection_options
@click.option("--output-dir", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="This round's folder: train.csv (corrected), relabels.csv, values.csv, sync.json.")
@click.option("--agreement", type=click.Choice(AGREEMENT_POLICIES), default="unanimous", show_default=True,
              help="When reviewers disagree (as for pull).")
@click.option("--count", type=int, default=None, help="Queue the COUNT most harmful examples.")
@click.option("--fraction", type=float, default=None,
              help="Queue the most harmful fraction (0-1) [default: 0.1 when --count is not given].")
@metric_option()
@click.option("--permutations", type=click.IntRange(min=1), default=200, show_default=True,
              help="Permutations of the new valuation.")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True, help="Seed of the permutations.")
@click.option("--batch-size", type=click.IntRange(min=1), default=200, show_default=True,
              help="Tasks per import request.")
@click.option("--progress/--no-progress", default=None, help="Progress bars on stderr [default: when a terminal].")
@friendly_errors
def sync_command(data_path, kernel_path, url, api_key, timeout, title, project_id, output_dir, agreement, count,
                 fraction, metric, permutations, seed, batch_size, progress, **columns):
    """One review round: pull the reviews, apply them, value the corrected data on the same kernel and push the
    new ranks. Rerunning it without new reviews changes nothing; the next round runs on OUTPUT_DIR/train.csv."""
    from freeshap_dq.config import ValuationConfig
    from freeshap_dq.curation.relabel import apply_relabels, relabelled_problem
    from freeshap_dq.data.tables import write_data_table
    from freeshap_dq.io import outputs_together
    from freeshap_dq.kernels.problem import KernelProblem
    from freeshap_dq.valuation.run import compute_values

    check_outputs({"--output-dir": output_dir}, {"--data": data_path, "--kernel": kernel_path},
                  folders=("--output-dir",))
    title, project_id = _project_choice(title, project_id)
    if count is not None and fraction is not None:
        raise click.UsageError("give --count or --fraction, not both.")
    fraction = 0.1 if count is None and fraction is None else fraction
    RemovalPolicy(fraction, count, None, False, DEFAULT_Z, 1.0, metric, allow_empty_class=True)  # checks them now
    config = ValuationConfig(permutations=permutations, seed=seed, rank_metric=metric)
    adapter = _adapter()
    options = pop_data_options(columns)
    raw = read_table(data_path)
    data = dataset_from_frame(raw, str(data_path), **options)
    problem = KernelProblem.load(kernel_path)
    relabelled_problem(problem, data, str(kernel_path))  # the kernel is the data's, before any server call
    client = _client(adapter, url, api_key, timeout)
    project = _open_project(client, title, project_id, "push to it first, or check --project")

    reviews, pulled = adapter.pull(client, project, agreement=agreement)
    new_labels = sorted(set(reviews["reviewed_label"].dropna()) - set(data.labels))
    if new_labels:
        raise InputError(f"reviewers of project {project.id} chose label(s) {', '.join(map(repr, new_labels))} that "
                         f"{data_path} does not have: a new class needs a new kernel. Run freeshap-dq labelstudio "
                         f"pull, relabel apply --allow-new-labels, kernel and value, then push.")
    outcome = apply_relabels(raw, data, reviews, options["label_column"], f"the reviews of project {project.id}",
                             on_conflict="error")
    corrected = dataset_from_frame(outcome.corrected, str(data_path), **options)
    problem, _ = relabelled_problem(problem, corrected, str(kernel_path))
    result = compute_values(problem, config, progress=progress)
    values = result.to_dataframe(metric)
    output_dir.mkdir(exist_ok=True)
    state_path = output_dir / "labelstudio-state.json"
    with outputs_together(output_dir) as scratch:
        write_data_table(outcome.corrected, scratch / "train.csv", like=data_path)
        write_table(reviews, str(scratch / "relabels.csv"))
        write_table(values, str(scratch / "values.csv"))
        joined = join_values(scratch / "values.csv", corrected)
        joined["text"] = corrected.texts
        if corrected.pairs is not None:
            joined["pair"] = corrected.pairs
        review = adapter.review_table(joined, metric=metric)
        selected = _selection(joined, review, count, fraction, None, False, DEFAULT_Z, False, metric)
        run = adapter.ReviewRun(_run_id(scratch / "values.csv", metric), metric, {
            "values": "values.csv", "data": "train.csv", "round": output_dir.name, "freeshap_dq": __version__})
        report = adapter.push(client, review, selected, run, project_id=project.id, state_path=state_path,
                              batch_size=batch_size, progress=progress, row_number_ids=corrected.row_number_ids)
        top = review.head(5)["example_id"].tolist()
        summary = {"command": "labelstudio sync", "freeshap_dq": __version__,
                   "created": dt.datetime.now(dt.timezone.utc).isoformat(), "project": {"id": project.id,
                                                                                          "title": project.title},
                   "data": str(data_path), "kernel": str(kernel_path), "agreement": agreement,
                   "reviews": pulled, "applied": outcome.counts, "not_applied": outcome.undecided,
                   "changes": outcome.changes.to_dict(orient="records"), "valuation": config.to_dict(),
                   "push": {"imported": report.imported, "refreshed": report.refreshed, "updated": report.updated,
                            "unchanged": report.unchanged, "predictions_moved": report.predictions_moved},
                   "new_top_harmful": top}
        write_json(summary, scratch / "sync.json")
    counts = outcome.counts
    click.echo(f"Round {output_dir}: {counts['changed']} labels fixed, {counts['confirmed']} confirmed, "
               f"{counts['already_applied']} applied before, {pulled['conflict']} conflicts and {pulled['skipped']} "
               f"skips not applied; {report.imported} new tasks, {report.refreshed + report.updated} updated, "
               f"{report.unchanged} unchanged.\nMost harmful now: {', '.join(top)}.\n"
               f"Next round: freeshap-dq labelstudio sync --data {output_dir}/train.csv --kernel {kernel_path} "
               f"--project-id {project.id} --output-dir NEXT_ROUND")
