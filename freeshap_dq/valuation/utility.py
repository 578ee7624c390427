r"""Kernel regression utility, exactly as FreeShap defines it.

For a subset S of the training set, with one-vs-rest 0/1 targets :math:`Y_S` and ridge
:math:`\lambda` (float64, no bias, no softmax):

.. math::  F = K_{TS} (K_{SS} + \lambda I)^{-1} Y_S \in \mathbb{R}^{m \times C}

Per test point t: ``acc_t = [argmax F_t = y_t]`` and ``ce_t = logsumexp(F_t) - F_{t,y_t}``
(raw scores used as logits). The utility is ``U(S) = (mean acc, -mean ce)``. The empty set
scores as random guessing, ``(1/C, -ln C)``, or as the all-zero predictor on request.

Closed-form leave-one-out from one factorisation, with :math:`G = (K + \lambda I)^{-1}` and
:math:`\alpha = G Y`:

- on training points, the LOO score of i is :math:`Y_i - \alpha_i / G_{ii}`; the ``auto`` ridge
  minimises the mean squared LOO residual (PRESS) on the training labels;
- on a test point x, :math:`f_{-i}(x) = f(x) - (k(x)^\top G e_i)\, \alpha_i / G_{ii}`.

Per-class kernels (K of shape C x n x n): column c of F is regressed on kernel c,
:math:`F_{:,c} = K^c_{TS} (K^c_{SS} + \lambda I)^{-1} Y_{S,c}`, and every formula above holds per class.
Internally kernels are handled as stacks (K, ., .) with K = 1 (one kernel for all classes) or K = C.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from freeshap_dq.config import ValuationConfig
from freeshap_dq.errors import KernelError
from freeshap_dq.kernels.problem import KernelProblem
from freeshap_dq.valuation.ridge import choose_ridge

DTYPE = torch.float64
# an eNTK's Gram is summed from fp32 products over 16,384-column blocks: rounding of about sqrt(16384) * 2**-24 ~ 1e-5
# of the diagonal, which duplicated texts (a rank-deficient kernel) expose as eigenvalues just below zero
PSD_RTOL = 1e-5


def resolve_device(spec: str = "auto") -> torch.device:
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(spec)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise KernelError(f"device {spec!r} was asked for but CUDA is not available here; use --device cpu or auto.")
    return device


def device_tensor(array: np.ndarray, device: torch.device) -> torch.Tensor:
    """A float64 tensor of ``array``; a read-only array (a memory-mapped kernel folder) is copied, never shared."""
    if isinstance(array, np.ndarray) and not array.flags.writeable:
        return torch.tensor(np.asarray(array), dtype=DTYPE, device=device)
    return torch.as_tensor(array, dtype=DTYPE, device=device)


def one_hot(y: torch.Tensor, n_classes: int) -> torch.Tensor:
    return torch.nn.functional.one_hot(y, n_classes).to(DTYPE)


def point_utilities(scores: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-point (accuracy, -cross-entropy) for scores (..., m, C) and labels (m,)."""
    acc = (scores.argmax(dim=-1) == y).to(DTYPE)
    picked = scores.gather(-1, y.expand(scores.shape[:-1]).unsqueeze(-1)).squeeze(-1)
    neg_ce = picked - torch.logsumexp(scores, dim=-1)
    return acc, neg_ce


def as_stack(k: torch.Tensor) -> torch.Tensor:
    """(K, ., .) view of one kernel (K = 1) or of per-class kernels (K = C)."""
    return k if k.dim() == 3 else k.unsqueeze(0)


def solve_scores(k_ss: torch.Tensor, k_ts: torch.Tensor, y_s: torch.Tensor, ridge: float) -> torch.Tensor:
    """Kernel regression scores (..., m, C) from kernel stacks k_ss (..., K, s, s), k_ts (..., K, m, s) and
    targets y_s (..., s, C): one kernel for every class (K = 1) or class c on kernel c (K = C)."""
    chol = _cholesky(k_ss, ridge)
    if k_ss.shape[-3] == 1:
        return (k_ts @ torch.cholesky_solve(y_s.unsqueeze(-3), chol)).squeeze(-3)
    coef = torch.cholesky_solve(y_s.transpose(-1, -2).unsqueeze(-1), chol)  # (..., C, s, 1)
    return (k_ts @ coef).squeeze(-1).transpose(-1, -2)


def per_class_product(stack: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
    """Column c of the result is ``stack[c] @ columns[:, c]`` (or ``stack[0] @ columns`` for one kernel)."""
    if stack.shape[0] == 1:
        return stack[0] @ columns
    return torch.einsum("cij,jc->ic", stack, columns)


def loo_train_scores(k_train: torch.Tensor, targets: torch.Tensor, ridge: float) -> torch.Tensor:
    """Leave-one-out regression scores on the training points themselves (n x C)."""
    inverse = torch.cholesky_inverse(_cholesky(as_stack(k_train), ridge))
    alpha = per_class_product(inverse, targets)
    diag = torch.diagonal(inverse, dim1=-2, dim2=-1).T  # (n, K)
    return targets - alpha / diag


def loo_probabilities(problem, ridge: float, kernel_scale: float = 1.0) -> np.ndarray:
    """Out-of-sample class probabilities for the training set: closed-form LOO kernel regression
    (one-vs-rest scores clipped at 1e-6 and renormalised)."""
    k = torch.as_tensor(problem.k_train, dtype=DTYPE) * kernel_scale
    y = torch.as_tensor(problem.y_train)
    scores = loo_train_scores(k, one_hot(y, problem.n_classes), ridge).numpy()
    probs = np.clip(scores, 1e-6, None)
    return probs / probs.sum(1, keepdims=True)


def _cholesky(k: torch.Tensor, ridge: float) -> torch.Tensor:
    eye = torch.eye(k.shape[-1], dtype=k.dtype, device=k.device)
    chol, info = torch.linalg.cholesky_ex(k + ridge * eye)
    if info.numel() and int(info.max()) > 0:
        raise KernelError(
            f"the kernel plus ridge {ridge:.3g} is not positive definite; raise the ridge or pass a jitter."
        )
    return chol


def loo_squared_error(k_train: torch.Tensor, targets: torch.Tensor, ridge: float) -> float:
    """Mean squared closed-form leave-one-out residual on the training labels (PRESS / n)."""
    residual = targets - loo_train_scores(k_train, targets, ridge)
    return float((residual**2).sum(-1).mean())


def check_positive_semidefinite(k_train: torch.Tensor, source: str) -> None:
    """Raise a clear error if K (each class kernel) has an eigenvalue below -PSD_RTOL * mean(diag K)."""
    mean_diag = float(torch.diagonal(k_train, dim1=-2, dim2=-1).mean())
    tol = PSD_RTOL * max(mean_diag, 1e-300)
    eye = torch.eye(k_train.shape[-1], dtype=k_train.dtype, device=k_train.device)
    _, info = torch.linalg.cholesky_ex(k_train + tol * eye)
    if int(info.max()) == 0:
        return
    smallest = float(torch.linalg.eigvalsh(k_train).min())
    if smallest >= -tol:
        return
    raise KernelError(
        f"{source}: k_train is not positive semidefinite: its smallest eigenvalue is {smallest:.3g} "
        f"(mean diagonal {mean_diag:.3g}). A kernel computed in fp32 can be slightly indefinite; "
        f"pass jitter >= {-smallest / mean_diag:.2g} (--jitter) to add that multiple of the mean "
        f"diagonal to the diagonal, or recompute the kernel in float64."
    )


def empty_point_utilities(mode: str, y_test: torch.Tensor, n_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-point (accuracy, -CE) of the empty coalition: random guessing, or the all-zero predictor (``zero``)."""
    m, device = y_test.shape[0], y_test.device
    if mode == "zero":
        return point_utilities(torch.zeros(m, n_classes, dtype=DTYPE, device=device), y_test)
    return (torch.full((m,), 1.0 / n_classes, dtype=DTYPE, device=device),
            torch.full((m,), -math.log(n_classes), dtype=DTYPE, device=device))


class UtilityEnds:
    """U(N) and U(empty) as (accuracy, -CE) means of ``full_point`` and ``empty_point``."""

    full_point: tuple[torch.Tensor, torch.Tensor]
    empty_point: tuple[torch.Tensor, torch.Tensor]

    @property
    def full(self) -> tuple[float, float]:
        return float(self.full_point[0].mean()), float(self.full_point[1].mean())

    @property
    def empty(self) -> tuple[float, float]:
        return float(self.empty_point[0].mean()), float(self.empty_point[1].mean())


class KernelRegressionUtility(UtilityEnds):
    """U(S) for one valuation problem, with tensors on one device; ``ridge`` in scaled-kernel units.
    A :class:`freeshap_dq.contracts.Utility` holding the whole kernel (no features of its own)."""

    features = None

    def __init__(self, problem: KernelProblem, config: ValuationConfig, device: torch.device | None = None):
        self.problem = problem
        self.device = device or resolve_device(config.device)
        scale = config.kernel_scale
        self.k_train = device_tensor(problem.k_train, self.device) * scale
        if config.jitter:
            self.k_train = self.k_train + config.jitter * float(
                torch.diagonal(self.k_train, dim1=-2, dim2=-1).mean()) * torch.eye(
                problem.n_train, dtype=DTYPE, device=self.device)
        check_positive_semidefinite(self.k_train, problem.source)
        self.k_test = device_tensor(problem.k_test, self.device) * scale
        self.per_class = problem.per_class
        self.k_stack, self.k_test_stack = as_stack(self.k_train), as_stack(self.k_test)
        self.y_train = torch.as_tensor(problem.y_train, device=self.device)
        self.y_test = torch.as_tensor(problem.y_test, device=self.device)
        self.n_classes = problem.n_classes
        self.targets = one_hot(self.y_train, self.n_classes)
        self.ridge_choice = choose_ridge(config.ridge, float(torch.diagonal(self.k_train, dim1=-2, dim2=-1).mean()),
                                         lambda ridge: loo_squared_error(self.k_train, self.targets, ridge))
        self.ridge = self.ridge_choice.value
        self.empty_mode = config.empty_utility
        self.empty_point = empty_point_utilities(self.empty_mode, self.y_test, self.n_classes)
        self.full_point = self.point_utilities_of(torch.arange(problem.n_train, device=self.device))

    def predict(self, subset: torch.Tensor) -> torch.Tensor:
        """Scores F (m x C) of the regression fitted on ``subset`` (direct solve)."""
        if subset.numel() == 0:
            return torch.zeros(self.problem.n_test, self.n_classes, dtype=DTYPE, device=self.device)
        if subset.numel() == self.problem.n_train and bool((subset == torch.arange(
                subset.numel(), device=subset.device)).all()):  # the full set: no n x n gathered copy
            return solve_scores(self.k_stack, self.k_test_stack, self.targets, self.ridge)
        return solve_scores(self.k_stack[:, subset][:, :, subset], self.k_test_stack[:, :, subset],
                            self.targets[subset], self.ridge)

    def point_utilities_of(self, subset: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if subset.numel() == 0:
            return self.empty_point
        return point_utilities(self.predict(subset), self.y_test)

    def __call__(self, subset) -> tuple[float, float]:
        """Aggregate (accuracy, -cross-entropy) of the subset of training indices."""
        acc, neg_ce = self.point_utilities_of(torch.as_tensor(np.asarray(subset, dtype=np.int64), device=self.device))
        return float(acc.mean()), float(neg_ce.mean())

    def leave_one_out_point_values(self, chunk: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
        """U(N) - U(N \\ {i}) per training point i and test point t: two n x m tensors."""
        inverse = torch.cholesky_inverse(_cholesky(self.k_stack, self.ridge))  # (K, n, n)
        alpha = per_class_product(inverse, self.targets)  # (n, C)
        scores = per_class_product(self.k_test_stack, alpha)  # (m, C)
        influence = self.k_test_stack @ inverse  # (K, m, n)
        diag = torch.diagonal(inverse, dim1=-2, dim2=-1).T  # (n, K)
        full_acc, full_ce = self.full_point
        n = self.problem.n_train
        acc_values = torch.empty(n, self.problem.n_test, dtype=DTYPE, device=self.device)
        ce_values = torch.empty_like(acc_values)
        for lo in range(0, n, chunk):
            hi = min(lo + chunk, n)
            # shift[i, t, c] = influence[c, t, i] alpha[i, c] / G^c_ii (K = 1: influence[0] for every class)
            shift = influence[:, :, lo:hi].permute(2, 1, 0) * (alpha[lo:hi] / diag[lo:hi]).unsqueeze(1)
            acc, neg_ce = point_utilities(scores.unsqueeze(0) - shift, self.y_test)
            acc_values[lo:hi] = full_acc - acc
            ce_values[lo:hi] = full_ce - neg_ce
        return acc_values, ce_values
