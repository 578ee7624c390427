import pandas as pd
import pytest

from freeshap_dq import InputError
from freeshap_dq.data.tables import encode_labels, label_mapping, load_dataset


def write(tmp_path, name, df):
    path = tmp_path / name
    {"csv": lambda: df.to_csv(path, index=False), "tsv": lambda: df.to_csv(path, sep="\t", index=False),
     "jsonl": lambda: df.to_json(path, orient="records", lines=True),
     "parquet": lambda: df.to_parquet(path)}[name.split(".")[1]]()
    return path


@pytest.mark.parametrize("name", ["d.csv", "d.tsv", "d.jsonl", "d.parquet"])
def test_load_formats(tmp_path, name):
    df = pd.DataFrame({"id": ["a", "b", "c"], "text": ["good", "bad", "fine"], "label": ["pos", "neg", "pos"]})
    data = load_dataset(write(tmp_path, name, df))
    assert data.texts == ["good", "bad", "fine"] and data.ids == ["a", "b", "c"] and data.labels[1] == "neg"
    names = label_mapping(data, data)
    assert names == ("neg", "pos") and list(encode_labels(data, names)) == [1, 0, 1]


@pytest.mark.parametrize("df, kwargs, message", [
    (pd.DataFrame({"text": ["a"], "label": ["x"]}), {"text_column": "sentence"}, "no column 'sentence'.*--text-column"),
    (pd.DataFrame({"text": ["a", ""], "label": ["x", "y"]}), {}, "row 2 has an empty 'text'"),
    (pd.DataFrame({"text": ["a", "b"], "label": ["x", None]}), {}, "row 2 has no label"),
    (pd.DataFrame({"id": [1, 1], "text": ["a", "b"], "label": ["x", "y"]}), {}, "id '1' appears in rows 1 and 2"),
    (pd.DataFrame({"text": [], "label": []}), {}, "no rows"),
])
def test_bad_tables(tmp_path, df, kwargs, message):
    with pytest.raises(InputError, match=message):
        load_dataset(write(tmp_path, "d.csv", df), **kwargs)


def test_unreadable_files(tmp_path):
    with pytest.raises(InputError, match="no such file"):
        load_dataset(tmp_path / "missing.csv")
    (tmp_path / "d.xlsx").write_text("x")
    with pytest.raises(InputError, match="unknown format"):
        load_dataset(tmp_path / "d.xlsx")
    (tmp_path / "latin.csv").write_bytes("text,label\ncaf\xe9,x\n".encode("latin-1"))
    with pytest.raises(InputError, match="not valid UTF-8"):
        load_dataset(tmp_path / "latin.csv")


def test_hugging_face_dataset_saved_to_disk(tmp_path):
    from datasets import Dataset, DatasetDict

    ds = Dataset.from_dict({"sentence": ["good", "bad"], "label": [1, 0], "idx": [10, 11]})
    ds.save_to_disk(str(tmp_path / "split"))
    data = load_dataset(tmp_path / "split", text_column="sentence", id_column="idx")
    assert data.texts == ["good", "bad"] and data.labels == ["1", "0"] and data.ids == ["10", "11"]
    DatasetDict({"train": ds, "validation": ds}).save_to_disk(str(tmp_path / "dict"))
    with pytest.raises(InputError, match="several splits"):
        load_dataset(tmp_path / "dict")
    (tmp_path / "plain").mkdir()
    with pytest.raises(InputError, match="not a Hugging Face dataset"):
        load_dataset(tmp_path / "plain")


def test_atomic_writes_get_the_usual_permissions(tmp_path):
    import os

    from freeshap_dq.io import write_json

    write_json({"a": 1}, tmp_path / "out.json")
    mask = os.umask(0)
    os.umask(mask)
    assert (tmp_path / "out.json").stat().st_mode & 0o777 == 0o666 & ~mask
    assert not list(tmp_path.glob(".out.json.*"))


@pytest.mark.parametrize("labels, message", [
    (["fresh", "rotten", "fresh ", "rotten"], "'fresh' \\(row 1\\) and 'fresh ' \\(row 3\\)"),
    (["fresh", "rotten", "Fresh", "rotten"], "differ only by case"),
    (["fresh", "rotten", "NaN", "rotten"], "row 3 has label 'NaN'.*looks like a missing value"),
])
def test_label_variants_are_refused_unless_allowed(tmp_path, labels, message):
    """'fresh ', 'Fresh' and the string NaN silently became classes of their own."""
    path = tmp_path / "d.csv"
    pd.DataFrame({"text": ["a", "b", "c", "d"], "label": labels}).to_csv(path, index=False)
    with pytest.raises(InputError, match=message):
        load_dataset(path)
    assert load_dataset(path, allow_label_variants=True).labels == labels


def test_invalid_utf8_names_the_byte_offset_and_line(tmp_path):
    """The UTF-8 error named the parser's buffer offset and no row."""
    rows = "".join(f"row {i},pos\n" for i in range(3000))
    data = ("text,label\n" + rows).encode() + b"caf\xe9,neg\n"
    (tmp_path / "bad.csv").write_bytes(data)
    with pytest.raises(InputError, match=f"byte 0xe9 at offset {len(data) - 6}, line 3002 of the file"):
        load_dataset(tmp_path / "bad.csv")
