"""One setting of ``freeshap-dq evaluate`` for the eNTK benchmarks: the data, its noisy labels and the settings.

20 Newsgroups by default (4 classes, n = 600 + 300) or Rotten Tomatoes (n = 1,000 + 300); MiniLM, fitted head,
``--trainable auto``, ``--max-length 64``, ``--sketch 64``, symmetric noise at 10 %, seed 0.
"""

from __future__ import annotations

import argparse
import dataclasses


def add_setting_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dataset", default="newsgroups", choices=("rotten-tomatoes", "newsgroups"))
    parser.add_argument("--n-train", type=int, default=0, help="0: 1,000 (Rotten Tomatoes) or 600 (20 Newsgroups)")
    parser.add_argument("--n-test", type=int, default=300)
    parser.add_argument("--sketch", type=int, default=64, help="0: the exact eNTK")


def noisy_setting(args: argparse.Namespace):
    """(evaluate's config, the training set with seed 0's symmetric noise, the test set, the label names)."""
    from freeshap_dq.data.tables import encode_labels, label_mapping
    from freeshap_dq.evaluation.harness import EvaluationConfig, _datasets
    from freeshap_dq.evaluation.noise import flip_labels

    n_train = args.n_train or (1000 if args.dataset == "rotten-tomatoes" else 600)
    config = EvaluationConfig(dataset=args.dataset, n_train=n_train, n_test=args.n_test, max_length=64,
                              sketch=args.sketch)
    train, test, _ = _datasets(config)
    names = label_mapping(train, test)
    noisy_y, _ = flip_labels(encode_labels(train, names), len(names), config.noise, 0, "symmetric")
    return config, dataclasses.replace(train, labels=[names[c] for c in noisy_y]), test, names
