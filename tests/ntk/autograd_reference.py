"""The reference every eNTK test compares against: plain autograd, one example at a time."""

import torch


def gradient_row(adapter, names, forward) -> torch.Tensor:
    """Flattened float64 gradient of the scalar ``forward()`` w.r.t. the named parameters (zeros if unused)."""
    params = dict(adapter.named_parameters())
    for k in names:
        params[k].requires_grad_(True)
    try:
        grads = torch.autograd.grad(forward(), [params[k] for k in names], allow_unused=True)
    finally:
        for k in names:
            params[k].requires_grad_(False)
    return torch.cat([(torch.zeros_like(params[k]) if g is None else g).reshape(-1).double()
                      for k, g in zip(names, grads, strict=True)])


def gram(rows: list[torch.Tensor], n_train: int):
    jac = torch.stack(rows)
    return (jac @ jac[:n_train].T).numpy()
