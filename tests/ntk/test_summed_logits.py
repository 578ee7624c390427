"""The summed eNTK from rank(W) combined logits: the same kernel as C per-class kernels summed, exact and sketched."""

import numpy as np
import pytest
import torch

from freeshap_dq.data.tables import TextDataset
from freeshap_dq.ntk.adapters import EncoderHead
from freeshap_dq.ntk.builder import NTKConfig, build_kernel
from freeshap_dq.ntk.compute import compute_ntk
from freeshap_dq.ntk.models import load_model_and_tokenizer
from freeshap_dq.ntk.sketch import compute_sketched_ntk
from freeshap_dq.ntk.summed_logits import combined_head, summed_kernel

TEXTS = ["a great movie", "a boring film and a dull plot that goes on", "it was bad", "very good indeed",
         "the actors are funny", "terrible", "i loved every minute of it", "long and tedious", "brilliant"]


@pytest.fixture
def adapter(tiny_bert_path):
    """Four classes, a head whose rows sum to zero (as the fitted head's do): rank 3."""
    model, tokenizer, _ = load_model_and_tokenizer(str(tiny_bert_path), "encoder")
    adapter = EncoderHead(model, tokenizer, n_classes=4, head_seed=2)
    with torch.no_grad():
        adapter.head.weight.sub_(adapter.head.weight.mean(0))
        adapter.head.bias.sub_(adapter.head.bias.mean())
    return adapter


def test_the_combined_head_keeps_the_head_gram_with_one_row_fewer(adapter):
    head = adapter.head
    combined = combined_head(head)
    assert combined.out_features == 3 and combined.in_features == head.in_features
    np.testing.assert_allclose((combined.weight.T @ combined.weight).numpy(), (head.weight.T @ head.weight).numpy(),
                               atol=1e-6 * float(head.weight.abs().max()) ** 2)
    h = torch.randn(5, head.in_features)
    full, reduced = head(h).double(), combined(h).double()
    np.testing.assert_allclose(reduced @ reduced.T - (full @ full.T), 0, atol=1e-5 * float((full @ full.T).abs().max()))


def test_a_full_rank_head_is_left_alone(tiny_bert_path):
    model, tokenizer, _ = load_model_and_tokenizer(str(tiny_bert_path), "encoder")
    adapter = EncoderHead(model, tokenizer, n_classes=3, head_seed=1)
    assert combined_head(adapter.head) is None
    ex = adapter.tokenize(TEXTS)
    out = summed_kernel(adapter, ex[:6], ex[6:], lambda: compute_ntk(adapter, ex[:6], ex[6:], trainable="top:1",
                                                                      kernel="sum", max_memory="256MiB", progress=False))
    assert "combined_logits" not in out.info


@pytest.mark.parametrize("trainable", ["top:1", "head-only"])
@pytest.mark.parametrize("sketch", [0, 16])
def test_combined_logits_give_the_per_class_kernels_sum(adapter, trainable, sketch):
    """Against the four per-class kernels (one backward each), summed: the head's missing share included. At k = 16
    the blocks' 32 x 32 and 32 x 37 weights are sketched (the same draw for both), the 4 x 32 head is not."""
    ex = adapter.tokenize(TEXTS)
    train, test = ex[:6], ex[6:]

    def compute(kernel):
        if sketch:
            return compute_sketched_ntk(adapter, train, test, sketch=sketch, sketch_seed=5, trainable=trainable,
                                        kernel=kernel, max_memory="256MiB", batch_size=4, test_diagonal=True,
                                        progress=False)
        return compute_ntk(adapter, train, test, trainable=trainable, kernel=kernel, max_memory="256MiB",
                           batch_size=4, test_diagonal=True, progress=False)

    reference = compute("per-class")
    out = summed_kernel(adapter, train, test, lambda: compute("sum"))
    assert out.info["combined_logits"] == 3 and out.info["logits"] == 4
    assert adapter.head.out_features == 4  # the adapter's own head is back
    assert out.n_trainable == reference.n_trainable and out.trainable_names == reference.trainable_names
    scale = np.abs(reference.k_train).max()
    np.testing.assert_allclose(out.k_train, reference.k_train.sum(0), atol=2e-6 * scale)
    np.testing.assert_allclose(out.k_test, reference.k_test.sum(0), atol=2e-6 * scale)
    np.testing.assert_allclose(out.test_diag, reference.test_diag.sum(0), atol=2e-6 * scale)


def test_the_builder_sums_the_fitted_heads_logits_with_one_pass_fewer(tiny_bert_path):
    """``--head fit`` on three classes: the summed kernel comes from two combined logits and equals the fitted
    head's per-class kernels summed."""
    names = ["c0", "c1", "c2"]
    train = TextDataset(TEXTS[:6], [names[i % 3] for i in range(6)], [f"tr{i}" for i in range(6)])
    test = TextDataset(TEXTS[6:], names, ["te0", "te1", "te2"])
    logs = []
    config = NTKConfig(model=str(tiny_bert_path), trainable="top:1", head="fit", max_memory="256MiB")
    summed = build_kernel(train, test, config, progress=False, log=logs.append)
    assert any("2 combined logit(s) instead of 3" in line for line in logs)
    per_class = build_kernel(train, test, NTKConfig(model=str(tiny_bert_path), trainable="top:1", head="fit",
                                                    kernel="per-class", max_memory="256MiB"),
                             progress=False, log=lambda m: None)
    scale = np.abs(summed.k_train).max()
    np.testing.assert_allclose(summed.k_train, per_class.k_train.sum(0), atol=2e-6 * scale)
    np.testing.assert_allclose(summed.k_test, per_class.k_test.sum(0), atol=2e-6 * scale)

