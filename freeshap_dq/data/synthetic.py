"""Synthetic valuation problems with known label noise (for the interim demo, tests and benchmarks).

Points are drawn from C Gaussian clusters in d dimensions; a fraction of the *training* labels
is flipped to another class (seeded); the kernel is an RBF kernel on the points, so it is
symmetric positive definite by construction.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from freeshap_dq.kernels.problem import KernelProblem


@dataclass
class NoisyProblem:
    problem: KernelProblem
    flipped: np.ndarray  # bool (n_train,): the training labels that were flipped
    clean_labels: np.ndarray


def rbf_kernel(x: np.ndarray, z: np.ndarray, bandwidth: float) -> np.ndarray:
    sq = (x * x).sum(1)[:, None] + (z * z).sum(1)[None, :] - 2.0 * x @ z.T
    return np.exp(-np.maximum(sq, 0.0) / (2.0 * bandwidth**2))


def noisy_problem(n_train: int = 400, n_test: int = 200, n_classes: int = 2, dim: int = 16,
                  separation: float = 1.5, noise: float = 0.1, seed: int = 0) -> NoisyProblem:
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(n_classes, dim))
    centers *= separation / np.linalg.norm(centers[0] - centers[-1])
    y = rng.integers(0, n_classes, size=n_train + n_test)
    x = centers[y] + rng.normal(scale=0.5, size=(n_train + n_test, dim))
    k = rbf_kernel(x, x, bandwidth=np.sqrt(dim) * 0.5)
    k = (k + k.T) / 2
    y_train = y[:n_train].copy()
    flipped = np.zeros(n_train, dtype=bool)
    flipped[rng.choice(n_train, size=int(round(noise * n_train)), replace=False)] = True
    y_train[flipped] = (y_train[flipped] + rng.integers(1, n_classes, size=flipped.sum())) % n_classes
    names = tuple(f"class_{c}" for c in range(n_classes))
    problem = KernelProblem(k[:n_train, :n_train], k[n_train:, :n_train], y_train, y[n_train:], names,
                            train_ids=np.array([f"train-{i:05d}" for i in range(n_train)]),
                            test_ids=np.array([f"test-{i:05d}" for i in range(n_test)]), source="<synthetic>")
    return NoisyProblem(problem, flipped, y[:n_train])
