r"""The word-embedding table's share of the eNTK, exactly and without a vocab x H gradient per example.

The gradient of f(x_a) with respect to the table has one non-zero row per distinct token v of x_a,
:math:`G_a[v] = \sum_{t: x_a(t) = v} g_a(t)`, with :math:`g_a(t)` the gradient with respect to the row looked
up at position t (none for the table's padding row). Its share of K[a, b] is
:math:`\sum_v G_a[v] \cdot G_b[v]` over the tokens a and b share: one small Gram per token.
The :math:`g_a(t)` come from the factors of the table's lookups (``factors.py``) or from ``vmap(grad)``
with respect to the looked-up rows.
"""

from __future__ import annotations

import torch
from torch.func import functional_call, grad, vmap

from freeshap_dq.ntk.factors import FactorStore
from freeshap_dq.ntk.precision import passes


def word_table_share(adapter, batches: list, c: int, ci: int, store: FactorStore | None, bar=None,
                     precision: str = "fp32"):
    """``word_table_vectors`` for (row ids, prefix, mask) batches: from the store's factors when it holds the
    word table (the bar then moves by the examples at once), else by vmap (its passes in ``precision``)."""
    name = adapter.word_table_name
    if store is None or name not in store.sites:
        return word_table_vectors(adapter, batches, c, _vocab(adapter), bar, precision)
    pieces = [(row_ids, ids, gs[ci], mask) for b, (row_ids, _, mask) in enumerate(batches)
              for ids, gs in store.calls(b, name)]
    if bar is not None:
        bar.update(sum(len(mask) for _, _, mask in batches))
    return _by_token(pieces, _vocab(adapter), store.modules[store.sites[name][0].module].padding_idx)


def _vocab(adapter) -> int:
    return dict(adapter.named_parameters())[adapter.word_table_name].shape[0]


def accumulate_word_table_gram(vectors, n: int, k_rows: torch.Tensor, diag: torch.Tensor | None) -> None:
    """The word table's share of rows (train + test) x train columns, from ``word_table_vectors``."""
    rows, _, summed = vectors
    train = rows < n
    token_gram(vectors, tuple(v[train] for v in vectors), k_rows)  # type: ignore[arg-type]
    if diag is not None and bool((~train).any()):
        diag.index_add_(0, rows[~train] - n, (summed[~train] ** 2).sum(1))


def word_table_vectors(adapter, batches, c: int, vocab: int, bar=None, precision: str = "fp32"
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(row, token, G_row[token]) for every distinct (row, token) pair of the examples in ``batches``
    ((row numbers, prefix, mask) each), the g_a(t) by ``vmap(grad)`` with respect to the looked-up rows."""
    def logit(vectors, prefix, mask):
        return functional_call(adapter, {}, (prefix.unsqueeze(0), mask.unsqueeze(0)),
                               {"word_vectors": vectors.unsqueeze(0)})[0, c]

    per_example = vmap(grad(logit), in_dims=(0, 0, 0)) if adapter.vmap_compatible else _unpadded_loop(grad(logit))
    pieces = []
    for row_ids, prefix, mask in batches:
        ids = prefix[..., 0]
        with torch.no_grad():
            looked_up = adapter.lookup(ids)
        with passes(precision, prefix.device):
            pieces.append((row_ids, ids, per_example(looked_up, prefix, mask), mask))
        if bar is not None:
            bar.update(len(row_ids))
    table = adapter.get_submodule(adapter.word_table_name.rpartition(".")[0])
    return _by_token(pieces, vocab, getattr(table, "padding_idx", None))


def _unpadded_loop(per_one):
    """``vmap``'s contract by a loop over the examples, each without its padding (a decoder's last-token scoring
    reads the last position when it is given vectors instead of ids); the padding's rows get zeros."""
    def per_example(vectors, prefix, mask):
        out = torch.zeros_like(vectors)
        for i in range(len(mask)):
            length = int((mask[i] > 0).sum())
            out[i, :length] = per_one(vectors[i, :length], prefix[i, :length], mask[i, :length])
        return out
    return per_example


def _by_token(pieces, vocab: int, padding_idx: int | None):
    """(row, token, summed gradient) per distinct (row, token) from (row ids, token ids, g, mask) batches."""
    rows, tokens, vectors = [], [], []
    for row_ids, ids, g, mask in pieces:
        keep = mask > 0
        if padding_idx is not None:
            keep &= ids != padding_idx
        rows.append(row_ids[:, None].expand_as(ids)[keep])
        tokens.append(ids[keep])
        vectors.append(g[keep].double())
    rows, tokens, vectors = torch.cat(rows), torch.cat(tokens), torch.cat(vectors)
    keys, inverse = torch.unique(rows * vocab + tokens, return_inverse=True)
    summed = torch.zeros(len(keys), vectors.shape[1], dtype=torch.float64, device=vectors.device)
    summed.index_add_(0, inverse, vectors)
    return keys // vocab, keys % vocab, summed


def token_gram(a, b, out: torch.Tensor, row_offset: int = 0, col_offset: int = 0) -> None:
    """``out[ra - row_offset, rb - col_offset] += sum over shared tokens v of G_ra[v] . G_rb[v]`` for word-table
    vectors ``a`` and ``b`` (from ``word_table_vectors``): per token, one small Gram of the examples holding it."""
    groups = []
    for rows, tokens, g in (a, b):
        order = torch.argsort(tokens, stable=True)
        unique, counts = torch.unique_consecutive(tokens[order], return_counts=True)
        starts = torch.cumsum(counts, 0) - counts
        spans = dict(zip(unique.tolist(), zip(starts.tolist(), counts.tolist(), strict=True), strict=True))
        groups.append((rows[order], g[order], spans))
    (rows_a, g_a, spans_a), (rows_b, g_b, spans_b) = groups
    for token, (sa, ca) in spans_a.items():
        if token not in spans_b:
            continue
        sb, cb = spans_b[token]
        block = g_a[sa:sa + ca] @ g_b[sb:sb + cb].T
        ia, ib = rows_a[sa:sa + ca] - row_offset, rows_b[sb:sb + cb] - col_offset
        out.index_put_((ia[:, None].expand(-1, cb), ib[None, :].expand(ca, -1)), block, accumulate=True)
