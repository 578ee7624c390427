"""freeshap-dq: FreeShap values (fine-tuning-free Shapley values on the eNTK) for data quality."""

__version__ = "0.1.0"

from freeshap_dq.config import PRESETS, ValuationConfig  # noqa: E402
from freeshap_dq.errors import CheckpointError, FreeShapError, InputError, KernelError  # noqa: E402
from freeshap_dq.kernels.problem import KernelProblem  # noqa: E402
from freeshap_dq.result import ValuationResult  # noqa: E402
from freeshap_dq.valuation.run import compute_values  # noqa: E402
from freeshap_dq.valuation.stopping import (  # noqa: E402
    MaxPermutations,
    MaxTime,
    SignStable,
    StandardErrorBelow,
    StoppingCriterion,
    TopKStable,
)

__all__ = [
    "CheckpointError", "FreeShapError", "InputError", "KernelError", "KernelProblem", "MaxPermutations",
    "MaxTime", "PRESETS", "SignStable", "StandardErrorBelow", "StoppingCriterion", "TopKStable",
    "ValuationConfig", "ValuationResult", "compute_values",
]
