"""The experiments, each on one kernel problem (labels as the experiment needs them).

- ``detection``: metrics of every detector against the known wrong labels (+ recall curves).
- ``removal``: drop 0-50% of the training set from the top (most valuable), the bottom (most
  harmful) or at random, refit, report test accuracy (kernel regression at the full set's ridge,
  plus any extra learner such as logistic regression on frozen embeddings).
- ``suspect_removal``: drop the most suspicious 5/10/20% by each of several detectors (the shipped
  detector, tuned cleanlab, ...) and refit: which detector's removals help the learners most.
- ``selection``: train on the top 2/5/10% by each ranking vs random.
- ``sign_robustness``: a fixed set of targets inserted into resampled training sets of several
  sizes; the share of targets whose value sign is not unanimous across resamples: FreeShap at the
  configured permutations, FreeShap run until each target's standard error is well below the
  spread of its value across resamples (``freeshap_converged``), and closed-form LOO.
- ``exact_fidelity``: FreeShap (TMC) against exact Shapley by enumeration on a small subset.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import replace

import numpy as np
import pandas as pd

from freeshap_dq.config import ValuationConfig
from freeshap_dq.evaluation.detectors import DetectorRun
from freeshap_dq.evaluation.metrics import average_ranks, detection_curve, detection_metrics
from freeshap_dq.kernels.problem import KernelProblem
from freeshap_dq.result import ValuationResult
from freeshap_dq.scores import harm_order, worth_order
from freeshap_dq.valuation.run import compute_values
from freeshap_dq.valuation.stopping import MaxPermutations, StoppingCriterion
from freeshap_dq.valuation.utility import KernelRegressionUtility

ROBUSTNESS_SE_SHARE = 0.1  # freeshap_converged: each target's standard error at most this share of its spread
ROBUSTNESS_MAX_PERMUTATIONS = 5000
Learner = Callable[[np.ndarray], float]  # training subset (indices) -> test accuracy


def detection(run: DetectorRun, flipped: np.ndarray, extra: dict[str, np.ndarray] | None = None
              ) -> tuple[pd.DataFrame, dict[str, tuple[np.ndarray, np.ndarray]]]:
    suspicion = {**run.suspicion, **(extra or {})}
    rows = [{"detector": name, **detection_metrics(s, flipped)} for name, s in suspicion.items()]
    curves = {name: detection_curve(s, flipped) for name, s in suspicion.items()}
    return pd.DataFrame(rows), curves


def subproblem(problem: KernelProblem, rows: np.ndarray) -> KernelProblem:
    rows = np.asarray(rows)
    return replace(problem, k_train=problem.k_train[..., rows[:, None], rows], k_test=problem.k_test[..., rows],
                   y_train=problem.y_train[rows],
                   train_ids=None if problem.train_ids is None else np.asarray(problem.train_ids)[rows])


def kernel_learner(problem: KernelProblem, config: ValuationConfig, ridge: float) -> Learner:
    """Test accuracy of kernel regression refitted on a subset at a fixed ridge; one utility serves every refit."""
    utility = KernelRegressionUtility(problem, replace(config, ridge=str(ridge), device="cpu"))
    return lambda subset: utility(np.asarray(subset))[0]


def removal(values: np.ndarray, learners: dict[str, Learner], seed: int = 0,
            fractions: tuple[float, ...] = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5)) -> pd.DataFrame:
    n = len(values)
    order = harm_order(values)
    shuffled = np.random.default_rng(seed).permutation(n)
    rows = []
    for fraction in fractions:
        k = int(round(fraction * n))
        kept = {"bottom": order[k:], "top": order[:n - k], "random": shuffled[k:]}
        for direction, subset in kept.items():
            for learner, fit in learners.items():
                rows.append({"removed_from": direction, "fraction_removed": fraction, "learner": learner,
                             "accuracy": fit(np.sort(subset))})
    return pd.DataFrame(rows)


def suspect_removal(suspicions: dict[str, np.ndarray], learners: dict[str, Learner],
                    fractions: tuple[float, ...] = (0.05, 0.1, 0.2)) -> pd.DataFrame:
    """Drop each detector's most suspicious ``fraction`` and refit: rows ``removed_from`` = 'suspects of NAME'."""
    rows = []
    for name, suspicion in suspicions.items():
        order = harm_order(-np.asarray(suspicion, dtype=float))
        for fraction in fractions:
            kept = np.sort(order[int(round(fraction * len(order))):])
            for learner, fit in learners.items():
                rows.append({"removed_from": f"suspects of {name}", "fraction_removed": fraction, "learner": learner,
                             "accuracy": fit(kept)})
    return pd.DataFrame(rows)


def selection(rankings: dict[str, np.ndarray], learners: dict[str, Learner], y: np.ndarray, seed: int = 0,
              fractions: tuple[float, ...] = (0.02, 0.05, 0.1)) -> pd.DataFrame:
    """``rankings``: name -> worth (higher = keep first). Subsets contain at least one example per class."""
    n = len(y)
    rankings = {**rankings, "random": np.random.default_rng(seed).random(n)}
    rows = []
    for fraction in fractions:
        k = max(int(round(fraction * n)), len(np.unique(y)), 2)  # room for every class, however small the fraction
        for name, worth in rankings.items():
            subset = _top_with_every_class(worth_order(worth), y, k)
            for learner, fit in learners.items():
                rows.append({"ranking": name, "fraction_kept": fraction, "learner": learner,
                             "accuracy": fit(np.sort(subset))})
    return pd.DataFrame(rows)


def _top_with_every_class(order: np.ndarray, y: np.ndarray, k: int) -> np.ndarray:
    """The first k of ``order``; a class left out replaces the last pick of a class picked twice or more."""
    chosen = list(order[:k])
    for c in np.unique(y):
        if np.any(y[chosen] == c):
            continue
        counts = {label: int(np.sum(y[chosen] == label)) for label in np.unique(y[chosen])}
        position = next(p for p in range(len(chosen) - 1, -1, -1) if counts[y[chosen[p]]] > 1)
        chosen[position] = next(i for i in order if y[i] == c)
    return np.array(chosen)


class TargetsConverged(StoppingCriterion):
    """Stop when every target's standard error (-CE) is at most its threshold (and T >= 10)."""

    def __init__(self, thresholds: np.ndarray):
        self.thresholds = np.asarray(thresholds, dtype=float)

    def __call__(self, result: ValuationResult) -> bool:
        se = result.stderr("ce")[:len(self.thresholds)]
        return result.count >= 10 and bool(np.all(se <= self.thresholds))

    def __repr__(self) -> str:
        return f"TargetsConverged({len(self.thresholds)} targets)"


def sign_robustness(problem: KernelProblem, config: ValuationConfig, sizes: tuple[int, ...] = (100, 200, 400),
                    resamples: int = 5, targets: int = 20, seed: int = 0, progress: bool | None = False,
                    se_share: float = ROBUSTNESS_SE_SHARE, max_permutations: int = ROBUSTNESS_MAX_PERMUTATIONS
                    ) -> pd.DataFrame:
    """% of targets whose value sign differs across training sets resampled around them.

    ``freeshap``: the configured permutations. ``freeshap_converged``: each resample's run continues until every
    target's standard error is at most ``se_share`` x the spread (std) of its value across the resamples (measured
    on the first pass), at most ``max_permutations``: a sign that flips then flips with the data, not with the
    Monte-Carlo error. ``loo``: closed-form leave-one-out (exact, no Monte-Carlo error)."""
    rng = np.random.default_rng(seed)
    target_rows = rng.choice(problem.n_train, size=targets, replace=False)
    pool = np.setdiff1d(np.arange(problem.n_train), target_rows)
    rows = []
    for size in sizes:
        if size - targets > len(pool):
            continue
        subs = [subproblem(problem, np.concatenate([target_rows, rng.choice(pool, size=size - targets, replace=False)]))
                for _ in range(resamples)]
        first = [compute_values(sub, replace(config, seed=config.seed + r), progress=progress)
                 for r, sub in enumerate(subs)]
        values = {"freeshap": [f.values("ce")[:targets] for f in first]}
        values["loo"] = [compute_values(sub, replace(config, method="loo"), progress=False).values("ce")[:targets]
                         for sub in subs]
        spread = np.std(np.stack(values["freeshap"]), axis=0, ddof=1)
        thresholds = se_share * spread
        stop = TargetsConverged(thresholds) | MaxPermutations(max_permutations)
        converged = [compute_values(sub, replace(config, seed=config.seed + r), stopping=stop, progress=progress)
                     for r, sub in enumerate(subs)]
        values["freeshap_converged"] = [c.values("ce")[:targets] for c in converged]
        se_ratio = {"freeshap": np.median(np.stack([f.stderr("ce")[:targets] for f in first]) / spread),
                    "freeshap_converged": np.median(np.stack([c.stderr("ce")[:targets] for c in converged]) / spread),
                    "loo": 0.0}
        used = {"freeshap": config.permutations, "freeshap_converged": float(np.mean([c.count for c in converged])),
                "loo": 0}
        for method, stacked in values.items():
            signs = np.sign(np.stack(stacked))
            unanimous = np.all(signs == signs[0], axis=0) & (signs[0] != 0)
            rows.append({"size": size, "method": method, "targets": targets, "resamples": resamples,
                         "pct_not_unanimous": 100.0 * float(np.mean(~unanimous)),
                         "permutations": used[method], "median_se_over_spread": float(se_ratio[method])})
    return pd.DataFrame(rows)


def exact_fidelity(problem: KernelProblem, config: ValuationConfig, n: int = 10, seed: int = 0) -> pd.DataFrame:
    """FreeShap (TMC, the configured permutations and truncation) vs exact Shapley on ``n`` examples."""
    rows_ = np.random.default_rng(seed).choice(problem.n_train, size=n, replace=False)
    sub = subproblem(problem, rows_)
    exact = compute_values(sub, replace(config, method="exact"), progress=False)
    tmc = compute_values(sub, config, progress=False)
    out = []
    for metric in ("ce", "accuracy"):
        a, b = exact.values(metric), tmc.values(metric)
        out.append({"metric": metric, "n": n, "permutations": config.permutations,
                    "pearson": _corr(a, b), "spearman": _corr(_ranks(a), _ranks(b)),
                    "max_abs_error": float(np.max(np.abs(a - b))), "value_range": float(np.ptp(a))})
    return pd.DataFrame(out)


def _ranks(x: np.ndarray) -> np.ndarray:
    return average_ranks(np.asarray(x, dtype=float))


def _corr(a: np.ndarray, b: np.ndarray) -> float:
    if np.std(a) == 0 or np.std(b) == 0:
        return math.nan
    return float(np.corrcoef(a, b)[0, 1])
