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
inputs, :mod:`freeshap_dq.kernels.landmarks`), N r P work instead of N n P.
"""

from __future__ import annotations

import sys

import torch
from tqdm.auto import tqdm

from freeshap_dq.contracts import ModelAdapter
from freeshap_dq.errors import InputError
from freeshap_dq.ntk.batching import collect_factors, fill_jacobian, length_order, pad_batch, readout_mask
from freeshap_dq.ntk.compute import GRAM_COLUMNS
from freeshap_dq.ntk.setup import (
    GRADIENT_PATHS,
    Setup,
    factor_groups,
    group_names,
    parameter_chunks,
    plan_chunks,
    plan_with_factors,
    prepare,
)
from freeshap_dq.ntk.word_table import token_gram, word_table_share


def auto_example_block(total: int, n: int, budget: int) -> int:
    """Every example in one block when the whole Gram (fp64) takes at most half the budget; else the
    largest block whose panel takes a quarter of it (at least 16 examples)."""
    if 8 * total * n <= budget // 2:
        return total
    return max(16, budget // 4 // (8 * n))


def compute_ntk_blocks(adapter: ModelAdapter, train_examples: list[dict], test_examples: list[dict], k_train_out, k_test_out, *,
                       trainable: str = "head-only", kernel: str = "class0", max_memory: str | int = "2GiB",
                       example_block: int = 0, batch_size: int = 0, device: str | torch.device = "cpu",
                       progress: bool | None = None, shard: tuple[int, int] = (0, 1),
                       done: frozenset | set = frozenset(), on_block_done=None, gradients: str = "auto",
                       precision: str = "fp32") -> dict:
    """Fill ``k_train_out`` (n x n) and ``k_test_out`` (m x n), array-likes such as memory maps, block by block.
    Returns the run's facts (trainable names and count, chunks, block size).

    ``shard=(rank, world)`` (under torchrun, the process group initialised): this process computes its share of
    the row blocks (balanced by their cost) into memory maps of the same files that every rank opened; after a
    barrier, rank 0 mirrors the upper triangle. Row blocks (lo, hi) in ``done`` are already written (a resumed
    run) and skipped; ``on_block_done(lo, hi)`` is called after each block is written. ``gradients`` as in
    ``compute_ntk``: with factors, a block's are collected once per visit and group of parameter chunks (one
    group when two blocks' factors fit FACTOR_SHARE of the budget), not once per chunk, and the column blocks
    are taken one at a time."""
    s = prepare(adapter, train_examples, trainable, _one_kernel(kernel), max_memory, device, precision)
    device, budget, names, params, sparse_table, classes = (
        s.device, s.budget, s.names, s.params, s.sparse_table, s.classes)
    examples = list(train_examples) + list(test_examples)
    n, total = len(train_examples), len(examples)
    block = example_block or auto_example_block(total, n, budget)
    blocks = _row_blocks(n, total, block)
    estimate, room, (capacity, batch) = plan_with_factors(
        _factor_estimate(adapter, s, [(examples, blocks, 1 if len(blocks) == 1 else 2)], batch_size, gradients),
        gradients, budget, lambda rest: _plan_blocks(rest, block, n, s.dense_names, params, batch_size))
    chunks = parameter_chunks(s.dense_names, params, capacity) if s.dense_names else []
    groups = factor_groups(adapter, chunks + ([[(adapter.word_table_name, 0, 0)]] if sparse_table else []), names,
                           estimate, room)
    train_blocks = [b for b in blocks if b[0] < n]
    columns_of = {(lo, hi): [(c0, c1) for c0, c1 in train_blocks if c0 < min(hi, n)] for lo, hi in blocks}
    passes = len(classes) * (len(groups) if estimate else len(groups[0]))  # train rows: the lower column blocks
    cost = {(lo, hi): passes * (hi - lo + sum(c1 - c0 for c0, c1 in cols if (c0, c1) != (lo, hi)))
            for (lo, hi), cols in columns_of.items()}
    rank, world = shard
    mine = assign_blocks({b: c for b, c in cost.items() if b not in done}, world)[rank]
    bar = tqdm(total=sum(cost[b] for b in mine), unit="ex", file=sys.stderr, dynamic_ncols=True,
               disable=rank > 0 or ((not sys.stderr.isatty()) if progress is None else not progress),
               desc=f"eNTK {adapter.adapter_name} by blocks of {block} ({len(blocks)} blocks, {len(chunks)} chunk(s)"
                    + (f", {len(groups)} factor pass(es))" if estimate else ", vmap)"))
    for lo, hi in mine:
        columns = columns_of[(lo, hi)]
        width = columns[-1][1]
        panel = torch.zeros(hi - lo, width, dtype=torch.float64, device=device)
        for group in groups:
            wanted = group_names(group) if estimate else None
            rows = _Block(adapter, s, examples, lo, hi, batch, wanted, bar)
            # with factors, one column block at a time (each collected once); else all of them per chunk pass
            for column_group in ([[c] for c in columns] if estimate else [columns]):
                sources = {c: rows if c == (lo, hi) else _Block(adapter, s, examples, *c, batch, wanted, bar,
                                                                 kept=False) for c in column_group}
                for unit in group:
                    for ci, c in enumerate(classes):
                        if sparse_table and unit[0][0] == adapter.word_table_name:
                            mine_vectors = rows.word_table(c, ci)
                            for source in sources.values():
                                token_gram(mine_vectors, mine_vectors if source is rows else source.word_table(c, ci),
                                           panel, row_offset=lo)
                            continue
                        jac_rows = rows.jacobian(unit, c, ci)
                        for (c0, c1), source in sources.items():
                            _add_product(panel[:, c0:c1], jac_rows,
                                         jac_rows if source is rows else source.jacobian(unit, c, ci))
                        del jac_rows
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
            "batch_size": batch, "chunk_capacity": capacity, "gradients": "factors" if estimate else "vmap",
            "factor_passes": len(groups) if estimate else 0, "factor_bytes": room,
            "max_memory_bytes": budget, "kernel": kernel, "trainable": trainable}


def compute_ntk_landmarks(adapter: ModelAdapter, train_examples: list[dict], test_examples: list[dict], landmarks, k_train_out,
                          k_test_out, diag_out, *, trainable: str = "head-only", kernel: str = "class0",
                          max_memory: str | int = "2GiB", example_block: int = 0, batch_size: int = 0,
                          device: str | torch.device = "cpu", progress: bool | None = None,
                          shard: tuple[int, int] = (0, 1), done: frozenset | set = frozenset(),
                          on_block_done=None, gradients: str = "auto", precision: str = "fp32") -> dict:
    """The landmark columns of the eNTK: ``k_train_out`` (n x r) = K[:, L], ``k_test_out`` (m x r) = K[T, L] and
    ``diag_out`` (n) = diag(K), by row blocks: N (r + block) / block gradient work and N r P Gram work instead of
    N n P. ``landmarks``: sorted training indices. Shards, resume, progress and ``gradients`` as
    ``compute_ntk_blocks``; with factors, the landmarks' are collected once for the whole run."""
    s = prepare(adapter, train_examples, trainable, _one_kernel(kernel), max_memory, device, precision)
    examples = list(train_examples) + list(test_examples)
    n, total = len(train_examples), len(examples)
    landmarks = [int(i) for i in landmarks]
    r = len(landmarks)
    if not landmarks or landmarks != sorted(set(landmarks)) or landmarks[0] < 0 or landmarks[-1] >= n:
        raise InputError(f"landmarks must be distinct sorted training indices in 0..{n - 1}.")
    landmark_examples = [train_examples[i] for i in landmarks]
    block = example_block or min(total, 2048)
    blocks = _row_blocks(n, total, block)
    estimate, room, (capacity, batch) = plan_with_factors(
        _factor_estimate(adapter, s, [(examples, blocks, 1), (landmark_examples, [(0, r)], 1)], batch_size,
                         gradients),
        gradients, s.budget, lambda rest: plan_chunks(
            rest, 16 * block * r, 4 * (block + r), s.dense_names, s.params, batch_size,
            f"example blocks of {block} against {r} landmarks", "use smaller --example-block or fewer --landmarks"))
    chunks = parameter_chunks(s.dense_names, s.params, capacity) if s.dense_names else []
    groups = factor_groups(adapter, chunks + ([[(adapter.word_table_name, 0, 0)]] if s.sparse_table else []),
                           s.names, estimate, room)
    passes = len(s.classes) * (len(groups) if estimate else len(groups[0]))
    rank, world = shard
    mine = assign_blocks({b: passes * (b[1] - b[0] + r) for b in blocks if b not in done}, world)[rank]
    bar = tqdm(total=sum(passes * (hi - lo + r) for lo, hi in mine), unit="ex", file=sys.stderr, dynamic_ncols=True,
               disable=rank > 0 or ((not sys.stderr.isatty()) if progress is None else not progress),
               desc=f"eNTK {adapter.adapter_name} against {r} landmarks ({len(blocks)} blocks, {len(chunks)} chunk(s)"
                    + (f", {len(groups)} factor pass(es))" if estimate else ", vmap)"))
    wanted_of = lambda group: group_names(group) if estimate else None  # noqa: E731
    once = len(groups) == 1  # the landmarks' gradients (factors, or their batches) serve every row block
    landmark_block = _Block(adapter, s, landmark_examples, 0, r, batch, wanted_of(groups[0]), bar) if once and mine \
        else None
    for lo, hi in mine:
        panel = torch.zeros(hi - lo, r, dtype=torch.float64, device=s.device)
        diag = torch.zeros(hi - lo, dtype=torch.float64, device=s.device)
        if once and estimate and lo != mine[0][0]:
            bar.update(len(s.classes) * r)  # the landmarks' factors were collected once
        for group in groups:
            rows = _Block(adapter, s, examples, lo, hi, batch, wanted_of(group), bar)
            columns = landmark_block if once else _Block(adapter, s, landmark_examples, 0, r, batch, wanted_of(group),
                                                         bar)
            for unit in group:
                for ci, c in enumerate(s.classes):
                    if s.sparse_table and unit[0][0] == adapter.word_table_name:
                        mine_vectors = rows.word_table(c, ci)
                        token_gram(mine_vectors, columns.word_table(c, ci), panel, row_offset=lo)
                        diag.index_add_(0, mine_vectors[0] - lo, (mine_vectors[2] ** 2).sum(1))
                        continue
                    jac_rows = rows.jacobian(unit, c, ci)
                    _add_product(panel, jac_rows, columns.jacobian(unit, c, ci))
                    diag += (jac_rows.double() ** 2).sum(1)
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
            "chunk_capacity": capacity, "gradients": "factors" if estimate else "vmap",
            "factor_passes": len(groups) if estimate else 0, "factor_bytes": room,
            "max_memory_bytes": s.budget, "kernel": kernel, "trainable": trainable}


def _add_product(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """out += a bᵀ: fp32 products over column blocks, summed in fp64."""
    for col in range(0, a.shape[1], GRAM_COLUMNS):
        out += (a[:, col:col + GRAM_COLUMNS] @ b[:, col:col + GRAM_COLUMNS].T).double()


class _Block:
    """The examples lo..hi as gradient batches (rows numbered from lo): with ``names``, the factors of those
    parameters collected once; else ``vmap(grad)`` per chunk. ``jacobian`` / ``word_table`` give their
    gradients. Without factors, a block that is not ``kept`` forms its batches (the frozen bottom's output)
    anew at each use."""

    def __init__(self, adapter, s: Setup, examples: list[dict], lo: int, hi: int, batch: int,
                 names: list[str] | None, bar, kept: bool = True):
        self.adapter, self.s, self.lo, self.hi, self.bar = adapter, s, lo, hi, bar
        self.form = lambda: _batches(adapter, examples, lo, hi, batch, s.device)  # noqa: E731
        self.kept = self.form() if kept or names is not None else None
        self.store = collect_factors(adapter, names, self.kept, s.classes, precision=s.precision) \
            if names is not None else None
        if names is not None:
            bar.update((hi - lo) * len(s.classes))

    @property
    def batches(self) -> list:
        return self.kept if self.kept is not None else self.form()

    def jacobian(self, chunk, c: int, ci: int) -> torch.Tensor:
        """The ((hi - lo) x chunk width) fp32 Jacobian of logit c for the block's examples, in their order."""
        jac = torch.empty(self.hi - self.lo, sum(b - a for _, a, b in chunk), dtype=torch.float32,
                          device=self.s.device)
        fill_jacobian(jac, self.adapter, self.s.params, chunk, c, ci,
                      [(idx - self.lo, prefix, mask) for idx, prefix, mask in self.batches], self.store,
                      None if self.store is not None else self.bar, self.s.precision)
        return jac

    def word_table(self, c: int, ci: int):
        return word_table_share(self.adapter, self.batches, c, ci, self.store,
                                None if self.store is not None else self.bar, self.s.precision)


def _factor_estimate(adapter, s: Setup, groups: list, batch_size: int, gradients: str) -> dict | None:
    """Bytes of each factored module's factors (Site -> bytes) with, for each (examples, blocks, count) of
    ``groups``, ``count`` of its largest blocks held at once, at the bytes per padded position of one probe batch
    of the shortest examples; None (vmap) with ``gradients='vmap'`` or when no factor rule applies."""
    if gradients not in GRADIENT_PATHS:
        raise InputError(f"gradients {gradients!r} is unknown; choose one of {', '.join(GRADIENT_PATHS)}.")
    if gradients == "vmap":
        return None
    batch = max(8, batch_size)
    examples = groups[0][0]
    probe = [examples[i] for i in length_order(examples)[:batch]]
    mask = readout_mask(probe, s.device)
    store = collect_factors(adapter, s.names, [(None, adapter.prefix(pad_batch(probe, adapter, s.device)), mask)],
                            s.classes, precision=s.precision)
    if store is None:
        return None
    positions = sum(count * max(_padded_tokens(group, lo, hi, batch) for lo, hi in blocks)
                    for group, blocks, count in groups)
    return {site: int(size / mask.numel() * positions) for site, size in store.site_bytes.items()}


def _padded_tokens(examples: list[dict], lo: int, hi: int, batch: int) -> int:
    """Positions in the length-sorted batches of examples lo..hi (as ``_batches`` forms them)."""
    lengths = sorted(len(e["input_ids"]) for e in examples[lo:hi])
    return sum(len(lengths[i:i + batch]) * lengths[i:i + batch][-1] for i in range(0, len(lengths), batch))


def _one_kernel(kernel: str) -> str:
    if kernel == "per-class":
        raise InputError("a kernel folder holds one kernel; per-class kernels (C x n x n) are computed in memory "
                         "(-o NAME.npz). Use --kernel class0 or sum for a kernel folder.")
    return kernel


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
    order = [lo + i for i in length_order(examples[lo:hi])]
    out = []
    for start in range(0, len(order), batch):
        idx = order[start:start + batch]
        chosen = [examples[i] for i in idx]
        out.append((torch.as_tensor(idx, device=device), adapter.prefix(pad_batch(chosen, adapter, device)),
                    readout_mask(chosen, device)))
    return out


def _plan_blocks(budget: int, block: int, n: int, names: list[str], params: dict, batch_size: int) -> tuple[int, int]:
    """Params per chunk and examples per gradient batch so that one panel (fp64), two blocks' Jacobian chunks
    (fp32), the fp64 column product and a batch of per-example gradients fit in ``budget`` bytes."""
    return plan_chunks(budget, 8 * block * n + 8 * block * block, 8 * block, names, params, batch_size,
                       f"example blocks of {block} with n = {n}", "use smaller --example-block")
