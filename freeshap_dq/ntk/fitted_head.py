r"""A head that knows the task, for the encoder-head adapter (``--head fit``).

The default encoder-head kernel is the eNTK of a *seeded random* linear head on the pooled
encoder, so the gradient that builds the kernel points in a random direction of the pooled space.
``--head fit`` replaces it with a multinomial logistic regression fitted on the frozen pooled
embeddings :math:`\phi(x_i)` with the **training labels the user gives** (never test labels):

.. math::  \min_{W, b}\ \sum_i -\log \mathrm{softmax}(W z_i + b)_{y_i} + \tfrac{1}{2C}\lVert W\rVert^2,
           \qquad z_i = (\phi(x_i) - \mu) / \sigma

(coordinates that are constant up to rounding are left unscaled) with the strength :math:`C`
chosen by stratified 5-fold cross-validation on the training set (``FIT_CS``), then mapped back
to raw pooled vectors: :math:`W' = W / \sigma`, :math:`b' = b - W' \mu`. The kernel then depends
on the labels being audited: a wrong label pulls the head, and so the kernel, a little toward
itself. That is the same dependence a model trained
on the data has, and the one the tuned logistic regression baseline has.

Which logit makes the kernel:

- C = 2: the L2-penalised multinomial solution is :math:`W = (-w/2, w/2)` with :math:`w` the binary
  coefficients. The head's rows are set to :math:`(-w, w)` so that the class-0 logit is the
  **logit difference** :math:`\log p_0/p_1`, and ``--kernel class0`` (what ``auto`` resolves to) is
  its eNTK.
- C > 2: the rows are the multinomial coefficients :math:`w_c` (centred: they sum to zero), no
  class is privileged, and ``--kernel auto`` resolves to ``sum``,
  :math:`K = \sum_c \langle\nabla f_c(x), \nabla f_c(x')\rangle`. As the rows sum to zero, W has rank C - 1 and the
  sum needs C - 1 backward passes (:mod:`freeshap_dq.ntk.summed_logits`).
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import torch

from freeshap_dq.errors import InputError
from freeshap_dq.io import one_blas_thread

HEADS = ("random", "fit")
DEFAULT_HEAD = "fit"  # docs/evaluation.md: the fitted head's kernel finds more wrong labels
FIT_CS = tuple(float(c) for c in np.logspace(-4, 2, 13))
FIT_FOLDS = 5


def fit_head_weights(features: np.ndarray, labels: np.ndarray, n_classes: int, seed: int = 0
                     ) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """(weight (C, H), bias (C,), what was fitted) of the fitted head on raw pooled ``features``."""
    from sklearn.linear_model import LogisticRegressionCV
    from sklearn.model_selection import StratifiedKFold

    labels = np.asarray(labels)
    counts = np.bincount(labels, minlength=n_classes)
    if counts.min() < 2:
        raise InputError(f"--head fit needs at least 2 training examples of every class to fit the head; class "
                         f"{int(counts.argmin())} has {int(counts.min())}. Use --head random.")
    folds = int(min(FIT_FOLDS, counts.min()))
    mean, scale = features.mean(0), features.std(0)
    scale = np.where(scale > 1e-6 * scale.max(), scale, 1.0)  # a constant coordinate (up to rounding) stays as is
    model = LogisticRegressionCV(Cs=list(FIT_CS), cv=StratifiedKFold(folds, shuffle=True, random_state=seed),
                                 max_iter=3000)
    with warnings.catch_warnings(), one_blas_thread():  # scikit-learn 1.9 announces LogisticRegressionCV changes
        warnings.simplefilter("ignore", FutureWarning)
        model.fit((features - mean) / scale, labels)
    coef = model.coef_ / scale
    intercept = model.intercept_ - coef @ mean
    if n_classes == 2:
        weight, bias = np.stack([-coef[0], coef[0]]), np.array([-intercept[0], intercept[0]])
    else:  # the same softmax with rows that sum to zero exactly (the solver's are only near it)
        weight, bias = coef - coef.mean(0), intercept - intercept.mean()
    chosen = float(np.ravel(model.C_)[0])
    scores = np.mean(list(model.scores_.values())[0], axis=0)
    info = {"C": chosen, "folds": folds, "cv_accuracy": round(float(scores.max()), 4),
            "majority_share": round(float(counts.max() / counts.sum()), 4),
            "weight_norm": round(float(np.linalg.norm(weight)), 4), "fitted_on": "the training labels given"}
    return weight, bias, info


def fit_warning(info: dict[str, Any]) -> str | None:
    """What a user should know about a fit that makes a poor kernel, or None.

    The trainable blocks' part of the kernel scales with the head's squared weights, so a head regularised to
    almost nothing leaves a kernel close to ``--trainable head-only``, and a head no better than the majority class
    points the blocks' gradients in a direction the labels do not support."""
    if info["cv_accuracy"] <= info["majority_share"] + 0.01:
        return (f"the fitted head predicts the training labels no better than always answering the most frequent "
                f"class (cross-validated accuracy {info['cv_accuracy']:.3f}, most frequent class "
                f"{info['majority_share']:.3f}): the embeddings barely separate these labels, so the head's direction, "
                f"and with it the kernel, is mostly noise. --head random gives a kernel that does not depend on them.")
    if info["C"] <= FIT_CS[0]:
        return (f"cross-validation chose the strongest regularisation of its grid (C = {info['C']:g}): the head's "
                f"weights are near zero (norm {info['weight_norm']:g}), so the trainable blocks add almost nothing and "
                f"the kernel is close to --trainable head-only. --head random keeps the blocks' part.")
    return None


def install_fitted_head(head: torch.nn.Linear, features: np.ndarray, labels: np.ndarray, seed: int = 0
                        ) -> dict[str, Any]:
    """Fit on ``features`` / ``labels`` and copy the weights into ``head``; returns what was fitted."""
    weight, bias, info = fit_head_weights(features, labels, head.out_features, seed)
    with torch.no_grad():
        head.weight.copy_(torch.as_tensor(weight, dtype=head.weight.dtype))
        head.bias.copy_(torch.as_tensor(bias, dtype=head.bias.dtype))
    return info


def resolve_kernel_mode(kernel: str, fitted_head: bool, n_classes: int) -> str:
    """``auto``: sum for a fitted head over more than two classes (no class is privileged), class0 otherwise
    (the paper's single kernel; for two classes the fitted class-0 logit is the logit difference)."""
    if kernel != "auto":
        return kernel
    return "sum" if fitted_head and n_classes > 2 else "class0"
