"""Label Studio adapter: FreeShap review tasks out, reviewed labels back.

``push`` turns a review table (one row per training example: text, given label, FreeShap value,
harm rank, 0-1 harm quality, optional cleanlab columns) into tasks of a text-classification
project. Each task carries one prediction per run: ``model_version`` = run id, ``score`` = the
0-1 quality (lower = more harmful, so "Uncertainty sampling" serves the most harmful first) and a
result pre-filled with the given label. The server is the source of truth for what already
exists (tasks are matched by ``data.example_id``), so re-running never duplicates tasks; a new
run updates the data, adds its prediction and switches the project's model version. A local
state file keeps the example id <-> task id map and what is left after a partial failure.

``pull`` reads the latest non-cancelled annotation of each task into a relabel table.

The API key is read at call time (``--api-key`` or LABEL_STUDIO_API_KEY) and never printed,
logged or written anywhere.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from xml.sax.saxutils import quoteattr

import pandas as pd

from freeshap_dq.curation.evidence import clip_text
from freeshap_dq.curation.relabel import DECISIONS, agreed_label
from freeshap_dq.data.tables import content_fingerprint
from freeshap_dq.errors import FreeShapError, InputError
from freeshap_dq.io import write_json
from freeshap_dq.scores import DEFAULT_METRIC, DEFAULT_Z, confidently_harmful, harm_order, metric_columns, value_to_score

try:
    import httpx
    from label_studio_sdk import LabelStudio
    from label_studio_sdk.core.api_error import ApiError
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError("the Label Studio integration needs the SDK: pip install 'freeshap-dq[labelstudio]'") from exc

ENV_URL, ENV_KEY = "LABEL_STUDIO_URL", "LABEL_STUDIO_API_KEY"
CONTROL, TEXT, PAIR = "label", "text", "pair"
SAMPLING = "Uncertainty sampling"
HARMFUL_VIEW, BOTH_VIEW, SCORE_VIEW = "Most harmful first", "Harmful and label issue", "By prediction score"


class LabelStudioError(FreeShapError):
    """The server cannot be used as asked: unreachable, refused credentials, unknown project, bad labels."""


class PartialPushError(LabelStudioError):
    """Some tasks were imported, then the server failed; rerunning the same push finishes the job."""


@dataclass(frozen=True)
class Connection:
    url: str
    api_key: str = field(repr=False)
    timeout: float = 60.0

    @classmethod
    def resolve(cls, url: str | None = None, api_key: str | None = None, timeout: float = 60.0) -> Connection:
        """Options first, then LABEL_STUDIO_URL / LABEL_STUDIO_API_KEY read now (not at import time)."""
        url = url or os.environ.get(ENV_URL)
        api_key = api_key or os.environ.get(ENV_KEY)
        if not url:
            raise LabelStudioError(f"no Label Studio address: pass --url or set {ENV_URL} (e.g. http://127.0.0.1:8080).")
        if not url.startswith(("http://", "https://")):
            raise LabelStudioError(f"--url {url!r} must start with http:// or https://.")
        if not api_key:
            raise LabelStudioError(f"no API key: set {ENV_KEY} (Account & Settings -> Access Token) or pass --api-key.")
        return cls(url.rstrip("/"), api_key, timeout)


@dataclass(frozen=True)
class ChoiceControl:
    """The project's classification control: where predictions and annotations put the label."""

    name: str
    to_name: str
    labels: tuple[str, ...]
    inputs: tuple[str, ...]


class Client:
    """The SDK behind one door: every failure becomes a LabelStudioError that says what to do."""

    def __init__(self, connection: Connection):
        self.url = connection.url
        self.timeout = connection.timeout
        self.sdk = LabelStudio(base_url=connection.url, api_key=connection.api_key, timeout=connection.timeout)

    def call(self, what: str, fn: Callable, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except ApiError as exc:
            raise self._api_error(what, exc) from None
        except httpx.TimeoutException:
            raise LabelStudioError(f"Label Studio at {self.url} did not answer within {self.timeout:g} s "
                                   f"(--timeout) while trying to {what}; if the server is busy give a longer --timeout "
                                   f"and run again (push resumes where it stopped), else check --url / {ENV_URL}."
                                   ) from None
        except (httpx.TransportError, OSError) as exc:
            raise LabelStudioError(f"cannot reach Label Studio at {self.url} while trying to {what} "
                                   f"({type(exc).__name__}: {exc}); is the server running? Check --url / {ENV_URL}."
                                   ) from None

    def _api_error(self, what: str, exc: ApiError) -> LabelStudioError:
        status = exc.status_code
        if status == 401:
            return LabelStudioError(f"Label Studio at {self.url} refused the API key (401) while trying to {what}; "
                                    f"check --api-key / {ENV_KEY} (a legacy token needs legacy tokens enabled in the "
                                    f"organization settings).")
        if status == 403:
            return LabelStudioError(f"the API key's user may not {what} on {self.url} (403); ask an administrator.")
        if status == 404:
            return LabelStudioError(f"not found on {self.url} while trying to {what} (404).")
        body = exc.body if isinstance(exc.body, (str, dict, list)) else ""
        return LabelStudioError(f"Label Studio at {self.url} answered {status} while trying to {what}: "
                                f"{json.dumps(body)[:500]}")

    def pages(self, what: str, fn: Callable, page_size: int = 500, **kwargs) -> list:
        """Every item of a paginated listing, page by page, stopping at the last page: the SDK's pager asks for
        the page after the last one, which the server answers with an error and a traceback in its log."""
        items: list = []
        page = 1
        while True:
            pager = self.call(what, fn, page=page, page_size=page_size, **kwargs)
            chunk = list(pager.items or [])
            items += chunk
            total = getattr(pager.response, "total", None) or getattr(pager.response, "count", None)
            if len(chunk) < page_size or (total is not None and len(items) >= total):
                return items
            page += 1

    def check(self) -> str:
        """Who the key belongs to (also proves the server is there and the key works)."""
        user = self.call("check the API key", self.sdk.users.whoami)
        return user.email or user.username or str(user.id)

    # projects -------------------------------------------------------------------------------------------
    def project(self, project_id: int):
        try:
            return self.call(f"open project {project_id}", self.sdk.projects.get, id=project_id)
        except LabelStudioError as exc:
            if "(404)" in str(exc):
                raise LabelStudioError(f"{self.url} has no project {project_id}; check --project-id.") from None
            raise

    def find_project(self, title: str):
        found = [p for p in self.pages(f"list projects titled {title!r}", self.sdk.projects.list, title=title)
                 if p.title == title]
        if len(found) > 1:
            ids = ", ".join(str(p.id) for p in found)
            raise LabelStudioError(f"{self.url} has {len(found)} projects titled {title!r} (ids {ids}); "
                                   f"choose one with --project-id.")
        return self.project(found[0].id) if found else None

    def create_project(self, title: str, config: str, model_version: str):
        return self.call(f"create project {title!r}", self.sdk.projects.create, title=title, label_config=config,
                         model_version=model_version, sampling=SAMPLING, expert_instruction=INSTRUCTIONS,
                         show_instruction=True)

    def set_model_version(self, project_id: int, model_version: str) -> None:
        self.call("switch the project's model version", self.sdk.projects.update, id=project_id,
                  model_version=model_version)

    # tasks ----------------------------------------------------------------------------------------------
    def tasks(self, project_id: int, with_annotations: bool = False) -> list:
        fields = "all" if with_annotations else "task_only"
        return self.pages("list the project's tasks", self.sdk.tasks.list, project=project_id, fields=fields)

    def import_tasks(self, project_id: int, tasks: list[dict]) -> list[int]:
        response = self.call(f"import {len(tasks)} tasks", self.sdk.projects.import_tasks, id=project_id,
                             request=tasks, return_task_ids=True)
        return list(response.task_ids or [])

    def update_task(self, task_id: int, data: dict, meta: dict) -> None:
        self.call(f"update task {task_id}", self.sdk.tasks.update, id=str(task_id), data=data, meta=meta)

    def predictions(self, project_id: int) -> list:
        return self.call("list the project's predictions", self.sdk.predictions.list, project=project_id)

    def add_prediction(self, task_id: int, prediction: dict) -> None:
        self.call(f"add a prediction to task {task_id}", self.sdk.predictions.create, task=task_id, **prediction)

    def import_predictions(self, project_id: int, predictions: list[dict]) -> None:
        self.call(f"import {len(predictions)} predictions", self.sdk.projects.import_predictions, id=project_id,
                  request=predictions)

    def delete_tasks(self, project_id: int, task_ids: list[int]) -> None:
        self.call(f"delete {len(task_ids)} outdated tasks", self.sdk.actions.create, id="delete_tasks",
                  project=project_id, selected_items={"all": False, "included": list(task_ids)})

    def update_prediction(self, prediction_id: int, prediction: dict) -> None:
        self.call(f"update prediction {prediction_id}", self.sdk.predictions.update, id=prediction_id, **prediction)

    # views ----------------------------------------------------------------------------------------------
    def save_view(self, project_id: int, title: str, ordering: list[str], filters: dict | None = None) -> int:
        data: dict[str, Any] = {"title": title, "ordering": ordering, **view_layout()}
        if filters is not None:
            data["filters"] = filters
        existing = [v for v in self.call("list saved views", self.sdk.views.list, project=project_id)
                    if (v.data or {}).get("title") == title]
        if existing:
            self.call(f"update view {title!r}", self.sdk.views.update, id=str(existing[0].id), data=data,
                      project=project_id)
            return existing[0].id
        return self.call(f"create view {title!r}", self.sdk.views.create, project=project_id, data=data).id

    def user_emails(self) -> dict[int, str]:
        try:
            return {u.id: u.email or u.username or str(u.id) for u in self.sdk.users.list()}
        except Exception:  # listing users may be forbidden to this key; fall back to ids
            return {}


# -- the label config ----------------------------------------------------------------------------------------

def label_config(labels: Iterable[str], pair: bool = False) -> str:
    """A text-classification config: FreeShap header, the text (and its pair), one choice per label."""
    choices = "\n".join(f"    <Choice value={quoteattr(str(label))}/>" for label in labels)
    pair_tag = f'\n  <Text name="{PAIR}" value="${PAIR}"/>' if pair else ""
    return (f'<View>\n  <Header value="$freeshap_header" size="5"/>\n  <Text name="{TEXT}" value="${TEXT}"/>{pair_tag}\n'
            f'  <Choices name="{CONTROL}" toName="{TEXT}" choice="single-radio" showInline="true" required="true">\n'
            f'{choices}\n  </Choices>\n  <Header value="Why" size="6"/>\n  <Text name="why" value="$freeshap_why"/>\n'
            f'</View>')


def choice_control(project) -> ChoiceControl:
    """The project's Choices control (ours by name, or the only one)."""
    parsed = project.parsed_label_config or {}
    controls = {name: spec for name, spec in parsed.items() if spec.get("type") == "Choices"}
    if CONTROL in controls:
        name = CONTROL
    elif len(controls) == 1:
        name = next(iter(controls))
    else:
        found = ", ".join(controls) or "none"
        raise LabelStudioError(f"project {project.id} ({project.title!r}) needs one <Choices> control to hold the "
                               f"label (found: {found}); push into a new project or fix its labeling config.")
    spec = controls[name]
    to_names = spec.get("to_name") or [TEXT]
    inputs = tuple(i.get("value") for i in spec.get("inputs", []) if i.get("value"))
    return ChoiceControl(name, to_names[0], tuple(spec.get("labels", [])), inputs)


def check_labels(control: ChoiceControl, labels: Iterable[str], project) -> None:
    """The server accepts unknown labels silently: refuse them before anything is imported."""
    missing = sorted({str(label) for label in labels if label} - set(control.labels))
    if missing:
        raise LabelStudioError(f"label(s) {', '.join(map(repr, missing))} are not choices of project {project.id} "
                               f"({project.title!r}, choices: {', '.join(control.labels)}); add them to its "
                               f"labeling config or push into another project.")
    unknown_inputs = [name for name in control.inputs if name not in (TEXT, PAIR)]
    if unknown_inputs:
        raise LabelStudioError(f"project {project.id} shows data field(s) {', '.join(unknown_inputs)} but tasks carry "
                               f"'{TEXT}' (and '{PAIR}'); push into a new project or use $text in its config.")


# -- tasks ---------------------------------------------------------------------------------------------------

@dataclass
class ReviewRun:
    """What one push is: its id and provenance, stored in every task's meta and prediction."""

    run_id: str
    metric: str = DEFAULT_METRIC
    provenance: dict[str, Any] = field(default_factory=dict)


def review_table(table: pd.DataFrame, metric: str = DEFAULT_METRIC, z: float = DEFAULT_Z, audit: pd.DataFrame | None = None,
                 evidence: pd.DataFrame | None = None) -> pd.DataFrame:
    """Per-example review fields, most harmful first.

    ``evidence`` (optional): example_id, freeshap_hurts (validation examples it hurts), freeshap_why (a paragraph,
    :class:`~freeshap_dq.curation.evidence.HarmEvidence`).

    ``table``: example_id, text (+ pair), label, value/value_ce, stderr/stderr_ce (the values table joined
    with the data). ``audit``: the table of ``freeshap-dq cleanlab audit`` (example_id, label_score,
    is_label_issue, predicted_label), optional.
    """
    value_col, se_col = metric_columns(metric)
    out = pd.DataFrame({"example_id": table["example_id"].astype(str), TEXT: table[TEXT],
                        "given_label": table["label"].astype(str)})
    if PAIR in table.columns:
        out[PAIR] = table[PAIR]
    values = table[value_col].to_numpy(dtype=float)
    stderr = table[se_col].to_numpy(dtype=float) if se_col in table.columns else values * float("nan")
    out["freeshap_value"] = values
    out["freeshap_stderr"] = stderr
    out["freeshap_score"], _ = value_to_score(values)
    out["freeshap_flagged"] = confidently_harmful(values, stderr, z)
    out["suggested_label"] = _other_label(out["given_label"])
    out["suggestion_source"] = out["suggested_label"].map(lambda s: "the other class" if s else "")
    if audit is not None:
        out = _join_audit(out, audit)
    out["freeshap_hurts"] = None
    out["freeshap_why"] = NO_EVIDENCE
    if evidence is not None:
        why = evidence.set_index("example_id")
        known = out["example_id"].isin(why.index).to_numpy()
        out.loc[known, "freeshap_hurts"] = why.loc[out.loc[known, "example_id"], "freeshap_hurts"].to_numpy()
        out.loc[known, "freeshap_why"] = why.loc[out.loc[known, "example_id"], "freeshap_why"].to_numpy()
    training_index = table["train_index"].to_numpy() if "train_index" in table.columns else None
    out = out.iloc[harm_order(values, training_index)].reset_index(drop=True)
    out.insert(1, "freeshap_rank", range(1, len(out) + 1))
    out["freeshap_header"] = [_header(row, len(out)) for row in out.itertuples(index=False)]
    return out


def _other_label(given: pd.Series) -> pd.Series:
    labels = sorted(set(given))
    if len(labels) != 2:
        return pd.Series([""] * len(given), index=given.index)
    return given.map({labels[0]: labels[1], labels[1]: labels[0]})


def _join_audit(out: pd.DataFrame, audit: pd.DataFrame) -> pd.DataFrame:
    needed = ["example_id", "label_score", "is_label_issue"]
    missing = [c for c in needed if c not in audit.columns]
    if missing:
        raise InputError(f"the audit table lacks column(s) {', '.join(missing)}; use the table written by "
                         f"freeshap-dq cleanlab audit.")
    audit = audit.assign(example_id=audit["example_id"].astype(str)).set_index("example_id")
    absent = [i for i in out["example_id"] if i not in audit.index]
    if absent:
        raise InputError(f"the audit table has no row for example id(s) {', '.join(map(repr, absent[:3]))}; "
                         f"use the audit of the same training data.")
    rows = audit.loc[out["example_id"]]
    out["cleanlab_label_quality"] = pd.to_numeric(rows["label_score"], errors="coerce").to_numpy()
    out["cleanlab_label_issue"] = rows["is_label_issue"].map(_as_bool).to_numpy()
    if "predicted_label" in rows.columns:
        predicted = rows["predicted_label"].astype(str).to_numpy()
        out["suggested_label"] = predicted
        out["suggestion_source"] = "cleanlab audit (leave-one-out kernel regression)"
    return out


def _as_bool(value) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in ("true", "1", "yes")
    return bool(value)


def _header(row, n: int) -> str:
    """The line above the text: rank and percentile, the value in words, the given and the suggested label."""
    share = 100.0 * row.freeshap_rank / n
    effect = "hurts" if row.freeshap_value < 0 else "helps" if row.freeshap_value > 0 else "neither helps nor hurts"
    parts = [f"FreeShap harm rank {row.freeshap_rank:,} of {n:,} (most harmful {share:.2g}%)",
             f"value {row.freeshap_value:+.2g}: {effect} the validation predictions"
             + (" (confidently)" if row.freeshap_flagged else ""), f"given label: {row.given_label}"]
    if row.suggested_label:
        source = "cleanlab" if row.suggestion_source.startswith("cleanlab") else "the other class"
        parts.append(f"suggested: {row.suggested_label} ({source})")
    quality = getattr(row, "cleanlab_label_quality", None)
    if quality is not None and not math.isnan(quality):
        parts.append(f"cleanlab label quality {quality:.2f}")
    return " · ".join(parts)


NO_EVIDENCE = ("Which validation examples it hurts is not shown: push with --result R.npz --test TEST from "
               "freeshap-dq value --per-point --save-result R.npz.")
INSTRUCTIONS = (
    "<p><b>FreeShap review.</b> Each task is a training example ranked by how much it hurts the model's predictions on "
    "the validation set (its FreeShap value: a Shapley value of kernel regression on the model's neural tangent "
    "kernel; below 0 = hurts). Rank 1 hurts most; harmful examples are often mislabelled.</p>"
    "<p>Read the text and choose its <b>correct</b> label. The given label is pre-selected: submitting it confirms "
    "the label; choosing another one corrects it. The header says the rank, the value and a suggested label; "
    "<i>Why</i> lists the validation examples this example hurts most. Skip when you cannot tell.</p>")


DATA_FIELDS = ("example_id", TEXT, PAIR, "given_label", "suggested_label", "freeshap_value", "freeshap_stderr",
               "freeshap_rank", "freeshap_score", "freeshap_flagged", "cleanlab_label_quality", "cleanlab_label_issue",
               "freeshap_hurts", "freeshap_why", "freeshap_header")


def task_data(row: dict) -> dict:
    """The task's ``data``: JSON numbers and booleans (so views can sort and filter), NaN -> null; values to
    4 significant digits (readable, and a new run with the same ranking changes nothing)."""
    return {key: _readable(_json_value(row[key])) for key in DATA_FIELDS if key in row}


def _readable(value):
    return float(f"{value:.4g}") if isinstance(value, float) else value


def task_prediction(row: dict, run: ReviewRun, control: ChoiceControl) -> dict:
    return {"model_version": run.run_id, "score": float(row["freeshap_score"]),
            "result": [{"from_name": control.name, "to_name": control.to_name, "type": "choices",
                        "value": {"choices": [str(row["given_label"])]}}]}


def task_meta(row: dict, run: ReviewRun) -> dict:
    return {"freeshap_dq": {"run_id": run.run_id, "metric": run.metric,
                            "suggestion_source": row.get("suggestion_source", ""), **run.provenance}}


def _json_value(value):
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


# -- push ----------------------------------------------------------------------------------------------------

def shown_content(data: dict) -> tuple[str, str | None]:
    """What a reviewer reads in a task (text, pair): the part of an example a review is about."""
    pair = data.get(PAIR)
    return str(data.get(TEXT, "")), None if pair is None else str(pair)


def was_reviewed(task) -> bool:
    """Someone annotated, skipped or started (a draft) this task: it is updated in place, never replaced."""
    counts = (getattr(task, "total_annotations", 0) or 0) + (getattr(task, "cancelled_annotations", 0) or 0)
    return bool(counts or getattr(task, "drafts", None))


def _run_of(task) -> str | None:
    return (task.meta or {}).get("freeshap_dq", {}).get("run_id")


def _tasks_by_example(tasks: list) -> tuple[dict, list[int]]:
    """The project's task of each example id, and the ids of unreviewed extra copies to delete (a push stopped
    between importing new versions and deleting the old ones leaves both): a reviewed copy wins, else the newest."""
    by_example: dict[str, list] = {}
    for task in tasks:
        example_id = (task.data or {}).get("example_id")
        if example_id is not None:
            by_example.setdefault(str(example_id), []).append(task)
    chosen, extra = {}, []
    for example_id, copies in by_example.items():
        copies.sort(key=lambda t: (was_reviewed(t), t.id), reverse=True)
        chosen[example_id] = copies[0]
        extra += [t.id for t in copies[1:] if not was_reviewed(t)]
    return chosen, extra


def refuse_moved_reviews(new_data: dict[str, dict], existing: dict, project, row_number_ids: bool) -> None:
    """Refuse a push that would show another text under a task someone has already reviewed: the review would
    then be pulled and applied to the wrong example. ``new_data``: example id -> the task data pushed now."""
    moved = [(example_id, existing[example_id]) for example_id, data in new_data.items()
             if was_reviewed(existing[example_id]) and shown_content(existing[example_id].data or {}) != shown_content(data)]
    if not moved:
        return
    example_id, task = moved[0]
    before, after = shown_content(task.data or {})[0], shown_content(new_data[example_id])[0]
    why = ("The data has no id column, so its ids are row numbers, and removing, adding or reordering rows moves "
           "every id: give the data an id column (--id-column) and push it into a new project."
           if row_number_ids else "Give the data the ids it was pushed with, or push it into a new project.")
    raise LabelStudioError(
        f"{len(moved)} reviewed task(s) of project {project.id} ({project.title!r}) would show another text under "
        f"the same example id, e.g. {example_id!r} (task {task.id}): the reviewer saw {clip_text(before, 60)!r}, the "
        f"data now has {clip_text(after, 60)!r}. Nothing was pushed: the review would land on the wrong example. {why}")


@dataclass
class PushReport:
    project_id: int
    project_title: str
    created_project: bool = False
    imported: int = 0
    updated: int = 0
    unchanged: int = 0
    predictions_added: int = 0
    refreshed: int = 0  # unreviewed tasks imported again with this run's data (the old version deleted)
    duplicates_removed: int = 0  # unreviewed copies left by a push stopped between import and delete
    predictions_moved: int = 0  # pre-selected choice moved to the current given label (the label was fixed)
    texts_replaced: int = 0  # unreviewed tasks whose example now has another text
    switched_model_version: bool = False
    not_in_values: int = 0
    views: dict[str, int] = field(default_factory=dict)
    task_ids: dict[str, int] = field(default_factory=dict)


@dataclass
class PushState:
    """The local record of a push: example id <-> task id, and what is still to import."""

    path: Path
    data: dict = field(default_factory=dict)

    @classmethod
    def load(cls, path: Path) -> PushState:
        if not path.exists():
            return cls(path, {})
        try:
            return cls(path, json.loads(path.read_text()))
        except (OSError, json.JSONDecodeError) as exc:
            raise InputError(f"{path}: not a readable push state ({exc}); move it away to start afresh.") from None

    def record(self, url: str, project, run: ReviewRun, task_ids: dict[str, int], pending: list[str]) -> None:
        self.data = {"url": url, "project_id": project.id, "project_title": project.title, "run_id": run.run_id,
                     "updated": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                     "complete": not pending, "pending": pending, "tasks": task_ids}
        write_json(self.data, self.path)


def push(client: Client, review: pd.DataFrame, selected: pd.Series, run: ReviewRun, *, title: str | None = None,
         project_id: int | None = None, state_path: Path | None = None, batch_size: int = 200,
         progress: bool | None = None, on_batch: Callable[[int], None] | None = None,
         row_number_ids: bool = False) -> PushReport:
    """Create/update the project, import the selected examples in rank order, refresh the rest, add views.

    ``review`` is ``review_table(...)`` (every training example, most harmful first); ``selected`` marks the
    rows to import as new tasks. Examples already in the project get their data refreshed and this run's
    prediction (pre-selecting the current given label) whether selected or not. A reviewed task never gets
    another text: when the data under its example id changed, nothing is pushed (:func:`refuse_moved_reviews`).
    ``row_number_ids``: the data's ids are its row numbers (said in that refusal).
    """
    from tqdm.auto import tqdm

    if batch_size < 1:
        raise InputError(f"--batch-size must be at least 1, got {batch_size}.")
    pair = PAIR in review.columns
    labels = sorted(set(review["given_label"]) | {s for s in review["suggested_label"] if s})
    project = client.project(project_id) if project_id is not None else client.find_project(title)
    created = project is None
    if created:
        project = client.create_project(title, label_config(labels, pair), run.run_id)
        project = client.project(project.id)
    control = choice_control(project)
    check_labels(control, labels, project)
    if pair and f"${PAIR}" not in (project.label_config or ""):
        raise LabelStudioError(f"the data has sentence pairs but project {project.id} does not show a {PAIR!r} field; "
                               f"push into a new project.")

    report = PushReport(project.id, project.title, created_project=created)
    existing, duplicates = _tasks_by_example(client.tasks(project.id))
    predictions = {p.task: p for p in client.predictions(project.id) if p.model_version == run.run_id}
    rows = review.to_dict(orient="records")
    state = PushState.load(state_path) if state_path else None
    task_ids = {eid: t.id for eid, t in existing.items()}
    report.not_in_values = len(set(existing) - set(review["example_id"]))

    refresh = [r for r in rows if r["example_id"] in existing]
    new_data = {r["example_id"]: task_data(r) for r in refresh}
    refuse_moved_reviews(new_data, existing, project, row_number_ids)
    replaced: dict[str, int] = {}  # example id -> the old task, for unreviewed tasks imported again below
    patch = []
    for row in refresh:
        task = existing[row["example_id"]]
        data = new_data[row["example_id"]]
        prediction = predictions.get(task.id)
        if (task.data == data and _run_of(task) == run.run_id and prediction is not None
                and _chosen_label(prediction.result or [], control) == str(row["given_label"])):
            report.unchanged += 1
            continue
        if shown_content(task.data or {}) != shown_content(data):
            report.texts_replaced += 1
        if was_reviewed(task):
            patch.append(row)
        else:
            replaced[row["example_id"]] = task.id
    missing_predictions = []
    for row in tqdm(patch, desc="update reviewed tasks", unit="task", disable=not _show(progress, len(patch))):
        task = existing[row["example_id"]]
        client.update_task(task.id, new_data[row["example_id"]], task_meta(row, run))
        report.updated += 1
        prediction = task_prediction(row, run, control)
        if task.id not in predictions:
            missing_predictions.append({"task": task.id, **prediction})
        elif _chosen_label(predictions[task.id].result or [], control) != str(row["given_label"]):
            client.update_prediction(predictions[task.id].id, prediction)
            report.predictions_moved += 1
    for start in range(0, len(missing_predictions), batch_size):
        client.import_predictions(project.id, missing_predictions[start:start + batch_size])
    report.predictions_added = len(missing_predictions)

    # New tasks and new versions of unreviewed ones, in rank order and in batches; the old versions are deleted
    # afterwards (a push stopped in between leaves duplicates, which the next push removes).
    chosen = selected.to_numpy()
    new = [r for r, pick in zip(rows, chosen, strict=True)
           if r["example_id"] in replaced or (pick and r["example_id"] not in existing)]
    fresh = sum(r["example_id"] not in replaced for r in new)
    bar = tqdm(total=len(new), desc="import tasks", unit="task", disable=not _show(progress, len(new)))
    for start in range(0, len(new), batch_size):
        batch = new[start:start + batch_size]
        payload = [{"data": task_data(r), "meta": task_meta(r, run), "predictions": [task_prediction(r, run, control)]}
                   for r in batch]
        try:
            ids = client.import_tasks(project.id, payload)
        except LabelStudioError as exc:
            bar.close()
            pending = [r["example_id"] for r in new[start:]]
            where = f" Progress saved in {state_path}." if state is not None else ""
            if state is not None:
                state.record(client.url, project, run, task_ids, pending)
            raise PartialPushError(
                f"{exc}\nImported {start} of {len(new)} tasks ({fresh} new, {len(replaced)} refreshed; harm ranks "
                f"{_rank_span(new[:start])}); {len(pending)} were not confirmed (ranks {_rank_span(new[start:])})"
                f"{_landed_anyway(client, project.id, pending, task_ids)}.{where} Rerun the same command to import the "
                f"rest; tasks already imported are not duplicated."
            ) from None
        if len(ids) != len(batch):
            raise LabelStudioError(f"the server reported {len(ids)} task ids for {len(batch)} imported tasks; "
                                   f"rerun the push to reconcile (tasks are matched by example_id).")
        task_ids.update({r["example_id"]: i for r, i in zip(batch, ids, strict=True)})
        report.imported += sum(r["example_id"] not in replaced for r in batch)
        report.refreshed += sum(r["example_id"] in replaced for r in batch)
        bar.update(len(batch))
        if state is not None:  # the map stays current even if the push is interrupted
            state.record(client.url, project, run, task_ids, [r["example_id"] for r in new[start + batch_size:]])
        if on_batch is not None:
            on_batch(report.imported + report.refreshed)
    bar.close()
    stale = [*replaced.values(), *duplicates]
    for start in range(0, len(stale), 1000):
        client.delete_tasks(project.id, stale[start:start + 1000])
    report.duplicates_removed = len(duplicates)

    if (project.model_version or "") != run.run_id:
        client.set_model_version(project.id, run.run_id)
        report.switched_model_version = not created
    report.views = save_views(client, project.id, audit="cleanlab_label_issue" in review.columns)
    report.task_ids = task_ids
    if state is not None:
        state.record(client.url, project, run, task_ids, [])
    return report


SERVER_COLUMNS = ("id", "inner_id", "completed_at", "total_annotations", "cancelled_annotations", "total_predictions",
                  "annotators", "annotations_results", "annotations_ids", "predictions_score",
                  "predictions_model_versions", "predictions_results", "file_upload", "storage_filename", "created_at",
                  "updated_at", "updated_by", "avg_lead_time", "draft_exists")  # Label Studio 1.23's task columns
SHOWN_COLUMNS = ("tasks:id", "tasks:data.freeshap_rank", "tasks:data.example_id", f"tasks:data.{TEXT}",
                 f"tasks:data.{PAIR}", "tasks:data.given_label", "tasks:data.suggested_label",
                 "tasks:data.freeshap_value", "tasks:data.freeshap_flagged", "tasks:data.freeshap_hurts",
                 "tasks:data.cleanlab_label_issue", "tasks:data.cleanlab_label_quality", "tasks:total_annotations",
                 "tasks:annotators")
COLUMN_TYPES = {"tasks:data.freeshap_rank": "Number", "tasks:data.freeshap_value": "Number",
                "tasks:data.freeshap_stderr": "Number", "tasks:data.freeshap_score": "Number",
                "tasks:data.freeshap_hurts": "Number", "tasks:data.cleanlab_label_quality": "Number",
                "tasks:data.freeshap_flagged": "Boolean", "tasks:data.cleanlab_label_issue": "Boolean"}


def view_layout() -> dict[str, Any]:
    """What every view shows: the columns a reviewer decides with (the others hidden, in the table and beside the
    labeling screen), numbers typed as numbers so the table sorts and filters them numerically (the server orders a
    data field numerically only when the view types it Number; it types every task-data column String itself)."""
    every = {f"tasks:{c}" for c in SERVER_COLUMNS} | {f"tasks:data.{f}" for f in DATA_FIELDS}
    hidden = sorted(every - set(SHOWN_COLUMNS))
    return {"hiddenColumns": {"explore": hidden, "labeling": hidden}, "columnsDisplayType": dict(COLUMN_TYPES)}


def save_views(client: Client, project_id: int, audit: bool) -> dict[str, int]:
    """Data Manager views with numeric sorting and filtering (the UI cannot build these on data fields)."""
    rank = "tasks:data.freeshap_rank"
    views = {HARMFUL_VIEW: client.save_view(project_id, HARMFUL_VIEW, [rank]),
             SCORE_VIEW: client.save_view(project_id, SCORE_VIEW, ["tasks:predictions_score"])}
    if audit:
        both = {"conjunction": "and", "items": [
            {"filter": "filter:tasks:data.freeshap_flagged", "operator": "equal", "type": "Boolean", "value": True},
            {"filter": "filter:tasks:data.cleanlab_label_issue", "operator": "equal", "type": "Boolean",
             "value": True}]}
        views[BOTH_VIEW] = client.save_view(project_id, BOTH_VIEW, [rank], both)
    return views


def _landed_anyway(client: Client, project_id: int, pending: list[str], before: dict[str, int]) -> str:
    """A request that timed out may have been carried out: say how many of the unconfirmed tasks the server has."""
    try:
        held = {str((t.data or {}).get("example_id")): t.id for t in client.tasks(project_id)}
    except LabelStudioError:
        return ""
    landed = sum(1 for e in pending if e in held and held[e] != before.get(e))
    return f"; the server holds {landed} of them all the same" if landed else ""


def _rank_span(rows: list[dict]) -> str:
    if not rows:
        return "none"
    ranks = [int(r["freeshap_rank"]) for r in rows]
    return f"{min(ranks)}-{max(ranks)}" if len(ranks) > 1 else str(ranks[0])


def _show(progress: bool | None, total: int) -> bool:
    import sys

    return total > 0 and (progress if progress is not None else sys.stderr.isatty())


# -- pull ----------------------------------------------------------------------------------------------------

RELABEL_COLUMNS = ("example_id", "given_label", "reviewed_label", "decision", "changed", "votes", "annotator",
                   "lead_time", "task_id", "reviewed_at", "content_fingerprint")


def pull(client: Client, project, agreement: str = "unanimous") -> tuple[pd.DataFrame, dict[str, int]]:
    """One relabel row per task someone acted on, and counts.

    Each reviewer's latest annotation counts once (a reviewer who changed their mind counts with the later
    label). ``agreement`` turns the reviewers' labels into one: ``unanimous`` (default) takes a label only
    when every reviewer chose it, ``majority`` the label most reviewers chose (a tie is a conflict), ``latest``
    the latest annotation whatever the others said. A task whose reviewers disagree under the policy is a
    ``conflict`` row, listed with the votes and without a reviewed label; a task only skipped (cancelled) is a
    ``skipped`` row. ``content_fingerprint`` is what the reviewers read (:func:`content_fingerprint`), so that
    ``relabel apply`` refuses a review whose example has another text in the data.
    """
    agreed_label([], agreement)  # checks the policy name
    control = choice_control(project)
    emails = client.user_emails()
    records = []
    counts = dict.fromkeys(("tasks", "reviewed", *DECISIONS, "unreviewed", "without_choice", "without_example_id"), 0)
    for task in client.tasks(project.id, with_annotations=True):
        counts["tasks"] += 1
        data = task.data or {}
        if data.get("example_id") is None:
            counts["without_example_id"] += 1
            continue
        annotations = [a if isinstance(a, dict) else a.model_dump() for a in task.annotations or []]
        if not annotations:
            counts["unreviewed"] += 1
            continue
        votes = _votes([a for a in annotations if not a.get("was_cancelled")], control, emails)
        if not votes and not all(a.get("was_cancelled") for a in annotations):
            counts["without_choice"] += 1
            continue
        counts["reviewed"] += 1
        given = str(data.get("given_label", ""))
        label = agreed_label([choice for _, choice, _ in votes], agreement)
        decision = "skipped" if not votes else "conflict" if label is None else "changed" if label != given else (
            "confirmed")
        counts[decision] += 1
        deciding = votes[-1] if votes else _vote(max(annotations, key=_when), None, emails)
        records.append({"example_id": str(data["example_id"]), "given_label": given, "reviewed_label": label,
                        "decision": decision, "changed": decision == "changed",
                        "votes": "; ".join(f"{who}: {choice}" for who, choice, _ in votes),
                        "annotator": deciding[0], "lead_time": deciding[2].get("lead_time"), "task_id": task.id,
                        "reviewed_at": str(_when(deciding[2])[0]),
                        "content_fingerprint": content_fingerprint(*shown_content(data))})
    table = pd.DataFrame.from_records(records, columns=list(RELABEL_COLUMNS))
    return table.sort_values("task_id").reset_index(drop=True), counts


def _when(annotation: dict) -> tuple[str, int]:
    return str(annotation.get("updated_at") or annotation.get("created_at") or ""), annotation.get("id") or 0


def _vote(annotation: dict, control: ChoiceControl | None, emails: dict) -> tuple[str, str | None, dict]:
    who = annotation.get("completed_by")
    if isinstance(who, dict):
        who = who.get("email") or who.get("id")
    label = _chosen_label(annotation.get("result") or [], control) if control is not None else None
    return emails.get(who, str(who)), label, annotation


def _votes(annotations: list[dict], control: ChoiceControl, emails: dict) -> list[tuple[str, str, dict]]:
    """(reviewer, label, annotation): each reviewer's latest annotation with a label choice, oldest first."""
    latest: dict[str, tuple[str, str, dict]] = {}
    for annotation in sorted(annotations, key=_when):
        vote = _vote(annotation, control, emails)
        if vote[1] is not None:
            latest[vote[0]] = vote
    return sorted(latest.values(), key=lambda v: _when(v[2]))


def _chosen_label(result: list, control: ChoiceControl) -> str | None:
    for item in result:
        if item.get("from_name") == control.name and item.get("type") == "choices":
            choices = (item.get("value") or {}).get("choices") or []
            if choices:
                return str(choices[0])
    return None
