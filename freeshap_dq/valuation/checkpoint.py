"""Checkpoints of a permutation run: ``checkpoint.npz`` in the checkpoint folder.

A checkpoint is a result of the completed permutation groups (:class:`freeshap_dq.result.ValuationResult`),
plus, beside it, the open group's partial sums (``partial_*`` arrays) — or, with per-point sums on disk
(:mod:`freeshap_dq.valuation.point_store`), the completed groups only, their files named in the manifest.
Writing is done by :meth:`freeshap_dq.valuation.accumulator.Accumulator.save_checkpoint`; reading here. A
checkpoint resumes only on the same kernel with the same value-changing settings (:data:`RESUME_KEYS`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from freeshap_dq.config import METRICS, VALUE_FIELDS
from freeshap_dq.errors import CheckpointError
from freeshap_dq.result import ValuationResult

CHECKPOINT_NAME = "checkpoint.npz"
RESUME_KEYS = VALUE_FIELDS  # a checkpoint is only resumed when these settings all match
PARTIAL_PREFIXES = {"sums": "sum", "sq_sums": "sqsum", "point_sums": "point_sum"}


def checkpoint_path(checkpoint_dir: str | Path) -> Path:
    """The checkpoint file of ``checkpoint_dir`` (created), with temporaries left by a killed write removed."""
    folder = Path(checkpoint_dir)
    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.glob(f".{CHECKPOINT_NAME}.*.tmp"):
        stale.unlink(missing_ok=True)
    return folder / CHECKPOINT_NAME


def load_checkpoint(path: Path, manifest: dict[str, Any]) -> tuple[ValuationResult, dict | None] | None:
    """(completed groups, open group) of the checkpoint at ``path``; None when there is none; refused when it
    was made on another kernel or with other value-changing settings."""
    if not path.exists():
        return None
    saved = ValuationResult.load(path)
    if saved.manifest.get("kernel_fingerprint") != manifest["kernel_fingerprint"]:
        raise CheckpointError(f"{path}: the checkpoint was computed on a different kernel "
                              f"(fingerprint {saved.manifest.get('kernel_fingerprint')} vs "
                              f"{manifest['kernel_fingerprint']}). Use another --checkpoint-dir or --no-resume.")
    old, new = saved.manifest.get("config", {}), manifest["config"]
    diff = [k for k in RESUME_KEYS if old.get(k) != new.get(k)]
    if diff:
        details = ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in diff)
        raise CheckpointError(f"{path}: the checkpoint was made with different settings ({details}). Use the "
                              f"same settings to resume, another --checkpoint-dir, or --no-resume to start over.")
    return saved, load_partial(path)


def partial_arrays(partial: dict[str, dict[str, np.ndarray] | None], count: int, evaluated: list[int]
                   ) -> dict[str, np.ndarray]:
    """The open group as the ``partial_*`` arrays saved beside a checkpoint."""
    arrays = {"partial_count": np.array(count), "partial_evaluated": np.asarray(evaluated, dtype=np.int64)}
    for key, prefix in PARTIAL_PREFIXES.items():
        if partial.get(key) is not None:
            arrays.update({f"partial_{prefix}_{m}": v for m, v in partial[key].items()})
    return arrays


def load_partial(path: Path) -> dict[str, Any] | None:
    """The open group saved beside a checkpoint's completed groups (None when there is none)."""
    with np.load(path, allow_pickle=False) as data:
        if "partial_count" not in data.files or int(data["partial_count"]) == 0:
            return None
        out: dict[str, Any] = {"count": int(data["partial_count"]), "evaluated": data["partial_evaluated"]}
        for key, prefix in PARTIAL_PREFIXES.items():
            if f"partial_{prefix}_accuracy" in data.files:
                out[key] = {m: data[f"partial_{prefix}_{m}"] for m in METRICS}
        return out
