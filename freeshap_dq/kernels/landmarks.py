r"""A Nyström kernel stored as its landmark columns: for n far beyond what an n x n kernel allows.

A ``LandmarkKernel`` holds, for r landmark training examples L, the columns :math:`K_{:,L}`
(n x r) and :math:`K_{T,L}` (m x r) and the diagonal :math:`\operatorname{diag}(K)` (n), with the
labels and ids. That is all the Nyström valuation needs (:mod:`freeshap_dq.valuation.feature_utility`):
:math:`\Phi = K_{:,L} K_{LL}^{-1/2}`, :math:`\Psi = K_{T,L} K_{LL}^{-1/2}`, with :math:`K_{LL}` the
landmarks' rows of :math:`K_{:,L}`. ``freeshap-dq kernel --landmarks r -o NAME.kernel`` computes
only these columns of the eNTK: N·r·P work and n·r storage instead of N·n·P and n².

Methods that need the whole kernel (exact enumeration, closed-form LOO, the exact engine, the
cleanlab audit) refuse it with a message.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np

from freeshap_dq.errors import KernelError
from freeshap_dq.kernels.problem import (
    SYMMETRY_RTOL,
    LabelledExamples,
    all_zero_kernel,
    check_ids,
    check_labels,
    row_blocks,
)


@dataclass(frozen=True)
class LandmarkKernel(LabelledExamples):
    k_train_landmarks: np.ndarray  # (n, r): K[:, L]
    k_test_landmarks: np.ndarray  # (m, r): K[T, L]
    landmarks: np.ndarray  # (r,) training indices, sorted
    diagonal_values: np.ndarray  # (n,): diag(K)
    y_train: np.ndarray
    y_test: np.ndarray
    label_names: tuple[str, ...] = ()
    train_ids: np.ndarray | None = None
    test_ids: np.ndarray | None = None
    source: str = field(default="<arrays>", compare=False)
    verified_fingerprint: str | None = field(default=None, compare=False, repr=False)

    per_class = False  # one kernel (class0 or sum)

    def __post_init__(self) -> None:
        y_train, y_test, names, n_classes = check_labels(self.y_train, self.y_test, self.label_names, self.source)
        n, m = y_train.shape[0], y_test.shape[0]
        landmarks = np.asarray(self.landmarks, dtype=np.int64)
        r = landmarks.shape[0]
        if landmarks.ndim != 1 or r == 0 or np.any(np.diff(landmarks) <= 0) or landmarks[0] < 0 or landmarks[-1] >= n:
            raise KernelError(f"{self.source}: landmarks must be distinct sorted training indices in 0..{n - 1}.")
        for key, arr, shape in (("k_train_landmarks", self.k_train_landmarks, (n, r)),
                                ("k_test_landmarks", self.k_test_landmarks, (m, r)),
                                ("diagonal", self.diagonal_values, (n,))):
            if np.shape(arr) != shape:
                raise KernelError(f"{self.source}: {key} has shape {np.shape(arr)}, expected {shape} "
                                  f"(n = {n} training, m = {m} test examples, r = {r} landmarks).")
        if self.verified_fingerprint is None:
            self._check_values(landmarks)
        for name, value in (("landmarks", landmarks), ("y_train", y_train), ("y_test", y_test), ("label_names", names),
                            ("train_ids", check_ids(self.train_ids, n, "train_ids", self.source)),
                            ("test_ids", check_ids(self.test_ids, m, "test_ids", self.source))):
            object.__setattr__(self, name, value)
        object.__setattr__(self, "_n_classes", n_classes)
        if self.verified_fingerprint is not None:
            object.__setattr__(self, "_fingerprint", self.verified_fingerprint)

    def _check_values(self, landmarks: np.ndarray) -> None:
        for key, arr in (("k_train_landmarks", self.k_train_landmarks), ("k_test_landmarks", self.k_test_landmarks),
                         ("diagonal", self.diagonal_values)):
            for lo, hi in row_blocks(arr):
                if not np.all(np.isfinite(arr[lo:hi])):
                    raise KernelError(f"{self.source}: {key} has non-finite entries (rows {lo}..{hi - 1}); "
                                      f"recompute the kernel.")
        if np.any(np.asarray(self.diagonal_values) < 0):
            raise KernelError(f"{self.source}: the kernel diagonal has negative entries; it is a squared norm.")
        k_ll = np.asarray(self.k_train_landmarks[landmarks])
        if not np.any(np.asarray(self.diagonal_values)):
            raise KernelError(all_zero_kernel(self.source))
        scale = max(float(np.abs(k_ll).max()), np.finfo(float).tiny)
        gap = float(np.abs(k_ll - k_ll.T).max())
        if gap > SYMMETRY_RTOL * scale:
            raise KernelError(f"{self.source}: the landmarks' block K[L, L] is not symmetric (|difference| {gap:.3g}, "
                              f"largest entry {scale:.3g}): these are not columns of one kernel.")
        if not np.allclose(np.diagonal(k_ll), np.asarray(self.diagonal_values)[landmarks], rtol=1e-5,
                           atol=1e-12 * scale):
            raise KernelError(f"{self.source}: K[L, L]'s diagonal disagrees with the stored diagonal at the landmarks.")

    @property
    def on_disk(self) -> bool:
        return isinstance(self.k_train_landmarks, np.memmap)

    @property
    def landmark_rank(self) -> int:
        """r: only the landmark columns are stored (see :class:`freeshap_dq.contracts.ValuationProblem`)."""
        return self.rank

    @property
    def rank(self) -> int:
        return int(self.landmarks.shape[0])

    def diagonal(self) -> np.ndarray:
        return np.asarray(self.diagonal_values)

    def mean_diag(self) -> float:
        return float(np.mean(self.diagonal_values))

    def fingerprint(self) -> str:
        cached = getattr(self, "_fingerprint", None)
        if cached is not None:
            return cached
        h = hashlib.sha256(b"landmarks")
        for arr in (self.k_train_landmarks, self.k_test_landmarks, self.landmarks, self.diagonal_values,
                    self.y_train, self.y_test):
            h.update(str(np.shape(arr)).encode())
            for lo, hi in row_blocks(np.asarray(arr) if not isinstance(arr, np.memmap) else arr):
                h.update(np.ascontiguousarray(arr[lo:hi]).tobytes())
        h.update("\x00".join(self.label_names).encode())
        object.__setattr__(self, "_fingerprint", h.hexdigest()[:32])
        return self._fingerprint  # type: ignore[attr-defined]

    @classmethod
    def from_problem(cls, problem, landmarks: np.ndarray, source: str = "<arrays>") -> LandmarkKernel:
        """The landmark columns of a full ``KernelProblem`` (to compare or to store a large kernel compactly)."""
        landmarks = np.sort(np.asarray(landmarks, dtype=np.int64))
        return cls(np.asarray(problem.k_train[:, landmarks]), np.asarray(problem.k_test[:, landmarks]), landmarks,
                   problem.diagonal(), problem.y_train, problem.y_test, problem.label_names, problem.train_ids,
                   problem.test_ids, source=source)
