r"""The arithmetic of the eNTK's passes (``--precision``): fp32, or bf16 where the device multiplies it natively.

With ``bf16`` the forward and backward passes through the trainable layers run under
``torch.autocast(dtype=bfloat16)``: matrix products take bf16 inputs and accumulate in fp32, while norms,
softmax and losses stay in fp32 (autocast's own lists). The factors :math:`(a_t, g_t)` of
:mod:`freeshap_dq.ntk.factors` are kept in bf16, and what is formed from them is written in fp32: the Jacobian
columns of the exact eNTK, or the sketch's :math:`k \times k` rows. The Gram :math:`K = J J^\top` is formed
exactly as for fp32 (fp32 products summed in fp64), so the kernel is still the Gram matrix of one set of
gradients: symmetric and positive semidefinite. Only the gradients differ, each by the bf16 passes' rounding
(8 significant bits per product input, :math:`2^{-9}` relative).

Measured on MiniLM at ``top:3`` (20 Newsgroups, n = 600 + 300, the fitted head's summed kernel, sketch 64):
a 0.1 % relative (Frobenius) kernel error, against the sketch's own 4.5 %, and the eNTK in 10.5 s instead of
18.4 s on two cores with AMX (``benchmarks/precision.py``, docs/benchmarks.md). On a device without native bf16
products (a CPU without AMX, a GPU before compute capability 8.0) bf16 is emulated and slower, so ``auto``
takes fp32 there.

The frozen bottom layers (computed once and remembered between kernels), the vectors the fitted head is fitted
on and the head's closed-form share of the summed kernel stay fp32. A tensor no factor rule covers gets its
gradient from ``vmap(grad)`` under the same autocast.
"""

from __future__ import annotations

import contextlib

import torch

PRECISIONS = ("fp32", "bf16")
PRECISION_CHOICES = ("auto", *PRECISIONS)
DEFAULT_PRECISION = "fp32"  # value, kernel: the eNTK as the paper defines it; evaluate takes auto
GRADIENT_DTYPES = {"fp32": "float32", "bf16": "bfloat16"}  # the manifest's name for the gradients' arithmetic


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` multiplies bf16 matrices in hardware (Intel AMX on a CPU; compute capability 8.0 or later
    on CUDA)."""
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.get_device_capability(device)[0] >= 8
    if device.type == "cpu":
        capabilities = getattr(torch.cpu, "get_capabilities", None)
        return bool(capabilities and capabilities().get("amx_bf16"))
    return False


def resolve_precision(precision: str, device: torch.device) -> str:
    """The precision ``precision`` stands for on ``device``: ``auto`` is bf16 where it is native, else fp32."""
    if precision == "auto":
        return "bf16" if native_bf16(device) else "fp32"
    return precision


def passes(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """The context the eNTK's forward and backward passes run in."""
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()
