"""Small kernel problems for the tests."""

import numpy as np

from freeshap_dq.data.synthetic import rbf_kernel
from freeshap_dq.kernels.problem import KernelProblem


def random_problem(n: int = 12, m: int = 6, n_classes: int = 3, dim: int = 4, seed: int = 0,
                   **kwargs) -> KernelProblem:
    """A small well-conditioned problem whose labels depend on the inputs."""
    rng = np.random.default_rng(seed)
    y = np.concatenate([np.arange(n_classes), rng.integers(0, n_classes, n + m - n_classes)])
    x = rng.normal(size=(n + m, dim)) + 1.2 * np.eye(n_classes, dim)[y]
    k = rbf_kernel(x, x, bandwidth=1.5)
    return KernelProblem(k[:n, :n], k[n:, :n], y[:n], y[n:], **kwargs)
