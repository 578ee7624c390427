"""The summed eNTK from C - 1 combined logits against C backward passes, on one fitted-head evaluate setting.

One setting of ``freeshap-dq evaluate`` (20 Newsgroups by default: 4 classes, n = 600 + 300, MiniLM, fitted head,
``--kernel auto`` = sum, ``--trainable auto``, ``--max-length 64``, ``--sketch 64``, symmetric noise at 10 %,
seed 0). The baseline, measured in the same run on the same noisy labels, is the same kernel from one backward
pass per class (what every version before ``freeshap_dq.ntk.summed_logits`` did). Reports each eNTK's seconds
(``build_kernel``'s own, the head's fit excluded), their ratio, and the largest difference between the two
kernels relative to the kernel's largest entry.

Usage:  python benchmarks/summed_kernel.py [--dataset newsgroups|rotten-tomatoes] [--sketch 64] [--repeats 2]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from unittest import mock

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
for variable in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
    os.environ.setdefault(variable, "1")


def main() -> None:
    import numpy as np
    from evaluate_setting import add_setting_arguments, noisy_setting

    from freeshap_dq.ntk import builder

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_setting_arguments(parser)
    parser.add_argument("--repeats", type=int, default=2, help="alternating runs of each way (the least time kept)")
    args = parser.parse_args()

    config, noisy, test, names = noisy_setting(args)
    n_train = config.n_train
    ntk = dataclasses.replace(config.ntk_config(), kernel="sum", precision="fp32")  # the exactness it measures
    quiet = lambda message: None  # noqa: E731

    def build(combined: bool):
        if combined:
            return builder.build_kernel(noisy, test, ntk, log=quiet, return_manifest=True, progress=False)
        with mock.patch.object(builder, "summed_kernel", lambda adapter, train, test, compute, *rest, **kw: compute()):
            return builder.build_kernel(noisy, test, ntk, log=quiet, return_manifest=True, progress=False)

    seconds = {False: [], True: []}
    kernels = {}
    for _ in range(args.repeats):
        for combined in (False, True):
            problem, manifest = build(combined)
            seconds[combined].append(manifest["seconds"])
            kernels[combined] = np.vstack([problem.k_train, problem.k_test])
    difference = np.abs(kernels[True] - kernels[False]).max() / np.abs(kernels[False]).max()
    per_class, combined = min(seconds[False]), min(seconds[True])
    print(f"| {args.dataset} | {len(names)} | {n_train} + {args.n_test} | {args.sketch or 'exact'} | "
          f"{per_class:.1f} s | {combined:.1f} s | {per_class / combined:.2f}x | {difference:.1e} |")
    print(f"(each: {', '.join(f'{s:.1f}' for s in seconds[False])} s with {len(names)} passes; "
          f"{', '.join(f'{s:.1f}' for s in seconds[True])} s combined)")


if __name__ == "__main__":
    main()
