r"""Wrong-label detectors on one kernel problem, as *suspicion* scores (higher = more suspicious).

- ``freeshap_ce`` / ``freeshap_accuracy``: :math:`-v_i` of TMC-Shapley with the -CE / accuracy utility.
- ``beta_shapley``: :math:`-v_i` of Beta(16, 1) Shapley from the same permutations (same seed).
- ``loo``: :math:`-(U(N) - U(N \setminus i))`, closed form, -CE utility.
- ``self_confidence``: :math:`-p_i(y_i)`, the closed-form leave-one-out kernel-regression
  probability of the given label.
- ``self_confidence_calibrated``: :math:`-(p_i(y_i) - t_{y_i})` with :math:`t_c` the mean of
  :math:`p_j(c)` over the examples labelled c (confident learning's per-class threshold): raw
  self-confidence favours whatever class the noise made larger and collapses under
  class-conditional noise (AUROC 0.58 -> 0.79 on Rotten Tomatoes, docs/evaluation.md).
- ``cv_kernel``: the same from k-fold kernel regression (out-of-fold probabilities).
- ``combined``: the mean of the normalised ranks of ``freeshap_ce`` and
  ``self_confidence_calibrated`` -- unless the wrong labels look one-directional, then ``freeshap_ce``
  alone. FreeShap says how much an example hurts held-out predictions, self-confidence how much the
  rest of the training set disagrees with its label: two views of a wrong label whose errors are
  only partly shared, so averaging ranks helps under symmetric noise. When wrong labels flow from
  some classes into others, the per-class thresholds of calibrated self-confidence are set by the
  very labels being audited and it falls well behind, while FreeShap is scored against the
  validation labels. Two tests, neither needing clean training labels, say so:

  - *shift*: the training labels' class shares differ from the validation set's (two-sample
    chi-square test, p < ``SHIFT_P``);
  - *asymmetry*: the table of (given label, the kernel's leave-one-out prediction) is not
    symmetric (Bowker's test, p < ``ASYMMETRY_P``). Symmetric noise sends as many class-i labels
    to j as j labels to i, so the disagreements are balanced pair by pair; one-directional flips
    pile up on one side. For two classes this is McNemar's test. It detects what the shift test
    cannot: flips that leave the class shares level (c to c + 1 over a cycle of classes).

  (docs/evaluation.md).
- ``random``: a seeded uniform ranking.

The cleanlab detectors (confident learning, KNN-Shapley) live in the cleanlab adapter.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np
import torch

from freeshap_dq.config import RANKING_METRIC, ValuationConfig
from freeshap_dq.evaluation.metrics import average_ranks
from freeshap_dq.kernels.problem import KernelProblem
from freeshap_dq.result import ValuationResult
from freeshap_dq.valuation.methods import samples_permutations
from freeshap_dq.valuation.run import compute_semivalues, compute_values
from freeshap_dq.valuation.utility import DTYPE, as_stack, loo_probabilities, one_hot, solve_scores


@dataclass
class DetectorRun:
    """Suspicions per detector plus what produced them (results, ridge, probabilities)."""

    suspicion: dict[str, np.ndarray] = field(default_factory=dict)
    results: dict[str, ValuationResult] = field(default_factory=dict)
    ridge: float = float("nan")
    loo_probs: np.ndarray | None = None
    cv_probs: np.ndarray | None = None

    @property
    def loo_prediction(self) -> np.ndarray:
        """The kernel's closed-form leave-one-out predicted class per training example (``combined`` tests it)."""
        return self.loo_probs.argmax(1)


def normalised_rank(x: np.ndarray) -> np.ndarray:
    """Ranks scaled to [0, 1] (average ranks for ties)."""
    x = np.asarray(x, dtype=float)
    return (average_ranks(x) - 1) / max(len(x) - 1, 1)


def combine(*suspicions: np.ndarray) -> np.ndarray:
    return np.mean([normalised_rank(s) for s in suspicions], axis=0)


SHIFT_P = 0.01
ASYMMETRY_P = 0.001
SHIPPED = f"freeshap_{RANKING_METRIC}"  # the detector every tool ranks by (freeshap_dq.config.RANKING_METRIC)


def _chi_square_survival(statistic: float, dof: int) -> float:
    return float(torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64),
                                         torch.tensor(statistic / 2, dtype=torch.float64)))


def label_shift_p_value(y_train: np.ndarray, y_test: np.ndarray, n_classes: int) -> float:
    """p-value of the two-sample chi-square test that training and validation labels share their class shares."""
    counts = np.stack([np.bincount(y_train, minlength=n_classes), np.bincount(y_test, minlength=n_classes)])
    counts = counts[:, counts.sum(0) > 0].astype(float)
    if counts.shape[1] < 2:
        return 1.0
    expected = counts.sum(1, keepdims=True) * counts.sum(0, keepdims=True) / counts.sum()
    statistic = float(((counts - expected) ** 2 / expected).sum())
    return _chi_square_survival(statistic, counts.shape[1] - 1)


def label_asymmetry_p_value(y_given: np.ndarray, y_predicted: np.ndarray, n_classes: int) -> float:
    r"""p-value of Bowker's test that the table :math:`n_{ij}` = #(given i, predicted j) is symmetric:
    :math:`\sum_{i<j} (n_{ij} - n_{ji})^2 / (n_{ij} + n_{ji})`, chi-square with one degree of freedom per pair
    of classes that disagree at all (McNemar's test for two classes). 1.0 when no pair disagrees."""
    table = np.zeros((n_classes, n_classes))
    np.add.at(table, (np.asarray(y_given), np.asarray(y_predicted)), 1)
    upper, lower = table[np.triu_indices(n_classes, 1)], table.T[np.triu_indices(n_classes, 1)]
    pairs = upper + lower > 0
    if not pairs.any():
        return 1.0
    statistic = float(((upper - lower)[pairs] ** 2 / (upper + lower)[pairs]).sum())
    return _chi_square_survival(statistic, int(pairs.sum()))


def combined_suspicion(freeshap_ce: np.ndarray, calibrated: np.ndarray, y_train: np.ndarray, y_test: np.ndarray,
                       y_predicted: np.ndarray, n_classes: int) -> np.ndarray:
    """``combined`` (module docstring): rank mean of the two signals; FreeShap alone when the labels look shifted
    or the disagreements with ``y_predicted`` (the kernel's leave-one-out predictions) one-directional."""
    if one_directional(y_train, y_test, y_predicted, n_classes):
        return normalised_rank(freeshap_ce)
    return combine(freeshap_ce, calibrated)


def one_directional(y_train: np.ndarray, y_test: np.ndarray, y_predicted: np.ndarray, n_classes: int) -> bool:
    """Whether the training labels' errors look one-directional: the shift or the asymmetry test fires."""
    return (label_shift_p_value(y_train, y_test, n_classes) < SHIFT_P
            or label_asymmetry_p_value(y_train, y_predicted, n_classes) < ASYMMETRY_P)


def calibrated_self_confidence(probs: np.ndarray, y: np.ndarray) -> np.ndarray:
    """p_i(y_i) minus the mean probability of class y_i over the examples labelled y_i."""
    y = np.asarray(y)
    thresholds = np.array([probs[y == c, c].mean() if np.any(y == c) else 0.0 for c in range(probs.shape[1])])
    return probs[np.arange(len(y)), y] - thresholds[y]


def cv_kernel_probabilities(problem: KernelProblem, ridge: float, kernel_scale: float = 1.0, folds: int = 5,
                            seed: int = 0) -> np.ndarray:
    """Out-of-fold class probabilities from kernel regression fitted on the other folds."""
    k = as_stack(torch.as_tensor(problem.k_train, dtype=DTYPE) * kernel_scale)
    targets = one_hot(torch.as_tensor(problem.y_train), problem.n_classes)
    fold = np.random.default_rng(seed).permutation(problem.n_train) % folds
    scores = torch.zeros_like(targets)
    for f in range(folds):
        held, fit = np.flatnonzero(fold == f), np.flatnonzero(fold != f)
        scores[held] = solve_scores(k[:, fit][:, :, fit], k[:, held][:, :, fit], targets[fit], ridge)
    probs = np.clip(scores.numpy(), 1e-6, None)
    return probs / probs.sum(1, keepdims=True)


def run_detectors(problem: KernelProblem, config: ValuationConfig, seed: int = 0, beta: bool = True,
                  progress: bool | None = None) -> DetectorRun:
    """Every core detector on ``problem`` (its labels are the possibly noisy ones)."""
    out = DetectorRun()
    if samples_permutations(config):
        runs = compute_semivalues(problem, config, (config.method, "beta") if beta else (config.method,), progress)
    else:  # exact enumeration: its own run, Beta Shapley by permutations
        runs = {config.method: compute_values(problem, config, progress=progress),
                **(compute_semivalues(problem, config, ("beta",), progress) if beta else {})}
    tmc = runs[config.method]
    out.results["freeshap"] = tmc
    out.ridge = float(tmc.manifest["ridge"])
    out.suspicion["freeshap_ce"] = -tmc.values("ce")
    out.suspicion["freeshap_accuracy"] = -tmc.values("accuracy")
    if beta:  # the same permutations' marginals, weighted as Beta Shapley (one engine run for both)
        beta_result = runs["beta"]
        out.results["beta_shapley"] = beta_result
        out.suspicion["beta_shapley"] = -beta_result.values("ce")
    loo = compute_values(problem, replace(config, method="loo"), progress=False)
    out.results["loo"] = loo
    out.suspicion["loo"] = -loo.values("ce")
    probs = loo_probabilities(problem, out.ridge, config.kernel_scale)
    out.loo_probs = probs
    given = np.arange(problem.n_train), problem.y_train
    out.suspicion["self_confidence"] = -probs[given]
    out.suspicion["self_confidence_calibrated"] = -calibrated_self_confidence(probs, problem.y_train)
    out.cv_probs = cv_kernel_probabilities(problem, out.ridge, config.kernel_scale, seed=seed)
    out.suspicion["cv_kernel"] = -out.cv_probs[given]
    out.suspicion["combined"] = combined_suspicion(out.suspicion["freeshap_ce"], out.suspicion[
        "self_confidence_calibrated"], problem.y_train, problem.y_test, out.loo_prediction, problem.n_classes)
    out.suspicion["random"] = np.random.default_rng(seed).random(problem.n_train)
    return out

