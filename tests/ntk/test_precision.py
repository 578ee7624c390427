"""bf16 passes (``--precision``): the fp32 kernel within bf16 rounding on every gradient path, still a Gram
matrix, recorded in the manifest and the cache key, and ``auto`` resolved from the device."""

import dataclasses

import numpy as np
import pytest
import torch

from freeshap_dq import InputError
from freeshap_dq.data.tables import TextDataset
from freeshap_dq.ntk.adapters import CausalLM, EncoderHead, PromptMLM
from freeshap_dq.ntk.blocked import compute_ntk_blocks
from freeshap_dq.ntk.builder import NTKConfig, build_kernel, cache_key, kernel_manifest
from freeshap_dq.ntk.compute import compute_ntk
from freeshap_dq.ntk.models import load_model_and_tokenizer
from freeshap_dq.ntk.precision import native_bf16, passes, resolve_precision
from freeshap_dq.ntk.setup import prepare
from freeshap_dq.ntk.sketch import compute_sketched_ntk

TEXTS = ["a great movie", "a boring film and a dull plot that goes on", "it was bad", "very good indeed",
         "the actors are funny", "terrible", "i loved every minute of it", "long and tedious"]
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def adapter(tiny_bert_path):
    model, tokenizer, _ = load_model_and_tokenizer(str(tiny_bert_path), "encoder")
    return EncoderHead(model, tokenizer, n_classes=3, head_seed=1)


def rows(out) -> np.ndarray:
    return np.concatenate([out.k_train, out.k_test], axis=-2)


def relative(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def exact(adapter, precision, **kwargs):
    ex = adapter.tokenize(TEXTS)
    return compute_ntk(adapter, ex[:5], ex[5:], max_memory="256MiB", progress=False, precision=precision, **kwargs)


@pytest.mark.parametrize(("trainable", "kernel", "gradients"), [
    ("top:1", "class0", "auto"), ("top:2", "sum", "auto"), ("top:1", "per-class", "auto"), ("top:1", "sum", "vmap"),
    ("all", "class0", "auto"),  # the word table, summed sparsely from its factors
])
def test_bf16_passes_give_the_fp32_kernel_within_bf16_rounding(adapter, trainable, kernel, gradients):
    """Different (the passes really ran in bf16), by about bf16's rounding (2^-9 per product input), and the train
    block still a symmetric positive semidefinite Gram matrix."""
    fp32 = exact(adapter, "fp32", trainable=trainable, kernel=kernel, gradients=gradients)
    bf16 = exact(adapter, "bf16", trainable=trainable, kernel=kernel, gradients=gradients)
    assert bf16.info["precision"] == "bf16" and fp32.info["precision"] == "fp32"
    assert 1e-5 < relative(rows(bf16), rows(fp32)) < 1e-2
    for k in bf16.k_train if kernel == "per-class" else [bf16.k_train]:
        np.testing.assert_allclose(k, k.T)
        assert np.linalg.eigvalsh(k).min() > -1e-9 * np.trace(k)


def test_bf16_sketch_is_the_fp32_sketch_within_bf16_rounding(adapter):
    ex = adapter.tokenize(TEXTS)
    run = lambda precision: compute_sketched_ntk(adapter, ex[:5], ex[5:], sketch=4, sketch_seed=3,  # noqa: E731
                                                 trainable="top:2", kernel="sum", max_memory="256MiB",
                                                 batch_size=3, progress=False, precision=precision)
    fp32, bf16 = run("fp32"), run("bf16")
    assert bf16.info["precision"] == "bf16"
    assert 1e-5 < relative(rows(bf16), rows(fp32)) < 1e-2


def test_kernel_folder_blocks_take_the_precision(adapter):
    ex = adapter.tokenize(TEXTS)
    k_train, k_test = np.zeros((5, 5)), np.zeros((3, 5))
    compute_ntk_blocks(adapter, ex[:5], ex[5:], k_train, k_test, trainable="top:1", max_memory="256MiB",
                       example_block=3, progress=False, precision="bf16")
    assert 1e-5 < relative(np.vstack([k_train, k_test]), rows(exact(adapter, "fp32", trainable="top:1"))) < 1e-2


def test_bf16_prompt_mlm_with_a_trainable_word_table(tiny_bert_path):
    model, tokenizer, _ = load_model_and_tokenizer(str(tiny_bert_path), "mlm")
    mlm = PromptMLM(model, tokenizer, 2, ["bad", "good"], template="{text} it was {mask} .")
    ex = mlm.tokenize(TEXTS)
    run = lambda precision: compute_ntk(mlm, ex[:5], ex[5:], trainable="freeze:1", max_memory="256MiB",  # noqa: E731
                                        progress=False, precision=precision)
    assert 1e-5 < relative(rows(run("bf16")), rows(run("fp32"))) < 1e-2


def test_bf16_causal_lm_with_rms_norms(tiny_llama_path):
    """Llama's RMS norms compute in fp32 under autocast; their factors are formed in the norm's own dtype."""
    model, tokenizer, _ = load_model_and_tokenizer(str(tiny_llama_path), "causal")
    causal = CausalLM(model, tokenizer, 2, ["bad", "great"], template="review : {text} it was", max_length=16)
    ex = causal.tokenize(TEXTS)
    run = lambda precision: compute_ntk(causal, ex[:5], ex[5:], trainable="top:1", max_memory="256MiB",  # noqa: E731
                                        progress=False, precision=precision)
    fp32, bf16 = run("fp32"), run("bf16")
    assert fp32.info["gradients"] == bf16.info["gradients"] == "factors"
    assert 1e-5 < relative(rows(bf16), rows(fp32)) < 1e-2


def test_auto_is_bf16_exactly_where_the_device_multiplies_it_natively(monkeypatch):
    assert resolve_precision("fp32", CPU) == "fp32" and resolve_precision("bf16", CPU) == "bf16"
    assert resolve_precision("auto", CPU) == ("bf16" if native_bf16(CPU) else "fp32")
    for amx, expected in ((True, "bf16"), (False, "fp32")):  # a CPU with and without AMX
        monkeypatch.setattr(torch.cpu, "get_capabilities", lambda amx=amx: {"amx_bf16": amx})
        assert resolve_precision("auto", CPU) == expected
    if not torch.cuda.is_available():
        assert not native_bf16(torch.device("cuda"))


def test_the_passes_run_under_bf16_autocast_and_fp32_under_none():
    layer = torch.nn.Linear(4, 3)
    with passes("bf16", CPU):
        assert layer(torch.ones(2, 4)).dtype == torch.bfloat16
    with passes("fp32", CPU):
        assert layer(torch.ones(2, 4)).dtype == torch.float32


def test_the_eNTK_refuses_an_unresolved_precision(adapter):
    ex = adapter.tokenize(TEXTS)
    for given in ("auto", "fp16"):
        with pytest.raises(InputError, match="precision"):
            prepare(adapter, ex[:5], "head-only", "class0", "256MiB", CPU, given)
    with pytest.raises(InputError, match="precision 'fp16' is unknown; choose one of auto, fp32, bf16"):
        NTKConfig(precision="fp16")


TRAIN = TextDataset(TEXTS[:6], ["pos", "neg", "neg", "pos", "pos", "neg"], [f"tr{i}" for i in range(6)])
TEST = TextDataset(TEXTS[6:], ["pos", "neg"], ["te0", "te1"])


def test_precision_is_in_the_manifest_and_the_cache_key(tmp_path, tiny_bert_path, monkeypatch):
    """fp32 keeps the keys of the kernels cached before the option; bf16 gets its own; auto is cached under what it
    stands for on the device."""
    config = NTKConfig(model=str(tiny_bert_path), trainable="top:1", head="random", max_memory="256MiB",
                       device="cpu")
    before = kernel_manifest(config, "fingerprint", TRAIN, TEST, ("neg", "pos"))
    assert "precision" not in before and before["gradient_dtype"] == "float32"
    low = kernel_manifest(dataclasses.replace(config, precision="bf16"), "fingerprint", TRAIN, TEST, ("neg", "pos"))
    assert low["precision"] == "bf16" and low["gradient_dtype"] == "bfloat16" and cache_key(low) != cache_key(before)

    logs: list[str] = []
    fp32, fp32_manifest = build_kernel(TRAIN, TEST, config, cache_dir=tmp_path, progress=False, log=logs.append,
                                       return_manifest=True)
    bf16, bf16_manifest = build_kernel(TRAIN, TEST, dataclasses.replace(config, precision="bf16"), cache_dir=tmp_path,
                                       progress=False, log=logs.append, return_manifest=True)
    assert "cached" not in logs[-1] and "bf16 passes" in " ".join(logs)
    assert bf16_manifest["precision"] == "bf16" and "precision" not in fp32_manifest
    assert 1e-5 < relative(bf16.k_train, fp32.k_train) < 1e-2
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: {"amx_bf16": True})  # a CPU with AMX
    logs.clear()
    auto = build_kernel(TRAIN, TEST, dataclasses.replace(config, precision="auto"), cache_dir=tmp_path,
                        progress=False, log=logs.append)
    assert "cached" in logs[-1] and "auto: this device multiplies bf16 natively" in logs[0]
    np.testing.assert_array_equal(auto.k_train, bf16.k_train)
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: {"amx_bf16": False})  # and one without
    logs.clear()
    auto = build_kernel(TRAIN, TEST, dataclasses.replace(config, precision="auto"), cache_dir=tmp_path,
                        progress=False, log=logs.append)
    assert "cached" in logs[-1] and "no native bf16" in logs[0]
    np.testing.assert_array_equal(auto.k_train, fp32.k_train)
    logs.clear()
    build_kernel(TRAIN, TEST, dataclasses.replace(config, precision="bf16"), cache_dir=tmp_path, progress=False,
                 log=logs.append)
    assert "emulated, they are slower than fp32" in logs[0]  # asked for on a device without them: said, and done
