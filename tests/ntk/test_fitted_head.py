"""--head fit: the head is a logistic regression on the frozen pooled embeddings, fitted to the training labels."""

import json
import warnings

import numpy as np
import pytest
import torch
from test_compute import autograd_kernel

from freeshap_dq import InputError
from freeshap_dq.data.tables import TextDataset
from freeshap_dq.ntk.builder import NTKConfig, build_adapter, build_kernel
from freeshap_dq.ntk.compute import representations
from freeshap_dq.ntk.fitted_head import FIT_CS, fit_head_weights, fit_warning, resolve_kernel_mode

TEXTS = ["a great movie", "a dull plot", "it was great", "it was bad", "very good", "terrible", "loved it",
         "boring and long", "funny and clever", "a mess", "brilliant", "tedious"]


def blobs(n_classes: int, n: int = 120, dim: int = 6, seed: int = 0):
    rng = np.random.default_rng(seed)
    y = np.arange(n) % n_classes
    centres = rng.normal(size=(n_classes, dim)) * 2
    x = centres[y] + rng.normal(size=(n, dim)) * np.linspace(0.5, 3, dim) + 10
    return x, y


def reference_probabilities(x, y):
    """sklearn's own fit on standardised features: what the head must reproduce on raw ones."""
    from sklearn.linear_model import LogisticRegressionCV
    from sklearn.model_selection import StratifiedKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    model = make_pipeline(StandardScaler(), LogisticRegressionCV(Cs=list(FIT_CS), cv=StratifiedKFold(
        5, shuffle=True, random_state=0), max_iter=3000))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return model.fit(x, y).predict_proba(x)


@pytest.mark.parametrize("n_classes", [2, 3, 4])
def test_head_reproduces_the_fitted_logistic_regression_on_raw_embeddings(n_classes):
    x, y = blobs(n_classes)
    weight, bias, info = fit_head_weights(x, y, n_classes)
    logits = x @ weight.T + bias
    probs = reference_probabilities(x, y)
    if n_classes == 2:  # the class-0 logit is the logit difference log p0 / p1
        np.testing.assert_allclose(logits[:, 0], np.log(probs[:, 0] / probs[:, 1]), atol=1e-6)
        np.testing.assert_allclose(logits[:, 1], -logits[:, 0])
    else:  # multinomial rows, centred
        shifted = np.exp(logits - logits.max(1, keepdims=True))
        np.testing.assert_allclose(shifted / shifted.sum(1, keepdims=True), probs, atol=1e-6)
        np.testing.assert_allclose(weight.sum(0), 0, atol=1e-8)
    assert info["C"] in FIT_CS and info["folds"] == 5 and 0.5 < info["cv_accuracy"] <= 1


def test_a_constant_coordinate_does_not_blow_up_the_head():
    x, y = blobs(2)
    constant = np.hstack([x, np.full((len(x), 1), 0.3) + np.random.default_rng(1).normal(size=(len(x), 1)) * 1e-30])
    weight, _, _ = fit_head_weights(constant, y, 2)
    reference, _, _ = fit_head_weights(x, y, 2)
    assert np.all(np.isfinite(weight)) and abs(weight[0, -1]) < 1e-6
    np.testing.assert_allclose(weight[:, :-1], reference, rtol=1e-6, atol=1e-9)


def test_too_few_examples_of_a_class_is_refused():
    x, y = blobs(2, n=20)
    y[y == 1] = 0
    y[0] = 1
    with pytest.raises(InputError, match="at least 2 training examples of every class"):
        fit_head_weights(x, y, 2)


def test_a_fit_that_makes_a_poor_kernel_is_named():
    x, y = blobs(2)
    assert fit_warning(fit_head_weights(x, y, 2)[2]) is None
    noise = np.random.default_rng(3).normal(size=x.shape)
    _, _, info = fit_head_weights(noise, np.random.default_rng(4).permutation(y), 2)
    assert "no better than always answering the most frequent class" in fit_warning(info)
    weak = {**info, "cv_accuracy": 0.7, "majority_share": 0.5, "C": FIT_CS[0]}
    assert "strongest regularisation" in fit_warning(weak) and "head-only" in fit_warning(weak)
    assert fit_warning({**weak, "C": FIT_CS[3]}) is None


def test_the_builder_warns_when_the_labels_cannot_be_fitted(tiny_bert_path):
    """Ten copies of one text with alternating labels: no head can beat the majority class."""
    train = TextDataset(["a great movie"] * 10, ["c0", "c1"] * 5, [f"tr{i}" for i in range(10)])
    test = TextDataset(TEXTS[:2], ["c0", "c1"], ["te0", "te1"])
    logs = []
    build_kernel(train, test, NTKConfig(model=str(tiny_bert_path), trainable="top:1", head="fit",
                                        max_memory="256MiB"), progress=False, log=logs.append)
    assert any(line.startswith("warning: the fitted head predicts the training labels no better") for line in logs)


def test_kernel_mode_auto():
    assert resolve_kernel_mode("auto", True, 2) == "class0"
    assert resolve_kernel_mode("auto", True, 4) == "sum"
    assert resolve_kernel_mode("auto", False, 4) == "class0"
    assert resolve_kernel_mode("per-class", True, 4) == "per-class"


def dataset(n_classes: int, labels=None) -> tuple[TextDataset, TextDataset]:
    names = [f"c{i}" for i in range(n_classes)]
    labels = labels or [names[i % n_classes] for i in range(10)]
    return (TextDataset(TEXTS[:10], labels, [f"tr{i}" for i in range(10)]),
            TextDataset(TEXTS[10:], names[:2], ["te0", "te1"]))


@pytest.mark.parametrize("n_classes", [2, 3])
def test_fitted_head_kernel_equals_autograd_with_that_head(tmp_path, tiny_bert_path, n_classes):
    train, test = dataset(n_classes)
    config = NTKConfig(model=str(tiny_bert_path), trainable="top:1", head="fit", max_memory="256MiB")
    problem, manifest = build_kernel(train, test, config, cache_dir=tmp_path, progress=False, log=lambda m: None,
                                     return_manifest=True)
    assert manifest["head"] == "fit" and manifest["kernel"] == ("class0" if n_classes == 2 else "sum")
    assert manifest["head_fit"]["fitted_on"] == "the training labels given"

    adapter, _ = build_adapter(config, problem.label_names)
    features = representations(adapter, adapter.tokenize(train.texts))
    weight, bias, _ = fit_head_weights(features, problem.y_train, n_classes)
    with torch.no_grad():
        adapter.head.weight.copy_(torch.as_tensor(weight))
        adapter.head.bias.copy_(torch.as_tensor(bias))
    names = manifest["trainable_names"]
    reference = autograd_kernel(adapter, TEXTS, None, names, 10, classes=(0,) if n_classes == 2 else range(n_classes))
    full = np.vstack([problem.k_train, problem.k_test])
    assert np.abs(full - reference).max() / np.abs(reference).max() < 1e-5

    random = build_kernel(train, test, NTKConfig(model=str(tiny_bert_path), trainable="top:1", head="random",
                                                 max_memory="256MiB"),
                          progress=False, log=lambda m: None)
    assert np.abs(random.k_train - problem.k_train).max() > 1e-3 * np.abs(problem.k_train).max()


def test_the_kernel_belongs_to_its_labels(tmp_path, tiny_bert_path):
    """A fitted head's kernel depends on the labels: another labelling is another cache entry and another kernel."""
    config = NTKConfig(model=str(tiny_bert_path), trainable="top:1", head="fit", max_memory="256MiB")
    train, test = dataset(2)
    relabelled = TextDataset(train.texts, ["c1", "c0", *train.labels[2:]], train.ids)
    first = build_kernel(train, test, config, cache_dir=tmp_path, progress=False, log=lambda m: None)
    second = build_kernel(relabelled, test, config, cache_dir=tmp_path, progress=False, log=lambda m: None)
    assert len(list(tmp_path.glob("*.json"))) == 2
    assert np.abs(first.k_train - second.k_train).max() > 1e-6 * np.abs(first.k_train).max()
    logs = []
    again = build_kernel(train, test, config, cache_dir=tmp_path, progress=False, log=logs.append)
    assert "cached" in logs[-1]
    np.testing.assert_array_equal(again.k_train, first.k_train)
    manifests = [json.loads(p.read_text()) for p in tmp_path.glob("*.json")]
    assert all(m["head"] == "fit" and "C" in m["head_fit"] for m in manifests)


def test_head_fit_is_for_the_encoder_head():
    with pytest.raises(InputError, match="--head is for the encoder-head adapter"):
        NTKConfig(adapter="sequence-classifier", head="random")
    with pytest.raises(InputError, match="--head-seed seeds the random head"):
        NTKConfig(head_seed=2)
    with pytest.raises(InputError, match="head"):
        NTKConfig(head="trained")


def test_a_checkpoints_own_head_is_never_refitted_and_keeps_the_class0_kernel(tmp_path):
    """The default --head fit is for the encoder head: a sequence classifier over 3 classes keeps its own head and
    the class-0 kernel (a first version resolved --kernel-mode auto to sum for it)."""
    from tiny_models import tiny_classifier

    path = tiny_classifier(tmp_path / "clf", "bert", id2label={0: "c0", 1: "c1", 2: "c2"})
    train, test = dataset(3)
    config = NTKConfig(model=str(path), trainable="head-only", max_memory="256MiB")
    assert not config.labels_shape_the_kernel
    _, manifest = build_kernel(train, test, config, progress=False, log=lambda m: None, return_manifest=True)
    assert manifest["adapter"] == "sequence-classifier" and manifest["kernel"] == "class0"
    assert "head_fit" not in manifest
