r"""The summed eNTK (``--kernel sum``) from rank(W) backward passes instead of C.

The logits are :math:`f(x) = W h(x) + b`, with :math:`W` (C x H) the head's weight and :math:`h(x)` the vector it
reads, which does not depend on the head's own parameters. For the parameters :math:`\phi` below the head,
:math:`\nabla_\phi f_c = J(x)^\top w_c` with :math:`J = \partial h / \partial \phi`, so the summed kernel is

.. math::  \sum_c \langle \nabla_\phi f_c(x), \nabla_\phi f_c(x') \rangle = \mathrm{tr}\big(W J(x) J(x')^\top W^\top\big).

With the thin SVD :math:`W = U \Sigma V^\top` of rank r, the r *combined logits* :math:`v = U^\top f` (a head of
weight :math:`\Sigma V^\top` and bias :math:`U^\top b`) give :math:`\mathrm{tr}(U^\top W M W^\top U) =
\mathrm{tr}(W M W^\top)` because :math:`U U^\top W = W`: the same kernel from r backward passes. The fitted head's
rows sum to zero (a softmax is unchanged by adding one vector to every row, and the penalty is least when they
sum to zero), so r = C - 1: 3 passes instead of 4 for four classes, 1 instead of 2 for two.

The head's own parameters are the exception. :math:`\partial f_c / \partial W = e_c h^\top` spans all C rows, and
the r combined logits see only r of them: their share is :math:`r (h \cdot h' + 1)` where the exact one is
:math:`C (h \cdot h' + 1)` (weight, bias). The missing :math:`(C - r)(h \cdot h' + 1)` is added in closed form from
the frozen model's :math:`h`, for whichever of the two is trainable.

This is exact (to rounding) for the exact eNTK, and for the sketched one the same draw as C passes would give:
the sketch is linear in each weight's gradient, and the combined logits' gradients are linear combinations of the
logits'. One exception: a head with more than k\ :sup:`2` entries is itself sketched, and the combined head's
sketch is another draw (unbiased for its r rows' share; the missing C - r rows' share is exact). A singular value below
``RANK_TOLERANCE`` of the largest is dropped; it would add at most its square's share (1e-10) to the kernel.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import numpy as np
import torch
from torch import nn

from freeshap_dq.contracts import ModelAdapter
from freeshap_dq.ntk.compute import KernelOutput, representations

RANK_TOLERANCE = 1e-5


def combined_head(head: nn.Linear) -> nn.Linear | None:
    """The head of the rank(W) combined logits :math:`U^\\top f`; None when W has full row rank (nothing to save)."""
    weight = head.weight.detach().double()
    u, sigma, vh = torch.linalg.svd(weight, full_matrices=False)
    rank = int((sigma > RANK_TOLERANCE * sigma[0]).sum()) if sigma.numel() and sigma[0] > 0 else 0
    if rank == 0 or rank >= head.out_features:
        return None
    combined = nn.Linear(head.in_features, rank, bias=head.bias is not None).to(head.weight.device)
    with torch.no_grad():
        combined.weight.copy_((sigma[:rank, None] * vh[:rank]).to(head.weight.dtype))
        if head.bias is not None:
            combined.bias.copy_((u[:, :rank].T @ head.bias.detach().double()).to(head.bias.dtype))
    combined.requires_grad_(False)
    return combined


def summed_kernel(adapter: ModelAdapter, train_examples: list[dict], test_examples: list[dict],
                  compute: Callable[[], KernelOutput],
                  features: Callable[[list[dict]], np.ndarray] | None = None) -> KernelOutput:
    """``compute()`` (a summed eNTK of ``adapter``) run on the combined logits when the head's rank is below C,
    completed by the head's missing share; ``compute()`` as it is otherwise. ``features(examples)``: the vectors the
    head reads (default: :func:`~freeshap_dq.ntk.compute.representations`)."""
    original = adapter.head
    combined = combined_head(original)
    if combined is None:
        return compute()
    weight_name, bias_name = _head_parameter_names(adapter)
    adapter.head = combined
    try:
        out = compute()
    finally:
        adapter.head = original
    device = combined.weight.device  # where compute() put the model
    original.to(device)
    features = features or (lambda examples: representations(adapter, examples, device=device))
    missing = original.out_features - combined.out_features
    trainable = set(out.trainable_names)
    head_train, head_test, head_diag = 0.0, 0.0, 0.0  # h.h' of the examples, when the head's weight is trainable
    if weight_name in trainable:
        h_train = features(list(train_examples))
        h_test = features(list(test_examples)) if test_examples else np.zeros((0, h_train.shape[1]))
        head_train, head_test, head_diag = h_train @ h_train.T, h_test @ h_train.T, np.einsum("ij,ij->i", h_test, h_test)
    bias = float(bias_name in trainable)
    k_train = out.k_train + missing * (head_train + bias)
    k_test = out.k_test + missing * (head_test + bias)
    diag = None if out.test_diag is None else out.test_diag + missing * (head_diag + bias)
    shares = [(weight_name, original.weight, combined.weight), (bias_name, original.bias, combined.bias)]
    n_trainable = out.n_trainable + sum(full.numel() - part.numel() for name, full, part in shares if name in trainable)
    return replace(out, k_train=k_train, k_test=k_test, test_diag=diag, n_trainable=n_trainable,
                   info={**out.info, "combined_logits": combined.out_features, "logits": original.out_features})


def _head_parameter_names(adapter: ModelAdapter) -> tuple[str | None, str | None]:
    """The names under which the adapter holds its head's weight and bias (None for a missing bias)."""
    by_identity = {id(p): name for name, p in adapter.named_parameters()}
    head = adapter.head
    return by_identity.get(id(head.weight)), None if head.bias is None else by_identity.get(id(head.bias))
