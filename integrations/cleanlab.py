r"""FreeShap as a cleanlab Datalab issue type, and a combined audit with cleanlab's label issues.

Importing this module registers the issue type ``freeshap`` for classification (do it before
``Datalab.get_issues("freeshap")`` on a Datalab loaded from disk).

**Score.** Like cleanlab's own ``data_valuation`` (0.5 = neutral, lower = more harmful), a value
v maps to :math:`s = \tfrac12\,(1 + \tanh(v / \sigma))` with :math:`\sigma` the median absolute
value of all values (stored in ``info["scale"]``): monotone, 0.5 exactly at v = 0, in (0, 1).
**Flag.** An example is a ``freeshap`` issue when it is harmful with confidence,
:math:`v + z \cdot \mathrm{se} < 0` (default z = 1.96), or, when a threshold is given, when v < threshold.

**Out-of-sample predictions for cleanlab's label issues** come from the same eNTK: closed-form
leave-one-out kernel regression (one factorisation), whose one-vs-rest scores estimate class
probabilities; they are clipped at 1e-6 and renormalised per row.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from freeshap_dq.errors import InputError
from freeshap_dq.io import available_memory
from freeshap_dq.kernels.problem import KernelProblem
from freeshap_dq.result import ValuationResult
from freeshap_dq.scores import DEFAULT_METRIC, DEFAULT_Z, confidently_harmful, harm_rank, value_to_score
from freeshap_dq.valuation.utility import loo_probabilities as loo_pred_probs

try:
    from cleanlab import Datalab, IssueManager
    from cleanlab.datalab.internal.issue_manager_factory import register
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError("the cleanlab integration needs cleanlab: pip install 'freeshap-dq[cleanlab]'") from exc

ISSUE_NAME = "freeshap"


def label_issues_in_process() -> dict:
    """Settings of cleanlab's label issue type that keep it in this process.

    cleanlab's find_label_issues forks a process pool by default; forking beside torch / OpenMP threads
    that hold locks can deadlock the children (seen in the test suite). A fresh dict every call: cleanlab
    stores the confident joint into the kwargs it is given.
    """
    return {"clean_learning_kwargs": {"find_label_issues_kwargs": {"n_jobs": 1}}}


class FreeShapIssueManager(IssueManager):
    """Training examples whose FreeShap value says they harm the model's predictions."""

    issue_name = ISSUE_NAME
    description = ("FreeShap values are Shapley values of training examples for a language model's predictions, "
                   "computed without fine-tuning by kernel regression on the model's empirical neural tangent kernel. "
                   "Examples flagged here lower held-out performance with confidence (value + z x stderr < 0).")
    verbosity_levels = {0: [], 1: ["z", "threshold", "metric"], 2: ["scale", "config"], 3: []}

    def find_issues(self, values=None, stderr=None, z: float = DEFAULT_Z, threshold: float | None = None,
                    metric: str = DEFAULT_METRIC, config: dict | None = None, **_: Any) -> None:
        if values is None:
            raise ValueError("the freeshap issue type needs issue_types={'freeshap': {'values': ..., 'stderr': ...}}")
        values = np.asarray(values, dtype=float)
        stderr = np.zeros_like(values) if stderr is None else np.asarray(stderr, float)
        scores, scale = value_to_score(values)
        flagged = values < threshold if threshold is not None else confidently_harmful(values, stderr, z)
        stderr = np.where(np.isnan(stderr), np.inf, stderr)
        rank = harm_rank(values)
        self.issues = pd.DataFrame({f"is_{ISSUE_NAME}_issue": flagged, f"{ISSUE_NAME}_score": scores,
                                    f"{ISSUE_NAME}_value": values, f"{ISSUE_NAME}_stderr": stderr,
                                    f"{ISSUE_NAME}_rank": rank})
        self.summary = self.make_summary(float(np.mean(scores)))
        self.info = {"z": z, "threshold": threshold, "metric": metric, "scale": scale, "config": config or {},
                     "num_flagged": int(flagged.sum()), "mean_value": float(values.mean())}

    def collect_info(self, *args, **kwargs) -> dict:
        return self.info


register(FreeShapIssueManager, task="classification")


def add_freeshap_issues(lab: Datalab, result: ValuationResult, metric: str = DEFAULT_METRIC, z: float = DEFAULT_Z,
                        threshold: float | None = None, ids: list | None = None, id_column: str | None = None) -> None:
    """Add FreeShap issues to ``lab`` without dropping the issues found before.

    ``ids`` (the result's order) are checked against ``lab.data[id_column]`` when both are given.
    Raises if the issue type is missing afterwards (Datalab prints and drops failing issue managers).
    """
    n = len(lab.data)
    if result.n_train != n:
        raise InputError(f"the result values {result.n_train} training examples but the Datalab holds {n}; "
                         f"value the same dataset the Datalab was built on.")
    if id_column is not None:
        result_ids = [str(i) for i in (ids if ids is not None else result.train_ids)]
        if id_column not in lab.data.column_names:
            raise InputError(f"the Datalab's data has no column {id_column!r}.")
        lab_ids = [str(i) for i in lab.data[id_column]]
        if lab_ids != result_ids:
            first = next(i for i, (a, b) in enumerate(zip(lab_ids, result_ids, strict=True)) if a != b)
            raise InputError(f"example ids differ from row {first + 1} on ({lab_ids[first]!r} in the Datalab, "
                             f"{result_ids[first]!r} in the result); put both in the same order.")
    lab.find_issues(issue_types={ISSUE_NAME: {
        "values": result.values(metric), "stderr": result.stderr(metric), "z": z, "threshold": threshold,
        "metric": metric, "config": result.manifest.get("config", {})}})
    if ISSUE_NAME not in set(lab.get_issue_summary()["issue_type"]):
        raise RuntimeError("cleanlab dropped the freeshap issue type (it prints the error above); nothing was added.")


def knn_graph_from_kernel(k_train: np.ndarray, k: int = 10, block_rows: int = 1024):
    """Sparse k-nearest-neighbour graph under the kernel distance sqrt(K_aa + K_bb - 2 K_ab), computed in row
    blocks (memory O(block_rows x n): a memory-mapped kernel folder is read, never copied whole)."""
    from scipy.sparse import csr_matrix

    n = k_train.shape[0]
    diag = np.array(np.diagonal(k_train), dtype=float)
    k = min(k, n - 1)
    neighbours = np.empty((n, k), dtype=np.int64)
    distances = np.empty((n, k))
    for lo in range(0, n, block_rows):
        hi = min(lo + block_rows, n)
        dist = np.sqrt(np.maximum(diag[lo:hi, None] + diag[None, :] - 2 * np.asarray(k_train[lo:hi]), 0.0))
        dist[np.arange(hi - lo), np.arange(lo, hi)] = np.inf
        order = np.argsort(dist, axis=1, kind="stable")[:, :k]
        neighbours[lo:hi], distances[lo:hi] = order, np.take_along_axis(dist, order, axis=1)
    rows = np.repeat(np.arange(n), k)
    return csr_matrix((distances.ravel(), (rows, neighbours.ravel())), shape=(n, n))


def check_knn_shapley_memory(n: int, force: bool = False) -> None:
    """cleanlab's KNN-Shapley allocates a dense n x n float64 matrix: refuse when it would not fit."""
    needed = 8 * n * n
    available = available_memory()
    if available is None:  # pragma: no cover - no way to tell
        return
    if needed > 0.5 * available and not force:
        raise InputError(f"cleanlab's data_valuation (KNN-Shapley) needs a dense {n} x {n} matrix "
                         f"({needed / 2**30:.1f} GiB) and {available / 2**30:.1f} GiB are available; leave it out or "
                         f"pass force (--force-data-valuation) if you know better.")


def combined_audit(problem: KernelProblem, result: ValuationResult, data: pd.DataFrame | None = None,
                   label_names: tuple[str, ...] | None = None, metric: str = DEFAULT_METRIC, z: float = DEFAULT_Z,
                   threshold: float | None = None, data_valuation: bool = False, force: bool = False,
                   knn: int = 10) -> tuple[Datalab, pd.DataFrame]:
    """cleanlab's label issues (+ optionally KNN-Shapley) and FreeShap in one Datalab and one table."""
    names = label_names or problem.label_names or tuple(str(c) for c in range(problem.n_classes))
    given = [names[c] for c in problem.y_train]
    frame = pd.DataFrame({"example_id": [str(i) for i in (problem.train_ids if problem.train_ids is not None
                                                          else range(problem.n_train))], "given_label": given})
    if data is not None:
        if len(data) != problem.n_train:
            raise InputError(f"the data has {len(data)} rows but the kernel has {problem.n_train} training examples.")
        frame = pd.concat([frame, data.drop(columns=[c for c in frame.columns if c in data.columns]).reset_index(
            drop=True)], axis=1)
    # cleanlab orders classes by sorting the label column: integer ids keep pred_probs' columns aligned
    frame["label_id"] = problem.y_train
    lab = Datalab(data=frame, label_name="label_id", verbosity=0)
    ridge = float(result.manifest.get("ridge", 1.0))
    scale = float(result.manifest.get("config", {}).get("kernel_scale", 1.0))
    pred_probs = loo_pred_probs(problem, ridge, scale)
    issue_types: dict[str, dict] = {"label": label_issues_in_process()}
    kwargs: dict[str, Any] = {"pred_probs": pred_probs}
    if data_valuation:
        check_knn_shapley_memory(problem.n_train, force)
        issue_types["data_valuation"] = {}
        kernel = problem.k_train.sum(0) if problem.per_class else problem.k_train  # per-class: their sum kernel
        kwargs["knn_graph"] = knn_graph_from_kernel(kernel, knn)
    lab.find_issues(issue_types=issue_types, **kwargs)
    add_freeshap_issues(lab, result, metric=metric, z=z, threshold=threshold)
    issues = lab.get_issues()
    table = frame[["example_id", "given_label"]].copy()
    table["predicted_label"] = [names[c] for c in pred_probs.argmax(1)]
    for column in issues.columns:
        if column not in table.columns:
            table[column] = issues[column].to_numpy()
    table["flagged_by_both"] = table["is_label_issue"] & table[f"is_{ISSUE_NAME}_issue"]
    table["flagged_by_either"] = table["is_label_issue"] | table[f"is_{ISSUE_NAME}_issue"]
    return lab, table.sort_values(f"{ISSUE_NAME}_rank").reset_index(drop=True)


# -- baselines for the evaluation harness (freeshap_dq.evaluation) -----------------------------------------

def confident_learning_suspicion(labels: np.ndarray, pred_probs: np.ndarray) -> np.ndarray:
    """Confident learning as a ranking: the label issues ``find_label_issues`` flags (per-class thresholds,
    pruned by the estimated noise rate) first, then everything by label quality; suspicion in [0, 2]."""
    from cleanlab.filter import find_label_issues
    from cleanlab.rank import get_label_quality_scores

    labels = np.asarray(labels)
    flagged = find_label_issues(labels, pred_probs, filter_by="prune_by_noise_rate", n_jobs=1)
    return (1.0 - get_label_quality_scores(labels, pred_probs)) + flagged.astype(float)


def knn_shapley_suspicion(features: np.ndarray, labels: np.ndarray, k: int = 10) -> np.ndarray:
    """cleanlab's KNN-Shapley data valuation on the embeddings, as suspicion = 1 - score."""
    from cleanlab.data_valuation import data_shapley_knn

    check_knn_shapley_memory(len(labels))
    return 1.0 - data_shapley_knn(np.asarray(labels), features=features, k=k)
