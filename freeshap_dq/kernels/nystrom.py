r"""Low-rank features of a kernel: the one home of the Nystrom set-up.

Features :math:`\Phi` (n x r) and :math:`\Psi` (m x r) with :math:`K \approx \Phi\Phi^\top` and
:math:`K_{T} \approx \Psi\Phi^\top`:

- ``nystrom``: r landmark columns L chosen at random (seeded, :func:`nystrom_landmarks`),
  :math:`\Phi = K_{:,L} K_{LL}^{-1/2}`, :math:`\Psi = K_{T,L} K_{LL}^{-1/2}` — needs only the n x r and
  m x r kernel columns (:func:`nystrom_features`; eigenvalues of :math:`K_{LL}` below 1e-12 of the largest
  are dropped);
- ``eigen``: the top-r eigenpairs, :math:`\Phi = U_r\Lambda_r^{1/2}`, :math:`\Psi = K_T U_r
  \Lambda_r^{-1/2}` (the best rank-r approximation; one n x n eigendecomposition). At r = n the kernel is
  reproduced exactly.

``captured`` is the share of :math:`\operatorname{tr} K` the features keep, :math:`\|\Phi\|_F^2 / \operatorname{tr} K`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from freeshap_dq.config import LOW_RANK_METHODS
from freeshap_dq.errors import InputError

EIGEN_RTOL = 1e-12


@dataclass
class LowRankKernel:
    phi: torch.Tensor  # (n, r)
    psi: torch.Tensor  # (m, r)
    method: str
    captured: float  # share of trace(K) the approximation keeps


def nystrom_landmarks(n: int, rank: int, seed: int) -> np.ndarray:
    """r distinct landmark indices, sorted, drawn from ``seed``."""
    return np.sort(np.random.default_rng(seed).choice(n, size=rank, replace=False))


def nystrom_features(columns: torch.Tensor, test_columns: torch.Tensor, landmarks: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """(Phi, Psi) from K[:, L] (n x r) and K[T, L] (m x r); ``landmarks`` index the rows of K_LL in ``columns``."""
    values, vectors = torch.linalg.eigh(columns[landmarks])
    keep = values > values.max() * EIGEN_RTOL
    inv_sqrt = (vectors[:, keep] / values[keep].sqrt()) @ vectors[:, keep].T
    return columns @ inv_sqrt, test_columns @ inv_sqrt


def low_rank_features(k_train: torch.Tensor, k_test: torch.Tensor, rank: int, method: str = "nystrom",
                      seed: int = 0) -> LowRankKernel:
    """Features of a kernel held in memory (n x n train block, m x n test block)."""
    n = k_train.shape[0]
    if method not in LOW_RANK_METHODS:
        raise InputError(f"low-rank method {method!r} is unknown; choose {' or '.join(LOW_RANK_METHODS)}.")
    if not 1 <= rank <= n:
        raise InputError(f"the rank must be between 1 and n = {n}, got {rank}.")
    if method == "eigen":
        values, vectors = torch.linalg.eigh(k_train)
        values, vectors = values.flip(0)[:rank], vectors.flip(1)[:, :rank]
        keep = values > values[0] * EIGEN_RTOL
        values, vectors = values[keep], vectors[:, keep]
        phi = vectors * values.sqrt()
        psi = (k_test @ vectors) / values.sqrt()
    else:
        landmarks = torch.as_tensor(nystrom_landmarks(n, rank, seed), device=k_train.device)
        phi, psi = nystrom_features(k_train[:, landmarks], k_test[:, landmarks], landmarks)
    captured = float((phi * phi).sum() / torch.diagonal(k_train).sum())
    return LowRankKernel(phi.contiguous(), psi.contiguous(), method, captured)
