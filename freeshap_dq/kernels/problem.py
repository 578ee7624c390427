"""A valuation problem on a precomputed kernel.

``KernelProblem`` holds the two kernel blocks FreeShap needs, train x train ``k_train`` (n x n)
and test x train ``k_test`` (m x n), with integer labels ``y_train`` (n,) and ``y_test`` (m,).
Per-class kernels (the eNTK of each class logit, class c regressed on kernel c) stack them:
``k_train`` (C x n x n), ``k_test`` (C x m x n).
It validates them once (shapes, finite values, symmetry, labels in range, at least two
training classes) so every later stage can trust them.

File format (``.npz``, no pickle): ``k_train``, ``k_test``, ``y_train``, ``y_test`` and
optionally ``label_names`` (strings), ``train_ids`` and ``test_ids`` (strings or integers).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from freeshap_dq.errors import KernelError
from freeshap_dq.io import OBJECT_ARRAYS, atomic_write, describe_file

REQUIRED_KEYS = ("k_train", "k_test", "y_train", "y_test")
SYMMETRY_RTOL = 1e-6
BLOCK_BYTES = 64 * 2**20  # validation and hashing read large matrices in blocks of this size


class LabelledExamples:
    """Counts shared by the problem types: ``y_train``, ``y_test`` and the validated number of classes."""

    y_train: np.ndarray
    y_test: np.ndarray

    @property
    def n_train(self) -> int:
        return int(self.y_train.shape[0])

    @property
    def n_test(self) -> int:
        return int(self.y_test.shape[0])

    @property
    def n_classes(self) -> int:
        return self._n_classes  # type: ignore[attr-defined]


@dataclass(frozen=True)
class KernelProblem(LabelledExamples):
    k_train: np.ndarray
    k_test: np.ndarray
    y_train: np.ndarray
    y_test: np.ndarray
    label_names: tuple[str, ...] = ()
    train_ids: np.ndarray | None = None
    test_ids: np.ndarray | None = None
    source: str = field(default="<arrays>", compare=False)
    verified_fingerprint: str | None = field(default=None, compare=False, repr=False)
    stored_diagonal: np.ndarray | None = field(default=None, compare=False, repr=False)  # diag(k_train), if known

    landmark_rank = None  # the whole kernel is stored

    def __post_init__(self) -> None:
        trusted = self.verified_fingerprint is not None and isinstance(self.k_train, np.memmap)
        k_train = _as_float_matrix(self.k_train, "k_train", self.source, scan=not trusted)
        k_test = _as_float_matrix(self.k_test, "k_test", self.source, scan=not trusted)
        y_train, y_test, names, n_classes = check_labels(self.y_train, self.y_test, self.label_names, self.source)
        n = y_train.shape[0]
        stack = k_train.shape[:-2]  # () for one kernel, (C,) for per-class kernels
        if k_train.shape[-2:] != (n, n):
            raise KernelError(
                f"{self.source}: k_train has shape {k_train.shape} but y_train has {n} labels; "
                f"k_train must be n x n = {n} x {n} (or C x n x n for per-class kernels)."
            )
        if k_test.shape != (*stack, y_test.shape[0], n):
            raise KernelError(
                f"{self.source}: k_test has shape {k_test.shape}; it must be "
                f"(number of test labels, number of train labels) = ({y_test.shape[0]}, {n})"
                + (f", one per class kernel: {(*stack, y_test.shape[0], n)}." if stack else ".")
            )
        if isinstance(k_train, np.memmap):  # on disk: checked block by block (once, when written), used as is
            if stack:
                raise KernelError(f"{self.source}: a kernel folder holds one kernel (n x n), not per-class kernels.")
            if not trusted:
                _check_symmetric_by_blocks(k_train, self.source)
            diag = np.zeros(0) if trusted else np.diagonal(k_train)
        else:
            scale = float(np.max(np.abs(k_train)))
            if scale == 0:
                raise KernelError(all_zero_kernel(self.source))
            gap = np.abs(k_train - np.swapaxes(k_train, -1, -2))
            if float(gap.max()) > SYMMETRY_RTOL * scale:
                *_, i, j = np.unravel_index(np.argmax(gap), k_train.shape)
                _raise_asymmetric(self.source, i, j, float(gap.max()), scale)
            k_train = (k_train + np.swapaxes(k_train, -1, -2)) / 2.0
            diag = np.diagonal(k_train, axis1=-2, axis2=-1).reshape(-1, n)
        if np.any(diag < 0):
            c, i = np.unravel_index(int(np.argmin(diag)), np.shape(diag)) if np.ndim(diag) == 2 else (0, int(np.argmin(diag)))
            raise KernelError(
                f"{self.source}: k_train has a negative diagonal entry K[{i},{i}] = {np.min(diag):.3g}"
                + (f" (class kernel {c})" if stack else "")
                + "; a kernel's diagonal is a squared norm and cannot be negative."
            )
        if stack and stack[0] != n_classes:
            raise KernelError(f"{self.source}: {stack[0]} per-class kernels for {n_classes} classes; give one n x n "
                              f"kernel per class (C x n x n), or a single n x n kernel.")
        train_ids = check_ids(self.train_ids, n, "train_ids", self.source)
        test_ids = check_ids(self.test_ids, y_test.shape[0], "test_ids", self.source)
        for name, value in (
            ("k_train", k_train), ("k_test", k_test), ("y_train", y_train), ("y_test", y_test),
            ("label_names", names), ("train_ids", train_ids), ("test_ids", test_ids),
        ):
            object.__setattr__(self, name, value)
        object.__setattr__(self, "_n_classes", n_classes)
        if trusted:
            object.__setattr__(self, "_fingerprint", self.verified_fingerprint)

    @property
    def per_class(self) -> bool:
        """True for per-class kernels (C x n x n): class c's scores are regressed on kernel c."""
        return self.k_train.ndim == 3

    @property
    def on_disk(self) -> bool:
        """True when the kernel blocks are memory-mapped files (a kernel folder), not arrays in RAM."""
        return isinstance(self.k_train, np.memmap)

    def fingerprint(self) -> str:
        """SHA-256 over the arrays (read in row blocks); a checkpoint or result refuses a kernel whose
        fingerprint differs."""
        cached = getattr(self, "_fingerprint", None)
        if cached is not None:
            return cached
        h = hashlib.sha256()
        for arr in (self.k_train, self.k_test, self.y_train, self.y_test):
            h.update(str(arr.shape).encode())
            for lo, hi in row_blocks(arr):
                h.update(np.ascontiguousarray(arr[lo:hi], dtype=arr.dtype).tobytes())
        h.update("\x00".join(self.label_names).encode())
        object.__setattr__(self, "_fingerprint", h.hexdigest()[:32])
        return self._fingerprint  # type: ignore[attr-defined]

    def diagonal(self) -> np.ndarray:
        """diag(k_train), (n,) or (C, n) — a kernel folder stores it beside the blocks, so no strided read of them."""
        if self.stored_diagonal is None:
            object.__setattr__(self, "stored_diagonal", np.array(np.diagonal(self.k_train, axis1=-2, axis2=-1)))
        return self.stored_diagonal

    def mean_diag(self) -> float:
        return float(np.mean(self.diagonal()))

    def save(self, path: str | os.PathLike) -> None:
        arrays = {
            "k_train": self.k_train, "k_test": self.k_test,
            "y_train": self.y_train, "y_test": self.y_test,
        }
        if self.label_names:
            arrays["label_names"] = np.asarray(self.label_names, dtype=str)
        if self.train_ids is not None:
            arrays["train_ids"] = self.train_ids
        if self.test_ids is not None:
            arrays["test_ids"] = self.test_ids
        with atomic_write(path) as tmp:
            with open(tmp, "wb") as fh:
                np.savez(fh, **arrays)

    @classmethod
    def load(cls, path: str | os.PathLike) -> KernelProblem:
        """A ``.npz`` kernel file, or a kernel folder (memory-mapped, see :mod:`freeshap_dq.kernels.folder`)."""
        path = Path(path)
        if not path.exists():
            raise KernelError(f"{path}: no such kernel file.")
        if path.is_dir():
            from freeshap_dq.kernels.folder import load_kernel_folder

            return load_kernel_folder(path)
        with open(path, "rb") as fh:
            if fh.read(2) != b"PK":
                raise KernelError(f"{path}: not a readable .npz file: it is {describe_file(path)}. Give the kernel .npz written "
                                  f"by freeshap-dq kernel (or numpy.savez), or a kernel folder.")
        try:
            with np.load(path, allow_pickle=False) as data:
                missing = [k for k in REQUIRED_KEYS if k not in data.files]
                if missing:
                    raise KernelError(
                        f"{path}: missing array(s) {', '.join(missing)}; a kernel file holds "
                        f"k_train (n x n), k_test (m x n), y_train (n,), y_test (m,) and optionally "
                        f"label_names, train_ids, test_ids. Found: {', '.join(data.files) or 'nothing'}."
                    )
                arrays = {k: data[k] for k in data.files}
        except KernelError:
            raise
        except ValueError:
            raise KernelError(f"{path}: {OBJECT_ARRAYS}.") from None
        except Exception as exc:  # zipfile.BadZipFile, OSError, ...
            raise KernelError(f"{path}: not a readable .npz file ({type(exc).__name__}: {exc}).") from None
        return cls(
            arrays["k_train"], arrays["k_test"], arrays["y_train"], arrays["y_test"],
            tuple(arrays.get("label_names", ())), arrays.get("train_ids"), arrays.get("test_ids"),
            source=str(path),
        )


def row_blocks(arr: np.ndarray, budget: int = BLOCK_BYTES) -> list[tuple[int, int]]:
    """Row ranges of ``arr`` of about ``budget`` bytes each (at least one row)."""
    rows = arr.shape[0] if arr.ndim else 1
    row_bytes = max(1, arr.itemsize * int(np.prod(arr.shape[1:], dtype=np.int64)))
    step = max(1, budget // row_bytes)
    return [(lo, min(lo + step, rows)) for lo in range(0, rows, step)] or [(0, 0)]


def _as_float_matrix(value, key: str, source: str, scan: bool = True) -> np.ndarray:
    if isinstance(value, np.memmap) and value.dtype == np.float64:
        arr = value  # a kernel folder: stays on disk
    else:
        if np.iscomplexobj(value):
            raise KernelError(f"{source}: {key} holds complex numbers; a kernel is real (an imaginary part would be "
                              f"dropped). Give its real part if that is what it means.")
        try:
            arr = np.asarray(value, dtype=np.float64)
        except (TypeError, ValueError):
            raise KernelError(f"{source}: {key} must be a numeric matrix.") from None
    if arr.ndim not in (2, 3):
        raise KernelError(f"{source}: {key} must be 2-dimensional (3 for per-class kernels), got shape {arr.shape}.")
    for lo, hi in row_blocks(arr) if scan else ():
        bad = ~np.isfinite(arr[lo:hi])
        if bad.any():
            where = np.argwhere(bad)[0]
            where[0] += lo
            where = tuple(int(x) for x in where)
            total = sum(int((~np.isfinite(arr[a:b])).sum()) for a, b in row_blocks(arr))
            raise KernelError(
                f"{source}: {key} has {total} non-finite entries (first at [{','.join(map(str, where))}] = {arr[where]}); "
                f"recompute the kernel (fp32 overflow?) or drop the examples involved."
            )
    return arr


def all_zero_kernel(source: str) -> str:
    return (f"{source}: k_train is all zeros: every training example's gradient is zero (nothing trainable reaches "
            f"the logit?), so no subset predicts anything and every value would be 0 — no ridge or jitter changes "
            f"that. Check --trainable and the model, or the kernel's source.")


def _check_symmetric_by_blocks(k: np.ndarray, source: str, block: int = 2048) -> None:
    n = k.shape[0]
    scale = max(float(np.max(np.abs(k[lo:hi]))) for lo, hi in row_blocks(k))
    if scale == 0:
        raise KernelError(all_zero_kernel(source))
    for r0 in range(0, n, block):
        rows = np.asarray(k[r0:r0 + block])
        for c0 in range(0, r0 + block, block):
            diff = np.abs(rows[:, c0:c0 + block] - np.asarray(k[c0:c0 + block, r0:r0 + block]).T)
            if diff.size and float(diff.max()) > SYMMETRY_RTOL * scale:
                i, j = np.unravel_index(np.argmax(diff), diff.shape)
                _raise_asymmetric(source, r0 + i, c0 + j, float(diff.max()), scale)


def _raise_asymmetric(source: str, i: int, j: int, asym: float, scale: float) -> None:
    raise KernelError(
        f"{source}: k_train is not symmetric: |K[{i},{j}] - K[{j},{i}]| = {asym:.3g} "
        f"(largest entry {scale:.3g}). Pass the train x train block of a kernel, or "
        f"symmetrise it with (K + K.T) / 2 if the difference is rounding."
    )


def check_labels(y_train, y_test, label_names, source: str) -> tuple[np.ndarray, np.ndarray, tuple[str, ...], int]:
    """(y_train, y_test as int64, label names, number of classes), or a KernelError saying what is wrong."""
    y_train, y_test = _as_labels(y_train, "y_train", source), _as_labels(y_test, "y_test", source)
    if y_train.shape[0] == 0:
        raise KernelError(f"{source}: the training set is empty (y_train has no entries).")
    if y_test.shape[0] == 0:
        raise KernelError(f"{source}: the test set is empty (y_test has no entries).")
    if np.ndim(label_names) > 1:
        raise KernelError(f"{source}: label_names must be one name per class (1-dimensional), got shape "
                          f"{np.shape(label_names)}.")
    names = tuple(str(x) for x in label_names)
    repeated = next((name for i, name in enumerate(names) if name in names[:i]), None)
    if repeated is not None:
        raise KernelError(f"{source}: label_names lists {repeated!r} twice; each class needs its own name.")
    n_classes = len(names) if names else int(max(y_train.max(), y_test.max())) + 1
    for arr, key in ((y_train, "y_train"), (y_test, "y_test")):
        bad = np.flatnonzero((arr < 0) | (arr >= n_classes))
        if bad.size:
            raise KernelError(
                f"{source}: {key}[{bad[0]}] = {arr[bad[0]]} is not a valid class id; "
                f"labels must be integers in 0..{n_classes - 1}"
                + (f" (label_names has {n_classes} entries)." if names else ".")
            )
    if not names:
        present = np.unique(np.concatenate([y_train, y_test]))
        gaps = np.setdiff1d(np.arange(n_classes), present)
        if gaps.size:
            stray = int(present[present > gaps[0]][0])
            key, arr = ("y_train", y_train) if np.any(y_train == stray) else ("y_test", y_test)
            raise KernelError(
                f"{source}: without label_names the class ids must be 0..C-1 with none missing, but id(s) "
                f"{', '.join(map(str, gaps[:5].tolist()))} never occur while {key}[{int(np.flatnonzero(arr == stray)[0])}]"
                f" = {stray}: that would make a {n_classes}-class problem. Fix the stray label, or store label_names "
                f"(one per class) if the classes are real.")
    if np.unique(y_train).size < 2:
        raise KernelError(
            f"{source}: the training set has a single class ({int(y_train[0])}); "
            f"Shapley values of a one-class problem are meaningless. Add examples of another class."
        )
    unseen = np.setdiff1d(y_test, y_train)
    if unseen.size:
        row = int(np.flatnonzero(y_test == unseen[0])[0])
        raise KernelError(
            f"{source}: y_test[{row}] = {unseen[0]} is a class that never occurs in y_train; "
            f"the regression cannot predict it. Drop those test examples or add training examples."
        )
    return y_train, y_test, names, n_classes


def _as_labels(value, key: str, source: str) -> np.ndarray:
    arr = np.asarray(value)
    if arr.ndim != 1:
        raise KernelError(f"{source}: {key} must be 1-dimensional, got shape {arr.shape}.")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        if not np.issubdtype(arr.dtype, np.floating) or not np.all(np.isfinite(arr)) or np.any(arr != np.round(arr)):
            raise KernelError(
                f"{source}: {key} must hold integer class ids (dtype {arr.dtype} given); map label "
                f"names to 0..C-1 and store the names in label_names."
            )
    return arr.astype(np.int64)


def check_ids(value, length: int, key: str, source: str) -> np.ndarray | None:
    if value is None:
        return None
    arr = np.asarray(value)
    if arr.shape != (length,):
        raise KernelError(f"{source}: {key} has shape {arr.shape}, expected ({length},).")
    uniq, counts = np.unique(arr, return_counts=True)
    if (counts > 1).any():
        raise KernelError(f"{source}: {key} has duplicate id {uniq[counts > 1][0].item()!r}; ids must be unique.")
    return arr
