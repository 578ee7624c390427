"""Push, re-push, new runs, pull and apply against a real Label Studio server (see conftest.py)."""

import dataclasses
import json
import os
import urllib.request
import xml.etree.ElementTree as ET

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

if os.environ.get("CI"):  # in CI the [labelstudio] extra is installed: a missing SDK must fail, not skip
    import label_studio_sdk  # noqa: F401
else:
    pytest.importorskip("label_studio_sdk", reason="install the [labelstudio] extra (make test does)")

from label_studio_sdk import LabelStudio  # noqa: E402

from freeshap_dq.cli.main import cli  # noqa: E402
from freeshap_dq.data.synthetic import noisy_problem  # noqa: E402
from freeshap_dq.integrations import labelstudio as ls_adapter  # noqa: E402

N_TRAIN = 40
FLIP = {"negative": "positive", "positive": "negative"}  # the other label of run_dir's two classes


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """Training data, a kernel, two value runs (different permutations) and a cleanlab audit."""
    d = tmp_path_factory.mktemp("review")
    data = noisy_problem(n_train=N_TRAIN, n_test=16, noise=0.2, seed=3)
    p = dataclasses.replace(data.problem, label_names=("negative", "positive"))
    train = pd.DataFrame({"id": p.train_ids, "text": [f"review number {i}" for i in range(N_TRAIN)],
                          "label": [p.label_names[y] for y in p.y_train]})
    train.to_csv(d / "train.csv", index=False)
    p.save(d / "K.npz")
    for name, seed in (("values.csv", 0), ("values2.csv", 1)):
        res = run(["value", "--kernel", d / "K.npz", "-o", d / name, "--permutations", 20, "--seed", seed])
        assert res.exit_code == 0, res.output
    res = run(["cleanlab", "audit", "--kernel", d / "K.npz", "--lab-dir", d / "lab", "-o", d / "audit.csv",
               "--permutations", 20])
    assert res.exit_code == 0, res.output
    return d


def run(args, env=None):
    return CliRunner().invoke(cli, [str(a) for a in args], env=env)


def env_for(server, key=None):
    return {"LABEL_STUDIO_URL": server.url, "LABEL_STUDIO_API_KEY": key or server.token}


def sdk(server):
    return LabelStudio(base_url=server.url, api_key=server.token)


def push(server, d, title, *extra, values="values.csv", key=None):
    res = run(["labelstudio", "push", "--values", d / values, "--data", d / "train.csv", "--project", title,
               "--state", d / f"{title}.state.json", *extra], env=env_for(server, key))
    return res


def project_by_title(client, title):
    found = [p for p in client.projects.list(title=title) if p.title == title]
    return client.projects.get(id=found[0].id) if found else None


def all_tasks(client, project_id):
    return list(client.tasks.list(project=project_id, fields="all"))


def test_push_creates_project_tasks_predictions_metadata_and_views(label_studio, run_dir):
    d = run_dir
    res = push(label_studio, d, "harm review", "--audit", d / "audit.csv", "--count", 12)
    assert res.exit_code == 0, res.output
    assert label_studio.token not in res.output
    client = sdk(label_studio)
    project = project_by_title(client, "harm review")
    state = json.loads((d / "harm review.state.json").read_text())
    run_id = state["run_id"]
    assert project.sampling == "Uncertainty sampling" and project.model_version == run_id
    tasks = all_tasks(client, project.id)
    assert len(tasks) == 12 and state["complete"]
    assert state["tasks"] == {t.data["example_id"]: t.id for t in tasks}

    values = pd.read_csv(d / "values.csv").sort_values(["value_ce", "example_id"])
    audit = pd.read_csv(d / "audit.csv").set_index("example_id")
    expected_order = list(values["example_id"][:12])
    by_rank = sorted(tasks, key=lambda t: t.data["freeshap_rank"])
    assert [t.data["example_id"] for t in by_rank] == expected_order
    assert [t.data["freeshap_rank"] for t in by_rank] == list(range(1, 13))
    assert [t.id for t in by_rank] == sorted(t.id for t in tasks)  # imported in rank order
    for task in tasks:
        data = task.data
        row = values.set_index("example_id").loc[data["example_id"]]
        assert isinstance(data["freeshap_value"], float) and isinstance(data["freeshap_rank"], int)
        assert isinstance(data["freeshap_flagged"], bool) and isinstance(data["cleanlab_label_issue"], bool)
        assert data["freeshap_value"] == float(f"{row['value_ce']:.4g}")  # readable: 4 significant digits
        assert 0 <= data["freeshap_score"] <= 1
        assert data["cleanlab_label_quality"] == pytest.approx(audit.loc[data["example_id"], "label_score"], rel=1e-3)
        assert data["suggested_label"] == audit.loc[data["example_id"], "predicted_label"]
        assert data["given_label"] in ("negative", "positive") and data["text"].startswith("review number")
        assert f"harm rank {data['freeshap_rank']} of {N_TRAIN}" in data["freeshap_header"]
        assert task.meta["freeshap_dq"]["run_id"] == run_id and task.meta["freeshap_dq"]["values"] == "values.csv"
        [prediction] = [p.model_dump() for p in task.predictions]
        assert prediction["model_version"] == run_id and prediction["score"] == pytest.approx(data["freeshap_score"], rel=1e-3)
        assert prediction["result"][0]["value"]["choices"] == [data["given_label"]]
    scores = [t.data["freeshap_score"] for t in by_rank]
    assert scores == sorted(scores)

    views = {v.data["title"]: v.id for v in client.views.list(project=project.id)}
    assert set(views) == {"Most harmful first", "Harmful and label issue", "By prediction score"}
    for view in client.views.list(project=project.id):  # all 30 columns were shown, text ~3,000 px to the right
        hidden = set(view.data["hiddenColumns"]["explore"])
        assert {"tasks:data.text", "tasks:data.given_label", "tasks:data.freeshap_rank"}.isdisjoint(hidden)
        assert {"tasks:data.freeshap_header", "tasks:inner_id", "tasks:predictions_results"} <= hidden
        assert view.data["columnsDisplayType"]["tasks:data.freeshap_rank"] == "Number"
    ranked = [t.data["freeshap_rank"] for t in client.tasks.list(project=project.id, view=views["Most harmful first"])]
    assert ranked == list(range(1, 13))
    scored = [t.predictions_score for t in client.tasks.list(project=project.id, view=views["By prediction score"])]
    assert scored == sorted(scored)
    both = [t.data for t in client.tasks.list(project=project.id, view=views["Harmful and label issue"])]
    assert len(both) == sum(t.data["freeshap_flagged"] and t.data["cleanlab_label_issue"] for t in tasks) > 0
    assert all(x["freeshap_flagged"] and x["cleanlab_label_issue"] for x in both)

    request = urllib.request.Request(f"{label_studio.url}/api/projects/{project.id}/next",
                                     headers={"Authorization": f"Token {label_studio.token}"})
    with urllib.request.urlopen(request) as response:  # uncertainty sampling serves the most harmful first
        assert json.load(response)["data"]["freeshap_rank"] == 1


def test_repush_of_the_same_run_changes_nothing(label_studio, run_dir):
    d = run_dir
    assert push(label_studio, d, "idempotent", "--count", 8).exit_code == 0
    client = sdk(label_studio)
    project = project_by_title(client, "idempotent")
    before = {t.id: (t.data, t.updated_at) for t in all_tasks(client, project.id)}
    res = push(label_studio, d, "idempotent", "--count", 8)
    assert res.exit_code == 0, res.output
    assert "0 tasks imported, 0 refreshed" in res.output
    assert "0 reviewed tasks updated, 8 unchanged, 0 predictions added" in res.output
    after = all_tasks(client, project.id)
    assert {t.id: (t.data, t.updated_at) for t in after} == before
    assert sum(len(t.predictions) for t in after) == 8
    assert len([p for p in client.projects.list(title="idempotent") if p.title == "idempotent"]) == 1


def test_new_run_updates_scores_adds_predictions_and_switches_model_version(label_studio, run_dir):
    d = run_dir
    assert push(label_studio, d, "two runs", "--count", 6).exit_code == 0
    res = push(label_studio, d, "two runs", "--count", 10, values="values2.csv")
    assert res.exit_code == 0, res.output
    assert "model version switched" in res.output
    client = sdk(label_studio)
    project = project_by_title(client, "two runs")
    run_id = json.loads((d / "two runs.state.json").read_text())["run_id"]
    assert project.model_version == run_id
    tasks = all_tasks(client, project.id)
    second = pd.read_csv(d / "values2.csv").set_index("example_id")
    worst10 = set(second.sort_values(["value_ce"]).index[:10])
    assert worst10 <= {t.data["example_id"] for t in tasks} and 10 <= len(tasks) <= 16
    assert len({t.data["example_id"] for t in tasks}) == len(tasks)
    for task in tasks:
        assert task.data["freeshap_value"] == pytest.approx(second.loc[task.data["example_id"], "value_ce"], rel=1e-3)
        assert task.meta["freeshap_dq"]["run_id"] == run_id
        versions = [p.model_version for p in task.predictions]
        assert versions.count(run_id) == 1 and len(versions) in (1, 2)


def test_annotate_pull_and_apply(label_studio, run_dir, tmp_path):
    d = run_dir
    assert push(label_studio, d, "review loop", "--count", 6).exit_code == 0
    client = sdk(label_studio)
    project = project_by_title(client, "review loop")
    tasks = sorted(all_tasks(client, project.id), key=lambda t: t.data["freeshap_rank"])

    def annotate(task, label, **kw):
        client.annotations.create(id=task.id, result=[{"from_name": "label", "to_name": "text", "type": "choices",
                                                       "value": {"choices": [label]}}], lead_time=2.5, **kw)

    changed, confirmed, cancelled, twice = tasks[:4]
    annotate(changed, FLIP[changed.data["given_label"]])
    annotate(confirmed, confirmed.data["given_label"])
    annotate(cancelled, FLIP[cancelled.data["given_label"]], was_cancelled=True)
    annotate(twice, FLIP[twice.data["given_label"]])
    annotate(twice, twice.data["given_label"])  # the latest annotation wins

    res = run(["labelstudio", "pull", "--project", "review loop", "-o", tmp_path / "relabels.csv"],
              env=env_for(label_studio))
    assert res.exit_code == 0, res.output
    assert "4 of 6 tasks reviewed: 1 labels changed, 2 confirmed, 0 conflicts (unanimous), 1 skipped" in res.output
    relabels = pd.read_csv(tmp_path / "relabels.csv").set_index("example_id")
    assert list(relabels.columns) == ["given_label", "reviewed_label", "decision", "changed", "votes", "annotator",
                                      "lead_time", "task_id", "reviewed_at", "content_fingerprint"]
    assert relabels["decision"].to_dict() == {changed.data["example_id"]: "changed",
                                              confirmed.data["example_id"]: "confirmed",
                                              cancelled.data["example_id"]: "skipped",
                                              twice.data["example_id"]: "confirmed"}  # one reviewer, latest counts
    row = relabels.loc[changed.data["example_id"]]
    assert row["reviewed_label"] == FLIP[row["given_label"]] and row["changed"]
    assert row["annotator"] == "test@example.com" and row["lead_time"] == 2.5
    assert not relabels.loc[twice.data["example_id"], "changed"]
    assert pd.isna(relabels.loc[cancelled.data["example_id"], "reviewed_label"])
    manifest = json.loads((tmp_path / "relabels.csv.manifest.json").read_text())
    assert manifest["counts"]["skipped"] == 1 and manifest["skipped"] == [cancelled.data["example_id"]]

    res = run(["relabel", "apply", "--data", d / "train.csv", "--relabels", tmp_path / "relabels.csv",
               "-o", tmp_path / "corrected.csv"])
    assert res.exit_code == 0, res.output
    original = pd.read_csv(d / "train.csv").set_index("id")
    corrected = pd.read_csv(tmp_path / "corrected.csv").set_index("id")
    differs = corrected["label"] != original["label"]
    assert list(corrected.index[differs]) == [changed.data["example_id"]]
    assert corrected.loc[changed.data["example_id"], "label"] == FLIP[original.loc[changed.data["example_id"], "label"]]
    manifest = json.loads((tmp_path / "corrected.csv.manifest.json").read_text())
    assert manifest["counts"]["changed"] == 1 and manifest["counts"]["confirmed"] == 2
    assert manifest["counts"]["skipped_not_applied"] == 1 and manifest["not_applied"]["skipped"] == [
        cancelled.data["example_id"]]
    assert manifest["changes"][0]["annotator"] == "test@example.com"

    # applying the same reviews again to the corrected data changes nothing and says so (it exited 2)
    res = run(["relabel", "apply", "--data", tmp_path / "corrected.csv", "--relabels", tmp_path / "relabels.csv",
               "-o", tmp_path / "again.csv"])
    assert res.exit_code == 0 and "in the data already (applied before)" in res.output, res.output
    assert (tmp_path / "again.csv").read_text() == (tmp_path / "corrected.csv").read_text()
    assert json.loads((tmp_path / "again.csv.manifest.json").read_text())["counts"]["already_applied"] == 1


def test_bad_credentials_give_a_clear_error_and_change_nothing(label_studio, run_dir):
    d = run_dir
    wrong = "0" * 40
    res = push(label_studio, d, "never created", "--count", 3, key=wrong)
    assert res.exit_code == 2
    assert "refused the API key (401)" in res.output and wrong not in res.output
    assert project_by_title(sdk(label_studio), "never created") is None
    assert not (d / "never created.state.json").exists()


def test_server_down_gives_a_clear_error(run_dir, tmp_path):
    from labelstudio_server import free_port

    env = {"LABEL_STUDIO_URL": f"http://127.0.0.1:{free_port()}", "LABEL_STUDIO_API_KEY": "x" * 40}
    res = run(["labelstudio", "push", "--values", run_dir / "values.csv", "--data", run_dir / "train.csv",
               "--project", "nowhere", "--state", tmp_path / "state.json"], env=env)
    assert res.exit_code == 2 and "cannot reach Label Studio" in res.output and "x" * 40 not in res.output
    assert not (tmp_path / "state.json").exists()
    res = run(["labelstudio", "pull", "--project", "nowhere", "-o", tmp_path / "r.csv"], env=env)
    assert res.exit_code == 2 and "cannot reach Label Studio" in res.output and not (tmp_path / "r.csv").exists()


def test_labels_missing_from_the_project_config_are_refused_before_import(label_studio, run_dir):
    client = sdk(label_studio)
    config = ls_adapter.label_config(["good", "bad"])
    project = client.projects.create(title="other labels", label_config=config)
    res = push(label_studio, run_dir, "other labels", "--count", 3)
    assert res.exit_code == 2
    assert "'negative', 'positive' are not choices" in res.output and "good, bad" in res.output
    assert all_tasks(client, project.id) == []


def test_unknown_project_and_missing_settings(label_studio, run_dir, tmp_path):
    res = run(["labelstudio", "pull", "--project-id", 99999, "-o", tmp_path / "r.csv"], env=env_for(label_studio))
    assert res.exit_code == 2 and "has no project 99999" in res.output
    res = run(["labelstudio", "pull", "--project", "no such title", "-o", tmp_path / "r.csv"],
              env=env_for(label_studio))
    assert res.exit_code == 2 and "no project titled 'no such title'" in res.output
    res = run(["labelstudio", "pull", "--project", "x y z", "-o", tmp_path / "r.csv"],
              env={"LABEL_STUDIO_URL": "", "LABEL_STUDIO_API_KEY": ""})
    assert res.exit_code == 2 and "LABEL_STUDIO_URL" in res.output


def test_sentence_pairs_show_both_texts(label_studio, tmp_path):
    rng = np.random.default_rng(0)
    train = pd.DataFrame({"id": [f"p{i}" for i in range(8)], "premise": [f"premise {i}" for i in range(8)],
                          "hypothesis": [f"hypothesis {i}" for i in range(8)],
                          "label": ["entail", "contradict", "neutral", "entail"] * 2})
    values = pd.DataFrame({"example_id": train["id"], "value": rng.normal(size=8), "value_ce": rng.normal(size=8),
                           "stderr": 0.1, "stderr_ce": 0.1})
    train.to_csv(tmp_path / "pairs.csv", index=False)
    values.to_csv(tmp_path / "values.csv", index=False)
    res = run(["labelstudio", "push", "--values", tmp_path / "values.csv", "--data", tmp_path / "pairs.csv",
               "--text-column", "premise", "--pair-column", "hypothesis", "--project", "pair review",
               "--count", 4], env=env_for(label_studio))
    assert res.exit_code == 0, res.output
    client = sdk(label_studio)
    project = project_by_title(client, "pair review")
    assert "$pair" in project.label_config
    tasks = all_tasks(client, project.id)
    assert len(tasks) == 4 and all(t.data["pair"].startswith("hypothesis") for t in tasks)
    assert all(t.data["suggested_label"] == "" for t in tasks)  # three classes, no audit: no guess
    assert (tmp_path / "pair-review.labelstudio.json").exists()  # one state file per project, beside the values
    res = run(["labelstudio", "pull", "--state", tmp_path / "pair-review.labelstudio.json", "-o", tmp_path / "r.csv"],
              env={"LABEL_STUDIO_URL": "", "LABEL_STUDIO_API_KEY": label_studio.token})
    assert res.exit_code == 0 and f"project {project.id}" in res.output, res.output  # project and address from it


def test_partial_failure_is_reported_and_resumed_without_duplicates(fresh_label_studio, run_dir, tmp_path):
    server = fresh_label_studio
    table = pd.read_csv(run_dir / "values.csv")
    train = pd.read_csv(run_dir / "train.csv")
    joined = table.merge(train.rename(columns={"id": "example_id"}), on="example_id")
    review = ls_adapter.review_table(joined)
    selected = review["freeshap_rank"] <= 12
    run_info = ls_adapter.ReviewRun("run-a")
    client = ls_adapter.Client(ls_adapter.Connection(server.url, server.token))
    state = tmp_path / "state.json"

    def stop_after_first_batch(imported):
        if imported == 4:
            server.stop()

    with pytest.raises(ls_adapter.PartialPushError) as failure:
        ls_adapter.push(client, review, selected, run_info, title="flaky", state_path=state, batch_size=4,
                        on_batch=stop_after_first_batch)
    message = str(failure.value)
    assert "cannot reach Label Studio" in message and "Imported 4 of 12 tasks (12 new, 0 refreshed; harm ranks 1-4)" in message
    assert "8 were not confirmed (ranks 5-12)" in message and "Rerun" in message
    recorded = json.loads(state.read_text())
    assert not recorded["complete"] and len(recorded["pending"]) == 8 and len(recorded["tasks"]) == 4

    server.start()
    report = ls_adapter.push(client, review, selected, run_info, title="flaky", state_path=state, batch_size=4)
    assert report.imported == 8 and report.unchanged == 4 and not report.created_project
    tasks = all_tasks(sdk(server), report.project_id)
    assert sorted(t.data["freeshap_rank"] for t in tasks) == list(range(1, 13))
    assert json.loads(state.read_text())["complete"]


def test_label_config_escapes_labels_and_parses():
    config = ls_adapter.label_config(['say "yes"', "a<b&c"], pair=True)
    root = ET.fromstring(config)
    assert [c.get("value") for c in root.iter("Choice")] == ['say "yes"', "a<b&c"]
    assert [t.get("value") for t in root.iter("Text")] == ["$text", "$pair", "$freeshap_why"]


def test_connection_reads_the_environment_at_call_time(monkeypatch):
    monkeypatch.delenv("LABEL_STUDIO_URL", raising=False)
    monkeypatch.delenv("LABEL_STUDIO_API_KEY", raising=False)
    with pytest.raises(ls_adapter.LabelStudioError, match="LABEL_STUDIO_URL"):
        ls_adapter.Connection.resolve()
    monkeypatch.setenv("LABEL_STUDIO_URL", "http://127.0.0.1:9/")
    with pytest.raises(ls_adapter.LabelStudioError, match="LABEL_STUDIO_API_KEY"):
        ls_adapter.Connection.resolve()
    monkeypatch.setenv("LABEL_STUDIO_API_KEY", "secret-key")
    connection = ls_adapter.Connection.resolve()
    assert connection.url == "http://127.0.0.1:9" and "secret-key" not in repr(connection)


SELECTION_CASES = {"count": ["--count", 3], "fraction": ["--fraction", 0.3], "threshold": ["--threshold", 0.0],
                   "confident": ["--confident"], "z": ["--confident", "--z", 0.0], "metric": ["--metric", "accuracy"],
                   "audit_path": ["--audit", "AUDIT"], "both": ["--audit", "AUDIT", "--both"]}
PUSH_NOT_SWEPT = {"values_path": "an input of every case", "data_path": "as --values", "dry_run": "the base of the "
                  "selection cases", "progress": "stderr only: a progress bar",
                  "batch_size": "how tasks are chunked into import requests: "
                                "test_partial_failure_is_reported_and_resumed_without_duplicates imports in batches",
                  "result_path": "test_the_reviewer_sees_why_instructions_and_a_readable_header",
                  "test_path": "as --result"}


def test_push_and_pull_options_reach_the_server_or_are_refused(label_studio, run_dir, tmp_path):
    """Every option of push and pull changes what is selected, what reaches the server or what is written, or is
    refused by name (the labelstudio part of tests/cli/test_option_sweep.py: it needs this suite's server)."""
    d = run_dir
    columns = {"text_column", "pair_column", "label_column", "id_column", "allow_label_variants"}
    connection = {"url", "api_key", "timeout", "title", "project_id"}
    swept = set(SELECTION_CASES) | set(PUSH_NOT_SWEPT) | columns | connection | {"run_id", "state_path"}
    push_params = {p.name for p in cli.commands["labelstudio"].commands["push"].params}
    assert push_params == swept, f"push options with no sweep case: {sorted(push_params - swept)}"
    # --agreement: test_reviewers_who_disagree_are_listed_not_applied_unless_a_policy_says; --state:
    # test_sentence_pairs_show_both_texts; --manifest below
    assert {p.name for p in cli.commands["labelstudio"].commands["pull"].params} == connection | {
        "output", "manifest_path", "agreement", "state_path"}

    def dry(*args, data="train.csv"):
        args = [str(d / "audit.csv") if a == "AUDIT" else a for a in args]
        return run(["labelstudio", "push", "--values", d / "values.csv", "--data", d / data, "--dry-run", *args])

    base = dry()
    assert base.exit_code == 0, base.output
    for name, args in SELECTION_CASES.items():
        res = dry(*args)
        assert res.exit_code == 0 and res.output != base.output, (name, res.output)
    for option in ("--text-column", "--label-column", "--id-column", "--pair-column"):
        res = dry(option, "nope")
        assert res.exit_code == 2 and "nope" in res.output, option
    train = pd.read_csv(d / "train.csv")
    train.loc[0, "label"] = train.loc[0, "label"].upper()
    train.to_csv(d / "variant.csv", index=False)
    assert dry(data="variant.csv").exit_code == 2 and dry("--allow-label-variants", data="variant.csv").exit_code == 0

    explicit = ["--url", label_studio.url, "--api-key", label_studio.token]  # the options, not the environment
    common = ["labelstudio", "push", "--values", d / "values.csv", "--data", d / "train.csv", "--count", 4]
    res = run([*common, *explicit, "--project", "sweep project", "--state", tmp_path / "s.json", "--run-id", "run-7"],
              env={"LABEL_STUDIO_URL": "", "LABEL_STUDIO_API_KEY": ""})
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "s.json").read_text())  # --state: the task map is where it was told to go
    client = sdk(label_studio)
    project = project_by_title(client, "sweep project")
    assert project.model_version == "run-7"
    assert {p.model_version for t in all_tasks(client, project.id) for p in client.predictions.list(task=t.id)} == {
        "run-7"}
    res = run([*common, "--count", 6, "--project-id", project.id, "--state", tmp_path / "s.json", "--run-id", "run-7"],
              env=env_for(label_studio))
    assert res.exit_code == 0 and len(all_tasks(client, project.id)) == 6, res.output
    res = run([*common, "--url", label_studio.url, "--api-key", "0" * 40, "--project", "never", "--state",
               tmp_path / "n.json"], env={"LABEL_STUDIO_URL": "", "LABEL_STUDIO_API_KEY": ""})
    assert res.exit_code == 2 and "refused the API key" in res.output and "0" * 40 not in res.output
    res = run([*common, "--timeout", 1e-6, "--project", "never", "--state", tmp_path / "n.json"],
              env=env_for(label_studio))
    assert res.exit_code == 2 and "--timeout" in res.output and "1e-06 s" in res.output, res.output
    assert not (tmp_path / "n.json").exists()

    by_title = run(["labelstudio", "pull", *explicit, "--project", "sweep project", "-o", tmp_path / "a.csv"],
                   env={"LABEL_STUDIO_URL": "", "LABEL_STUDIO_API_KEY": ""})
    by_id = run(["labelstudio", "pull", "--project-id", project.id, "-o", tmp_path / "b.csv"],
                env=env_for(label_studio))
    assert by_title.exit_code == by_id.exit_code == 0, by_title.output + by_id.output
    assert (tmp_path / "a.csv").read_bytes() == (tmp_path / "b.csv").read_bytes()
    res = run(["labelstudio", "pull", "--project-id", project.id, "-o", tmp_path / "m.csv", "--manifest",
               tmp_path / "pull.json"], env=env_for(label_studio))
    assert res.exit_code == 0 and json.loads((tmp_path / "pull.json").read_text())["project"]["id"] == project.id
    assert not (tmp_path / "m.csv.manifest.json").exists()
    res = run(["labelstudio", "pull", "--timeout", 1e-6, "--project-id", project.id, "-o", tmp_path / "c.csv"],
              env=env_for(label_studio))
    assert res.exit_code == 2 and "--timeout" in res.output and not (tmp_path / "c.csv").exists()
    res = run(["labelstudio", "pull", "--timeout", 0, "--project-id", project.id, "-o", tmp_path / "c.csv"],
              env=env_for(label_studio))
    assert res.exit_code == 2 and "--timeout" in res.output


def choose(client, task_id, label, user=None, **kw):
    extra = {"completed_by": user} if user is not None else {}
    client.annotations.create(id=task_id, result=[{"from_name": "label", "to_name": "text", "type": "choices",
                                                   "value": {"choices": [label]}}], **extra, **kw)


def reviewer(client, name):
    email = f"{name}@example.com"
    known = {u.email: u.id for u in client.users.list()}
    return known[email] if email in known else client.users.create(email=email, username=name,
                                                                    password=f"{name}-password-123").id


def test_reviewers_who_disagree_are_listed_not_applied_unless_a_policy_says(label_studio, run_dir, tmp_path):
    """rt-4401: bob fresh, carol rotten was resolved by 'latest wins' without a word."""
    d = run_dir
    assert push(label_studio, d, "two reviewers", "--count", 4).exit_code == 0
    client = sdk(label_studio)
    project = project_by_title(client, "two reviewers")
    tasks = sorted(all_tasks(client, project.id), key=lambda t: t.data["freeshap_rank"])
    bob, carol, dan = (reviewer(client, name) for name in ("bob", "carol", "dan"))
    split, majority, agreed = tasks[:3]
    choose(client, split.id, split.data["given_label"], bob)
    choose(client, split.id, FLIP[split.data["given_label"]], carol)
    for user, label in ((bob, FLIP[majority.data["given_label"]]), (carol, FLIP[majority.data["given_label"]]),
                        (dan, majority.data["given_label"])):
        choose(client, majority.id, label, user)
    choose(client, agreed.id, FLIP[agreed.data["given_label"]], bob)
    choose(client, agreed.id, FLIP[agreed.data["given_label"]], carol)

    def pull(*extra):
        out = tmp_path / f"pull{len(list(tmp_path.iterdir()))}.csv"
        res = run(["labelstudio", "pull", "--project", "two reviewers", "-o", out, *extra], env=env_for(label_studio))
        assert res.exit_code == 0, res.output
        return res, pd.read_csv(out).set_index("example_id"), json.loads(out.with_name(out.name + ".manifest.json")
                                                                          .read_text())

    res, table, manifest = pull()
    ids = [t.data["example_id"] for t in (split, majority, agreed)]
    assert table.loc[ids, "decision"].tolist() == ["conflict", "conflict", "changed"]
    assert table.loc[ids[0], "votes"] == (f"bob@example.com: {split.data['given_label']}; "
                                          f"carol@example.com: {FLIP[split.data['given_label']]}")
    assert pd.isna(table.loc[ids[0], "reviewed_label"]) and "conflicts (not applied" in res.output
    assert manifest["counts"]["conflict"] == 2 and isinstance(manifest["counts"]["conflict"], int)
    assert sorted(manifest["conflict"]) == sorted(ids[:2]) and manifest["agreement"] == "unanimous"
    _, table, _ = pull("--agreement", "majority")
    assert table.loc[ids, "decision"].tolist() == ["conflict", "changed", "changed"]
    _, table, _ = pull("--agreement", "latest")
    assert table.loc[ids[0], "reviewed_label"] == FLIP[split.data["given_label"]]

    res, table, _ = pull()
    relabels = sorted(tmp_path.glob("pull*.csv"))[-1]
    res = run(["relabel", "apply", "--data", d / "train.csv", "--relabels", relabels, "-o", tmp_path / "fixed.csv"])
    assert res.exit_code == 0 and "2 conflict rows not applied" in res.output, res.output
    fixed = pd.read_csv(tmp_path / "fixed.csv").set_index("id")["label"]
    original = pd.read_csv(d / "train.csv").set_index("id")["label"]
    assert list(fixed.index[fixed != original]) == [ids[2]]


def test_a_push_never_puts_another_text_under_a_review(label_studio, tmp_path):
    """Data without an id column: v2 drops the first 3 rows, so every row-number id moves; pushing it into the
    project reviewed on v1 showed other texts under the reviews, and apply changed the wrong examples."""
    n = 12
    texts = [f"review text number {i}" for i in range(n)]
    labels = ["fresh", "rotten"] * (n // 2)
    pd.DataFrame({"text": texts, "label": labels}).to_csv(tmp_path / "v1.csv", index=False)
    pd.DataFrame({"text": texts[3:], "label": labels[3:]}).to_csv(tmp_path / "v2.csv", index=False)
    rng = np.random.default_rng(0)
    for name, rows in (("v1", n), ("v2", n - 3)):
        pd.DataFrame({"example_id": [str(i) for i in range(rows)], "value": rng.normal(size=rows),
                      "value_ce": rng.normal(size=rows)}).to_csv(tmp_path / f"{name}.values.csv", index=False)
    env = env_for(label_studio)
    base = ["labelstudio", "push", "--project", "row ids", "--threshold", 100, "--state", tmp_path / "s.json"]
    res = run([*base, "--values", tmp_path / "v1.values.csv", "--data", tmp_path / "v1.csv"], env=env)
    assert res.exit_code == 0, res.output
    client = sdk(label_studio)
    project = project_by_title(client, "row ids")
    task = next(t for t in all_tasks(client, project.id) if t.data["example_id"] == "5")
    choose(client, task.id, "fresh")  # the reviewer changes example 5 ('review text number 5', rotten)
    res = run(["labelstudio", "pull", "--project", "row ids", "-o", tmp_path / "r.csv"], env=env)
    assert res.exit_code == 0, res.output

    before = {t.id: t.data for t in all_tasks(client, project.id)}
    res = run([*base, "--values", tmp_path / "v2.values.csv", "--data", tmp_path / "v2.csv"], env=env)
    assert res.exit_code == 2, res.output
    assert "'5' (task" in res.output and "review text number 5" in res.output and "review text number 8" in res.output
    assert "row numbers" in res.output and "--id-column" in res.output
    assert {t.id: t.data for t in all_tasks(client, project.id)} == before  # nothing was pushed

    res = run(["relabel", "apply", "--data", tmp_path / "v2.csv", "--relabels", tmp_path / "r.csv", "-o",
               tmp_path / "fixed.csv"])
    assert res.exit_code == 2 and "'5' has another text" in res.output and not (tmp_path / "fixed.csv").exists()
    res = run(["relabel", "apply", "--data", tmp_path / "v1.csv", "--relabels", tmp_path / "r.csv", "-o",
               tmp_path / "fixed.csv"])
    assert res.exit_code == 0, res.output
    assert pd.read_csv(tmp_path / "fixed.csv")["label"][5] == "fresh"


def test_after_a_fix_the_preselected_choice_is_the_current_label(label_studio, run_dir, tmp_path):
    """Re-pushing the fixed data kept a prediction of the old label: Submit would undo the fix."""
    d = run_dir
    assert push(label_studio, d, "after the fix", "--count", 3).exit_code == 0
    client = sdk(label_studio)
    project = project_by_title(client, "after the fix")
    task = min(all_tasks(client, project.id), key=lambda t: t.data["freeshap_rank"])
    new_label = FLIP[task.data["given_label"]]
    choose(client, task.id, new_label)
    env = env_for(label_studio)
    assert run(["labelstudio", "pull", "--project", "after the fix", "-o", tmp_path / "r.csv"], env=env).exit_code == 0
    assert run(["relabel", "apply", "--data", d / "train.csv", "--relabels", tmp_path / "r.csv", "-o",
                tmp_path / "fixed.csv"]).exit_code == 0
    res = run(["labelstudio", "push", "--values", d / "values.csv", "--data", tmp_path / "fixed.csv", "--project",
               "after the fix", "--count", 3, "--state", tmp_path / "s.json"], env=env)
    assert res.exit_code == 0 and "1 tasks now pre-select their current given label" in res.output, res.output
    (prediction,) = client.predictions.list(task=task.id)
    assert prediction.result[0]["value"]["choices"] == [new_label]
    refreshed = client.tasks.get(id=task.id)
    assert refreshed.data["given_label"] == new_label and f"given label: {new_label}" in refreshed.data[
        "freeshap_header"]
    res = run(["labelstudio", "pull", "--project", "after the fix", "-o", tmp_path / "r2.csv"], env=env)
    assert pd.read_csv(tmp_path / "r2.csv").set_index("example_id").loc[task.data["example_id"], "decision"] == (
        "confirmed")


def test_a_new_run_refreshes_unreviewed_tasks_in_bulk_and_keeps_reviews(label_studio, run_dir):
    """Re-push updated tasks one request at a time (100 tasks: 50 s). Unreviewed tasks are now imported again in
    batches and their old versions deleted in one request; a reviewed task is updated in place, keeping its
    annotation; the copies an interrupted push leaves behind are removed."""
    d = run_dir
    assert push(label_studio, d, "bulk refresh", "--count", 10).exit_code == 0
    client = sdk(label_studio)
    project = project_by_title(client, "bulk refresh")
    first = {t.data["example_id"]: t for t in all_tasks(client, project.id)}
    reviewed = min(first.values(), key=lambda t: t.data["freeshap_rank"])
    choose(client, reviewed.id, reviewed.data["given_label"])
    orphan = next(t for t in first.values() if t.id != reviewed.id)  # as if a push stopped before deleting it
    client.projects.import_tasks(id=project.id, request=[{"data": orphan.data, "meta": orphan.meta}])

    res = push(label_studio, d, "bulk refresh", "--count", 10, values="values2.csv")
    assert res.exit_code == 0, res.output
    assert "9 refreshed" in res.output and "1 reviewed tasks updated" in res.output, res.output
    assert "1 duplicate tasks of an interrupted push removed" in res.output
    after = {t.data["example_id"]: t for t in all_tasks(client, project.id)}
    assert len(after) == len(all_tasks(client, project.id))  # one task per example
    assert after[reviewed.data["example_id"]].id == reviewed.id and after[reviewed.data["example_id"]].annotations
    second = pd.read_csv(d / "values2.csv").set_index("example_id")["value_ce"]
    assert all(t.data["freeshap_value"] == float(f"{second[e]:.4g}") for e, t in after.items())
    state = json.loads((d / "bulk refresh.state.json").read_text())
    assert state["tasks"] == {e: t.id for e, t in after.items()}
    res = push(label_studio, d, "bulk refresh", "--count", 10, values="values2.csv")
    assert "0 refreshed" in res.output and f"{len(after)} unchanged" in res.output, res.output


def test_the_reviewer_sees_why_instructions_and_a_readable_header(label_studio, run_dir, tmp_path):
    """No instructions, a 'score 0.00' header for a quarter of the top 100, and no reason why an example is there."""
    from freeshap_dq.kernels.problem import KernelProblem
    from freeshap_dq.result import ValuationResult

    d = run_dir
    problem = KernelProblem.load(d / "K.npz")
    pd.DataFrame({"id": problem.test_ids, "text": [f"validation review {j}" for j in range(problem.n_test)],
                  "label": [problem.label_names[y] for y in problem.y_test]}).to_csv(tmp_path / "test.csv", index=False)
    res = run(["value", "--kernel", d / "K.npz", "--permutations", 20, "--per-point", "--save-result",
               tmp_path / "r.npz", "-o", tmp_path / "v.csv"])
    assert res.exit_code == 0, res.output
    common = ["labelstudio", "push", "--values", tmp_path / "v.csv", "--data", d / "train.csv", "--count", 5,
              "--project", "why it is here", "--state", tmp_path / "s.json"]
    res = run([*common, "--result", tmp_path / "r.npz", "--test", tmp_path / "test.csv"], env=env_for(label_studio))
    assert res.exit_code == 0, res.output
    client = sdk(label_studio)
    project = project_by_title(client, "why it is here")
    assert "FreeShap" in project.expert_instruction and project.show_instruction
    assert "$freeshap_why" in project.label_config
    points = ValuationResult.load(tmp_path / "r.npz").point_values("ce")
    row_of = {e: i for i, e in enumerate(problem.train_ids)}
    for task in all_tasks(client, project.id):
        data = task.data
        i = row_of[data["example_id"]]
        assert data["freeshap_hurts"] == int((points[i] < 0).sum())
        assert data["freeshap_why"].startswith(f"Hurts {data['freeshap_hurts']} of {problem.n_test} validation")
        worst = int(np.argmin(points[i]))
        assert f"“validation review {worst}”" in data["freeshap_why"]
        assert f"harm rank {data['freeshap_rank']} of {N_TRAIN}" in data["freeshap_header"]
        assert "score" not in data["freeshap_header"] and "the validation predictions" in data["freeshap_header"]

    res = run(["labelstudio", "push", "--values", d / "values2.csv", "--data", d / "train.csv", "--count", 5,
               "--result", tmp_path / "r.npz", "--test", tmp_path / "test.csv", "--dry-run"])
    assert res.exit_code == 2 and "are not the same run" in res.output  # values of another run than the result
    res = run([*common, "--result", tmp_path / "r.npz"], env=env_for(label_studio))
    assert res.exit_code == 2 and "--test" in res.output


def test_listing_tasks_puts_no_traceback_in_the_server_log(label_studio, run_dir, tmp_path):
    """The SDK's pager asked for the page after the last one: every listing logged a traceback on the server."""
    log = label_studio.log_path
    before = log.read_text(errors="replace").count("Traceback")
    assert push(label_studio, run_dir, "quiet server", "--count", 3).exit_code == 0
    res = run(["labelstudio", "pull", "--project", "quiet server", "-o", tmp_path / "r.csv"],
              env=env_for(label_studio))
    assert res.exit_code == 0, res.output
    assert log.read_text(errors="replace").count("Traceback") == before


def test_sync_runs_a_review_round_and_a_rerun_changes_nothing(label_studio, run_dir, tmp_path):
    """pull -> apply -> value on the same kernel with the corrected labels -> push, in one command."""
    from freeshap_dq import ValuationConfig, compute_values
    from freeshap_dq.curation.relabel import relabelled_problem
    from freeshap_dq.data.tables import load_dataset
    from freeshap_dq.kernels.problem import KernelProblem

    d = run_dir
    env = env_for(label_studio)
    assert push(label_studio, d, "sync rounds", "--count", 6).exit_code == 0
    client = sdk(label_studio)
    project = project_by_title(client, "sync rounds")
    tasks = sorted(all_tasks(client, project.id), key=lambda t: t.data["freeshap_rank"])
    fixed, confirmed, disputed = tasks[:3]
    choose(client, fixed.id, FLIP[fixed.data["given_label"]])
    choose(client, confirmed.id, confirmed.data["given_label"])
    choose(client, disputed.id, FLIP[disputed.data["given_label"]], reviewer(client, "erin"))
    choose(client, disputed.id, disputed.data["given_label"], reviewer(client, "frank"))

    sync = ["labelstudio", "sync", "--kernel", d / "K.npz", "--project", "sync rounds", "--count", 6,
            "--permutations", 20]
    res = run([*sync, "--data", d / "train.csv", "--output-dir", tmp_path / "round1"], env=env)
    assert res.exit_code == 0, res.output
    assert "1 labels fixed, 1 confirmed" in res.output and "1 conflicts" in res.output, res.output
    round1 = tmp_path / "round1"
    corrected = pd.read_csv(round1 / "train.csv").set_index("id")["label"]
    original = pd.read_csv(d / "train.csv").set_index("id")["label"]
    assert list(corrected.index[corrected != original]) == [fixed.data["example_id"]]
    problem, _ = relabelled_problem(KernelProblem.load(d / "K.npz"), load_dataset(round1 / "train.csv"))
    expected = compute_values(problem, ValuationConfig(permutations=20, seed=0)).to_dataframe("ce")
    values = pd.read_csv(round1 / "values.csv")
    assert np.allclose(values["value_ce"], expected["value_ce"]) and values["example_id"].tolist() == expected[
        "example_id"].tolist()
    summary = json.loads((round1 / "sync.json").read_text())
    assert summary["applied"]["changed"] == 1 and summary["not_applied"]["conflict"] == [disputed.data["example_id"]]
    task = client.tasks.get(id=fixed.id)
    assert task.data["given_label"] == FLIP[fixed.data["given_label"]]  # the fix is what the reviewer sees now
    (prediction,) = [p for p in client.predictions.list(task=fixed.id) if p.model_version == project_by_title(
        client, "sync rounds").model_version]
    assert prediction.result[0]["value"]["choices"] == [task.data["given_label"]]

    res = run([*sync, "--data", round1 / "train.csv", "--output-dir", tmp_path / "round2"], env=env)
    assert res.exit_code == 0, res.output
    assert "0 labels fixed" in res.output and "0 new tasks, 0 updated" in res.output, res.output
    assert (tmp_path / "round2" / "values.csv").read_bytes() == (round1 / "values.csv").read_bytes()
    assert (tmp_path / "round2" / "train.csv").read_bytes() == (round1 / "train.csv").read_bytes()

    res = run([*sync, "--data", round1 / "train.csv", "--output-dir", tmp_path / "round3", "--seed", 1,
               "--agreement", "latest", "--metric", "accuracy", "--fraction", 0.2, "--batch-size", 2], env=env)
    assert res.exit_code == 2 and "--count" in res.output  # --count and --fraction together are refused
    res = run([*sync[:-4], "--permutations", 20, "--data", round1 / "train.csv", "--output-dir", tmp_path / "round3",
               "--seed", 1, "--agreement", "latest", "--metric", "accuracy", "--fraction", 0.2, "--batch-size", 2],
              env=env)
    assert res.exit_code == 0 and "0 conflicts" in res.output, res.output
    third = json.loads((tmp_path / "round3" / "sync.json").read_text())
    assert third["valuation"]["seed"] == 1 and third["valuation"]["rank_metric"] == "accuracy"
    assert not pd.read_csv(tmp_path / "round3" / "values.csv")["value_ce"].equals(values["value_ce"])
    exercised = {"data_path", "kernel_path", "title", "output_dir", "count", "permutations", "seed", "agreement",
                 "metric", "fraction", "batch_size"}
    elsewhere = {"url", "api_key", "timeout", "project_id", "progress", "text_column", "pair_column", "label_column",
                 "id_column", "allow_label_variants"}  # the connection and data options shared with push and pull
    assert {p.name for p in cli.commands["labelstudio"].commands["sync"].params} == exercised | elsewhere


def test_a_timed_out_import_that_the_server_carried_out_is_reported_and_not_duplicated(label_studio, run_dir,
                                                                                      tmp_path):
    """A client timeout said 'Imported 0 of 300' although the server had imported 100 of them."""
    table = pd.read_csv(run_dir / "values.csv")
    train = pd.read_csv(run_dir / "train.csv")
    review = ls_adapter.review_table(table.merge(train.rename(columns={"id": "example_id"}), on="example_id"))
    selected = review["freeshap_rank"] <= 8
    client = ls_adapter.Client(ls_adapter.Connection(label_studio.url, label_studio.token))
    real_import = client.import_tasks

    def carried_out_then_timed_out(project_id, tasks):  # the server's answer is lost after it did the work
        real_import(project_id, tasks)
        raise ls_adapter.LabelStudioError("Label Studio did not answer within 60 s (--timeout)")

    client.import_tasks = carried_out_then_timed_out
    with pytest.raises(ls_adapter.PartialPushError) as failure:
        ls_adapter.push(client, review, selected, ls_adapter.ReviewRun("run-t"), title="slow server",
                        state_path=tmp_path / "s.json", batch_size=8)
    assert "Imported 0 of 8 tasks" in str(failure.value) and "the server holds 8 of them all the same" in str(
        failure.value)
    client.import_tasks = real_import
    report = ls_adapter.push(client, review, selected, ls_adapter.ReviewRun("run-t"), title="slow server",
                             state_path=tmp_path / "s.json", batch_size=8)
    assert report.imported == 0 and report.unchanged == 8
    assert len(all_tasks(sdk(label_studio), report.project_id)) == 8
