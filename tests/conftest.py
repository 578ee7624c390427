import os

import numpy as np
import pytest

for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
    os.environ.setdefault(var, "1")

from freeshap_dq.kernel import KernelProblem  # noqa: E402
from freeshap_dq.synthetic import rbf_kernel  # noqa: E402


def random_problem(n: int = 12, m: int = 6, n_classes: int = 3, dim: int = 4, seed: int = 0,
                   **kwargs) -> KernelProblem:
    """A small well-conditioned problem whose labels depend on the inputs."""
    rng = np.random.default_rng(seed)
    y = np.concatenate([np.arange(n_classes), rng.integers(0, n_classes, n + m - n_classes)])
    x = rng.normal(size=(n + m, dim)) + 1.2 * np.eye(n_classes, dim)[y]
    k = rbf_kernel(x, x, bandwidth=1.5)
    return KernelProblem(k[:n, :n], k[n:, :n], y[:n], y[n:], **kwargs)


@pytest.fixture
def problem() -> KernelProblem:
    return random_problem()


@pytest.fixture(scope="session")
def tiny_bert_path(tmp_path_factory):
    from tiny_models import tiny_bert

    return tiny_bert(tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture(scope="session")
def tiny_llama_path(tmp_path_factory):
    from tiny_models import tiny_llama

    return tiny_llama(tmp_path_factory.mktemp("tiny-llama"))
