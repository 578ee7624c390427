"""The sketched eNTK against the same projections applied to plain autograd gradients, its mean against the exact
eNTK (unbiased), and its refusals."""

import dataclasses

import numpy as np
import pytest
import torch
from tiny_models import tiny_classifier

from freeshap_dq import InputError
from freeshap_dq.data.tables import TextDataset
from freeshap_dq.ntk.adapters import EncoderHead
from freeshap_dq.ntk.batching import pad_batch, readout_mask
from freeshap_dq.ntk.builder import NTKConfig, build_adapter, build_kernel, build_kernel_folder, cache_key, kernel_manifest
from freeshap_dq.ntk.compute import compute_ntk
from freeshap_dq.ntk.models import load_model_and_tokenizer
from freeshap_dq.ntk.sketch import compute_sketched_ntk, sketch_projections

TEXTS = ["a great movie", "a boring film and a dull plot that goes on", "it was bad", "very good indeed",
         "the actors are funny", "terrible", "i loved every minute of it", "long and tedious"]


@pytest.fixture(scope="module")
def adapter(tiny_bert_path):
    model, tokenizer, _ = load_model_and_tokenizer(str(tiny_bert_path), "encoder")
    return EncoderHead(model, tokenizer, n_classes=3, head_seed=1)


def projected_autograd_kernel(adapter, examples, names, classes, projections, n_train):
    """Reference: per example and class, each tensor's gradient by a plain backward on the example alone; the
    sketched weights' G replaced by rows^T G columns; the Gram of those rows in float64."""
    params = dict(adapter.named_parameters())
    kernel = 0
    for c in classes:
        rows = []
        for example in examples:
            for name in names:
                params[name].requires_grad_(True)
            logit = adapter(adapter.prefix(pad_batch([example], adapter, "cpu")), readout_mask([example], "cpu"))[0, c]
            grads = torch.autograd.grad(logit, [params[k] for k in names], allow_unused=True)
            for name in names:
                params[name].requires_grad_(False)
            parts = []
            for name, g in zip(names, grads, strict=True):
                g = torch.zeros_like(params[name]) if g is None else g
                if name in projections:
                    g = projections[name].rows.T @ g @ projections[name].columns
                parts.append(g.reshape(-1).double())
            rows.append(torch.cat(parts))
        jac = torch.stack(rows)
        kernel = kernel + (jac @ jac[:n_train].T).numpy()
    return kernel


@pytest.mark.parametrize(("trainable", "kernel"), [("top:1", "class0"), ("top:2", "sum"), ("head-only", "sum")])
def test_sketched_kernel_equals_the_projected_autograd_gradients(adapter, trainable, kernel):
    ex = adapter.tokenize(TEXTS)
    out = compute_sketched_ntk(adapter, ex[:5], ex[5:], sketch=4, sketch_seed=3, trainable=trainable, kernel=kernel,
                               max_memory="256MiB", batch_size=3, progress=False)
    projections = sketch_projections(adapter, out.trainable_names, 4, 3)
    assert out.info["sketched_weights"] == len(projections) > 0
    if trainable == "top:1":  # q, k, v, attention output, intermediate, output, and the 3 x 32 head (> 4 x 4)
        assert len(projections) == 7 and "head.weight" in projections
    expected = projected_autograd_kernel(adapter, ex, out.trainable_names, [0] if kernel == "class0" else [0, 1, 2],
                                         projections, 5)
    np.testing.assert_allclose(out.k_train, expected[:5], rtol=1e-4, atol=1e-7 * np.abs(expected).max())
    np.testing.assert_allclose(out.k_test, expected[5:], rtol=1e-4, atol=1e-7 * np.abs(expected).max())
    np.testing.assert_allclose(out.k_train, out.k_train.T)


def test_the_sketch_is_unbiased(adapter):
    """The mean over 48 seeds approaches the exact eNTK: its error is a fraction of one sketch's."""
    ex = adapter.tokenize(TEXTS)
    exact = compute_ntk(adapter, ex[:5], ex[5:], trainable="top:1", max_memory="256MiB", progress=False)
    exact_rows = np.vstack([exact.k_train, exact.k_test])
    sketches = [compute_sketched_ntk(adapter, ex[:5], ex[5:], sketch=4, sketch_seed=seed, trainable="top:1",
                                     max_memory="256MiB", progress=False) for seed in range(48)]
    rows = [np.vstack([s.k_train, s.k_test]) for s in sketches]
    error = lambda k: np.linalg.norm(k - exact_rows) / np.linalg.norm(exact_rows)  # noqa: E731
    single = np.mean([error(k) for k in rows])
    assert single > 0.02  # a real approximation at k = 4 ...
    assert error(np.mean(rows, axis=0)) < single / 3  # ... whose errors average out (1/sqrt(48) ~ 1/7 expected)
    assert not np.allclose(rows[0], rows[1])  # the seed changes the projections


def test_a_sketch_wider_than_every_weight_is_the_exact_kernel(adapter):
    ex = adapter.tokenize(TEXTS)
    exact = compute_ntk(adapter, ex[:5], ex[5:], trainable="top:2", kernel="sum", max_memory="256MiB",
                        progress=False)
    wide = compute_sketched_ntk(adapter, ex[:5], ex[5:], sketch=64, trainable="top:2", kernel="sum",
                                max_memory="256MiB", progress=False)  # 64^2 entries > the tiny model's 32 x 64
    assert wide.info["sketched_weights"] == 0
    np.testing.assert_allclose(wide.k_train, exact.k_train, rtol=1e-5)
    np.testing.assert_allclose(wide.k_test, exact.k_test, rtol=1e-5)


def test_per_class_kernels_and_the_test_diagonal(adapter):
    """Per-class kernels are the sketched rows of each logit; the test diagonal is the sketched test rows' own
    squared norm (the same projections when the test examples are valued as training examples)."""
    ex = adapter.tokenize(TEXTS)
    out = compute_sketched_ntk(adapter, ex[:5], ex[5:], sketch=4, trainable="top:1", kernel="per-class",
                               max_memory="256MiB", test_diagonal=True, progress=False)
    assert out.k_train.shape == (3, 5, 5) and out.k_test.shape == (3, 3, 5) and out.test_diag.shape == (3, 3)
    summed = compute_sketched_ntk(adapter, ex[:5], ex[5:], sketch=4, trainable="top:1", kernel="sum",
                                  max_memory="256MiB", progress=False)
    np.testing.assert_allclose(out.k_train.sum(0), summed.k_train, rtol=1e-6)
    everything = compute_sketched_ntk(adapter, ex, [], sketch=4, trainable="top:1", kernel="per-class",
                                      max_memory="256MiB", progress=False)
    np.testing.assert_allclose(out.test_diag, np.diagonal(everything.k_train, axis1=1, axis2=2)[:, 5:], rtol=1e-5)


def test_a_transposed_conv1d_weight_is_sketched_like_a_linear_one(tmp_path):
    path = tiny_classifier(tmp_path / "gpt2", "gpt2")
    adapter, _ = build_adapter(NTKConfig(model=str(path), adapter="sequence-classifier"), ("neg", "pos"),
                               log=lambda m: None)
    ex = adapter.tokenize(TEXTS)
    out = compute_sketched_ntk(adapter, ex[:5], ex[5:], sketch=4, trainable="top:1", max_memory="256MiB",
                               batch_size=2, progress=False)
    projections = sketch_projections(adapter, out.trainable_names, 4, 0)
    assert any(".attn.c_attn." in name for name in projections)  # GPT-2's Conv1D
    expected = projected_autograd_kernel(adapter, ex, out.trainable_names, [0], projections, 5)
    np.testing.assert_allclose(out.k_train, expected[:5], rtol=1e-4, atol=1e-7 * np.abs(expected).max())


def test_the_sketch_refuses_what_it_does_not_cover(adapter):
    ex = adapter.tokenize(TEXTS)
    with pytest.raises(InputError, match="word-embedding table"):
        compute_sketched_ntk(adapter, ex[:5], ex[5:], sketch=8, trainable="all", max_memory="256MiB")
    for kwargs, message in (({"sketch": 2}, "at least 4"), ({"sketch": -1}, "at least 4"),
                            ({"sketch_seed": 1}, "--sketch K"), ({"sketch": 8, "trainable": "all"}, "word-embedding"),
                            ({"sketch": 8, "trainable": "freeze:1"}, "word-embedding"),
                            ({"sketch": 8, "landmarks": 4}, "--landmarks")):
        with pytest.raises(InputError, match=message):
            NTKConfig(**kwargs)
    with pytest.raises(InputError, match="at least 64MiB|raise --max-memory"):
        compute_sketched_ntk(adapter, ex[:5], ex[5:], sketch=4, trainable="top:1", max_memory="1KiB")


def _data(tiny_bert_path):
    train = TextDataset(TEXTS[:6], ["pos", "neg"] * 3, [f"t{i}" for i in range(6)], source="train.csv")
    test = TextDataset(TEXTS[6:], ["pos", "neg"], ["s0", "s1"], source="test.csv")
    return train, test, NTKConfig(model=str(tiny_bert_path), trainable="top:1", max_memory="256MiB")


def test_the_sketch_is_in_the_manifest_and_the_cache_key_only_when_set(tiny_bert_path, tmp_path):
    train, test, config = _data(tiny_bert_path)
    exact = kernel_manifest(config, "fingerprint", train, test, ("neg", "pos"))
    assert "sketch" not in exact and "sketch_seed" not in exact  # the kernels cached before --sketch stay valid
    sketched = kernel_manifest(dataclasses.replace(config, sketch=8), "fingerprint", train, test, ("neg", "pos"))
    seeded = kernel_manifest(dataclasses.replace(config, sketch=8, sketch_seed=1), "fingerprint", train, test,
                             ("neg", "pos"))
    assert sketched["sketch"] == 8 and "sketch_seed" not in sketched and seeded["sketch_seed"] == 1
    assert len({cache_key(exact), cache_key(sketched), cache_key(seeded)}) == 3

    messages = []
    problem, manifest = build_kernel(train, test, dataclasses.replace(config, sketch=8), cache_dir=tmp_path,
                                     log=messages.append, return_manifest=True)
    assert manifest["sketch"] == 8 and manifest["sketch_width"] > 0
    assert any("sketched to" in m for m in messages)
    exact_problem = build_kernel(train, test, config, cache_dir=tmp_path, log=messages.append)
    assert not np.array_equal(problem.k_train, exact_problem.k_train)  # a distinct cache entry, not the exact one
    again = build_kernel(train, test, dataclasses.replace(config, sketch=8), cache_dir=tmp_path, log=messages.append)
    assert "using the cached kernel" in messages[-1]
    np.testing.assert_array_equal(again.k_train, problem.k_train)


def test_kernel_folders_and_torchrun_refuse_the_sketch(tiny_bert_path, tmp_path):
    train, test, config = _data(tiny_bert_path)
    with pytest.raises(InputError, match="kernel folder"):
        build_kernel_folder(train, test, tmp_path / "k.kernel", dataclasses.replace(config, sketch=8))
    assert not (tmp_path / "k.kernel").exists()
    with pytest.raises(InputError, match="torchrun"):
        build_kernel(train, test, dataclasses.replace(config, sketch=8), shard=(0, 2))
