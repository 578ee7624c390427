r"""The prefix engine: the utility of every prefix of a permutation from one Cholesky.

For a permutation :math:`\pi` let :math:`A = K_{\pi\pi} + \lambda I = L L^\top`. The leading
p x p block of L is the factor of the p-th prefix, so with :math:`W = L^{-1} K_{\pi T}` (n x m)
and :math:`z = L^{-1} Y_\pi` (n x C) the scores of the p-th prefix are

.. math::  F_p = \sum_{q \le p} W_{q,:}^\top z_{q,:}

(a cumulative sum). One factorisation serves all prefixes and all classes.

With truncation the factor grows in blocks of b rows (left-looking): with S the rows done and
B the next b, :math:`R = L_S^{-1} A_{SB}`, :math:`L_{BB} = \mathrm{chol}(A_{BB} - R^\top R)`,
:math:`W_B = L_{BB}^{-1}(K_{BT} - R^\top W_S)`, :math:`z_B = L_{BB}^{-1}(Y_B - R^\top z_S)`;
the b prefixes of the block are scored, the stopping rule is applied, and the work stops at
the block that truncates.

Truncation (reference semantics): after recording prefix p's marginal, if
:math:`|U(S_p) - U(N)| \le tol \cdot |U(N) - U(\emptyset)|` on both metrics for the second
consecutive prefix, the permutation stops; later elements get a marginal of 0.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from freeshap_dq.contracts import PointSink
from freeshap_dq.errors import KernelError
from freeshap_dq.valuation.utility import DTYPE, KernelRegressionUtility, point_utilities

CHUNK_ELEMENTS = 4_000_000  # bound on prefix-chunk x m x C scores held at once


@dataclass
class PermutationMarginals:
    """Marginals of a batch of permutations, in permutation order (position p = element perm[:, p])."""

    accuracy: torch.Tensor  # (B, n)
    ce: torch.Tensor  # (B, n)
    point_accuracy: torch.Tensor | None  # (B, n, m)
    point_ce: torch.Tensor | None  # (B, n, m)
    evaluated: torch.Tensor  # (B,) number of prefixes evaluated (n when not truncated)


class PrefixEngine:
    """The exact engine (module docstring); an :class:`freeshap_dq.contracts.Engine`.

    ``full_utility``: U(N) as a (accuracy, -CE) tensor, the target of the truncation rule."""

    def __init__(self, utility: KernelRegressionUtility, *, tolerance: float = 0.0,
                 per_point: bool = False, block_size: int = 128):
        self.u = utility
        self.tolerance = tolerance
        self.per_point = per_point
        self.block_size = block_size
        full, empty = utility.full, utility.empty
        self.full_utility = torch.tensor(full, dtype=DTYPE, device=utility.device)
        empty_utility = torch.tensor(empty, dtype=DTYPE, device=utility.device)
        self.truncation_threshold = tolerance * torch.abs(self.full_utility - empty_utility)

    def manifest_entries(self) -> dict[str, Any]:
        return {}

    def run(self, perms: torch.Tensor, point_sink: PointSink | None = None) -> PermutationMarginals:
        """Marginals of every element of each permutation in ``perms`` (B x n, long).

        Per point, with ``point_sink``: instead of returning B x n x m marginals, each block of positions is
        handed over as it is computed, ``point_sink(start, acc, ce)`` with (B, b, m) marginals of positions
        start .. start + b (zero after truncation), so memory stays O(B b m)."""
        u = self.u
        perms = perms.to(u.device)
        batch, n = perms.shape
        m = u.problem.n_test
        out_acc = torch.zeros(batch, n, dtype=DTYPE, device=u.device)
        out_ce = torch.zeros_like(out_acc)
        keep_points = self.per_point and point_sink is None
        point_acc = torch.zeros(batch, n, m, dtype=DTYPE, device=u.device) if keep_points else None
        point_ce = torch.zeros_like(point_acc) if keep_points else None
        evaluated = torch.full((batch,), n, dtype=torch.long, device=u.device)

        prev_acc = u.empty_point[0].expand(batch, m)
        prev_ce = u.empty_point[1].expand(batch, m)
        within_prev = torch.zeros(batch, dtype=torch.bool, device=u.device)
        active = torch.ones(batch, dtype=torch.bool, device=u.device)
        for start, scores in self.prefix_scores(perms):
            acc, neg_ce = point_utilities(scores, u.y_test)  # (B, b, m)
            d_acc = torch.diff(acc, dim=1, prepend=prev_acc.unsqueeze(1))
            d_ce = torch.diff(neg_ce, dim=1, prepend=prev_ce.unsqueeze(1))
            prev_acc, prev_ce = acc[:, -1], neg_ce[:, -1]
            stop = slice(start, start + acc.shape[1])
            mean_acc, mean_ce = acc.mean(-1), neg_ce.mean(-1)
            keep = torch.ones_like(mean_acc, dtype=torch.bool) & active.unsqueeze(1)
            if self.tolerance > 0:
                within = ((mean_acc - self.full_utility[0]).abs() <= self.truncation_threshold[0]) & (
                    (mean_ce - self.full_utility[1]).abs() <= self.truncation_threshold[1])
                second = within & torch.cat([within_prev.unsqueeze(1), within[:, :-1]], dim=1)
                within_prev = within[:, -1]
                positions = torch.arange(acc.shape[1], device=u.device)
                first_hit = torch.where(second, positions, acc.shape[1]).min(dim=1).values
                keep &= positions.unsqueeze(0) <= first_hit.unsqueeze(1)
                stopped_here = active & (first_hit < acc.shape[1])
                evaluated = torch.where(stopped_here, start + first_hit + 1, evaluated)
                active = active & ~stopped_here
            weight = keep.to(DTYPE)
            out_acc[:, stop] = d_acc.mean(-1) * weight
            out_ce[:, stop] = d_ce.mean(-1) * weight
            if keep_points:
                point_acc[:, stop] = d_acc * weight.unsqueeze(-1)
                point_ce[:, stop] = d_ce * weight.unsqueeze(-1)
            elif self.per_point:
                point_sink(start, d_acc * weight.unsqueeze(-1), d_ce * weight.unsqueeze(-1))
            if not bool(active.any()):
                break
        return PermutationMarginals(out_acc, out_ce, point_acc, point_ce, evaluated)

    def prefix_scores(self, perms: torch.Tensor):
        """Yield (start, F) with F (B, b, m, C) the scores of prefixes start+1 .. start+b.

        Per-class kernels add a class axis after the batch axis: one factor per class kernel, and class c's
        scores come from kernel c alone."""
        u = self.u
        batch, n = perms.shape
        block = n if self.tolerance == 0 else min(self.block_size, n)
        if u.per_class:
            a_perm = u.k_train[:, perms.unsqueeze(-1), perms.unsqueeze(-2)].movedim(0, 1).contiguous()  # (B, C, n, n)
            k_perm = u.k_test.transpose(-1, -2)[:, perms].movedim(0, 1)  # (B, C, n, m)
            y_perm = u.targets[perms].transpose(-1, -2).unsqueeze(-1)  # (B, C, n, 1)
        else:
            a_perm = u.k_train[perms.unsqueeze(-1), perms.unsqueeze(-2)]  # (B, n, n)
            k_perm = u.k_test.T[perms]  # (B, n, m)
            y_perm = u.targets[perms]  # (B, n, C)
        a_perm.diagonal(dim1=-2, dim2=-1).add_(u.ridge)
        blocked = block < n
        chol = torch.zeros_like(a_perm) if blocked else None
        w_all = torch.zeros_like(k_perm) if blocked else None
        z_all = torch.zeros_like(y_perm) if blocked else None
        scores = torch.zeros(batch, u.problem.n_test, u.n_classes, dtype=DTYPE, device=u.device)
        for start in range(0, n, block):
            end = min(start + block, n)
            a_bb = a_perm[..., start:end, start:end]
            k_b, y_b = k_perm[..., start:end, :], y_perm[..., start:end, :]
            if start > 0:
                r = torch.linalg.solve_triangular(chol[..., :start, :start], a_perm[..., :start, start:end], upper=False)
                r_t = r.transpose(-1, -2)
                a_bb = a_bb - r_t @ r
                k_b = k_b - r_t @ w_all[..., :start, :]
                y_b = y_b - r_t @ z_all[..., :start, :]
                chol[..., start:end, :start] = r_t
            l_bb = self._factor(a_bb, perms, start)
            w_b = torch.linalg.solve_triangular(l_bb, k_b, upper=False)
            z_b = torch.linalg.solve_triangular(l_bb, y_b, upper=False)
            if blocked:
                chol[..., start:end, start:end] = l_bb
                w_all[..., start:end, :] = w_b
                z_all[..., start:end, :] = z_b
            step = max(1, CHUNK_ELEMENTS // max(1, batch * u.problem.n_test * u.n_classes))
            for lo in range(0, end - start, step):
                hi = min(lo + step, end - start)
                if u.per_class:  # (B, C, b, m) * (B, C, b, 1) -> (B, b, m, C)
                    contrib = (w_b[..., lo:hi, :] * z_b[..., lo:hi, :]).permute(0, 2, 3, 1)
                else:
                    contrib = w_b[:, lo:hi, :, None] * z_b[:, lo:hi, None, :]
                prefix = scores.unsqueeze(1) + torch.cumsum(contrib, dim=1)
                scores = prefix[:, -1]
                yield start + lo, prefix

    def _factor(self, a: torch.Tensor, perms: torch.Tensor, start: int) -> torch.Tensor:
        chol, info = torch.linalg.cholesky_ex(a)
        if int(info.max()) > 0:
            raise KernelError(
                f"Cholesky failed at prefix {start + int(info.max())} of a permutation: the kernel plus "
                f"ridge {self.u.ridge:.3g} is numerically singular. Raise the ridge (e.g. --ridge auto) or "
                f"pass --jitter."
            )
        return chol
