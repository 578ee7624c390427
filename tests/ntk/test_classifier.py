"""The sequence-classifier adapter: the eNTK of a fine-tuned checkpoint's own logits, on every architecture."""

import numpy as np
import pytest
import torch
from tiny_models import CLASSIFIER_ARCHITECTURES, tiny_classifier

from freeshap_dq.errors import InputError
from freeshap_dq.ntk.builder import NTKConfig, build_adapter, resolve_adapter
from freeshap_dq.ntk.compute import compute_ntk
from freeshap_dq.ntk.setup import select_trainable

TEXTS = ["a great movie", "a dull plot and a mess", "it was great", "terrible", "i loved every minute of it",
         "long and tedious", "brilliant"]
LABELS = ("neg", "pos")


@pytest.fixture(scope="module", params=CLASSIFIER_ARCHITECTURES)
def classifier(request, tmp_path_factory):
    path = tiny_classifier(tmp_path_factory.mktemp(request.param), request.param)
    adapter, _ = build_adapter(NTKConfig(model=str(path), adapter="sequence-classifier"), LABELS, log=lambda m: None)
    return request.param, path, adapter


def autograd_kernel(adapter, examples, names, classes):
    """K[i, j] = sum over classes of <d f_c(x_i) / d theta, d f_c(x_j) / d theta>, by a plain loop."""
    params = dict(adapter.named_parameters())
    rows = []
    for example in examples:
        ids = torch.tensor([example["input_ids"]])
        types = torch.tensor([example.get("token_type_ids", [0] * ids.shape[1])])
        for name in names:
            params[name].requires_grad_(True)
        logits = adapter(torch.stack([ids, types], -1), torch.ones_like(ids))
        per_class = []
        for c in classes:  # a parameter the logit does not use (DeBERTa's unused projections) has gradient 0
            grads = torch.autograd.grad(logits[0, c], [params[n] for n in names], retain_graph=True, allow_unused=True)
            per_class.append(torch.cat([torch.zeros(params[n].numel()) if g is None else g.reshape(-1)
                                        for n, g in zip(names, grads, strict=True)]))
        for name in names:
            params[name].requires_grad_(False)
        rows.append(torch.stack(per_class))
    jac = torch.stack(rows).double()  # (N, C, P)
    return torch.einsum("icp,jcp->ij", jac, jac).numpy()


@pytest.mark.parametrize("trainable", ["head-only", "top:1", "all"])
def test_kernel_equals_a_plain_autograd_loop_over_the_models_own_logits(classifier, trainable):
    name, _, adapter = classifier
    train = adapter.tokenize(TEXTS[:5])
    test = adapter.tokenize(TEXTS[5:])
    names = select_trainable(adapter, trainable)
    for mode, classes in (("class0", [0]), ("sum", [0, 1])):
        out = compute_ntk(adapter, train, test, trainable=trainable, kernel=mode, max_memory="256MiB")
        expected = autograd_kernel(adapter, train + test, names, classes)
        np.testing.assert_allclose(out.k_train, expected[:5, :5], rtol=2e-4, atol=1e-6, err_msg=f"{name} {mode}")
        np.testing.assert_allclose(out.k_test, expected[5:, :5], rtol=2e-4, atol=1e-6, err_msg=f"{name} {mode}")
        np.testing.assert_allclose(out.k_train, out.k_train.T, rtol=1e-10, atol=1e-12)
    again = compute_ntk(adapter, train, test, trainable=trainable, kernel="class0", max_memory="256MiB")
    first = compute_ntk(adapter, train, test, trainable=trainable, kernel="class0", max_memory="256MiB")
    np.testing.assert_array_equal(first.k_train, again.k_train)  # deterministic
    per_class = compute_ntk(adapter, train, test, trainable=trainable, kernel="per-class", max_memory="256MiB")
    np.testing.assert_allclose(per_class.k_train[0], again.k_train, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(per_class.k_train[1], autograd_kernel(adapter, train, names, [1]), rtol=2e-4,
                               atol=1e-6)


def test_trainable_keeps_its_meaning_on_every_architecture(classifier):
    name, _, adapter = classifier
    head = select_trainable(adapter, "head-only")
    assert head and all(not n.startswith(adapter.base_prefix) for n in head), name  # the model's own classifier
    top1 = set(select_trainable(adapter, "top:1"))
    assert set(head) < top1 and all(n in head or n.startswith(f"{adapter.layers_prefix}1.") for n in top1), name
    assert adapter.n_layers == 2


def test_the_checkpoints_head_is_picked_automatically_and_the_reason_recorded(classifier):
    _, path, _ = classifier
    config, why = resolve_adapter(NTKConfig(model=str(path)))
    assert config.adapter == "sequence-classifier" and "has a classification head" in why


def test_labels_are_matched_by_name_generic_ones_by_index_and_a_mismatch_is_refused(tmp_path):
    path = tiny_classifier(tmp_path / "swapped", "bert", id2label={0: "pos", 1: "neg"})
    adapter, _ = build_adapter(NTKConfig(model=str(path), adapter="sequence-classifier"), LABELS, log=lambda m: None)
    assert adapter.class_order == [1, 0]  # the data's 'neg' is the model's logit 1
    example = adapter.tokenize(["a great movie"])[0]
    ids = torch.tensor([example["input_ids"]])
    prefix = torch.stack([ids, torch.tensor([example["token_type_ids"]])], -1)
    raw = adapter.model(input_ids=ids, token_type_ids=prefix[..., 1]).logits
    assert torch.allclose(adapter(prefix, torch.ones_like(ids)), raw[:, [1, 0]])
    generic = tiny_classifier(tmp_path / "generic", "bert", id2label={0: "LABEL_0", 1: "LABEL_1"})
    messages = []
    adapter, _ = build_adapter(NTKConfig(model=str(generic), adapter="sequence-classifier"), LABELS,
                               log=messages.append)
    assert adapter.class_order == [0, 1] and "mapping them by index" in messages[0]
    with pytest.raises(InputError, match=r"model's labels \(neg, pos\) are not the data's labels \(bad, good\)"):
        build_adapter(NTKConfig(model=str(path), adapter="sequence-classifier"), ("bad", "good"))
    with pytest.raises(InputError, match="2 output classes"):
        build_adapter(NTKConfig(model=str(path), adapter="sequence-classifier"), ("a", "b", "c"))


POSITIVE, NEGATIVE = ["great", "brilliant", "good", "loved"], ["terrible", "dull", "bad", "mess"]


def planted(n, seed):
    rng = np.random.default_rng(seed)
    labels = ["pos", "neg"] * (n // 2)
    texts = [" ".join([*rng.choice(POSITIVE if y == "pos" else NEGATIVE, 2), "movie", "plot"]) for y in labels]
    return texts, labels


def fine_tune(path, out, steps=40):
    """A few AdamW steps on planted data: the head and the top layer learn which words mean what."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path)
    texts, labels = planted(32, seed=1)
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    target = torch.tensor([model.config.label2id[y] for y in labels])
    torch.manual_seed(0)
    optimiser = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        optimiser.zero_grad()
        model(**batch, labels=target).loss.backward()
        optimiser.step()
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def test_a_fine_tuned_checkpoints_own_head_makes_a_better_kernel_than_the_pretrained_one(tmp_path):
    """Evidence that the model's own head is used: fine-tuning changes the eNTK and raises the held-out -CE (the
    planted words are single tokens, so even the pretrained kernel classifies them, but barely above chance
    confidence: -CE about -log 2), keeping accuracy at least 0.9."""
    import json

    import pandas as pd
    from click.testing import CliRunner

    from freeshap_dq.cli.main import cli

    pretrained = tiny_classifier(tmp_path / "pretrained", "bert")
    tuned = fine_tune(pretrained, tmp_path / "tuned")
    for name, n, seed in (("train", 24, 2), ("test", 40, 3)):
        texts, labels = planted(n, seed)
        pd.DataFrame({"id": [f"{name}{i}" for i in range(n)], "text": texts, "label": labels}).to_csv(
            tmp_path / f"{name}.csv", index=False)
    utility, kernels = {}, {}
    for name, model in (("pretrained", pretrained), ("tuned", tuned)):
        out = tmp_path / f"{name}.values.csv"
        res = CliRunner().invoke(cli, ["value", "--train", str(tmp_path / "train.csv"), "--test",
                                       str(tmp_path / "test.csv"), "--model", str(model), "--trainable", "head-only",
                                       "--permutations", "4", "-o", str(out), "--no-progress"])
        assert res.exit_code == 0, res.output
        assert "eNTK adapter sequence-classifier (auto:" in res.output
        manifest = json.loads(out.with_name(out.name + ".manifest.json").read_text())
        assert manifest["kernel"]["adapter"] == "sequence-classifier"
        assert "has a classification head" in manifest["kernel"]["settings"]["adapter_choice"]
        utility[name] = manifest["utility_full"]
        kernels[name] = manifest["kernel_fingerprint"]
    assert kernels["tuned"] != kernels["pretrained"]  # the fine-tuned weights make another eNTK
    assert utility["tuned"]["accuracy"] >= max(0.9, utility["pretrained"]["accuracy"]), utility
    assert utility["tuned"]["ce"] > utility["pretrained"]["ce"], utility


def test_encoder_head_options_are_refused_for_a_checkpoint_with_its_own_head(tmp_path):
    from freeshap_dq.ntk.builder import NTKConfig

    path = tiny_classifier(tmp_path / "bert", "bert")
    with pytest.raises(InputError, match="--pooling is for the encoder-head adapter"):
        resolve_adapter(NTKConfig(model=str(path), pooling="cls"))
    forced, why = resolve_adapter(NTKConfig(model=str(path), adapter="encoder-head", pooling="cls"))
    assert forced.adapter == "encoder-head" and why == "--adapter encoder-head was given"
    with pytest.raises(InputError, match="reads the fine-tuned model's own head"):
        NTKConfig(model=str(path), adapter="sequence-classifier", head_seed=3)


def test_a_module_outside_the_factor_rules_falls_back_and_says_so(tmp_path):
    """DeBERTa applies its position projections to the relative embeddings (no batch axis): no factor rule
    covers them, so their per-example gradients come from the per-example loop, and the output says so."""
    path = tiny_classifier(tmp_path / "deberta", "deberta-v2")
    adapter, _ = build_adapter(NTKConfig(model=str(path), adapter="sequence-classifier"), LABELS, log=lambda m: None)
    out = compute_ntk(adapter, adapter.tokenize(TEXTS[:4]), adapter.tokenize(TEXTS[4:]), trainable="top:1",
                      max_memory="256MiB")
    assert out.info["gradients"] == "factors" and out.info["fallback"] == "per-example loop"
    assert any("pos_key_proj" in name for name in out.info["without_factors"])
    import pandas as pd
    from click.testing import CliRunner

    from freeshap_dq.cli.main import cli

    pd.DataFrame({"text": TEXTS, "label": ["neg", "pos"] * 3 + ["neg"]}).to_csv(tmp_path / "d.csv", index=False)
    res = CliRunner().invoke(cli, ["value", "--train", str(tmp_path / "d.csv"), "--test", str(tmp_path / "d.csv"),
                                   "--model", str(path), "--trainable", "top:1", "--permutations", "3", "-o",
                                   str(tmp_path / "v.csv"), "--no-progress"])
    assert res.exit_code == 0 and "have no factor rule" in res.output and "per-example loop" in res.output
    assert "cannot be cached" in res.output, res.output


def test_the_vectors_the_models_own_head_reads(tmp_path):
    """evaluate's embedding baselines read the input of the head: for a fine-tuned BERT, its pooler's output."""
    from freeshap_dq.data.tables import TextDataset
    from freeshap_dq.ntk.builder import build_representations

    path = tiny_classifier(tmp_path / "bert", "bert")
    data = TextDataset(TEXTS[:4], ["neg", "pos"] * 2, [f"e{i}" for i in range(4)])
    vectors, = build_representations([data], NTKConfig(model=str(path)), LABELS)
    adapter, _ = build_adapter(NTKConfig(model=str(path), adapter="sequence-classifier"), LABELS, log=lambda m: None)
    for row, example in enumerate(adapter.tokenize(data.texts)):
        ids = torch.tensor([example["input_ids"]])
        pooled = adapter.model.bert(input_ids=ids, token_type_ids=torch.tensor([example["token_type_ids"]])).pooler_output
        np.testing.assert_allclose(vectors[row], pooled[0].double().numpy(), rtol=1e-5, atol=1e-6)
    assert "head.weight" not in dict(adapter.named_parameters())  # no second path to the head's parameters


def test_a_checkpoint_without_a_tokenizer_is_refused_before_any_work(tmp_path):
    import pandas as pd
    from click.testing import CliRunner

    from freeshap_dq.cli.main import cli

    path = tiny_classifier(tmp_path / "bert", "bert")
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        (path / name).unlink(missing_ok=True)
    pd.DataFrame({"text": TEXTS, "label": ["neg", "pos"] * 3 + ["neg"]}).to_csv(tmp_path / "d.csv", index=False)
    res = CliRunner().invoke(cli, ["value", "--train", str(tmp_path / "d.csv"), "--test", str(tmp_path / "d.csv"),
                                   "--model", str(path), "-o", str(tmp_path / "v.csv")])
    assert res.exit_code == 2 and "has no tokenizer" in res.output and "save_pretrained" in res.output, res.output
    assert "Traceback" not in res.output and not (tmp_path / "v.csv").exists()


def test_the_frozen_bottom_is_cached_where_its_replay_matches_and_switched_off_where_not(classifier):
    """top:1 of 2 blocks: block 0 runs once, without gradients; a model whose blocks hand on more than the
    hidden states (DeBERTa's relative attention) is detected on the first batch and runs whole, saying so."""
    from freeshap_dq.ntk.batching import pad_batch

    name, path, _ = classifier
    messages = []
    adapter, _ = build_adapter(NTKConfig(model=str(path), adapter="sequence-classifier"), LABELS, log=messages.append)
    adapter.set_trainable(set(select_trainable(adapter, "top:1")))
    assert adapter.first_trainable_layer == 1
    prefix = adapter.prefix(pad_batch(adapter.tokenize(TEXTS[:3]), adapter, "cpu"))
    if name == "deberta-v2":
        assert adapter.first_trainable_layer == -1 and prefix.shape[-1] == 2 and "cannot be cached" in messages[-1]
    else:
        assert adapter.first_trainable_layer == 1 and prefix.shape[-1] == 2 + 32, name  # ids, types, hidden 32
    adapter.set_trainable(set(select_trainable(adapter, "all")))
    assert adapter.first_trainable_layer == -1  # the embeddings are trainable: nothing to cache


@pytest.mark.parametrize("architecture", ["bert", "gpt2"])
def test_the_fallback_paths_give_the_same_kernel(tmp_path, architecture):
    """--gradients vmap on these models: the per-example loop for the dense parameters and for the word table's
    token-by-token share (each example without its padding: a decoder scores its last real token)."""
    path = tiny_classifier(tmp_path / architecture, architecture)
    adapter, _ = build_adapter(NTKConfig(model=str(path), adapter="sequence-classifier"), LABELS, log=lambda m: None)
    train, test = adapter.tokenize(TEXTS[:5]), adapter.tokenize(TEXTS[5:])  # different lengths: padded batches
    loop = compute_ntk(adapter, train, test, trainable="all", gradients="vmap", max_memory="256MiB")
    factors = compute_ntk(adapter, train, test, trainable="all", gradients="factors", max_memory="256MiB")
    expected = autograd_kernel(adapter, train + test, select_trainable(adapter, "all"), [0])
    for out in (loop, factors):
        np.testing.assert_allclose(out.k_train, expected[:5, :5], rtol=2e-4, atol=1e-6)
        np.testing.assert_allclose(out.k_test, expected[5:, :5], rtol=2e-4, atol=1e-6)
    assert adapter.word_table_name in dict(adapter.named_parameters())


class TinyTextClassifier(torch.nn.Module):
    """Not a transformers model: an embedding, PyTorch's own encoder blocks, mean pooling, a linear head."""

    def __init__(self, vocab: int, n_classes: int = 2):
        super().__init__()
        torch.manual_seed(0)
        self.embed = torch.nn.Embedding(vocab, 16)
        self.blocks = torch.nn.ModuleList([torch.nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
                                           for _ in range(2)])
        self.norm = torch.nn.LayerNorm(16)
        self.out = torch.nn.Linear(16, n_classes)

    def forward(self, input_ids, attention_mask):
        hidden = self.embed(input_ids)
        for block in self.blocks:
            hidden = block(hidden, src_key_padding_mask=attention_mask == 0)
        weights = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return self.out(self.norm((hidden * weights).sum(1) / weights.sum(1)))


@pytest.mark.parametrize("trainable", ["head-only", "top:1", "all"])
def test_any_module_classifier_gets_its_kernel_from_the_generic_path(tmp_path_factory, trainable):
    """PyTorch's attention reads ``out_proj.weight`` without calling ``out_proj``: a factor site that never runs
    must fall back to the loop (taking its gradient as zero gave a kernel 5-15 % off)."""
    from tiny_models import train_wordpiece

    from freeshap_dq.ntk.classifier import ModuleClassifier

    tokenizer = train_wordpiece(tmp_path_factory.mktemp("tok"))
    module = TinyTextClassifier(len(tokenizer)).eval()
    for p in module.parameters():
        p.requires_grad_(False)
    adapter = ModuleClassifier(module, tokenizer, 2)
    train, test = adapter.tokenize(TEXTS[:5]), adapter.tokenize(TEXTS[5:])
    names = select_trainable(adapter, trainable)
    assert set(select_trainable(adapter, "head-only")) == {"model.out.weight", "model.out.bias"}
    out = compute_ntk(adapter, train, test, trainable=trainable, kernel="sum", max_memory="256MiB")
    expected = autograd_kernel(adapter, train + test, names, [0, 1])
    scale = np.abs(expected).max()  # float32 gradients: entries near zero are exact to the kernel's scale, not their own
    np.testing.assert_allclose(out.k_train, expected[:5, :5], rtol=2e-4, atol=1e-6 * scale)
    np.testing.assert_allclose(out.k_test, expected[5:, :5], rtol=2e-4, atol=1e-6 * scale)
    if trainable != "head-only":  # PyTorch's attention keeps its projections as bare parameters: the loop takes them
        assert any("in_proj_weight" in name for name in out.info["without_factors"])
