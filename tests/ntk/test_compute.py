import numpy as np
import pytest
import torch
from autograd_reference import gradient_row, gram

from freeshap_dq import InputError
from freeshap_dq.ntk.adapters import EncoderHead, additive_mask
from freeshap_dq.ntk.compute import compute_ntk
from freeshap_dq.ntk.models import load_model_and_tokenizer
from freeshap_dq.ntk.setup import parse_memory, resolve_trainable, select_trainable

TEXTS = ["a great movie", "a boring film and a dull plot that goes on", "it was bad", "very good indeed",
         "the actors are funny", "terrible", "i loved every minute of it", "long and tedious"]
PAIRS = ["brilliant", "not very good", "it was great", "moving", "dull", "clever", "funny", "a mess"]


@pytest.fixture(scope="module")
def adapter(tiny_bert_path):
    model, tokenizer, _ = load_model_and_tokenizer(str(tiny_bert_path), "encoder")
    return EncoderHead(model, tokenizer, n_classes=3, head_seed=1)


def autograd_kernel(adapter, texts, pairs, names, n_train, classes=(0,)):
    """Reference: one plain backward per example and class (unpadded, 2-D masks), Gram in float64."""
    adapter.set_trainable(set())  # the full network from the embeddings, no cached prefix

    def logit(i, c):
        enc = adapter.tokenizer(texts[i], None if pairs is None else pairs[i], return_tensors="pt")
        hidden = adapter.encoder(**enc).last_hidden_state
        pooled = hidden[:, 0] if adapter.pooling == "cls" else hidden.mean(1)
        return adapter.head(pooled)[0, c]

    return sum(gram([gradient_row(adapter, names, forward=lambda i=i, c=c: logit(i, c)) for i in range(len(texts))], n_train)
               for c in classes)


def relative_error(out, reference):
    full = np.vstack([out.k_train, out.k_test])
    return np.abs(full - reference).max() / np.abs(reference).max()


@pytest.mark.parametrize("gradients", ["auto", "vmap"])
@pytest.mark.parametrize("trainable", ["head-only", "top:1", "freeze:1", "all", "regex:attention"])
def test_kernel_equals_gram_of_autograd_gradients(adapter, trainable, gradients):
    ex = adapter.tokenize(TEXTS)
    out = compute_ntk(adapter, ex[:5], ex[5:], trainable=trainable, max_memory="256MiB", progress=False,
                      gradients=gradients)
    assert out.info["gradients"] == ("factors" if gradients == "auto" else "vmap")
    reference = autograd_kernel(adapter, TEXTS, None, out.trainable_names, 5)
    assert relative_error(out, reference) < 1e-5


def test_sum_kernel_and_sentence_pairs_and_cls_pooling(tiny_bert_path):
    model, tokenizer, _ = load_model_and_tokenizer(str(tiny_bert_path), "encoder")
    adapter = EncoderHead(model, tokenizer, n_classes=2, pooling="cls")
    ex = adapter.tokenize(TEXTS, PAIRS)
    assert any(1 in e["token_type_ids"] for e in ex)
    out = compute_ntk(adapter, ex[:6], ex[6:], trainable="top:2", kernel="sum", max_memory="256MiB", progress=False)
    reference = autograd_kernel(adapter, TEXTS, PAIRS, out.trainable_names, 6, classes=(0, 1))
    assert relative_error(out, reference) < 1e-5


def test_per_class_kernels_equal_autograd_grams_per_logit_and_sum_to_the_sum_kernel(adapter):
    ex = adapter.tokenize(TEXTS)
    out = compute_ntk(adapter, ex[:5], ex[5:], trainable="all", kernel="per-class", max_memory="1MiB",
                      progress=False, test_diagonal=True)  # several chunks and the word table's sparse share
    assert out.k_train.shape == (3, 5, 5) and out.k_test.shape == (3, 3, 5) and out.test_diag.shape == (3, 3)
    for c in range(3):
        reference = autograd_kernel(adapter, TEXTS, None, out.trainable_names, 5, classes=(c,))
        full = np.vstack([out.k_train[c], out.k_test[c]])
        assert np.abs(full - reference).max() / np.abs(reference).max() < 1e-5
        np.testing.assert_array_equal(out.k_train[c], out.k_train[c].T)
    summed = compute_ntk(adapter, ex[:5], ex[5:], trainable="all", kernel="sum", max_memory="256MiB", progress=False)
    np.testing.assert_allclose(out.k_train.sum(0), summed.k_train, rtol=1e-5, atol=1e-6 * np.abs(summed.k_train).max())


@pytest.mark.parametrize("gradients", ["factors", "vmap"])
def test_chunking_and_batching_do_not_change_the_kernel(adapter, gradients):
    ex = adapter.tokenize(TEXTS)
    big = compute_ntk(adapter, ex[:5], ex[5:], trainable="all", max_memory="256MiB", progress=False,
                      test_diagonal=True)
    factors = big.info["factor_bytes"] if gradients == "factors" else 0  # the factors take their part of the budget
    small = compute_ntk(adapter, ex[:5], ex[5:], trainable="all", max_memory=2**20 + factors, batch_size=3,
                        progress=False, test_diagonal=True, gradients=gradients)
    assert small.info["chunks"] > 1 and big.info["chunks"] == 1 and small.info["gradients"] == gradients
    np.testing.assert_allclose(small.k_train, big.k_train, rtol=1e-5, atol=1e-7 * np.abs(big.k_train).max())
    np.testing.assert_allclose(small.k_test, big.k_test, rtol=1e-5, atol=1e-7 * np.abs(big.k_train).max())
    np.testing.assert_allclose(small.test_diag, big.test_diag, rtol=1e-5)
    again = compute_ntk(adapter, ex[:5], ex[5:], trainable="all", max_memory="256MiB", progress=False)
    np.testing.assert_array_equal(again.k_train, big.k_train)  # deterministic


def test_factors_beyond_their_share_of_the_budget_take_several_passes(adapter, monkeypatch):
    from freeshap_dq.ntk import setup as compute

    ex = adapter.tokenize(TEXTS)
    run = lambda: compute_ntk(adapter, ex[:5], ex[5:], trainable="all", max_memory="1500KiB", batch_size=4,  # noqa: E731
                              progress=False, test_diagonal=True)
    whole = run()
    assert whole.info["gradients"] == "factors" and whole.info["factor_passes"] == 1 and whole.info["chunks"] > 1
    assert 0 < whole.info["factor_bytes"] <= compute.FACTOR_SHARE * 1500 * 1024
    monkeypatch.setattr(compute, "FACTOR_SHARE", 0.15)  # a third of the factors' size: groups of chunks
    out = run()
    assert out.info["gradients"] == "factors" and out.info["factor_passes"] >= 2
    assert out.info["factor_bytes"] <= 0.15 * 1500 * 1024
    reference = compute_ntk(adapter, ex[:5], ex[5:], trainable="all", max_memory="256MiB", progress=False,
                            test_diagonal=True, gradients="vmap")
    scale = np.abs(reference.k_train).max()
    for k in (whole, out):
        np.testing.assert_allclose(k.k_train, reference.k_train, rtol=1e-5, atol=1e-7 * scale)
        np.testing.assert_allclose(k.k_test, reference.k_test, rtol=1e-5, atol=1e-7 * scale)
        np.testing.assert_allclose(k.test_diag, reference.test_diag, rtol=1e-5)
    with pytest.raises(InputError, match="gradients 'jvp' is unknown"):
        compute_ntk(adapter, ex[:5], ex[5:], trainable="top:2", progress=False, gradients="jvp")


def test_train_block_is_symmetric_psd_and_test_diagonal_matches(adapter):
    ex = adapter.tokenize(TEXTS)
    out = compute_ntk(adapter, ex, ex[:3], trainable="top:2", max_memory="256MiB", progress=False, test_diagonal=True)
    np.testing.assert_array_equal(out.k_train, out.k_train.T)
    assert np.linalg.eigvalsh(out.k_train).min() > -1e-6 * np.abs(out.k_train).max()
    np.testing.assert_allclose(out.test_diag, np.diag(out.k_train)[:3], rtol=1e-5)


def test_parameter_selection_counts(adapter):
    count = lambda spec: sum(dict(adapter.named_parameters())[n].numel() for n in select_trainable(adapter, spec))  # noqa: E731
    head = 32 * 3 + 3
    layer = sum(p.numel() for n, p in adapter.named_parameters() if ".layer.1." in n)
    embeddings = sum(p.numel() for n, p in adapter.named_parameters() if "embeddings" in n)
    assert count("head-only") == head
    assert count("top:1") == head + layer
    assert count("top:3") == head + 3 * layer
    assert count("freeze:2") == head + layer + embeddings
    assert count("all") == head + 3 * layer + embeddings  # the unused pooler is left out
    assert "pooler" not in " ".join(select_trainable(adapter, "all"))


def test_auto_trainable_is_the_top_three_layers_or_every_layer_of_a_shallower_model(adapter):
    assert adapter.n_layers == 3
    assert select_trainable(adapter, "auto") == select_trainable(adapter, "top:3")
    assert resolve_trainable("auto", 12) == "top:3" and resolve_trainable("auto", 2) == "top:2"
    assert resolve_trainable("auto", 1) == "top:1" and resolve_trainable("freeze:4", 2) == "freeze:4"


@pytest.mark.parametrize("spec, message", [("top:9", r"has 3 layers .*give --trainable top:3 "), ("top:x", "whole number"),
                                           ("regex:nomatch", "matches no parameter"), ("some", "unknown")])
def test_bad_trainable_specs(adapter, spec, message):
    with pytest.raises(InputError, match=message):
        select_trainable(adapter, spec)


def test_budget_too_small_is_reported(adapter):
    ex = adapter.tokenize(TEXTS)
    with pytest.raises(InputError, match="too small.*--max-memory"):
        compute_ntk(adapter, ex[:5], ex[5:], trainable="all", max_memory="10KiB", progress=False)


def test_additive_4d_mask_equals_2d_mask(adapter):
    enc = adapter.tokenizer(TEXTS[:3], padding=True, return_tensors="pt")
    with torch.no_grad():
        two_d = adapter.encoder(**enc).last_hidden_state
        four_d = adapter.encoder(enc["input_ids"], attention_mask=additive_mask(enc["attention_mask"], torch.float32),
                                 token_type_ids=enc["token_type_ids"]).last_hidden_state
    keep = enc["attention_mask"].bool()
    torch.testing.assert_close(four_d[keep], two_d[keep], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("spec, expected", [("1KiB", 1024), ("2 GiB", 2 * 2**30), ("512mb", 512 * 2**20),
                                            ("1000", 1000)])
def test_parse_memory(spec, expected):
    assert parse_memory(spec) == expected


def test_auto_memory_is_bounded():
    assert 2**30 <= parse_memory("auto") <= 16 * 2**30
    with pytest.raises(InputError, match="not understood"):
        parse_memory("lots")


def test_model_loading_errors(tmp_path):
    with pytest.raises(InputError, match="Hugging Face Hub id"):
        load_model_and_tokenizer("bert-base-uncased/v1", "encoder")
    with pytest.raises(InputError, match="no config.json"):
        load_model_and_tokenizer(str(tmp_path), "encoder")
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(InputError, match="has no weights"):
        load_model_and_tokenizer(str(tmp_path), "encoder")
