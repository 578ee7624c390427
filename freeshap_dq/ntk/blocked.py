r"""The eNTK by example blocks, written into a kernel folder on disk, for when n x (n + m) does not fit.

The examples (train, then test, in the caller's order) are cut into blocks of b. For each row block
R the row panel :math:`K[R, :]` (b x n, float64) is accumulated in memory over the parameter chunks:

.. math::  K[R, C] \mathrel{+}= J_c[R]\, J_c[C]^\top \quad \text{for every train column block } C

(only C up to R for train rows: the train block is symmetric and its upper part is mirrored from
the lower one at the end), and written into the memory-mapped ``k_train.npy`` / ``k_test.npy``.
Memory is one panel plus two blocks' Jacobian chunks, whatever n is; the price is recomputing
column blocks' gradients once per row block, about (B + 1) / 2 gradient passes for B train blocks
instead of one (the Gram product, usually the larger cost, is the same). The word table's exact
sparse share (``trainable=all``) is computed the same way, block against block.

``compute_ntk_landmarks`` is the same loop against one fixed column block, the r landmark examples
L: it writes :math:`K[:, L]`, :math:`K[T, L]` and :math:`\operatorname{diag}(K)` (the Nyström kernel's
inputs, :mod:`freeshap_dq.landmark_kernel`), N r P work instead of N n P.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch
from torch.func import functional_call, grad, vmap
from tqdm.auto import tqdm

from ..errors import InputError
from .compute import (
    GRAM_COLUMNS, KERNEL_MODES, _chunks, _length_order, _mask, _pad, parse_memory, plan_chunks, select_trainable,
    token_gram, word_table_vectors,
)


def auto_example_block(total: int, n: int, budget: int) -> int:
    """Every example in one block when the whole Gram (fp64) takes at most half the budget; else the
    largest block whose panel takes a quarter of it (at least 16 examples)."""
    if 8 * total * n <= budget // 2:
        return total
    return max(16, budget // 4 // (8 * n))


def compute_ntk_blocks(adapter, train_examples: list[dict], test_examples: list[dict], k_train_out, k_test_out, *,
                       trainable: str = "head-only", kernel: str = "class0", max_memory: str | int = "2GiB",
                       example_block: int = 0, batch_size: int = 0, device: str | torch.device = "cpu",
                       progress: bool | None = None, shard: tuple[int, int] = (0, 1),
                       done: frozenset | set = frozenset(), on_block_done=None) -> dict:
    """Fill ``k_train_out`` (n x n) and ``k_test_out`` (m x n), array-likes such as memory maps, block by block.
    Returns the run's facts (trainable names and count, chunks, block size).

    ``shard=(rank, world)`` (under torchrun, the process group initialised): this process computes its share of
    the row blocks (balanced by their cost) into memory maps of the same files that every rank opened; after a
    barrier, rank 0 mirrors the upper triangle. Row blocks (lo, hi) in ``done`` are already written (a resumed
    run) and skipped; ``on_block_done(lo, hi)`` is called after each block is written."""
    s = _prepare(adapter, train_examples, trainable, kernel, max_memory, device)
    device, budget, names, params, sparse_table, classes, vocab = (
        s.device, s.budget, s.names, s.params, s.sparse_table, s.classes, s.vocab)
    examples = list(train_examples) + list(test_examples)
    n, total = len(train_examples), len(examples)
    block = example_block or auto_example_block(total, n, budget)
    capacity, batch = _plan_blocks(budget, block, n, s.dense_names, params, batch_size)
    chunks = _chunks(s.dense_names, params, capacity) if s.dense_names else []
    blocks = _row_blocks(n, total, block)
    train_blocks = [b for b in blocks if b[0] < n]
    columns_of = {(lo, hi): [(c0, c1) for c0, c1 in train_blocks if c0 < min(hi, n)] for lo, hi in blocks}
    passes = (len(chunks) + sparse_table) * len(classes)  # train rows: only the lower column blocks
    cost = {(lo, hi): passes * (hi - lo + sum(c1 - c0 for c0, c1 in cols if (c0, c1) != (lo, hi)))
            for (lo, hi), cols in columns_of.items()}
    rank, world = shard
    mine = assign_blocks({b: c for b, c in cost.items() if b not in done}, world)[rank]
    bar = tqdm(total=sum(cost[b] for b in mine), unit="ex", file=sys.stderr, dynamic_ncols=True,
               disable=rank > 0 or ((not sys.stderr.isatty()) if progress is None else not progress),
               desc=f"eNTK {adapter.adapter_name} by blocks of {block} ({len(blocks)} blocks, {len(chunks)} chunk(s))")
    for lo, hi in mine:
        columns = columns_of[(lo, hi)]
        width = columns[-1][1]
        panel = torch.zeros(hi - lo, width, dtype=torch.float64, device=device)
        rows = _batches(adapter, examples, lo, hi, batch, device)
        for chunk in chunks:
            theta = {k: params[k] for k in sorted({name for name, _, _ in chunk})}
            for c in classes:
                jac_rows = _jacobian(adapter, theta, chunk, c, rows, lo, hi, device, bar)
                for c0, c1 in columns:
                    jac_cols = jac_rows if (c0, c1) == (lo, hi) else _jacobian(
                        adapter, theta, chunk, c, _batches(adapter, examples, c0, c1, batch, device), c0, c1, device, bar)
                    for col in range(0, jac_rows.shape[1], GRAM_COLUMNS):
                        panel[:, c0:c1] += (jac_rows[:, col:col + GRAM_COLUMNS]
                                            @ jac_cols[:, col:col + GRAM_COLUMNS].T).double()
                del jac_rows
        if sparse_table:
            for c in classes:
                mine = word_table_vectors(adapter, rows, c, vocab, bar)
                for c0, c1 in columns:
                    theirs = mine if (c0, c1) == (lo, hi) else word_table_vectors(
                        adapter, _batches(adapter, examples, c0, c1, batch, device), c, vocab, bar)
                    token_gram(mine, theirs, panel, row_offset=lo)
        panel = panel.cpu().numpy()
        if lo < n:
            diagonal = panel[:, lo:hi]
            panel[:, lo:hi] = (torch.tril(torch.as_tensor(diagonal)) + torch.tril(torch.as_tensor(diagonal), -1).T).numpy()
            k_train_out[lo:hi, :width] = panel
        else:
            k_test_out[lo - n:hi - n] = panel
        if on_block_done is not None:
            on_block_done(lo, hi)
    bar.close()
    _wait_for_all_ranks(world, k_train_out, k_test_out)
    for lo, hi in train_blocks if rank == 0 else ():  # the upper triangle of the train block, from the lower one
        for c0, c1 in train_blocks:
            if c0 > lo:
                k_train_out[lo:hi, c0:c1] = k_train_out[c0:c1, lo:hi].T
    return {"trainable_names": names, "n_trainable": sum(params[k].numel() for k in names), "chunks": len(chunks),
            "example_block": block, "blocks": len(blocks), "blocks_resumed": len(set(blocks) & set(done)),
            "batch_size": batch, "chunk_capacity": capacity,
            "max_memory_bytes": budget, "kernel": kernel, "trainable": trainable}


def compute_ntk_landmarks(adapter, train_examples: list[dict], test_examples: list[dict], landmarks, k_train_out,
                          k_test_out, diag_out, *, trainable: str = "head-only", kernel: str = "class0",
                          max_memory: str | int = "2GiB", example_block: int = 0, batch_size: int = 0,
                          device: str | torch.device = "cpu", progress: bool | None = None,
                          shard: tuple[int, int] = (0, 1), done: frozenset | set = frozenset(),
                          on_block_done=None) -> dict:
    """The landmark columns of the eNTK: ``k_train_out`` (n x r) = K[:, L], ``k_test_out`` (m x r) = K[T, L] and
    ``diag_out`` (n) = diag(K), by row blocks: N (r + block) / block gradient work and N r P Gram work instead of
    N n P. ``landmarks``: sorted training indices. Shards, resume and progress as ``compute_ntk_blocks``."""
    s = _prepare(adapter, train_examples, trainable, kernel, max_memory, device)
    examples = list(train_examples) + list(test_examples)
    n, total = len(train_examples), len(examples)
    landmarks = [int(i) for i in landmarks]
    r = len(landmarks)
    if not landmarks or landmarks != sorted(set(landmarks)) or landmarks[0] < 0 or landmarks[-1] >= n:
        raise InputError(f"landmarks must be distinct sorted training indices in 0..{n - 1}.")
    landmark_examples = [train_examples[i] for i in landmarks]
    block = example_block or min(total, 2048)
    capacity, batch = plan_chunks(s.budget, 16 * block * r, 4 * (block + r), s.dense_names, s.params, batch_size,
                                  f"example blocks of {block} against {r} landmarks",
                                  "use smaller --example-block or fewer --landmarks")
    chunks = _chunks(s.dense_names, s.params, capacity) if s.dense_names else []
    blocks = _row_blocks(n, total, block)
    passes = (len(chunks) + s.sparse_table) * len(s.classes)
    rank, world = shard
    mine = assign_blocks({b: passes * (b[1] - b[0] + r) for b in blocks if b not in done}, world)[rank]
    bar = tqdm(total=sum(passes * (hi - lo + r) for lo, hi in mine), unit="ex", file=sys.stderr, dynamic_ncols=True,
               disable=rank > 0 or ((not sys.stderr.isatty()) if progress is None else not progress),
               desc=f"eNTK {adapter.adapter_name} against {r} landmarks ({len(blocks)} blocks, {len(chunks)} chunk(s))")
    for lo, hi in mine:
        panel = torch.zeros(hi - lo, r, dtype=torch.float64, device=s.device)
        diag = torch.zeros(hi - lo, dtype=torch.float64, device=s.device)
        rows = _batches(adapter, examples, lo, hi, batch, s.device)
        columns = _batches(adapter, landmark_examples, 0, r, batch, s.device)
        for chunk in chunks:
            theta = {k: s.params[k] for k in sorted({name for name, _, _ in chunk})}
            for c in s.classes:
                jac_rows = _jacobian(adapter, theta, chunk, c, rows, lo, hi, s.device, bar)
                jac_cols = _jacobian(adapter, theta, chunk, c, columns, 0, r, s.device, bar)
                for col in range(0, jac_rows.shape[1], GRAM_COLUMNS):
                    panel += (jac_rows[:, col:col + GRAM_COLUMNS] @ jac_cols[:, col:col + GRAM_COLUMNS].T).double()
                diag += (jac_rows.double() ** 2).sum(1)
        for c in s.classes if s.sparse_table else ():
            mine_vectors = word_table_vectors(adapter, rows, c, s.vocab, bar)
            token_gram(mine_vectors, word_table_vectors(adapter, columns, c, s.vocab, bar), panel, row_offset=lo)
            diag.index_add_(0, mine_vectors[0] - lo, (mine_vectors[2] ** 2).sum(1))
        if lo < n:
            k_train_out[lo:hi] = panel.cpu().numpy()
            diag_out[lo:hi] = diag.cpu().numpy()
        else:
            k_test_out[lo - n:hi - n] = panel.cpu().numpy()
        if on_block_done is not None:
            on_block_done(lo, hi)
    bar.close()
    _wait_for_all_ranks(world, k_train_out, k_test_out, diag_out)
    return {"trainable_names": s.names, "n_trainable": sum(s.params[k].numel() for k in s.names),
            "chunks": len(chunks), "example_block": block, "blocks": len(blocks),
            "blocks_resumed": len(set(blocks) & set(done)), "landmarks": r, "batch_size": batch,
            "chunk_capacity": capacity, "max_memory_bytes": s.budget, "kernel": kernel, "trainable": trainable}


@dataclass
class _Setup:
    device: torch.device
    budget: int
    names: list[str]
    params: dict
    dense_names: list[str]
    sparse_table: bool
    vocab: int
    classes: list[int]


def _prepare(adapter, train_examples, trainable: str, kernel: str, max_memory, device) -> _Setup:
    """Check the kernel mode, select and expose the trainable parameters, move the adapter to the device."""
    if kernel not in KERNEL_MODES:
        raise InputError(f"kernel {kernel!r} is unknown; choose one of {', '.join(KERNEL_MODES)}.")
    if kernel == "per-class":
        raise InputError("a kernel folder holds one kernel; per-class kernels (C x n x n) are computed in memory "
                         "(-o NAME.npz). Use --kernel class0 or sum for a kernel folder.")
    if not train_examples:
        raise InputError("the training set is empty.")
    device = torch.device(device)
    names = select_trainable(adapter, trainable)
    params = dict(adapter.named_parameters())
    for p in params.values():
        p.requires_grad_(False)
    adapter.set_trainable(set(names))
    adapter.to(device)
    word_table = getattr(adapter, "word_table_name", None)
    sparse_table = word_table in names
    return _Setup(device, parse_memory(max_memory, device), names, params,
                  [k for k in names if not (sparse_table and k == word_table)], sparse_table,
                  params[word_table].shape[0] if sparse_table else 0,
                  [0] if kernel == "class0" else list(range(adapter.head.out_features)))


def _row_blocks(n: int, total: int, block: int) -> list[tuple[int, int]]:
    """Blocks of at most ``block`` rows: train rows 0..n, then test rows n..total (a block never mixes them)."""
    return [(lo, min(lo + block, end)) for start, end in ((0, n), (n, total)) for lo in range(start, end, block)]


def _wait_for_all_ranks(world: int, *outputs) -> None:
    """Flush this rank's memory maps, then wait until every rank has (no-op in one process)."""
    if world == 1:
        return
    import torch.distributed as dist

    for out in outputs:
        if hasattr(out, "flush"):
            out.flush()
    dist.barrier()


def assign_blocks(cost: dict[tuple[int, int], int], world: int) -> list[list[tuple[int, int]]]:
    """Row blocks per rank: the costliest first, each to the least loaded rank (deterministic); each rank's in order."""
    loads, shares = [0] * world, [[] for _ in range(world)]
    for block in sorted(cost, key=lambda b: (-cost[b], b)):
        r = min(range(world), key=lambda i: (loads[i], i))
        loads[r] += cost[block]
        shares[r].append(block)
    return [sorted(share) for share in shares]


def _batches(adapter, examples: list[dict], lo: int, hi: int, batch: int, device) -> list:
    """(first, last, prefix, mask) batches of examples lo..hi, by length; rows numbered from lo."""
    order = [lo + i for i in _length_order(examples[lo:hi])]
    out = []
    for start in range(0, len(order), batch):
        idx = order[start:start + batch]
        chosen = [examples[i] for i in idx]
        out.append((torch.as_tensor(idx, device=device), adapter.prefix(_pad(chosen, adapter, device)),
                    _mask(chosen, device)))
    return out


def _jacobian(adapter, theta: dict, chunk, c: int, batches: list, lo: int, hi: int, device, bar) -> torch.Tensor:
    """The ((hi - lo) x chunk width) fp32 Jacobian of logit c for examples lo..hi, in their order."""
    def logit(theta, prefix, mask):
        return functional_call(adapter, theta, (prefix.unsqueeze(0), mask.unsqueeze(0)))[0, c]

    per_example = vmap(grad(logit), in_dims=(None, 0, 0))
    width = sum(b - a for _, a, b in chunk)
    jac = torch.empty(hi - lo, width, dtype=torch.float32, device=device)
    for idx, prefix, mask in batches:
        grads = per_example(theta, prefix, mask)
        col = 0
        for name, a, b in chunk:
            jac[idx - lo, col:col + b - a] = grads[name].reshape(len(idx), -1)[:, a:b]
            col += b - a
        bar.update(len(idx))
    return jac


def _plan_blocks(budget: int, block: int, n: int, names: list[str], params: dict, batch_size: int) -> tuple[int, int]:
    """Params per chunk and examples per gradient batch so that one panel (fp64), two blocks' Jacobian chunks
    (fp32), the fp64 column product and a batch of per-example gradients fit in ``budget`` bytes."""
    return plan_chunks(budget, 8 * block * n + 8 * block * block, 8 * block, names, params, batch_size,
                       f"example blocks of {block} with n = {n}", "use smaller --example-block")
