"""freeshap-dq: FreeShap values (fine-tuning-free Shapley values on the eNTK) for data quality.

The public API is imported on first use (PEP 562), so ``import freeshap_dq`` — and the command line's start,
where a Ctrl-C must already be handled — does not pull in torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

_PUBLIC = {
    "PRESETS": "freeshap_dq.config", "ValuationConfig": "freeshap_dq.config",
    "CheckpointError": "freeshap_dq.errors", "FreeShapError": "freeshap_dq.errors",
    "InputError": "freeshap_dq.errors", "KernelError": "freeshap_dq.errors",
    "KernelProblem": "freeshap_dq.kernels.problem", "ValuationResult": "freeshap_dq.result",
    "MaxPermutations": "freeshap_dq.valuation.stopping", "MaxTime": "freeshap_dq.valuation.stopping",
    "SignStable": "freeshap_dq.valuation.stopping", "StandardErrorBelow": "freeshap_dq.valuation.stopping",
    "StoppingCriterion": "freeshap_dq.valuation.stopping", "TopKStable": "freeshap_dq.valuation.stopping",
    "compute_values": "freeshap_dq.valuation.run",
}
__all__ = sorted(_PUBLIC)

if TYPE_CHECKING:
    from freeshap_dq.config import PRESETS, ValuationConfig
    from freeshap_dq.errors import CheckpointError, FreeShapError, InputError, KernelError
    from freeshap_dq.kernels.problem import KernelProblem
    from freeshap_dq.result import ValuationResult
    from freeshap_dq.valuation.run import compute_values
    from freeshap_dq.valuation.stopping import (
        MaxPermutations,
        MaxTime,
        SignStable,
        StandardErrorBelow,
        StoppingCriterion,
        TopKStable,
    )


def __getattr__(name: str):
    if name in _PUBLIC:
        value = getattr(importlib.import_module(_PUBLIC[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'freeshap_dq' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_PUBLIC))
