"""Every option of ``freeshap-dq kernel`` reaches the kernel's manifest (or is refused by name)."""

import json

import pandas as pd
import pytest
from click.testing import CliRunner

from freeshap_dq.cli.main import cli
from freeshap_dq.ntk.builder import KERNEL_VALUE_FIELDS

TRAIN = ["a great movie", "a boring film", "it was great", "it was bad", "very good indeed", "terrible"]
LABELS = ["pos", "neg"] * 3
NOT_SWEPT = {"train_path": "the input of every case", "test_path": "as --train",
             "output": "the output of every case", "progress": "stderr only", "distributed": "tests/ntk/test_sharding.py",
             "cache_dir": "tests/ntk/test_builder.py (a cached kernel is reused and checked)",
             "text_column": "data columns: tests/cli/test_option_sweep.py", "pair_column": "as --text-column",
             "label_column": "as --text-column", "id_column": "as --text-column",
             "allow_label_variants": "as --text-column", "example_block": "kernel folders: tests/cli/test_cli_ntk.py",
             "landmarks": "kernel folders: tests/cli/test_cli_ntk.py", "landmark_seed": "as --landmarks"}
CASES = {"trainable": ["--trainable", "all"], "pooling": ["--pooling", "cls"],
         "head_seed": ["--head", "random", "--head-seed", "3"],
         "head": ["--head", "random"], "kernel": ["--kernel-mode", "sum"], "max_length": ["--max-length", "32"],
         "adapter": ["--adapter", "prompt-mlm", "--label-words", "neg=bad,pos=great"],
         "template": ["--adapter", "prompt-mlm", "--label-words", "neg=bad,pos=great", "--template",
                      "{text} so {mask} ."],
         "label_words": ["--adapter", "prompt-mlm", "--label-words", "neg=terrible,pos=great"],
         "max_memory": ["--max-memory", "300MiB"], "grad_batch_size": ["--grad-batch-size", "2"],
         "gradients": ["--gradients", "vmap"], "device": ["--device", "cpu"], "sketch": ["--sketch", "4"],
         "sketch_seed": ["--sketch", "4", "--sketch-seed", "1"], "precision": ["--precision", "bf16"]}
REFUSED = {"lora_rank": ["--lora-rank", "2"]}  # LoRA is for the causal-lm adapter: refused with the encoder head


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("kernel-sweep")
    pd.DataFrame({"text": TRAIN, "label": LABELS}).to_csv(folder / "train.csv", index=False)
    pd.DataFrame({"text": ["great fun", "dull"], "label": ["pos", "neg"]}).to_csv(folder / "test.csv", index=False)
    return folder


def kernel(data, model, out, *args):
    res = CliRunner().invoke(cli, ["kernel", "--train", str(data / "train.csv"), "--test", str(data / "test.csv"),
                                   "--model", str(model), "--trainable", "top:1", "--max-memory", "256MiB",
                                   "-o", str(out), *args])
    path = out.with_name(out.name + ".manifest.json")
    return res, json.loads(path.read_text()) if res.exit_code == 0 else None


def test_every_kernel_option_is_swept():
    names = {p.name for p in cli.commands["kernel"].params}
    assert names == set(NOT_SWEPT) | set(CASES) | set(REFUSED) | {"model"}


def test_kernel_options_reach_the_manifest(data, tmp_path, tiny_bert_path, tmp_path_factory):
    from tiny_models import tiny_bert

    res, base = kernel(data, tiny_bert_path, tmp_path / "base.npz")
    assert res.exit_code == 0, res.output
    for name, args in CASES.items():
        res, manifest = kernel(data, tiny_bert_path, tmp_path / f"{name}.npz", *args)
        assert res.exit_code == 0, (name, res.output)
        where = manifest if name in KERNEL_VALUE_FIELDS else manifest["settings"]
        reference = base if name in KERNEL_VALUE_FIELDS else base["settings"]  # --sketch*: recorded when set
        assert where[name] != reference.get(name), f"--{name} did not reach the kernel manifest"
    other = tiny_bert(tmp_path_factory.mktemp("other-model"), seed=1)
    res, manifest = kernel(data, other, tmp_path / "model.npz")
    assert res.exit_code == 0 and manifest["model_fingerprint"] != base["model_fingerprint"]
    for name, args in REFUSED.items():
        res, _ = kernel(data, tiny_bert_path, tmp_path / f"{name}.npz", *args)
        assert res.exit_code == 2 and "causal-lm" in res.output, (name, res.output)
