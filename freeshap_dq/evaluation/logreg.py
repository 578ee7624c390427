"""A tuned logistic regression on frozen embeddings: out-of-fold class probabilities.

The strength C is chosen by inner cross-validation on each training fold (the fitted head's grid,
``freeshap_dq.ntk.fitted_head.FIT_CS``: 13 values from 1e-4 to 1e2); the default C = 1 overfits and would
make a straw man of the baselines built on it (tuned cleanlab, ``cl_logreg_tuned``) and of the embeddings'
oracle (:mod:`.oracles`).
"""

from __future__ import annotations

import warnings

import numpy as np

from freeshap_dq.io import one_blas_thread
from freeshap_dq.ntk.fitted_head import FIT_CS


def tuned_logreg_pred_probs(features: np.ndarray, labels: np.ndarray, seed: int = 0, folds: int = 5) -> np.ndarray:
    """(n, C) out-of-fold probabilities: each fold predicted by a model fitted, C tuned, on the other folds."""
    from sklearn.linear_model import LogisticRegressionCV
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    model = make_pipeline(StandardScaler(), LogisticRegressionCV(Cs=list(FIT_CS), cv=folds, max_iter=2000))
    outer = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    with warnings.catch_warnings(), one_blas_thread():  # scikit-learn 1.9 announces LogisticRegressionCV changes
        warnings.simplefilter("ignore", FutureWarning)
        return cross_val_predict(model, features, labels, cv=outer, method="predict_proba")
