r"""The kernel-regression utility of a Nyström kernel, set up without an n x n matrix in memory.

For a kernel folder (memory-mapped, :mod:`freeshap_dq.kernels.folder`) valued with ``--low-rank r``
(Nyström), everything is done in feature space: r landmark rows :math:`K_{L,:}` are read from disk
(contiguous rows; :math:`K_{:,L} = K_{L,:}^\top` by symmetry), :math:`K_{T,L}` is gathered from
the test block in row blocks, and

.. math::  \Phi = K_{:,L} K_{LL}^{-1/2}, \qquad \Psi = K_{T,L} K_{LL}^{-1/2} .

The ``auto`` ridge minimises the closed-form leave-one-out error of the rank-r model: with
:math:`\Phi = U S V^\top`, the hat matrix is :math:`H_\lambda = U \operatorname{diag}(s^2/(s^2+\lambda)) U^\top`
and the LOO residual of i is :math:`(Y_i - (H_\lambda Y)_i) / (1 - (H_\lambda)_{ii})` — the same
criterion as the exact kernel's (:mod:`freeshap_dq.valuation.ridge`) applied to :math:`\Phi\Phi^\top`, at
O(n r) per candidate. Memory is O((n + m) r); the kernel is read once, in blocks.
"""

from __future__ import annotations

import numpy as np
import torch

from freeshap_dq.config import ValuationConfig
from freeshap_dq.errors import InputError
from freeshap_dq.kernels.nystrom import LowRankKernel, nystrom_features, nystrom_landmarks
from freeshap_dq.kernels.problem import KernelProblem, row_blocks
from freeshap_dq.valuation.ridge import choose_ridge
from freeshap_dq.valuation.utility import (
    DTYPE,
    UtilityEnds,
    empty_point_utilities,
    one_hot,
    point_utilities,
    resolve_device,
)


def landmark_columns(problem, config: ValuationConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(landmarks L, K[:, L] (n x r), K[T, L] (m x r)) as float64 arrays in memory, unscaled: stored columns of a
    ``LandmarkKernel``, or for a kernel folder r = ``config.low_rank`` seeded landmarks whose rows are read."""
    if problem.landmark_rank is not None:
        if config.low_rank not in (0, problem.rank):
            raise InputError(f"{problem.source} holds {problem.rank} landmark columns; --low-rank must be "
                             f"{problem.rank} (or left out), not {config.low_rank}.")
        return (problem.landmarks, np.array(problem.k_train_landmarks, dtype=np.float64),
                np.array(problem.k_test_landmarks, dtype=np.float64))
    landmarks = nystrom_landmarks(problem.n_train, min(config.low_rank, problem.n_train), config.seed)
    columns = np.ascontiguousarray(problem.k_train[landmarks].T, dtype=np.float64)  # K[:, L] = K[L, :]' by symmetry
    test_columns = np.concatenate([problem.k_test[lo:hi][:, landmarks] for lo, hi in row_blocks(problem.k_test)])
    return landmarks, columns, np.asarray(test_columns, dtype=np.float64)


class FeatureSpaceUtility(UtilityEnds):
    """What the low-rank engine needs of a utility (targets, ridge, U(N), U(empty)), from features only."""

    def __init__(self, problem: KernelProblem, config: ValuationConfig, device: torch.device | None = None):
        if config.low_rank_method != "nystrom":
            raise InputError("the feature-space utility serves --low-rank with the nystrom method.")
        self.problem = problem
        self.device = device or resolve_device(config.device)
        n = problem.n_train
        landmarks, columns, test_columns = landmark_columns(problem, config)
        scale = config.kernel_scale
        mean_diag = problem.mean_diag() * scale
        columns *= scale
        test_columns *= scale
        if config.jitter:
            columns[landmarks, np.arange(len(landmarks))] += config.jitter * mean_diag
            mean_diag *= 1 + config.jitter
        phi, psi = nystrom_features(torch.as_tensor(columns, dtype=DTYPE, device=self.device),
                                    torch.as_tensor(test_columns, dtype=DTYPE, device=self.device),
                                    torch.as_tensor(landmarks, device=self.device))
        self.features = LowRankKernel(phi.contiguous(), psi.contiguous(), "nystrom",
                                      float((phi * phi).sum() / (mean_diag * n)))
        self.y_train = torch.as_tensor(problem.y_train, device=self.device)
        self.y_test = torch.as_tensor(problem.y_test, device=self.device)
        self.n_classes = problem.n_classes
        self.targets = one_hot(self.y_train, self.n_classes)
        self._svd: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        self.ridge_choice = choose_ridge(config.ridge, mean_diag, self._loo_squared_error)
        self.ridge = self.ridge_choice.value
        self.empty_mode = config.empty_utility
        self.empty_point = empty_point_utilities(self.empty_mode, self.y_test, self.n_classes)
        a = phi.T @ phi + self.ridge * torch.eye(phi.shape[1], dtype=DTYPE, device=self.device)
        self.full_point = point_utilities(psi @ torch.linalg.solve(a, phi.T @ self.targets), self.y_test)

    def _loo_squared_error(self, ridge: float) -> float:
        """The rank-r model's mean squared leave-one-out residual (module docstring), from one SVD of Phi."""
        if self._svd is None:
            u, s, _ = torch.linalg.svd(self.features.phi, full_matrices=False)
            self._svd = u, s, u.T @ self.targets
        u, s, projected = self._svd
        shrink = s**2 / (s**2 + ridge)
        fitted = u @ (shrink.unsqueeze(-1) * projected)
        leverage = (u * u) @ shrink
        residual = (self.targets - fitted) / (1.0 - leverage).unsqueeze(-1)
        return float((residual**2).sum(-1).mean())
