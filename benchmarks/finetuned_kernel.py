"""Does the eNTK of a *fine-tuned* classifier find wrong labels better than the pretrained kernel?

Rotten Tomatoes (n = 1,000, m = 300, the evaluation harness's split), symmetric noise 10%, per seed:

1. flip the labels (the harness's ``flip_labels``);
2. fine-tune MiniLM + a classification head (``AutoModelForSequenceClassification``) on the *noisy* training
   labels, a short CPU run (``--epochs``, AdamW, lr 5e-5, batch 32): the "after kernel", whose weights saw the
   noise it is asked to find;
3. eNTK of the fine-tuned model's own logits (the sequence-classifier adapter, top:2) and of the pretrained
   encoder-head kernel (top:2, seeded head), both valued with the harness's detectors on the same noisy labels.

Reports AUROC of FreeShap -CE, LOO and self-confidence, and the clean test accuracy of kernel regression, per
seed and kernel. Usage: python benchmarks/finetuned_kernel.py [--seeds 0,1,2] [--epochs 1] [--permutations 200]
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from freeshap_dq.config import ValuationConfig  # noqa: E402
from freeshap_dq.data.datasets import rotten_tomatoes  # noqa: E402
from freeshap_dq.data.tables import TextDataset, encode_labels, label_mapping  # noqa: E402
from freeshap_dq.evaluation.detectors import run_detectors  # noqa: E402
from freeshap_dq.evaluation.metrics import auroc  # noqa: E402
from freeshap_dq.evaluation.noise import flip_labels  # noqa: E402
from freeshap_dq.ntk.builder import NTKConfig, build_kernel  # noqa: E402
from freeshap_dq.ntk.models import resolve_model_path  # noqa: E402


def fine_tune(texts, labels, names, out: Path, epochs: int, seed: int) -> Path:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    base = resolve_model_path("minilm")
    tokenizer = AutoTokenizer.from_pretrained(base)
    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_pretrained(
        base, num_labels=len(names), id2label=dict(enumerate(names)), label2id={n: i for i, n in enumerate(names)})
    optimiser = torch.optim.AdamW(model.parameters(), lr=5e-5)
    rng = np.random.default_rng(seed)
    model.train()
    for _ in range(epochs):
        order = rng.permutation(len(texts))
        for start in range(0, len(texts), 32):
            rows = order[start:start + 32]
            batch = tokenizer([texts[i] for i in rows], padding=True, truncation=True, max_length=128,
                              return_tensors="pt")
            loss = model(**batch, labels=torch.tensor([labels[i] for i in rows])).loss
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
    model.eval()
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--permutations", type=int, default=200)
    args = parser.parse_args()
    train, test, _ = rotten_tomatoes(1000, 300, noise=0.0, seed=0)
    names = label_mapping(train, test)
    clean = encode_labels(train, names)
    config = ValuationConfig(permutations=args.permutations, ridge="rel:10")
    log = lambda message: None  # noqa: E731
    pretrained = build_kernel(train, test, NTKConfig(model="minilm", adapter="encoder-head", trainable="top:2"), log=log)
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        for seed in (int(s) for s in args.seeds.split(",")):
            noisy, flipped = flip_labels(clean, len(names), 0.1, seed, "symmetric")
            noisy_train = TextDataset(train.texts, [names[y] for y in noisy], train.ids, None, train.source)
            started = time.monotonic()
            folder = fine_tune(train.texts, noisy, names, Path(scratch) / f"tuned-{seed}", args.epochs, seed)
            tuning = time.monotonic() - started
            started = time.monotonic()
            tuned = build_kernel(noisy_train, test, NTKConfig(model=str(folder), trainable="top:2"), log=log)
            kernel_seconds = time.monotonic() - started
            for kind, problem in (("pretrained (encoder-head)", pretrained), ("fine-tuned (own head)", tuned)):
                problem = dataclasses.replace(problem, y_train=noisy)
                run = run_detectors(problem, dataclasses.replace(config, seed=seed), seed=seed, beta=False)
                rows.append({"seed": seed, "kernel": kind,
                             **{name: auroc(run.suspicion[name], flipped)
                                for name in ("freeshap_ce", "loo", "self_confidence", "combined")},
                             "test_accuracy": float(run.results["freeshap"].manifest["utility_full"]["accuracy"]),
                             "seconds": round(tuning + kernel_seconds, 1) if kind.startswith("fine") else None})
            print(rows[-2], rows[-1], flush=True)
    import pandas as pd

    table = pd.DataFrame(rows)
    print("\n" + table.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    means = table.groupby("kernel")[["freeshap_ce", "loo", "self_confidence", "combined", "test_accuracy"]].mean()
    print("\nmean over seeds:\n" + means.to_string(float_format=lambda v: f"{v:.3f}"))


if __name__ == "__main__":
    main()
