import dataclasses
import json

import numpy as np
import pytest

from freeshap_dq import CheckpointError, InputError, KernelProblem
from freeshap_dq.data.tables import TextDataset
from freeshap_dq.ntk import builder
from freeshap_dq.ntk.adapters import EncoderHead
from freeshap_dq.ntk.builder import NTKConfig, build_kernel, load_kernel
from freeshap_dq.ntk.compute import representations
from freeshap_dq.ntk.models import load_model_and_tokenizer

TRAIN = TextDataset(["a great movie", "a dull plot", "it was great", "it was bad", "very good", "terrible"],
                    ["pos", "neg", "pos", "neg", "pos", "neg"], [f"tr{i}" for i in range(6)])
TEST = TextDataset(["brilliant", "boring film"], ["pos", "neg"], ["te0", "te1"])


def test_build_cache_hit_and_refusal(tmp_path, tiny_bert_path):
    # the random head: a fitted head on 6 examples is regularised to almost nothing, and then top:1 and head-only
    # kernels differ by less than allclose sees
    config = NTKConfig(model=str(tiny_bert_path), trainable="top:1", head="random", max_memory="256MiB")
    logs = []
    first = build_kernel(TRAIN, TEST, config, cache_dir=tmp_path, progress=False, log=logs.append)
    assert isinstance(first, KernelProblem) and first.label_names == ("neg", "pos")
    assert list(first.train_ids) == [f"tr{i}" for i in range(6)]
    files = sorted(p.name for p in tmp_path.iterdir())
    assert len(files) == 2 and files[0].endswith(".json") and files[1].endswith(".safetensors")
    manifest = json.loads((tmp_path / files[0]).read_text())
    assert manifest["trainable"] == "top:1" and manifest["n_trainable"] > 0 and manifest["model_fingerprint"]

    second = build_kernel(TRAIN, TEST, config, cache_dir=tmp_path, progress=False, log=logs.append)
    assert "cached" in logs[-1]
    np.testing.assert_array_equal(second.k_train, first.k_train)

    other = build_kernel(TRAIN, TEST, NTKConfig(model=str(tiny_bert_path), trainable="head-only", head="random"),
                         cache_dir=tmp_path, progress=False, log=logs.append)
    assert "cached" not in logs[-1] and not np.allclose(other.k_train, first.k_train)

    expected = {**manifest, "trainable": "top:2"}
    with pytest.raises(CheckpointError, match="trainable: cached 'top:1', wanted 'top:2'"):
        load_kernel(tmp_path / files[1], expected=expected)


def test_auto_trainable_is_resolved_for_the_model_before_the_cache_key(tmp_path, tiny_bert_path, tiny_llama_path):
    """--trainable auto is recorded as the layers it took: top:3 of tiny BERT's 3, top:2 (all) of tiny Llama's 2;
    the auto kernel is the explicit top:3 one (one cache entry, the same values)."""
    logs = []
    auto = build_kernel(TRAIN, TEST, NTKConfig(model=str(tiny_bert_path), head="random", max_memory="256MiB"),
                        cache_dir=tmp_path, progress=False, log=logs.append, return_manifest=True)
    assert auto[1]["trainable"] == "top:3"
    assert any("trainable top:3 (auto: the last 3 of 3 layers and the head)" in line for line in logs)
    explicit = build_kernel(TRAIN, TEST, NTKConfig(model=str(tiny_bert_path), trainable="top:3", head="random",
                                                   max_memory="256MiB"), cache_dir=tmp_path, progress=False,
                            log=logs.append)
    assert "cached" in logs[-1]
    np.testing.assert_array_equal(explicit.k_train, auto[0].k_train)
    shallow = NTKConfig(model=str(tiny_llama_path), adapter="causal-lm", label_words="neg=bad,pos=good",
                      max_memory="256MiB")
    _, manifest = build_kernel(TRAIN, TEST, shallow, progress=False, log=logs.append, return_manifest=True)
    assert manifest["trainable"] == "top:2" and "last 2 of 2 layers" in " ".join(logs)
    assert any(".layers.0." in name for name in manifest["trainable_names"])


def test_unknown_test_label_and_single_class_are_refused(tiny_bert_path):
    config = NTKConfig(model=str(tiny_bert_path))
    bad_test = TextDataset(["x"], ["neutral"], ["t"], source="test.csv")
    with pytest.raises(InputError, match="test.csv: row 1 has label 'neutral'"):
        build_kernel(TRAIN, bad_test, config, progress=False)
    one_class = TextDataset(["a", "b"], ["pos", "pos"], ["1", "2"], source="train.csv")
    with pytest.raises(InputError, match="train.csv: every training example has label 'pos'"):
        build_kernel(one_class, TEST, config, progress=False)


def test_config_validation():
    with pytest.raises(InputError, match="adapter"):
        NTKConfig(adapter="nope")
    with pytest.raises(InputError, match="kernel"):
        NTKConfig(kernel="per-token")


def test_real_minilm_kernel_small(tmp_path):
    """The packaged all-MiniLM-L6-v2: a real pretrained encoder, head + top layer, 8 examples."""
    config = NTKConfig(model="minilm", trainable="top:1", max_memory="1GiB")
    problem = build_kernel(TRAIN, TEST, config, progress=False, log=lambda m: None)
    assert problem.k_train.shape == (6, 6) and problem.k_test.shape == (2, 6)
    assert np.linalg.eigvalsh(problem.k_train).min() > 0
    # the pretrained representation puts "brilliant" nearer the positive examples than the negative ones
    pos = problem.y_train == problem.label_names.index("pos")
    assert problem.k_test[0, pos].mean() > problem.k_test[0, ~pos].mean() or \
        problem.k_test[1, ~pos].mean() > problem.k_test[1, pos].mean()


TEXTS_TO_REMEMBER = ["a great movie", "a boring film", "it was bad", "very good indeed"]


def test_frozen_representations_are_remembered_by_model_settings_and_tokens(tiny_bert_path):
    config = NTKConfig(model=str(tiny_bert_path), adapter="encoder-head")
    model, tokenizer, _ = load_model_and_tokenizer(str(tiny_bert_path), "encoder")
    adapter = EncoderHead(model, tokenizer, n_classes=2)
    ex = adapter.tokenize(TEXTS_TO_REMEMBER)
    with builder.remembering_frozen_outputs():
        first = builder.frozen_representations(adapter, ex, config, "model-a", "cpu")
        np.testing.assert_array_equal(first, representations(adapter, ex))
        first[:] = 0  # the caller's copy: the remembered vectors are not changed through it
        again = builder.frozen_representations(adapter, ex, config, "model-a", "cpu")
        np.testing.assert_array_equal(again, representations(adapter, ex))
        assert len(builder.REPRESENTATIONS.kept) == 1
        edited = adapter.tokenize(["a great film", *TEXTS_TO_REMEMBER[1:]])  # an edited text, another model
        builder.frozen_representations(adapter, edited, config, "model-a", "cpu")
        builder.frozen_representations(adapter, ex, config, "model-b", "cpu")
        cls = EncoderHead(model, tokenizer, n_classes=2, pooling="cls")  # another pooling
        pooled = builder.frozen_representations(cls, ex, dataclasses.replace(config, pooling="cls"), "model-a", "cpu")
        assert len(builder.REPRESENTATIONS.kept) == 4
        np.testing.assert_array_equal(pooled, representations(cls, ex))
        assert np.abs(pooled - again).max() > 1e-3
    assert not builder.REPRESENTATIONS.kept  # forgotten when the block ends
    builder.frozen_representations(adapter, ex, config, "model-a", "cpu")
    assert not builder.REPRESENTATIONS.kept  # outside such a block nothing is kept


def test_kernels_of_the_same_texts_share_the_frozen_bottom_and_equal_fresh_ones(tiny_bert_path):
    """Two labellings of the same texts (evaluate's settings) under the fitted head: the second kernel reuses the
    first one's frozen prefixes and vectors, and both are bit for bit the kernels computed without remembering."""
    texts = [*TEXTS_TO_REMEMBER, "terrible", "brilliant", "long and tedious", "i loved every minute"]
    labels = [["c0", "c1", "c2"][i % 3] for i in range(len(texts))]
    relabelled = ["c1", "c1", *labels[2:]]  # one label changed (a permutation of the classes would not change the sum)
    test = TextDataset(["it was great", "a dull plot", "funny"], ["c0", "c1", "c2"], ["te0", "te1", "te2"])
    config = NTKConfig(model=str(tiny_bert_path), trainable="top:1", head="fit", max_memory="256MiB",
                       grad_batch_size=3)
    datasets = [TextDataset(texts, y, [f"tr{i}" for i in range(len(texts))]) for y in (labels, relabelled)]
    quiet = {"progress": False, "log": lambda m: None}
    fresh = [build_kernel(train, test, config, **quiet) for train in datasets]
    with builder.remembering_frozen_outputs():
        remembered = [build_kernel(train, test, config, **quiet) for train in datasets]
        assert len(builder.PREFIXES.kept) == 4 and len(builder.REPRESENTATIONS.kept) == 2  # 3 + 1 batches; train, test
    assert not builder.PREFIXES.kept
    for a, b in zip(fresh, remembered, strict=True):
        np.testing.assert_array_equal(a.k_train, b.k_train)
        np.testing.assert_array_equal(a.k_test, b.k_test)
    assert not np.array_equal(fresh[0].k_train, fresh[1].k_train)  # the labels reach the kernel through the head
