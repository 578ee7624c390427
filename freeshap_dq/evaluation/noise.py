"""Seeded label noise: which training labels are wrong is known, so detectors can be scored.

- ``symmetric``: ``round(rate * n)`` examples chosen uniformly; each gets a different class
  uniformly at random.
- ``class-conditional``: only examples of the first ``ceil(C / 2)`` classes flip, class c to
  (c + 1) mod C (e.g. positive -> negative only); ``round(rate * n)`` flips in all, as many as
  those classes hold at most.
"""

from __future__ import annotations

import numpy as np

from freeshap_dq.errors import InputError

NOISE_MODES = ("symmetric", "class-conditional")


def flip_labels(y: np.ndarray, n_classes: int, rate: float, seed: int, mode: str = "symmetric"
                ) -> tuple[np.ndarray, np.ndarray]:
    """(noisy labels, flipped mask)."""
    if mode not in NOISE_MODES:
        raise InputError(f"noise mode {mode!r} is unknown; choose {' or '.join(NOISE_MODES)}.")
    if not 0 <= rate < 1:
        raise InputError(f"noise rate must be in [0, 1), got {rate}.")
    y = np.asarray(y, dtype=np.int64)
    rng = np.random.default_rng(seed)
    count = int(round(rate * len(y)))
    if mode == "symmetric":
        chosen = rng.choice(len(y), size=count, replace=False)
        shift = rng.integers(1, n_classes, size=count)
    else:
        sources = np.flatnonzero(y < (n_classes + 1) // 2)
        chosen = rng.choice(sources, size=min(count, len(sources)), replace=False)
        shift = np.ones(len(chosen), dtype=np.int64)
    noisy = y.copy()
    noisy[chosen] = (y[chosen] + shift) % n_classes
    flipped = np.zeros(len(y), dtype=bool)
    flipped[chosen] = True
    return noisy, flipped
