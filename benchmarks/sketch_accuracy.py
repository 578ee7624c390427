"""The sketched eNTK (``--sketch K``) against the exact one on one fitted-head evaluate setting: time, kernel error,
detection.

One setting of ``freeshap-dq evaluate`` (Rotten Tomatoes by default, MiniLM, fitted head, ``--trainable auto``,
``--max-length 64``, symmetric noise at 10 %, seed 0): the exact eNTK is the baseline, measured in the same run.
For each K (and sketch seed) it reports the eNTK's seconds and their ratio to the exact one, the relative
(Frobenius) error of the train and test blocks, and FreeShap -CE's AUROC and misses at the noise budget
(FNR@noise) against the known flips, beside the exact kernel's.

Usage:  python benchmarks/sketch_accuracy.py [--dataset rotten-tomatoes|newsgroups] [--sketch 32,64,128]
                                             [--seeds 0,1] [--noise-mode symmetric]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
for variable in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
    os.environ.setdefault(variable, "1")


def main() -> None:
    import numpy as np

    from freeshap_dq.data.tables import encode_labels, label_mapping
    from freeshap_dq.evaluation.detectors import run_detectors
    from freeshap_dq.evaluation.harness import EvaluationConfig, _datasets
    from freeshap_dq.evaluation.metrics import auroc, fnr_at_noise_rate
    from freeshap_dq.evaluation.noise import flip_labels
    from freeshap_dq.ntk.builder import build_kernel

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="rotten-tomatoes", choices=("rotten-tomatoes", "newsgroups"))
    parser.add_argument("--n-train", type=int, default=0, help="0: 1,000 (Rotten Tomatoes) or 600 (20 Newsgroups)")
    parser.add_argument("--n-test", type=int, default=300)
    parser.add_argument("--sketch", default="32,64,128")
    parser.add_argument("--seeds", default="0,1", help="sketch seeds")
    parser.add_argument("--noise-mode", default="symmetric")
    parser.add_argument("--noise-seed", type=int, default=0)
    args = parser.parse_args()

    n_train = args.n_train or (1000 if args.dataset == "rotten-tomatoes" else 600)
    config = EvaluationConfig(dataset=args.dataset, n_train=n_train, n_test=args.n_test, max_length=64)
    train, test, _ = _datasets(config)
    names = label_mapping(train, test)
    noisy_y, flipped = flip_labels(encode_labels(train, names), len(names), config.noise, args.noise_seed,
                                   args.noise_mode)
    noisy = dataclasses.replace(train, labels=[names[c] for c in noisy_y])
    valuation = dataclasses.replace(config.valuation_config(), seed=args.noise_seed)
    quiet = lambda message: None  # noqa: E731

    def measure(sketch: int, seed: int):
        ntk = dataclasses.replace(config.ntk_config(), sketch=sketch, sketch_seed=seed, precision="fp32")  # as recorded
        problem, manifest = build_kernel(noisy, test, ntk, log=quiet, return_manifest=True, progress=False)
        run = run_detectors(problem, valuation, seed=args.noise_seed, progress=False)
        suspicion = run.suspicion["freeshap_ce"]
        return problem, manifest, auroc(suspicion, flipped), fnr_at_noise_rate(suspicion, flipped)

    exact, manifest, exact_auroc, exact_fnr = measure(0, 0)
    baseline = manifest["seconds"]
    print(f"{args.dataset}, n = {n_train} + {args.n_test}, {manifest['trainable']} ({manifest['n_trainable']:,} "
          f"parameters), kernel {manifest['kernel']}, {args.noise_mode} noise seed {args.noise_seed}")
    print("| K | sketch seed | numbers per example | eNTK s | x exact | train error | test error | AUROC | FNR@noise |")
    print("|---|---|---|---|---|---|---|---|---|")
    print(f"| exact | | {manifest['n_trainable']:,} | {baseline:.1f} | 1.00 | 0 | 0 | {exact_auroc:.3f} | "
          f"{exact_fnr:.3f} |")
    error = lambda a, b: float(np.linalg.norm(a - b) / np.linalg.norm(b))  # noqa: E731
    for sketch in (int(k) for k in args.sketch.split(",")):
        for seed in (int(s) for s in args.seeds.split(",")):
            problem, manifest, value_auroc, value_fnr = measure(sketch, seed)
            print(f"| {sketch} | {seed} | {manifest['sketch_width']:,} | {manifest['seconds']:.1f} | "
                  f"{manifest['seconds'] / baseline:.2f} | {error(problem.k_train, exact.k_train):.3f} | "
                  f"{error(problem.k_test, exact.k_test):.3f} | {value_auroc:.3f} | {value_fnr:.3f} |", flush=True)


if __name__ == "__main__":
    main()
