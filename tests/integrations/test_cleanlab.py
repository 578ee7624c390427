import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

if os.environ.get("CI"):  # in CI the [cleanlab] extra is installed: a missing cleanlab must fail, not skip
    import cleanlab  # noqa: F401
else:
    cleanlab = pytest.importorskip("cleanlab", reason="install the [cleanlab] extra (make test does)")

from cleanlab import Datalab  # noqa: E402

from freeshap_dq import InputError, ValuationConfig, compute_values  # noqa: E402
from freeshap_dq.cli.main import cli  # noqa: E402
from freeshap_dq.data.synthetic import noisy_problem  # noqa: E402
from freeshap_dq.evaluation.metrics import auroc  # noqa: E402
from freeshap_dq.integrations.cleanlab import (  # noqa: E402
    add_freeshap_issues,
    check_knn_shapley_memory,
    combined_audit,
    label_issues_in_process,
    loo_pred_probs,
)
from freeshap_dq.scores import value_to_score  # noqa: E402


@pytest.fixture(scope="module")
def noisy():
    data = noisy_problem(n_train=200, n_test=80, noise=0.1, seed=2)
    result = compute_values(data.problem, ValuationConfig(permutations=40))
    return data, result


def lab_with_label_issues(data):
    p = data.problem
    frame = pd.DataFrame({"id": p.train_ids, "label": p.y_train})
    lab = Datalab(data=frame, label_name="label", verbosity=0)
    lab.find_issues(pred_probs=loo_pred_probs(p, ridge=0.1), issue_types={"label": label_issues_in_process()})
    return lab


def test_freeshap_issue_type_appears_everywhere_and_existing_issues_survive(noisy, capsys):
    data, result = noisy
    lab = lab_with_label_issues(data)
    label_before = lab.get_issues("label").copy()
    add_freeshap_issues(lab, result, id_column="id")
    assert set(lab.get_issue_summary()["issue_type"]) == {"label", "freeshap"}
    issues = lab.get_issues("freeshap")
    assert {"is_freeshap_issue", "freeshap_score", "freeshap_value", "freeshap_stderr", "freeshap_rank"} <= set(issues)
    assert "is_label_issue" in lab.get_issues().columns
    pd.testing.assert_frame_equal(lab.get_issues("label"), label_before)
    lab.report()
    assert "freeshap issues" in capsys.readouterr().out
    flagged = issues["is_freeshap_issue"].to_numpy()
    expected = result.values("ce") + 1.96 * result.stderr("ce") < 0
    np.testing.assert_array_equal(flagged, expected)


def test_score_mapping_is_monotone_with_half_at_zero():
    values = np.array([-3.0, -1.0, 0.0, 0.5, 2.0])
    scores, scale = value_to_score(values)
    assert scores[2] == 0.5 and np.all(np.diff(scores) > 0) and np.all((scores > 0) & (scores < 1))
    assert scale == pytest.approx(1.5)


def test_threshold_flagging(noisy):
    data, result = noisy
    lab = lab_with_label_issues(data)
    add_freeshap_issues(lab, result, threshold=0.0)
    np.testing.assert_array_equal(lab.get_issues("freeshap")["is_freeshap_issue"], result.values("ce") < 0)


def test_errors_wrong_length_and_ids(noisy):
    data, result = noisy
    small = Datalab(data=pd.DataFrame({"id": ["a", "b"], "label": [0, 1]}), label_name="label", verbosity=0)
    with pytest.raises(InputError, match="values 200 training examples but the Datalab holds 2"):
        add_freeshap_issues(small, result)
    lab = lab_with_label_issues(data)
    with pytest.raises(InputError, match="ids differ from row 1"):
        add_freeshap_issues(lab, result, ids=list(reversed(data.problem.train_ids)), id_column="id")
    with pytest.raises(InputError, match="no column 'nope'"):
        add_freeshap_issues(lab, result, id_column="nope")


def test_save_load_round_trip_in_a_fresh_process(noisy, tmp_path):
    data, result = noisy
    lab = lab_with_label_issues(data)
    add_freeshap_issues(lab, result)
    lab.save(str(tmp_path / "lab"))
    code = ("import freeshap_dq.integrations\nfrom cleanlab import Datalab\n"
            f"lab = Datalab.load({str(tmp_path / 'lab')!r})\n"
            "print(int(lab.get_issues('freeshap')['is_freeshap_issue'].sum()))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert int(out.stdout.strip().splitlines()[-1]) == int(lab.get_issues("freeshap")["is_freeshap_issue"].sum())


def test_combined_audit_finds_flipped_labels_with_both_signals(noisy):
    data, result = noisy
    lab, table = combined_audit(data.problem, result, data_valuation=True)
    t = table.set_index("example_id").loc[list(data.problem.train_ids)]
    assert auroc(-t["label_score"].to_numpy(), data.flipped) > 0.8
    assert auroc(-t["freeshap_score"].to_numpy(), data.flipped) > 0.8
    assert 0 <= auroc(-t["data_valuation_score"].to_numpy(), data.flipped) <= 1
    both = t["flagged_by_both"].to_numpy()
    assert both.sum() > 0 and data.flipped[both].mean() > 0.5  # mostly flipped labels where the signals agree
    assert list(table["freeshap_rank"]) == sorted(table["freeshap_rank"])
    assert set(table.columns) >= {"given_label", "predicted_label", "label_score", "is_label_issue"}


def test_knn_graph_in_row_blocks_equals_the_dense_one():
    from freeshap_dq.integrations.cleanlab import knn_graph_from_kernel

    x = np.random.default_rng(0).normal(size=(23, 4))
    kernel = x @ x.T
    dist = np.sqrt(np.maximum(np.diag(kernel)[:, None] + np.diag(kernel)[None, :] - 2 * kernel, 0.0))
    np.fill_diagonal(dist, np.inf)
    graph = knn_graph_from_kernel(kernel, k=5, block_rows=4).toarray()
    for i in range(23):
        expected = np.argsort(dist[i], kind="stable")[:5]
        assert set(np.flatnonzero(graph[i])) == set(expected)
        np.testing.assert_allclose(graph[i, expected], dist[i, expected])


def test_knn_shapley_memory_guard():
    with pytest.raises(InputError, match="dense 10000000 x 10000000"):
        check_knn_shapley_memory(10_000_000)
    check_knn_shapley_memory(10_000_000, force=True)
    check_knn_shapley_memory(100)


def test_cli_audit_and_export(noisy, tmp_path):
    data, result = noisy
    data.problem.save(tmp_path / "K.npz")
    result.save(tmp_path / "r.npz")
    run = lambda args: CliRunner().invoke(cli, [str(a) for a in args])  # noqa: E731
    res = run(["cleanlab", "audit", "--kernel", tmp_path / "K.npz", "--result", tmp_path / "r.npz",
               "--lab-dir", tmp_path / "lab", "-o", tmp_path / "audit.csv"])
    assert res.exit_code == 0, res.output
    assert "freeshap issues" in res.output and "flagged by both" in res.output
    audit = pd.read_csv(tmp_path / "audit.csv")
    assert len(audit) == 200 and audit["flagged_by_both"].sum() > 0
    res = run(["cleanlab", "export", "--lab-dir", tmp_path / "lab", "--issue-type", "freeshap",
               "-o", tmp_path / "fs.csv"])
    assert res.exit_code == 0, res.output
    assert "freeshap_value" in pd.read_csv(tmp_path / "fs.csv").columns
    res = run(["cleanlab", "export", "--lab-dir", tmp_path / "lab", "--issue-type", "outlier"])
    assert res.exit_code == 2 and "no issue type 'outlier'" in res.output
    other = noisy_problem(n_train=200, n_test=80, noise=0.1, seed=9).problem
    other.save(tmp_path / "K2.npz")
    res = run(["cleanlab", "audit", "--kernel", tmp_path / "K2.npz", "--result", tmp_path / "r.npz",
               "--lab-dir", tmp_path / "lab2"])
    assert res.exit_code == 2 and "another kernel" in res.output


def test_helper_raises_when_cleanlab_drops_the_issue_type(noisy, monkeypatch, capsys):
    """Datalab prints and swallows issue-manager exceptions; the helper must not report success."""
    from freeshap_dq.integrations.cleanlab import FreeShapIssueManager

    data, result = noisy
    lab = lab_with_label_issues(data)

    def broken(self, **kwargs):  # a fault inside the manager, which real inputs cannot provoke
        raise ValueError("boom")

    monkeypatch.setattr(FreeShapIssueManager, "find_issues", broken)
    with pytest.raises(RuntimeError, match="dropped the freeshap issue type"):
        add_freeshap_issues(lab, result)
    assert set(lab.get_issue_summary()["issue_type"]) == {"label"}


def test_audit_keeps_classes_aligned_when_label_names_are_not_sorted(noisy):
    from freeshap_dq import KernelProblem

    data, result = noisy
    p = data.problem
    reordered = KernelProblem(p.k_train, p.k_test, p.y_train, p.y_test, ("zzz", "aaa"), p.train_ids, p.test_ids)
    _, table = combined_audit(reordered, result)
    t = table.set_index("example_id").loc[list(p.train_ids)]
    assert list(t["given_label"][:3]) == [("zzz", "aaa")[c] for c in p.y_train[:3]]
    agree = (t["predicted_label"] == t["given_label"]).mean()
    assert agree > 0.8  # with misaligned columns most predictions would disagree with the given labels
    assert auroc(-t["label_score"].to_numpy(), data.flipped) > 0.8


def test_label_issues_are_found_without_forking_a_process_pool(noisy, monkeypatch):
    """cleanlab forks a pool by default; forking beside torch/OpenMP threads deadlocked the suite once."""
    import multiprocessing.pool

    def no_pool(self, *args, **kwargs):
        raise RuntimeError("a process pool was created")

    monkeypatch.setattr(multiprocessing.pool.Pool, "__init__", no_pool)
    data, result = noisy
    for _ in range(2):  # twice: cleanlab writes into the settings it is given, which must not leak between calls
        lab, _ = combined_audit(data.problem, result)
        assert {"label", "freeshap"} <= set(lab.get_issue_summary()["issue_type"])
    small = noisy_problem(n_train=30, n_test=10, noise=0.1, seed=1).problem
    lab, _ = combined_audit(small, compute_values(small, ValuationConfig(permutations=5)))
    assert "label" in set(lab.get_issue_summary()["issue_type"])


def test_cli_audit_refuses_options_that_do_not_apply(noisy, tmp_path):
    """--trainable with --kernel, --permutations with --result, --z with --threshold and --force-data-valuation
    without --data-valuation were accepted and ignored."""
    data, result = noisy
    data.problem.save(tmp_path / "K.npz")
    result.save(tmp_path / "r.npz")
    base = ["cleanlab", "audit", "--kernel", tmp_path / "K.npz", "--lab-dir", tmp_path / "lab", "-o",
            tmp_path / "a.csv"]
    for extra, flag in ((["--trainable", "all"], "--trainable"), (["--text-column", "t"], "--text-column"),
                        (["--result", tmp_path / "r.npz", "--permutations", 5], "--permutations"),
                        (["--threshold", -0.1, "--z", 1.0], "--z"), (["--force-data-valuation"], "--force-data-valuation")):
        res = CliRunner().invoke(cli, [str(a) for a in base + extra])
        assert res.exit_code == 2 and flag in res.output and "does not apply" in res.output, (extra, res.output)
    assert not (tmp_path / "lab").exists() and not (tmp_path / "a.csv").exists()
