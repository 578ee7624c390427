"""Kernel folders: a kernel too big for RAM, as memory-mappable ``.npy`` files.

A kernel folder (any name; ``K.kernel/`` by convention) holds

- ``k_train.npy`` (n x n, float64) and ``k_test.npy`` (m x n, float64), read with ``mmap_mode="r"``;
- ``y_train.npy``, ``y_test.npy`` (int64) and optionally ``train_ids.npy``, ``test_ids.npy``;
- ``k_train_diag.npy``: the diagonal of k_train (a strided read of the big file otherwise);
- ``kernel.json``: format version, shapes, label names and the eNTK manifest when it came from a model.

``KernelFolderWriter`` fills the two blocks in place (``freeshap-dq kernel --example-block``
writes them one row panel at a time) inside a hidden temporary folder that is renamed over the
destination only when complete, so a crash never leaves a half-written kernel behind. Before the
rename it validates the blocks (finite, symmetric) and fingerprints them, once, and records the
result with each file's size and modification time in ``kernel.json``; loading an unchanged folder
then reads no block at all (a folder whose files changed is validated again).
``KernelProblem.load`` opens a folder without reading the blocks into memory; the valuation
reads what it needs (the whole kernel for the exact engine, only landmark rows for the Nyström
engine, see :mod:`freeshap_dq.valuation.feature_utility`).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from freeshap_dq.errors import KernelError
from freeshap_dq.io import OBJECT_ARRAYS, current_umask, describe_file, replace_folder
from freeshap_dq.kernels.problem import KernelProblem

FORMAT = "freeshap-dq kernel folder"
FORMAT_VERSION = 1
META_NAME = "kernel.json"
RESUME_NAME = "resume.json"
LANDMARKS = "landmarks.npy"
DIAGONAL = "k_train_diag.npy"  # diag(k_train), written with the verdict: reading it from the n x n file is strided


class KernelFolderWriter:
    """``with KernelFolderWriter(path, n, m) as w: w.k_train[...] = ...; w.k_test[...] = ...; w.finish(...)``.

    With ``resume_key`` (what determines the blocks' values, e.g. the eNTK manifest and block size) the work
    folder is ``.NAME.partial`` beside the target and survives an interruption: blocks recorded with
    ``mark_done`` are listed in ``done`` when the same target is written again with the same key, and are
    not recomputed. A different key starts over."""

    def __init__(self, path: str | os.PathLike, n_train: int, n_test: int, resume_key: dict[str, Any] | None = None,
                 landmarks: np.ndarray | None = None):
        self.path = Path(path)
        if self.path.exists() and not (self.path / META_NAME).exists():
            raise KernelError(f"{self.path}: exists and is not a kernel folder; choose another output path.")
        if not self.path.parent.exists():
            raise KernelError(f"{self.path}: the folder {self.path.parent} does not exist; create it first.")
        self.n_train, self.n_test = n_train, n_test
        self.landmarks = None if landmarks is None else np.sort(np.asarray(landmarks, dtype=np.int64))
        if self.landmarks is None:
            self.shapes = {"k_train": (n_train, n_train), "k_test": (n_test, n_train)}
        else:  # a landmark (Nystrom) kernel: K[:, L], K[T, L] and diag(K)
            r = len(self.landmarks)
            self.shapes = {"k_train_landmarks": (n_train, r), "k_test_landmarks": (n_test, r), "k_train_diag": (n_train,)}
        self.resume_key = None if resume_key is None else json.loads(json.dumps(resume_key, sort_keys=True, default=str))
        self.done: set[tuple[int, int]] = set()
        self.resumed = False
        self._finished = False

    def __enter__(self) -> KernelFolderWriter:
        open_memmap = np.lib.format.open_memmap
        if self.resume_key is None:
            self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=self.path.parent))
        else:
            self.tmp = self.path.with_name(f".{self.path.name}.partial")
            if self._resumable(self.shapes):
                self.resumed = True
                self.done = {tuple(int(x) for x in p.name.split("-")) for p in (self.tmp / "done").iterdir()}  # type: ignore[misc]
                self.maps = {name: np.load(self.tmp / f"{name}.npy", mmap_mode="r+") for name in self.shapes}
                return self
            shutil.rmtree(self.tmp, ignore_errors=True)
            (self.tmp / "done").mkdir(parents=True)
            (self.tmp / RESUME_NAME).write_text(json.dumps(self.resume_key, sort_keys=True))
        self.maps = {name: open_memmap(self.tmp / f"{name}.npy", "w+", np.float64, shape)
                     for name, shape in self.shapes.items()}
        if self.landmarks is not None:
            np.save(self.tmp / LANDMARKS, self.landmarks, allow_pickle=False)
        return self

    @property
    def k_train(self) -> np.memmap:
        """k_train (n x n), or K[:, L] (n x r) for a landmark kernel."""
        return self.maps["k_train" if self.landmarks is None else "k_train_landmarks"]

    @property
    def k_test(self) -> np.memmap:
        """k_test (m x n), or K[T, L] (m x r) for a landmark kernel."""
        return self.maps["k_test" if self.landmarks is None else "k_test_landmarks"]

    @property
    def diagonal(self) -> np.memmap:
        """diag(K) (n), written by the caller for a landmark kernel."""
        return self.maps["k_train_diag"]

    def _resumable(self, shapes: dict[str, tuple[int, ...]]) -> bool:
        try:
            if json.loads((self.tmp / RESUME_NAME).read_text()) != self.resume_key:
                return False
            return all(np.load(self.tmp / f"{name}.npy", mmap_mode="r").shape == shape for name, shape in shapes.items())
        except (OSError, ValueError):
            return False

    def mark_done(self, lo: int, hi: int) -> None:
        """Record that rows lo..hi are written (flushed first), so that an interrupted run resumes after them."""
        if self.resume_key is not None:
            mark_block_done(self.tmp, lo, hi, *self.maps.values())

    def finish(self, y_train, y_test, label_names=(), train_ids=None, test_ids=None,
               manifest: dict[str, Any] | None = None) -> None:
        for name, arr in (("y_train", np.asarray(y_train, dtype=np.int64)), ("y_test", np.asarray(y_test, dtype=np.int64)),
                          ("train_ids", train_ids), ("test_ids", test_ids)):
            if arr is not None:
                np.save(self.tmp / f"{name}.npy", np.asarray(arr), allow_pickle=False)
        meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "n_train": self.n_train, "n_test": self.n_test,
                "kind": "full" if self.landmarks is None else "landmarks",
                "label_names": [str(x) for x in label_names], "manifest": manifest or {}}
        (self.tmp / META_NAME).write_text(json.dumps(meta, indent=1, sort_keys=True, default=str) + "\n")
        self._finished = True

    def __exit__(self, exc_type, exc, tb) -> None:
        for block in self.maps.values():
            block.flush()
        del self.maps
        if exc_type is not None or not self._finished:
            if self.resume_key is None or not any((self.tmp / "done").iterdir()):
                shutil.rmtree(self.tmp, ignore_errors=True)  # else kept: the same command resumes from it
            return
        try:
            problem = load_kernel_folder(self.tmp, source=str(self.path))
            fingerprint = problem.fingerprint()
            if self.landmarks is None:
                np.save(self.tmp / DIAGONAL, problem.diagonal(), allow_pickle=False)
        except BaseException:
            shutil.rmtree(self.tmp, ignore_errors=True)
            raise
        shutil.rmtree(self.tmp / "done", ignore_errors=True)
        (self.tmp / RESUME_NAME).unlink(missing_ok=True)
        for item in self.tmp.iterdir():
            os.chmod(item, 0o666 & ~current_umask())
        meta = json.loads((self.tmp / META_NAME).read_text())
        meta["verified"] = {"fingerprint": fingerprint, "files": _file_stats(self.tmp)}
        (self.tmp / META_NAME).write_text(json.dumps(meta, indent=1, sort_keys=True, default=str) + "\n")
        os.chmod(self.tmp / META_NAME, 0o666 & ~current_umask())
        replace_folder(self.tmp, self.path)


def mark_block_done(work_folder: Path, lo: int, hi: int, *maps: np.memmap) -> None:
    """Flush the memory maps, then leave the marker that rows lo..hi of the work folder are complete."""
    for array in maps:
        array.flush()
    (Path(work_folder) / "done" / f"{lo}-{hi}").touch()


def save_kernel_folder(problem: KernelProblem, path: str | os.PathLike, manifest: dict[str, Any] | None = None) -> None:
    """Write an in-memory problem as a kernel folder (e.g. to value it later without loading it)."""
    with KernelFolderWriter(path, problem.n_train, problem.n_test) as writer:
        writer.k_train[:] = problem.k_train
        writer.k_test[:] = problem.k_test
        writer.finish(problem.y_train, problem.y_test, problem.label_names, problem.train_ids, problem.test_ids,
                      manifest)


def read_folder_manifest(path: str | os.PathLike) -> dict[str, Any]:
    return _read_meta(Path(path)).get("manifest", {})


def load_kernel_folder(path: str | os.PathLike, source: str | None = None):
    """A ``KernelProblem`` (memory-mapped) or, for a folder of kind "landmarks", a ``LandmarkKernel``."""
    path = Path(path)
    meta = _read_meta(path)
    verified = meta.get("verified") or {}
    trusted = verified.get("fingerprint") if verified.get("files") == _file_stats(path) else None
    if meta.get("kind") == "landmarks":
        return _load_landmarks(path, meta, trusted, source)
    arrays: dict[str, np.ndarray | None] = {}
    for name in ("k_train", "k_test", "y_train", "y_test", "train_ids", "test_ids"):
        file = path / f"{name}.npy"
        if not file.exists():
            if name in ("train_ids", "test_ids"):
                arrays[name] = None
                continue
            raise KernelError(f"{path}: the kernel folder has no {file.name}; it is incomplete. Recompute it.")
        arrays[name] = _load_npy(file, memory_mapped=name.startswith("k_"))
    for name in ("k_train", "k_test"):
        if arrays[name].dtype != np.float64:  # type: ignore[union-attr]
            raise KernelError(f"{path / (name + '.npy')}: dtype {arrays[name].dtype} (float64 expected).")  # type: ignore[union-attr]
    diagonal = np.load(path / DIAGONAL, allow_pickle=False) if trusted and (path / DIAGONAL).exists() else None
    return KernelProblem(arrays["k_train"], arrays["k_test"], arrays["y_train"], arrays["y_test"],
                         tuple(meta.get("label_names", ())), arrays["train_ids"], arrays["test_ids"],
                         source=source or str(path), verified_fingerprint=trusted, stored_diagonal=diagonal)


def _load_landmarks(path: Path, meta: dict[str, Any], trusted: str | None, source: str | None):
    from freeshap_dq.kernels.landmarks import LandmarkKernel

    arrays = {}
    for name in ("k_train_landmarks", "k_test_landmarks", "k_train_diag", "landmarks", "y_train", "y_test",
                 "train_ids", "test_ids"):
        file = path / f"{name}.npy"
        if not file.exists():
            if name.endswith("_ids"):
                arrays[name] = None
                continue
            raise KernelError(f"{path}: the kernel folder has no {file.name}; it is incomplete. Recompute it.")
        arrays[name] = _load_npy(file, memory_mapped=name.startswith("k_"))
    return LandmarkKernel(arrays["k_train_landmarks"], arrays["k_test_landmarks"], arrays["landmarks"],
                          arrays["k_train_diag"], arrays["y_train"], arrays["y_test"],
                          tuple(meta.get("label_names", ())), arrays["train_ids"], arrays["test_ids"],
                          source=source or str(path), verified_fingerprint=trusted)


def save_landmark_folder(kernel, path: str | os.PathLike, manifest: dict[str, Any] | None = None) -> None:
    """Write a ``LandmarkKernel`` as a kernel folder of kind "landmarks"."""
    with KernelFolderWriter(path, kernel.n_train, kernel.n_test, landmarks=kernel.landmarks) as writer:
        writer.k_train[:] = kernel.k_train_landmarks
        writer.k_test[:] = kernel.k_test_landmarks
        writer.diagonal[:] = kernel.diagonal_values
        writer.finish(kernel.y_train, kernel.y_test, kernel.label_names, kernel.train_ids, kernel.test_ids, manifest)


def _load_npy(file: Path, memory_mapped: bool) -> np.ndarray:
    """One array of a kernel folder (memory-mapped for the kernel blocks); never unpickles."""
    try:
        return np.load(file, mmap_mode="r" if memory_mapped else None, allow_pickle=False)
    except ValueError:
        kind = describe_file(file)
        if kind == "a .npy array file":
            raise KernelError(f"{file}: {OBJECT_ARRAYS}; recompute the kernel folder.") from None
        raise KernelError(f"{file}: not a .npy array: it is {kind}. The kernel folder is damaged; recompute it.") from None


def _file_stats(path: Path) -> dict[str, list[int]]:
    """Size, modification and change time of each array file: an edit that restores the size and mtime (touch -r,
    cp -p over it) still moves the change time, which no user can set, so the folder is verified again."""
    return {item.name: [stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns]
            for item in sorted(path.glob("*.npy")) for stat in (item.stat(),)}


def _read_meta(path: Path) -> dict[str, Any]:
    try:
        meta = json.loads((path / META_NAME).read_text())
    except FileNotFoundError:
        raise KernelError(f"{path}: a folder without {META_NAME} is not a kernel folder.") from None
    except json.JSONDecodeError as exc:
        raise KernelError(f"{path / META_NAME}: not valid JSON ({exc}).") from None
    if meta.get("format") != FORMAT or meta.get("format_version") != FORMAT_VERSION:
        raise KernelError(f"{path}: kernel folder format {meta.get('format_version')!r} is not supported "
                          f"(this version reads {FORMAT_VERSION}).")
    return meta
