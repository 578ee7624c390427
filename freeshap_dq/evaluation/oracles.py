r"""Oracles: how well the model itself can tell a wrong label apart, given every *other* label clean.

Not detectors: they read the clean labels the evaluation flipped, which no detector has. They answer
the question a missed goal raises -- is it the detector or the representation? A flipped label on an
example that the model, fitted to clean labels, assigns to the flipped class looks like a correct
label to anything built on that model.

- ``oracle_kernel``: :math:`-p_i(\tilde y_i)`, the closed-form leave-one-out kernel-regression
  probability of the given (possibly flipped) label :math:`\tilde y_i`, on the setting's own kernel and
  ridge, with the **clean** labels as targets. Leaving :math:`i` out, its prediction comes from the
  other examples' clean labels only.
- ``oracle_logreg``: the same from out-of-fold probabilities of the tuned logistic regression on the
  frozen embeddings (:mod:`.logreg`, the learner under tuned cleanlab) fitted to the clean labels.

Each is what its learner's self-confidence would score if the rest of the training set had no noise
at all. It is a reference, not a bound: a detector can pass it by reading what it does not, as FreeShap
does under class-conditional noise, where the validation labels show which way the flips went. Where a
detector is level with it (the shipped one under symmetric noise on Rotten Tomatoes, docs/evaluation.md),
a goal far beyond it is a goal for a better model; where a detector trails it, the model could find more.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from freeshap_dq.kernels.problem import KernelProblem
from freeshap_dq.valuation.utility import loo_probabilities

ORACLES = ("oracle_kernel", "oracle_logreg")


def oracle_suspicions(problem: KernelProblem, clean_labels: np.ndarray, ridge: float, kernel_scale: float = 1.0,
                      clean_logreg_probs: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """The oracles' suspicions for ``problem``'s given labels; ``oracle_logreg`` only with ``clean_logreg_probs``, the
    out-of-fold probabilities of :func:`~freeshap_dq.evaluation.logreg.tuned_logreg_pred_probs` on the clean labels
    (they depend on those and the seed only: one computation serves every noise mode of a seed)."""
    given, clean = np.asarray(problem.y_train), np.asarray(clean_labels)
    if clean.shape != given.shape:
        raise ValueError(f"{len(clean)} clean labels for {len(given)} training examples")
    rows = np.arange(len(given))
    probs = loo_probabilities(replace(problem, y_train=clean), ridge, kernel_scale)
    out = {"oracle_kernel": -probs[rows, given]}
    if clean_logreg_probs is not None:
        out["oracle_logreg"] = -np.asarray(clean_logreg_probs)[rows, given]
    return out
