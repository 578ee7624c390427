import json

import pandas as pd
import pytest
from click.testing import CliRunner

from freeshap_dq.cli.main import cli
from freeshap_dq.curation.relabel import apply_relabels
from freeshap_dq.data.tables import dataset_from_frame
from freeshap_dq.errors import InputError


def frame(labels=("a", "b", "a", "b")):
    return pd.DataFrame({"id": [f"e{i}" for i in range(len(labels))], "text": [f"t{i}" for i in range(len(labels))],
                         "label": list(labels)})


def relabel(raw, reviews, **kw):
    return apply_relabels(raw, dataset_from_frame(raw, "data.csv"), pd.DataFrame(reviews), "label", **kw)


def test_changes_confirmations_and_record():
    raw = frame()
    out = relabel(raw, {"example_id": ["e0", "e1"], "given_label": ["a", "b"], "reviewed_label": ["b", "b"],
                        "annotator": ["ann@x", "ann@x"]})
    assert list(out.corrected["label"]) == ["b", "b", "a", "b"] and list(raw["label"]) == ["a", "b", "a", "b"]
    assert out.counts == {"rows": 4, "reviewed": 2, "changed": 1, "confirmed": 1, "already_applied": 0,
                          "conflicts": 0, "conflicts_skipped": 0, "other_text_skipped": 0}
    change = out.changes.iloc[0]
    assert (change["example_id"], change["row"], change["from_label"], change["to_label"], change["annotator"]) == \
        ("e0", 1, "a", "b", "ann@x")


def test_integer_label_columns_stay_integers():
    raw = pd.DataFrame({"id": ["x", "y"], "text": ["p", "q"], "label": [0, 1]})
    out = relabel(raw, {"example_id": ["x"], "given_label": [0], "reviewed_label": ["1"]})
    assert out.corrected["label"].tolist() == [1, 1] and pd.api.types.is_integer_dtype(out.corrected["label"])


def test_stale_reviews_are_conflicts():
    raw = frame()
    reviews = {"example_id": ["e0", "e1"], "given_label": ["b", "b"], "reviewed_label": ["b", "a"]}
    with pytest.raises(InputError, match=r"row 1: example 'e0' has label 'a' in data.csv but the reviewer saw 'b'"):
        relabel(raw, reviews)
    skipped = relabel(raw, reviews, on_conflict="skip")
    assert list(skipped.corrected["label"]) == ["a", "a", "a", "b"] and skipped.counts["conflicts_skipped"] == 1
    applied = relabel(raw, reviews, on_conflict="apply")
    assert list(applied.corrected["label"]) == ["b", "a", "a", "b"] and applied.counts["changed"] == 2


@pytest.mark.parametrize("reviews, message", [
    ({"example_id": ["e9"], "reviewed_label": ["a"]}, r"example id\(s\) 'e9' \(row 1\) are not in data.csv"),
    ({"example_id": ["e0"], "reviewed_label": ["c"]}, r"reviewed label\(s\) 'c' do not occur.*--allow-new-labels"),
    ({"example_id": ["e0", "e0"], "reviewed_label": ["a", "b"]}, r"'e0' appears in rows 1 and 2"),
    ({"example_id": ["e0"], "label": ["a"]}, r"no column\(s\) reviewed_label"),
    ({"example_id": ["e0", "e1"], "reviewed_label": ["a", ""]}, r"row 2 has no reviewed_label"),
])
def test_bad_relabel_tables(reviews, message):
    with pytest.raises(InputError, match=message):
        relabel(frame(), reviews)


def test_new_labels_when_allowed():
    out = relabel(frame(), {"example_id": ["e0"], "reviewed_label": ["c"]}, allow_new_labels=True)
    assert out.corrected["label"].tolist()[0] == "c"


def test_cli_writes_dataset_and_manifest_atomically(tmp_path):
    frame().to_json(tmp_path / "data.jsonl", orient="records", lines=True)
    pd.DataFrame({"example_id": ["e1"], "given_label": ["b"], "reviewed_label": ["a"]}).to_csv(
        tmp_path / "relabels.csv", index=False)
    args = ["relabel", "apply", "--data", tmp_path / "data.jsonl", "--relabels", tmp_path / "relabels.csv"]
    res = CliRunner().invoke(cli, [str(a) for a in args + ["--dry-run"]])
    assert res.exit_code == 0 and "e1" in res.output and not list(tmp_path.glob("fixed*"))
    res = CliRunner().invoke(cli, [str(a) for a in args + ["-o", tmp_path / "fixed.jsonl"]])
    assert res.exit_code == 0, res.output
    fixed = pd.read_json(tmp_path / "fixed.jsonl", lines=True)
    assert fixed["label"].tolist() == ["a", "a", "a", "b"]
    manifest = json.loads((tmp_path / "fixed.jsonl.manifest.json").read_text())
    assert manifest["counts"]["changed"] == 1 and manifest["per_class_after"] == {"a": 3, "b": 1}

    # the reviewer confirmed 'a', and the data has 'b' since: a real conflict ('a' -> 'b' reviewed would be applied)
    pd.DataFrame({"example_id": ["e1"], "given_label": ["a"], "reviewed_label": ["a"]}).to_csv(
        tmp_path / "stale.csv", index=False)
    res = CliRunner().invoke(cli, [str(a) for a in ["relabel", "apply", "--data", tmp_path / "data.jsonl",
                                                    "--relabels", tmp_path / "stale.csv", "-o", tmp_path / "x.jsonl"]])
    assert res.exit_code == 2 and "the data changed after the push" in res.output
    assert not (tmp_path / "x.jsonl").exists() and not (tmp_path / "x.jsonl.manifest.json").exists()


def test_applying_twice_is_a_no_op_and_real_conflicts_stay_errors():
    """Applying to data that already carries the reviewed label exited 2 ('the data changed after the push')."""
    raw = frame()
    reviews = {"example_id": ["e0", "e1"], "given_label": ["a", "b"], "reviewed_label": ["b", "a"]}
    once = relabel(raw, reviews).corrected
    twice = relabel(once, reviews)
    assert twice.corrected.equals(once) and len(twice.changes) == 0
    assert twice.already_applied == ["e0", "e1"] and twice.counts["already_applied"] == 2
    assert twice.counts["confirmed"] == 0 and twice.counts["conflicts"] == 0
    edited = once.copy()
    edited.loc[0, "label"] = "c"  # someone set a third label after the fix: neither the seen nor the reviewed one
    with pytest.raises(InputError, match="the data changed after the push"):
        relabel(edited, reviews)


def test_undecided_rows_are_counted_and_change_nothing():
    raw = frame()
    out = relabel(raw, {"example_id": ["e0", "e1", "e2"], "given_label": ["a", "b", "a"],
                        "reviewed_label": ["b", None, None], "decision": ["changed", "conflict", "skipped"]})
    assert list(out.corrected["label"]) == ["b", "b", "a", "b"]
    assert out.undecided == {"conflict": ["e1"], "skipped": ["e2"]}
    assert out.counts["conflict_not_applied"] == 1 and out.counts["skipped_not_applied"] == 1
    with pytest.raises(InputError, match="'maybe' are unknown"):
        relabel(raw, {"example_id": ["e0"], "reviewed_label": ["b"], "decision": ["maybe"]})


def test_a_review_of_another_text_is_refused_naming_the_id():
    raw = frame()
    data = dataset_from_frame(raw, "data.csv")
    prints = data.content_fingerprints()
    reviews = {"example_id": ["e0", "e1"], "given_label": ["a", "b"], "reviewed_label": ["b", "a"],
               "content_fingerprint": [prints[0], prints[2]]}  # e1's review was about the text now under e2
    with pytest.raises(InputError, match="'e1' has another text"):
        relabel(raw, reviews)
    out = relabel(raw, reviews, on_conflict="skip")
    assert list(out.corrected["label"]) == ["b", "b", "a", "b"] and out.counts["other_text_skipped"] == 1
    with pytest.raises(InputError, match="never applies them"):
        relabel(raw, reviews, on_conflict="apply")


@pytest.mark.parametrize("labels, policy, expected", [
    (["a", "a"], "unanimous", "a"), (["a", "b"], "unanimous", None), (["a", "b", "b"], "majority", "b"),
    (["a", "b"], "majority", None), (["a", "b"], "latest", "b"), ([], "latest", None), (["a"], "unanimous", "a")])
def test_agreement_policies(labels, policy, expected):
    from freeshap_dq.curation.relabel import agreed_label

    assert agreed_label(labels, policy) == expected
