"""The paper's scale on a GPU, in one short run (for a session that is lent a device machine).

1. eNTK: a BERT-base-size model with random weights (12 layers, hidden 768, vocab 30,522, seeded),
   ``encoder-head``, trainable ``freeze:8`` (embeddings + top 4 layers + head, the paper's BERT
   setting), n = 5,000 train + m = 872 test synthetic sentences (10-30 words, a WordPiece vocabulary
   trained on the fly; nothing is downloaded). Target (issue #3): under 3 minutes, against the
   reference's ≈ 35 minutes.
2. Engine: the batched prefix engine, n = 5,000, m = 872 (an RBF kernel), T = 200 permutations,
   per-point values. Target (issue #8): under 60 s, against the reference's 5 h 47 min.
   Baseline in the same run: the same engine with one permutation at a time.

``--precisions fp32,bf16`` computes the eNTK of part 1 with fp32 and with bf16 passes (``--precision``,
docs/ntk.md) and reports both times and the kernels' relative difference.

Needs only torch, transformers, tokenizers, numpy and pandas (all on the device image) and this
repository on the path. ``--smoke`` runs a tiny version on the CPU to check the script itself.

Usage (device):  PYTHONUNBUFFERED=1 python3 benchmarks/gpu_paper_scale.py --json $OUT/gpu.json
Usage (here):    python benchmarks/gpu_paper_scale.py --smoke
"""

from __future__ import annotations

import argparse
import json
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
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

WORDS = ("good bad great dull movie film plot cast funny boring clever mess moving tedious loved hated script actors "
         "wonderful terrible brilliant sincere long every minute very not indeed story scene music ending director "
         "performance characters dialogue slow beautiful awful charming predictable").split()


def sentences(count: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=rng.integers(10, 31))) for _ in range(count)]


def bert_base(folder: Path, layers: int, hidden: int, heads: int, intermediate: int, vocab: int):
    from tiny_models import train_wordpiece
    from transformers import BertConfig, BertModel

    tokenizer = train_wordpiece(folder)
    torch.manual_seed(0)
    model = BertModel(BertConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers,
                                 num_attention_heads=heads, intermediate_size=intermediate,
                                 max_position_embeddings=512, pad_token_id=tokenizer.pad_token_id),
                      add_pooling_layer=False)
    model.config._attn_implementation = "eager"
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model, tokenizer


def ntk_run(args, device: torch.device, precision: str = "fp32") -> dict:
    from freeshap_dq.ntk.adapters import EncoderHead
    from freeshap_dq.ntk.compute import compute_ntk

    with tempfile.TemporaryDirectory() as tmp:
        model, tokenizer = bert_base(Path(tmp), args.layers, args.hidden, args.heads, args.intermediate, args.vocab)
    adapter = EncoderHead(model, tokenizer, n_classes=2, head_seed=0)
    train, test = adapter.tokenize(sentences(args.n, 1)), adapter.tokenize(sentences(args.m, 2))
    if device.type == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    out = compute_ntk(adapter, train, test, trainable=args.trainable, max_memory=args.max_memory, device=device,
                      progress=True, precision=precision)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    finite = bool(np.isfinite(out.k_train).all() and np.isfinite(out.k_test).all())
    return {"precision": precision, "seconds": seconds, "examples_per_second": (args.n + args.m) / seconds,
            "n_trainable": out.n_trainable, "kernel": np.vstack([out.k_train, out.k_test]),
            "chunks": out.info["chunks"], "batch_size": out.info["batch_size"], "gradients": out.info["gradients"],
            "factor_gib": out.info["factor_bytes"] / 2**30, "finite": finite,
            "peak_gpu_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None}


def engine_run(args, device: torch.device) -> dict:
    from freeshap_dq import KernelProblem, ValuationConfig, compute_values
    from freeshap_dq.data.synthetic import rbf_kernel

    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, args.n + args.m)
    x = rng.normal(size=(args.n + args.m, 32)) + 0.8 * np.eye(2, 32)[y]
    k = rbf_kernel(x, x[:args.n], bandwidth=6.0)
    problem = KernelProblem(k[:args.n], k[args.n:], y[:args.n], y[args.n:])
    out = {}
    for name, batch in (("batched", 0), ("one at a time", 1)):
        perms = args.perms if batch == 0 else max(2, args.perms // 20)
        config = ValuationConfig(permutations=perms, per_point=True, ridge="rel:1", device=str(device),
                                 batch_size=batch)
        if device.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        result = compute_values(problem, config, progress=False)
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - started
        out[name] = {"permutations": perms, "seconds": seconds, "seconds_per_permutation": seconds / perms,
                     "finite": bool(np.isfinite(result.values("ce")).all())}
    out["speed_up_per_permutation"] = (out["one at a time"]["seconds_per_permutation"]
                                       / out["batched"]["seconds_per_permutation"])
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="A tiny CPU run that checks the script.")
    p.add_argument("--json", default=None, help="Also write the results here.")
    p.add_argument("--parts", default="ntk,engine")
    p.add_argument("--precisions", default="fp32", help="Comma-separated eNTK passes for part 1: fp32, bf16.")
    args = p.parse_args()
    big = dict(n=5000, m=872, layers=12, hidden=768, heads=12, intermediate=3072, vocab=30522, trainable="freeze:8",
               max_memory="100GiB", perms=200)
    tiny = dict(n=40, m=10, layers=3, hidden=32, heads=4, intermediate=64, vocab=30522, trainable="freeze:2",
                max_memory="256MiB", perms=4)
    for key, value in (tiny if args.smoke else big).items():
        setattr(args, key, value)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    report = {"machine": platform.machine(), "device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "sizes": {"n": args.n, "m": args.m}}
    print(f"# paper scale on {report['device']} (torch {torch.__version__}), n = {args.n}, m = {args.m}", flush=True)
    if "ntk" in args.parts:
        kernels = {}
        for precision in args.precisions.split(","):
            r = ntk_run(args, device, precision)
            kernels[precision] = r.pop("kernel")
            report["ntk" if precision == "fp32" else f"ntk_{precision}"] = r
            print(f"eNTK ({precision} passes): {r['seconds']:.1f} s ({r['examples_per_second']:.0f} examples/s), "
                  f"{r['n_trainable']:,} trainable parameters, {r['chunks']} chunk(s), gradients by "
                  f"{r['gradients']}, peak GPU memory {r['peak_gpu_gib']} GiB; target < 180 s (reference ≈ 2100 s)",
                  flush=True)
        if {"fp32", "bf16"} <= set(kernels):
            report["bf16_kernel_difference"] = float(np.linalg.norm(kernels["bf16"] - kernels["fp32"])
                                                     / np.linalg.norm(kernels["fp32"]))
            print(f"bf16 against fp32: {report['bf16_kernel_difference']:.1e} relative kernel difference", flush=True)
    if "engine" in args.parts:
        report["engine"] = engine_run(args, device)
        r = report["engine"]
        print(f"engine: T = {r['batched']['permutations']} per point in {r['batched']['seconds']:.1f} s "
              f"(set-up included), {r['speed_up_per_permutation']:.1f}x per permutation over one at a time; "
              f"target < 60 s (reference 20,820 s)", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
