r"""Examples into batches, and batches into per-example gradient columns.

Examples are batched by length (little padding); a batch is its padded ids and a read-out mask (0 padding,
1 token, 2 the read-out position). :func:`fill_jacobian` writes a parameter chunk's per-example gradient
columns for a list of batches, from the factors of :func:`collect_factors` where a factor rule covers a tensor
and from ``torch.func.vmap(grad(...))`` elsewhere — the one gradient path of the in-memory, blocked and
landmark eNTKs.
"""

from __future__ import annotations

import torch
from torch.func import functional_call, grad, vmap

from freeshap_dq.contracts import ModelAdapter
from freeshap_dq.ntk.factors import FactorStore, NotFactorable, factor_sites
from freeshap_dq.ntk.precision import passes


def fill_jacobian(jac: torch.Tensor, adapter: ModelAdapter, params: dict, chunk, c: int, ci: int, batches: list,
                  store: FactorStore | None, bar=None, precision: str = "fp32") -> None:
    """``jac[rows]`` = the per-example gradient columns of ``chunk`` (logit c, the store's class ci) for
    (rows, prefix, mask) batches: from the factors in ``store`` (its batch b is batch b here) for the tensors
    they cover, from ``vmap(grad)`` for the rest (its passes in ``precision``)."""
    factored = store.sites if store is not None else {}
    theta = {k: params[k] for k in sorted({name for name, _, _ in chunk}) if k not in factored}

    def logit(theta, prefix, mask):
        return functional_call(adapter, theta, (prefix.unsqueeze(0), mask.unsqueeze(0)))[0, c]

    per_example = vmap(grad(logit), in_dims=(None, 0, 0)) if adapter.vmap_compatible else _loop(grad(logit))
    for b, (rows, prefix, mask) in enumerate(batches):
        with passes(precision, prefix.device):
            grads = per_example(theta, prefix, mask) if theta else {}
        col = 0
        for name, lo, hi in chunk:
            if name not in factored:
                jac[rows, col:col + hi - lo] = grads[name].reshape(len(mask), -1)[:, lo:hi]
            elif isinstance(rows, slice):  # a view of jac: written in place
                store.piece(b, name, ci, lo, hi, out=jac[rows, col:col + hi - lo])
            else:
                piece = torch.empty(len(mask), hi - lo, dtype=jac.dtype, device=jac.device)
                store.piece(b, name, ci, lo, hi, out=piece)
                jac[rows, col:col + hi - lo] = piece
            col += hi - lo
        del grads
        if bar is not None:
            bar.update(len(mask))


def _loop(per_one):
    """``vmap``'s contract by a plain loop over the examples: for a model whose forward vmap cannot trace (the
    transformers models' own mask builders), slower and always correct."""
    def per_example(theta, prefix, mask):
        grads = [per_one(theta, prefix[i], mask[i]) for i in range(len(mask))]
        return {name: torch.stack([g[name] for g in grads]) for name in theta}
    return per_example


def collect_factors(adapter: ModelAdapter, names: list[str], batches: list, classes: list[int], bar=None,
                    precision: str = "fp32") -> FactorStore | None:
    """The factors of ``names`` for (rows, prefix, mask) batches, from passes in ``precision``; None when no factor
    rule covers any."""
    sites = factor_sites(adapter, names)
    if not sites:
        return None
    store = FactorStore(adapter, sites, precision)
    try:
        for _, prefix, mask in batches:
            store.collect(adapter, prefix, mask, classes)
            if bar is not None:
                bar.update(len(mask) * len(classes))
    except NotFactorable:
        return None
    return store if store.sites else None


def length_order(examples: list[dict]) -> list[int]:
    return sorted(range(len(examples)), key=lambda i: (len(examples[i]["input_ids"]), i))


def pad_batch(examples: list[dict], adapter: ModelAdapter, device) -> dict[str, torch.Tensor]:
    length = max(len(e["input_ids"]) for e in examples)
    pad_id = adapter.tokenizer.pad_token_id or 0
    out = {key: torch.tensor([e[key] + [pad_id if key == "input_ids" else 0] * (length - len(e[key]))
                              for e in examples], device=device)
           for key in ("input_ids", "token_type_ids") if key in examples[0]}
    out["attention_mask"] = readout_mask(examples, device)
    return out


def readout_mask(examples: list[dict], device) -> torch.Tensor:
    """0 = padding, 1 = token, 2 = the read-out position (mask token / answer position)."""
    length = max(len(e["input_ids"]) for e in examples)
    rows = []
    for e in examples:
        row = [1] * len(e["input_ids"]) + [0] * (length - len(e["input_ids"]))
        if e.get("read_at", -1) >= 0:
            row[e["read_at"]] = 2
        rows.append(row)
    return torch.tensor(rows, device=device)
