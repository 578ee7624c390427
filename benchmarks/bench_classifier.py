"""eNTK of fine-tuned sequence classifiers, per architecture: the fast path against two baselines, same run.

For each architecture a small random ``<Arch>ForSequenceClassification`` (hidden 128, ``--layers`` blocks, built
from a config: no download) and N short texts; trainable top:1 (the last block and the classifier):

  (a) fast path: the frozen bottom computed once (where its replay matches), per-example gradients from
      factors (one batched forward and backward per class through the top);
  (b) fallback: ``gradients='vmap'``, which for these models is the per-example loop (their own mask code
      cannot run under vmap) - what any module outside the factor rules gets;
  (c) naive: a plain autograd loop, one backward per example, then J J^T.

Kernels (a) and (b) are compared with (c). Usage: python benchmarks/bench_classifier.py [--n 96]
Prints a Markdown table; docs/benchmarks.md records a run with the machine it ran on.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from tiny_models import train_wordpiece  # noqa: E402

from freeshap_dq.ntk.builder import NTKConfig, build_adapter  # noqa: E402
from freeshap_dq.ntk.compute import compute_ntk  # noqa: E402
from freeshap_dq.ntk.setup import select_trainable  # noqa: E402

ARCHITECTURES = ("bert", "roberta", "distilbert", "electra", "deberta-v2", "gpt2", "llama")
WORDS = ["a", "great", "movie", "dull", "plot", "it", "was", "bad", "very", "good", "i", "loved", "every", "minute"]


def build(folder: Path, architecture: str, layers: int) -> Path:
    import transformers as tf

    tok = train_wordpiece(folder)
    common = dict(vocab_size=len(tok), pad_token_id=tok.pad_token_id, num_labels=2, id2label={0: "neg", 1: "pos"},
                  label2id={"neg": 0, "pos": 1})
    enc = dict(hidden_size=128, num_hidden_layers=layers, num_attention_heads=4, intermediate_size=256,
               max_position_embeddings=80, **common)
    model = {
        "bert": lambda: tf.BertForSequenceClassification(tf.BertConfig(**enc)),
        "roberta": lambda: tf.RobertaForSequenceClassification(tf.RobertaConfig(**{**enc, "max_position_embeddings": 96})),
        "electra": lambda: tf.ElectraForSequenceClassification(tf.ElectraConfig(embedding_size=64, **enc)),
        "deberta-v2": lambda: tf.DebertaV2ForSequenceClassification(tf.DebertaV2Config(
            relative_attention=True, position_biased_input=False, pos_att_type=["p2c", "c2p"], **enc)),
        "distilbert": lambda: tf.DistilBertForSequenceClassification(tf.DistilBertConfig(
            dim=128, n_layers=layers, n_heads=4, hidden_dim=256, max_position_embeddings=80, **common)),
        "gpt2": lambda: tf.GPT2ForSequenceClassification(tf.GPT2Config(n_embd=128, n_layer=layers, n_head=4, n_positions=80,
                                                                        **common)),
        "llama": lambda: tf.LlamaForSequenceClassification(tf.LlamaConfig(
            hidden_size=128, intermediate_size=256, num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=80, **common)),
    }[architecture]()
    model.save_pretrained(folder)
    return folder


def naive(adapter, examples, names) -> np.ndarray:
    params = dict(adapter.named_parameters())
    rows = []
    for name in names:
        params[name].requires_grad_(True)
    for e in examples:
        ids = torch.tensor([e["input_ids"]])
        types = torch.tensor([e.get("token_type_ids", [0] * ids.shape[1])])
        logit = adapter(torch.stack([ids, types], -1), torch.ones_like(ids))[0, 0]
        grads = torch.autograd.grad(logit, [params[n] for n in names], allow_unused=True)
        rows.append(torch.cat([torch.zeros(params[n].numel()) if g is None else g.reshape(-1)
                               for n, g in zip(names, grads, strict=True)]))
    for name in names:
        params[name].requires_grad_(False)
    jac = torch.stack(rows).double()
    return (jac @ jac.T).numpy()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=96, help="Examples (all rows of the kernel).")
    parser.add_argument("--layers", type=int, default=8, help="Blocks of each model (top:1 is trainable).")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    texts = [" ".join(rng.choice(WORDS, int(rng.integers(6, 14)))) for _ in range(args.n)]
    torch.manual_seed(0)
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        for arch in ARCHITECTURES:
            path = build(Path(scratch) / arch, arch, args.layers)
            adapter, _ = build_adapter(NTKConfig(model=str(path), adapter="sequence-classifier"), ("neg", "pos"),
                                       log=lambda message: None)
            examples = adapter.tokenize(texts)
            names = select_trainable(adapter, "top:1")
            timed = {}
            for label, gradients in (("fast", "factors"), ("fallback", "vmap")):
                started = time.perf_counter()
                out = compute_ntk(adapter, examples, [], trainable="top:1", max_memory="2GiB", gradients=gradients)
                timed[label] = (time.perf_counter() - started, out.k_train)
                if label == "fast":
                    unfactored = len(out.info["without_factors"])
                    factor_mib = out.info["factor_bytes"] / 2**20
            started = time.perf_counter()
            reference = naive(adapter, examples, names)
            naive_seconds = time.perf_counter() - started
            error = max(float(np.max(np.abs(k - reference)) / np.max(np.abs(reference))) for _, k in timed.values())
            n_params = sum(dict(adapter.named_parameters())[k].numel() for k in names)
            rows.append((arch, n_params, timed["fast"][0], timed["fallback"][0], naive_seconds, error,
                         unfactored, factor_mib))
    print(f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}; "
          f"n = {args.n} texts of 6-14 words, trainable top:1 of {args.layers} blocks (hidden 128), class-0 kernel\n")
    print("| architecture | trainable params | fast path (s) | per-example loop (s) | naive autograd loop (s) | "
          "fast vs naive | max rel. difference | tensors without a factor rule | factor memory (MiB) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for arch, n_params, fast, fallback, naive_s, error, unfactored, factor_mib in rows:
        print(f"| {arch} | {n_params:,} | {fast:.2f} | {fallback:.2f} | {naive_s:.2f} | {naive_s / fast:.1f}x | "
              f"{error:.1e} | {unfactored} | {factor_mib:.1f} |")


if __name__ == "__main__":
    main()
