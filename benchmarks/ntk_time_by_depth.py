"""Where an evaluate setting's eNTK time goes, by depth, against this machine's fp32 matrix-multiply rate.

The fitted head (evaluate's default) makes one eNTK per (noise mode x seed), because the kernel depends on that
setting's labels. This measures one such eNTK on Rotten Tomatoes (MiniLM, seeded head, the same shapes as the fitted
one) for each ``--trainable`` and splits it into the Gram products (``K += J J^T``), the per-example gradient
factors (one batched forward + backward) and the rest (the Jacobian columns from the factors, the frozen bottom's
forward). The baseline, measured in the same run: a plain fp32 ``A @ B.T`` of the Gram's shapes (1,300 x 16,384
against 1,000 x 16,384, the Gram's column block). The Gram's floor is its flop count at that rate: no exact eNTK
of these parameters can take less on this machine.

Usage:  python benchmarks/ntk_time_by_depth.py [--n-train 1000] [--n-test 300] [--trainable top:2,top:3]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def gemm_rate(rows: int, cols: int, width: int = 16384, repeats: int = 5) -> float:
    """fp32 flop/s of ``A @ B.T`` for A rows x width, B cols x width."""
    import torch

    a = torch.randn(rows, width)
    b = a[:cols].clone()
    a @ b.T
    started = time.perf_counter()
    for _ in range(repeats):
        a @ b.T
    return 2 * rows * cols * width * repeats / (time.perf_counter() - started)


def gram_pairs(n: int, m: int) -> int:
    """Dot products the blocked Gram forms: the train block's lower block triangle (rows of GRAM_ROWS against the
    columns up to the block's end) and the m x n test block."""
    from freeshap_dq.ntk.compute import GRAM_ROWS

    return sum((min(lo + GRAM_ROWS, n) - lo) * min(lo + GRAM_ROWS, n) for lo in range(0, n, GRAM_ROWS)) + m * n


class Timed:
    """Wraps a module function and sums its wall time."""

    def __init__(self, module, name: str):
        self.module, self.name, self.inner, self.seconds = module, name, getattr(module, name), 0.0
        setattr(module, name, self)

    def __call__(self, *args, **kwargs):
        started = time.perf_counter()
        try:
            return self.inner(*args, **kwargs)
        finally:
            self.seconds += time.perf_counter() - started

    def restore(self) -> None:
        setattr(self.module, self.name, self.inner)


def measure(trainable: str, n_train: int, n_test: int, max_memory: str) -> dict:
    import freeshap_dq.ntk.compute as compute
    from freeshap_dq.data.datasets import rotten_tomatoes
    from freeshap_dq.data.tables import label_mapping
    from freeshap_dq.ntk.builder import NTKConfig, build_adapter, tokenize_checked

    train, test, _ = rotten_tomatoes(n_train, n_test, seed=0)
    config = NTKConfig(model="minilm", adapter="encoder-head", head="random", trainable=trainable, max_length=64,
                       max_memory=max_memory)
    adapter, _ = build_adapter(config, label_mapping(train, test), log=lambda _: None)
    train_ex, test_ex = tokenize_checked(adapter, train, config), tokenize_checked(adapter, test, config)
    gram, factors = Timed(compute, "accumulate_gram"), Timed(compute, "collect_factors")
    try:
        started = time.perf_counter()
        out = compute.compute_ntk(adapter, train_ex, test_ex, trainable=trainable, max_memory=max_memory,
                                  progress=False)
        total = time.perf_counter() - started
    finally:
        gram.restore()
        factors.restore()
    return {"trainable": trainable, "params": out.n_trainable, "chunks": out.info["chunks"], "total": total,
            "gram": gram.seconds, "factors": factors.seconds, "flops": 2 * gram_pairs(n_train, n_test) * out.n_trainable}


def main() -> None:
    import torch

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n-train", type=int, default=1000)
    parser.add_argument("--n-test", type=int, default=300)
    parser.add_argument("--trainable", default="top:2,top:3")
    parser.add_argument("--max-memory", default="auto")
    args = parser.parse_args()
    rate = gemm_rate(args.n_train + args.n_test, args.n_train)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; fp32 A @ B.T "
          f"({args.n_train + args.n_test} x 16384 by {args.n_train} x 16384): {rate / 1e9:.0f} GFLOP/s")
    print("| trainable | params | chunks | eNTK s | Gram s | factors s | rest s | Gram GFLOP/s | Gram floor s "
          "(at the A @ B.T rate) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for trainable in args.trainable.split(","):
        r = measure(trainable, args.n_train, args.n_test, args.max_memory)
        print(f"| {r['trainable']} | {r['params']:,} | {r['chunks']} | {r['total']:.1f} | {r['gram']:.1f} | "
              f"{r['factors']:.1f} | {r['total'] - r['gram'] - r['factors']:.1f} | {r['flops'] / r['gram'] / 1e9:.0f} | "
              f"{r['flops'] / rate:.1f} |", flush=True)


if __name__ == "__main__":
    main()
