"""bf16 passes (``--precision bf16``) against fp32 on one fitted-head evaluate setting, and the device's own
matrix-product rates.

One setting of ``freeshap-dq evaluate`` (20 Newsgroups by default: 4 classes, n = 600 + 300, MiniLM, fitted head,
``--kernel auto`` = sum, ``--trainable auto``, ``--max-length 64``, ``--sketch 64``, symmetric noise at 10 %,
seed 0). The baseline, measured in the same run on the same noisy labels, is the same eNTK with fp32 passes (the
default of ``value``). Reports each eNTK's seconds (``build_kernel``'s own, the head's fit excluded; the frozen bottom
layers are remembered between the runs, as evaluate does between its settings), their ratio, and the relative
(Frobenius) difference between the two kernels. Beside it, the rate of a plain fp32 and bf16 matrix product of one
MiniLM feed-forward layer's shape on the same device, so that the ratio can be read against what the hardware gives.

Usage:  python benchmarks/precision.py [--dataset newsgroups|rotten-tomatoes] [--sketch 64] [--repeats 2]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
for variable in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
    os.environ.setdefault(variable, "1")


def product_rate(dtype, device, repeats: int = 20) -> float:
    """GFLOP/s of (16 x 64 x 8 tokens, 384) @ (384, 1536): one feed-forward layer of MiniLM on eight batches."""
    import torch

    a = torch.randn(16 * 64 * 8, 384, device=device).to(dtype)
    b = torch.randn(384, 1536, device=device).to(dtype)
    for _ in range(3):
        a @ b
    started = time.perf_counter()
    for _ in range(repeats):
        a @ b
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return 2 * a.shape[0] * 384 * 1536 * repeats / (time.perf_counter() - started) / 1e9


def main() -> None:
    import numpy as np
    import torch
    from evaluate_setting import add_setting_arguments, noisy_setting

    from freeshap_dq.ntk import builder
    from freeshap_dq.ntk.precision import native_bf16
    from freeshap_dq.valuation.utility import resolve_device

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_setting_arguments(parser)
    parser.add_argument("--repeats", type=int, default=2, help="alternating runs of each precision (least kept)")
    args = parser.parse_args()

    config, noisy, test, names = noisy_setting(args)
    n_train = config.n_train
    device = resolve_device("auto")
    rates = {p: product_rate(dtype, device) for p, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16))}

    seconds: dict[str, list[float]] = {"fp32": [], "bf16": []}
    kernels = {}
    with builder.remembering_frozen_outputs():
        builder.build_kernel(noisy, test, config.ntk_config(), log=lambda m: None, progress=False)  # fills the memo
        for _ in range(args.repeats):
            for precision in seconds:
                ntk = dataclasses.replace(config.ntk_config(), precision=precision)
                problem, manifest = builder.build_kernel(noisy, test, ntk, log=lambda m: None, return_manifest=True,
                                                         progress=False)
                seconds[precision].append(manifest["seconds"])
                kernels[precision] = np.vstack([problem.k_train, problem.k_test])
    error = np.linalg.norm(kernels["bf16"] - kernels["fp32"]) / np.linalg.norm(kernels["fp32"])
    fp32, bf16 = min(seconds["fp32"]), min(seconds["bf16"])
    print("| data | classes | n | sketch | device (native bf16) | fp32 eNTK | bf16 eNTK | ratio | kernel difference "
          "| fp32 / bf16 product GFLOP/s |")
    print(f"| {args.dataset} | {len(names)} | {n_train} + {args.n_test} | {args.sketch or 'exact'} | {device} "
          f"({'yes' if native_bf16(device) else 'no'}) | {fp32:.1f} s | {bf16:.1f} s | {fp32 / bf16:.2f}x | "
          f"{error:.1e} | {rates['fp32']:.0f} / {rates['bf16']:.0f} |")
    print(f"(each: {', '.join(f'{s:.1f}' for s in seconds['fp32'])} s fp32; "
          f"{', '.join(f'{s:.1f}' for s in seconds['bf16'])} s bf16)")


if __name__ == "__main__":
    main()
