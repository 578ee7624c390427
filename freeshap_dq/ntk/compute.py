r"""The empirical NTK of an adapter, streamed under a memory budget.

:math:`K[a,b] = \langle \partial f(x_a)/\partial\theta, \partial f(x_b)/\partial\theta \rangle` over the
trainable parameters :math:`\theta`, with f the class-0 logit ("single kernel", the paper's
default), summed over classes (:math:`\sum_c \langle \nabla f_c(x_a), \nabla f_c(x_b)\rangle`), or one
kernel per class (``per-class``: :math:`K^c[a,b] = \langle \nabla f_c(x_a), \nabla f_c(x_b)\rangle`, C x n x n).

Per-example gradients come from ``torch.func.vmap(grad(...))`` over batches of similar-length
examples (little padding). The trainable parameters are split into chunks (slices of flattened
tensors) so that the per-chunk Jacobian ``J_c`` (N x P_c, fp32) fits the budget; then
``K += J_c J_c^T``: fp32 products over column blocks, summed in float64. Rows are train + test, columns train: only the
n x n and m x n blocks are formed (plus the test diagonal on request).
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm.auto import tqdm

from freeshap_dq.contracts import ModelAdapter
from freeshap_dq.errors import InputError
from freeshap_dq.ntk.batching import collect_factors, fill_jacobian, length_order, pad_batch, readout_mask
from freeshap_dq.ntk.setup import (
    GRADIENT_PATHS,
    KERNEL_MODES,
    factor_groups,
    group_names,
    parameter_chunks,
    plan_chunks,
    plan_with_factors,
    prepare,
)
from freeshap_dq.ntk.word_table import accumulate_word_table_gram, word_table_share

__all__ = ["GRADIENT_PATHS", "KERNEL_MODES", "KernelOutput", "compute_ntk", "representations"]

GRAM_COLUMNS = 16384  # Jacobian columns per fp32 Gram product; products are summed in fp64
GRAM_ROWS = 128  # train rows per block of the (block-triangular) train Gram


@dataclass
class KernelOutput:
    k_train: np.ndarray
    k_test: np.ndarray
    test_diag: np.ndarray | None
    trainable_names: list[str]
    n_trainable: int
    info: dict = field(default_factory=dict)


def compute_ntk(adapter: ModelAdapter, train_examples: list[dict], test_examples: list[dict], *, trainable: str = "head-only",
                kernel: str = "class0", max_memory: str | int = "2GiB", batch_size: int = 0,
                test_diagonal: bool = False, device: str | torch.device = "cpu",
                progress: bool | None = None, shard: tuple[int, int] = (0, 1), gradients: str = "auto",
                prefix: Callable[[dict], torch.Tensor] | None = None, precision: str = "fp32") -> KernelOutput:
    """The eNTK rows (train + test) x columns (train).

    ``gradients``: where per-example gradients come from. ``factors`` (see ``factors.py``): one forward and
    backward per class for the whole set, the Jacobian columns formed from the kept factors, however much
    memory they take; ``auto``: the same while the factors take at most FACTOR_SHARE of the memory budget,
    beyond that one forward + backward per group of parameter chunks whose factors do (vmap when even one
    chunk would not fit beside them); ``vmap``: one ``vmap(grad)`` pass per parameter chunk. Parameters no
    factor rule covers always use vmap.

    ``shard=(rank, world)``: this process computes every world-th unit of work (a parameter chunk, or the
    word table's sparse share) and the partial Grams are summed with ``torch.distributed.all_reduce``
    (an n x (n + m) message per rank, whatever the model size); the process group must be initialised.

    ``prefix(batch)``: the frozen bottom's output of a padded batch (default ``adapter.prefix``; the builder passes
    one that remembers it between kernels of the same texts). ``precision``: of the forward and backward passes
    (:mod:`freeshap_dq.ntk.precision`).
    """
    s = prepare(adapter, train_examples, trainable, kernel, max_memory, device, precision)
    device, budget, names, params, classes = s.device, s.budget, s.names, s.params, s.classes
    dense_names, sparse_table, word_table = s.dense_names, s.sparse_table, adapter.word_table_name
    n, total = len(train_examples), len(train_examples) + len(test_examples)
    n_trainable = sum(params[k].numel() for k in names)
    kernels = adapter.head.out_features if kernel == "per-class" else 1
    chunk_capacity, batch = _plan(budget, total, n, dense_names, params, batch_size, kernels)
    rank, world = shard
    order, prefixes = length_batches(adapter, train_examples, test_examples, batch, device, prefix)
    progress_off = rank > 0 or ((not sys.stderr.isatty()) if progress is None else not progress)
    estimate, room, (chunk_capacity, batch) = plan_with_factors(
        _factor_estimate(adapter, names, prefixes, classes, gradients, s.precision), gradients, budget,
        lambda rest: _plan(rest, total, n, dense_names, params, batch, kernels))
    if world > 1:  # at least one chunk per rank
        chunk_capacity = min(chunk_capacity, max(1, math.ceil(sum(params[k].numel() for k in dense_names) / world)))
    chunks = parameter_chunks(dense_names, params, chunk_capacity)
    mine = [u % world == rank for u in range(len(chunks) + sparse_table)]
    # units of work: my parameter chunks, then (as a chunk of its own) the word table's sparse share
    units = [c for c, is_mine in zip(chunks, mine[:len(chunks)], strict=True) if is_mine]
    units += [[(word_table, 0, 0)]] if sparse_table and mine[-1] else []
    groups = factor_groups(adapter, units, names, estimate, room)

    stack = (len(classes),) if kernel == "per-class" else ()
    k_rows = torch.zeros(*stack, total, n, dtype=torch.float64, device=device)
    diag = torch.zeros(*stack, total - n, dtype=torch.float64, device=device) if test_diagonal else None
    target = (lambda c: (k_rows[c], None if diag is None else diag[c])) if stack else (lambda c: (k_rows, diag))
    bar = tqdm(total=(len(units) + len(groups) * bool(estimate)) * len(classes) * total, unit="ex", file=sys.stderr,
               dynamic_ncols=True, disable=progress_off,
               desc=f"eNTK {adapter.adapter_name} ({n_trainable:,} trainable params, {len(chunks)} chunk(s), "
                    + (f"{len(groups)} factor pass(es))" if estimate else "vmap)"))
    widths = [sum(hi - lo for _, lo, hi in unit) for unit in units]
    buffer = torch.zeros(total, max(widths, default=0), dtype=torch.float32, device=device)  # reused; zeros: its
    # pages are faulted in by a parallel fill, not one by one by the writes
    batches = [(slice(lo, hi), prefix, mask) for lo, hi, prefix, mask in prefixes]
    rows = [(torch.arange(lo, hi, device=device), prefix, mask) for lo, hi, prefix, mask in prefixes]
    passes, unfactored = [], set()
    for group in groups:
        store = collect_factors(adapter, group_names(group), batches, classes, bar, s.precision) if estimate else None
        passes.append("vmap" if store is None else "factors")
        unfactored |= {name for name in group_names(group) if name != word_table or not sparse_table} - set(
            store.sites if store is not None else ())
        for unit in group:
            if unit[0][0] == word_table and sparse_table:
                for ci, c in enumerate(classes):
                    accumulate_word_table_gram(word_table_share(adapter, rows, c, ci, store, bar, s.precision), n,
                                               *target(c))
                continue
            jac = buffer[:, :sum(hi - lo for _, lo, hi in unit)]
            for ci, c in enumerate(classes):
                fill_jacobian(jac, adapter, params, unit, c, ci, batches, store, bar, s.precision)
                accumulate_gram(jac, n, *target(c))
        del store
    del buffer
    bar.close()
    if world > 1:
        import torch.distributed as dist

        dist.all_reduce(k_rows)
        if diag is not None:
            dist.all_reduce(diag)
    k_train, k_test, diag = caller_order(k_rows, diag, order, n)
    return KernelOutput(k_train, k_test, diag, names, n_trainable,
                        {"chunks": len(chunks), "batch_size": batch, "chunk_capacity": chunk_capacity, "world": world,
                         "kernel": kernel, "trainable": trainable, "max_memory_bytes": budget, "precision": s.precision,
                         "gradients": "factors" if passes and set(passes) == {"factors"} else "vmap",
                         "factor_passes": passes.count("factors"), "factor_bytes": room,
                         "without_factors": sorted(unfactored),
                         "fallback": "vmap" if adapter.vmap_compatible else "per-example loop"})


def length_batches(adapter: ModelAdapter, train_examples: list[dict], test_examples: list[dict], batch: int,
                   device, prefix: Callable[[dict], torch.Tensor] | None = None) -> tuple[list[int], list[tuple]]:
    """(order, batches): the rows of J are the training examples by length, then the test examples by length
    (batches never mix them, so the training rows are J[:n]); ``order[row]`` is the row's index in the caller's
    train + test list. A batch is (lo, hi, the frozen bottom's output, read-out mask) for rows lo..hi."""
    n, total = len(train_examples), len(train_examples) + len(test_examples)
    order = length_order(train_examples) + [n + i for i in length_order(test_examples)]
    examples = [(list(train_examples) + list(test_examples))[i] for i in order]
    spans = [(lo, min(lo + batch, end)) for start, end in ((0, n), (n, total)) for lo in range(start, end, batch)]
    prefix = prefix or adapter.prefix
    return order, [(lo, hi, prefix(pad_batch(examples[lo:hi], adapter, device)),
                    readout_mask(examples[lo:hi], device)) for lo, hi in spans]


def caller_order(k_rows: torch.Tensor, diag: torch.Tensor | None, order: list[int], n: int
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(k_train, k_test, test diagonal) in the caller's order, from rows (and columns) in ``order`` whose train
    block holds its lower block triangle only."""
    total = len(order)
    inverse = torch.empty(total, dtype=torch.long)
    inverse[torch.as_tensor(order)] = torch.arange(total)
    k_rows = _mirror_lower(k_rows, n).cpu()[..., inverse, :][..., inverse[:n]].numpy()
    if diag is not None:
        diag = diag.cpu()[..., inverse[n:] - n].numpy()
    return k_rows[..., :n, :], k_rows[..., n:, :], diag


def _factor_estimate(adapter, names: list[str], prefixes: list, classes: list[int], gradients: str,
                     precision: str = "fp32") -> dict | None:
    """Bytes of each factored module's factors for the whole set (Site -> bytes), extrapolated by positions from
    the first batch (the shortest examples: per-example factors such as the head's are over-counted); None for
    vmap: ``gradients='vmap'`` or no factor rule covers any parameter."""
    if gradients not in GRADIENT_PATHS:
        raise InputError(f"gradients {gradients!r} is unknown; choose one of {', '.join(GRADIENT_PATHS)}.")
    if gradients == "vmap":
        return None
    lo, hi, prefix, mask = prefixes[0]
    probe = collect_factors(adapter, names, [(None, prefix, mask)], classes, precision=precision)
    if probe is None:
        return None
    scale = sum(m.numel() for _, _, _, m in prefixes) / mask.numel()
    return {site: int(size * scale) for site, size in probe.site_bytes.items()}


def accumulate_gram(jac: torch.Tensor, n: int, k_rows: torch.Tensor, diag: torch.Tensor | None) -> None:
    """k_rows += J J[:n]^T, fp32 products over column blocks summed in fp64. Of the symmetric
    train block only the lower block triangle is formed (``_mirror_lower`` completes it)."""
    total = jac.shape[0]
    row_blocks = [(lo, min(lo + GRAM_ROWS, n)) for lo in range(0, n, GRAM_ROWS)]
    for lo in range(0, jac.shape[1], GRAM_COLUMNS):
        block = jac[:, lo:lo + GRAM_COLUMNS]
        for r0, r1 in row_blocks:  # train rows r0:r1 against train columns :r1
            k_rows[r0:r1, :r1] += (block[r0:r1] @ block[:r1].T).double()
        if total > n:
            k_rows[n:] += (block[n:] @ block[:n].T).double()
        if diag is not None:
            diag += (block[n:].double() ** 2).sum(1)


def _mirror_lower(k_rows: torch.Tensor, n: int) -> torch.Tensor:
    """Fill the train block's upper triangle from its lower one (the diagonal blocks are full)."""
    train = k_rows[..., :n, :]
    lower = torch.tril(train) + torch.tril(train, -1).transpose(-1, -2)
    return torch.cat([lower, k_rows[..., n:, :]], dim=-2)


def _plan(budget: int, total: int, n: int, names: list[str], params: dict, batch_size: int,
          kernels: int = 1) -> tuple[int, int]:
    """Params per chunk and examples per batch so that the Gram rows (fp64, one set per kernel), J (fp32), the fp64
    column block and one batch of per-example gradients fit in ``budget`` bytes."""
    return plan_chunks(budget, 8 * total * n * kernels + 4 * total * GRAM_COLUMNS, 4 * total, names, params,
                       batch_size, f"{total} examples", "train fewer parameters")


@torch.no_grad()
def representations(adapter: ModelAdapter, examples: list[dict], batch_size: int = 32, device: torch.device | None = None
                    ) -> np.ndarray:
    """The vectors the adapter's head reads (pooled / mask / answer position) from the frozen model, (N, H): the
    input of ``adapter.head``, captured by a forward hook (the whole network frozen, so its bottom is cached)."""
    device = device or torch.device("cpu")
    first = adapter.first_trainable_layer
    captured: list[torch.Tensor] = []
    hook = adapter.head.register_forward_hook(lambda module, inputs, output: captured.append(inputs[0]))
    adapter.first_trainable_layer = adapter.n_layers
    try:
        order = length_order(examples)
        out: list[np.ndarray | None] = [None] * len(examples)
        for start in range(0, len(order), batch_size):
            rows = order[start:start + batch_size]
            batch = pad_batch([examples[i] for i in rows], adapter, device)
            captured.clear()
            adapter(adapter.prefix(batch), batch["attention_mask"])
            vectors = captured[-1].reshape(len(rows), -1).double().cpu().numpy()
            for i, vector in zip(rows, vectors, strict=True):
                out[i] = vector
        return np.stack(out)
    finally:
        hook.remove()
        adapter.first_trainable_layer = first
