r"""Low-rank kernels for large n: every prefix's predictions from r x r updates.

With features :math:`\Phi` (n x r) and :math:`\Psi` (m x r) such that :math:`K \approx \Phi\Phi^\top`
and :math:`K_{T} \approx \Psi\Phi^\top`, kernel regression on a coalition S is, by the push-through
identity,

.. math::  F_S = \Psi\,(\Phi_S^\top\Phi_S + \lambda I_r)^{-1}\,\Phi_S^\top Y_S ,

and the exact engine's trick works in feature space. With :math:`G = A^{-1}`, :math:`A = \lambda I +
\Phi_S^\top\Phi_S`, the current weights :math:`W = G\Phi_S^\top Y_S` and the next block of b
permuted rows U (b x r) with targets Y: :math:`H = UG`, :math:`M = I_b + HU^\top = LL^\top`,
:math:`V = L^{-1}H`, :math:`z = L^{-1}(Y - UW)`. By Woodbury the leading j x j block of L serves the
j-th prefix of the block, so

.. math::  F_{S+j} = F_S + \sum_{q \le j} (\Psi v_q) z_q^\top ,

a cumulative sum as in the exact engine; then :math:`G \leftarrow G - V^\top V`,
:math:`W \leftarrow W + V^\top z` (G recomputed from A every ``refresh`` blocks to bound
round-off). All of it is matrix-matrix work: :math:`O(n (4 r^2 + m r))` per permutation with b = r,
instead of :math:`O(n^3/3 + n^2 m)`.

The features (``eigen``: exact at r = n, and so are the values; ``nystrom``: r landmark columns) come
from :mod:`freeshap_dq.kernels.nystrom`.

The utility of the full set and the truncation threshold are those of the low-rank model, so the
values are FreeShap values of the rank-r kernel (docs/scaling.md measures how far that is from
the exact ones).
"""

from __future__ import annotations

from typing import Any

import torch

from freeshap_dq.config import METRICS
from freeshap_dq.contracts import Utility
from freeshap_dq.kernels.nystrom import LowRankKernel
from freeshap_dq.valuation.prefix_engine import PrefixEngine
from freeshap_dq.valuation.utility import DTYPE, point_utilities


class LowRankPrefixEngine(PrefixEngine):
    """The prefix engine on a rank-r kernel: same marginals and truncation, r x r work per block."""

    def __init__(self, utility: Utility, features: LowRankKernel, *, tolerance: float = 0.0,
                 per_point: bool = False, block_size: int = 128, refresh: int = 8):
        self.features = features
        self.refresh = refresh
        super().__init__(utility, tolerance=tolerance, per_point=per_point, block_size=block_size)
        full = point_utilities(self._scores_of(torch.arange(utility.problem.n_train, device=utility.device)),
                               utility.y_test)
        self.full_point = full
        self.full_utility = torch.stack([full[0].mean(), full[1].mean()])
        empty = torch.tensor(utility.empty, dtype=DTYPE, device=utility.device)
        self.truncation_threshold = tolerance * torch.abs(self.full_utility - empty)

    def manifest_entries(self) -> dict[str, Any]:
        return {"low_rank": {"rank": int(self.features.phi.shape[1]), "method": self.features.method,
                             "trace_captured": self.features.captured,
                             "utility_full": dict(zip(METRICS, self.full_utility.tolist(), strict=True))}}

    def _scores_of(self, subset: torch.Tensor) -> torch.Tensor:
        phi, u = self.features.phi[subset], self.u
        a = phi.T @ phi + u.ridge * torch.eye(phi.shape[1], dtype=DTYPE, device=u.device)
        return self.features.psi @ torch.linalg.solve(a, phi.T @ u.targets[subset])

    def prefix_scores(self, perms: torch.Tensor):
        """Yield (start, F) with F (B, b, m, C): one b x b Cholesky per block of b positions."""
        u, phi_all, psi = self.u, self.features.phi, self.features.psi
        batch, n = perms.shape
        r = phi_all.shape[1]
        eye = torch.eye(r, dtype=DTYPE, device=u.device)
        gram = (u.ridge * eye).expand(batch, r, r).clone()  # A = lambda I + Phi_S' Phi_S
        inverse = (eye / u.ridge).expand(batch, r, r).clone()  # G = A^-1
        weights = torch.zeros(batch, r, u.n_classes, dtype=DTYPE, device=u.device)  # G Phi_S' Y_S
        scores = torch.zeros(batch, psi.shape[0], u.n_classes, dtype=DTYPE, device=u.device)
        block = min(self.block_size, n)
        for index, start in enumerate(range(0, n, block)):
            rows = perms[:, start:start + block]
            feats, targets = phi_all[rows], u.targets[rows]  # (B, b, r), (B, b, C)
            h = feats @ inverse
            m_block = h @ feats.transpose(-1, -2)
            m_block.diagonal(dim1=-2, dim2=-1).add_(1.0)
            chol = torch.linalg.cholesky(m_block)
            v = torch.linalg.solve_triangular(chol, h, upper=False)
            z = torch.linalg.solve_triangular(chol, targets - feats @ weights, upper=False)
            contrib = (v @ psi.T).unsqueeze(-1) * z.unsqueeze(-2)  # (B, b, m, C)
            prefix = scores.unsqueeze(1) + torch.cumsum(contrib, dim=1)
            scores = prefix[:, -1]
            yield start, prefix
            gram += feats.transpose(-1, -2) @ feats
            weights += v.transpose(-1, -2) @ z
            if (index + 1) % self.refresh == 0:
                inverse = torch.cholesky_inverse(torch.linalg.cholesky(gram))
            else:
                inverse -= v.transpose(-1, -2) @ v
