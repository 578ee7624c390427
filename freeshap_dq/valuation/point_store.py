"""Per-point sums on disk, for when the n x m per-point matrices do not fit in memory.

Per metric, the sums over completed permutation groups live in ``points-<count>-<metric>.npy``
(count = permutations they hold), written once and never modified; the open group's sums are
added, block by block as the engine produces them, to a scratch ``points-open-<metric>.npy``.
Closing a group writes a *new* completed file (old + open, read in row blocks), after which the
caller records it in its checkpoint and the old file is deleted: whatever moment a run is killed,
the file its checkpoint names is intact, and the open group is recomputed on resume (permutations
are seeded by their index, so the result is the same). Files are memory-mapped ``.npy``: any
tool reads them without freeshap-dq.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np

from freeshap_dq.config import METRICS
from freeshap_dq.errors import CheckpointError
from freeshap_dq.kernels.problem import row_blocks

OPEN = "open"


class PointStore:
    def __init__(self, directory: str | Path, n_train: int, n_test: int, completed_count: int = 0):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.shape = (n_train, n_test)
        self.count = completed_count
        if completed_count:
            missing = [p.name for p in self._paths(completed_count).values() if not p.exists()]
            if missing:
                raise CheckpointError(f"{self.dir}: the checkpoint holds {completed_count} permutations but the per-point "
                                      f"file(s) {', '.join(missing)} are missing. Restore them or use --no-resume.")
        self._remove_other_files(keep=completed_count)
        self.completed = self._open(completed_count) if completed_count else None
        self.open = self._fresh(OPEN)
        self.previous = 0  # the completed count replaced by the last close_group, deleted by forget_previous

    def _paths(self, tag: int | str) -> dict[str, Path]:
        return {metric: self.dir / f"points-{tag}-{metric}.npy" for metric in METRICS}

    def _open(self, count: int) -> dict[str, np.memmap]:
        return {metric: np.load(path, mmap_mode="r") for metric, path in self._paths(count).items()}

    def _fresh(self, tag: int | str) -> dict[str, np.memmap]:
        for path in self._paths(tag).values():
            path.unlink(missing_ok=True)  # a new inode: files linked elsewhere (a saved result) stay intact
        return {metric: np.lib.format.open_memmap(path, "w+", np.float64, self.shape)
                for metric, path in self._paths(tag).items()}

    def add(self, metric: str, rows: np.ndarray, values: np.ndarray) -> None:
        """Open group: ``sums[rows] += values`` (rows distinct: one block of one permutation)."""
        self.open[metric][rows] += values

    def close_group(self, new_count: int) -> None:
        """completed <- completed + open, as a new file set for ``new_count`` permutations; the open group restarts."""
        self.previous = self.count
        self._write_sum(new_count)
        self.completed, self.count = self._open(new_count), new_count
        self.open = self._fresh(OPEN)

    def forget_previous(self) -> None:
        """Delete the file set replaced by the last ``close_group`` (call once the checkpoint names the new one)."""
        if self.previous and self.previous != self.count:
            for path in self._paths(self.previous).values():
                path.unlink(missing_ok=True)

    def totals(self, count: int) -> dict[str, np.ndarray]:
        """Memory-mapped sums over all ``count`` permutations (completed + open group)."""
        if count == self.count and self.completed is not None:
            return self.completed
        if count == 0:
            return {metric: np.zeros(self.shape) for metric in METRICS}
        self._write_sum(count)
        return self._open(count)

    def _write_sum(self, count: int) -> None:
        target = self._fresh(count)
        for metric in METRICS:
            for lo, hi in row_blocks(target[metric]):
                block = np.array(self.open[metric][lo:hi])
                if self.completed is not None:
                    block += self.completed[metric][lo:hi]
                target[metric][lo:hi] = block
            target[metric].flush()

    def _remove_other_files(self, keep: int) -> None:
        wanted = {p.name for p in self._paths(keep).values()} if keep else set()
        for path in self.dir.glob("points-*.npy"):
            if path.name not in wanted:
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
