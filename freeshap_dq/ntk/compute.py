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
import re
import sys
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.func import functional_call, grad, vmap
from tqdm.auto import tqdm

from freeshap_dq.errors import InputError
from freeshap_dq.io import available_memory
from freeshap_dq.ntk.factors import FactorStore, NotFactorable, factor_sites
from freeshap_dq.ntk.word_table import accumulate_word_table_gram, word_table_share

KERNEL_MODES = ("class0", "sum", "per-class")
GRADIENT_PATHS = ("auto", "factors", "vmap")
FACTOR_SHARE = 0.5  # at most this part of the memory budget holds factors (auto); else vmap(grad) per chunk
GRAM_COLUMNS = 16384  # Jacobian columns per fp32 Gram product; products are summed in fp64
GRAM_ROWS = 128  # train rows per block of the (block-triangular) train Gram
MEMORY_UNITS = {"": 1, "b": 1, "k": 2**10, "kb": 2**10, "kib": 2**10, "m": 2**20, "mb": 2**20, "mib": 2**20,
                "g": 2**30, "gb": 2**30, "gib": 2**30}


AUTO_MEMORY_FRACTION, AUTO_MEMORY_CAP = 0.4, 16 * 2**30


def parse_memory(spec: str | int, device: torch.device | None = None) -> int:
    """Bytes for '512MiB', '4GiB', '1000' ...; 'auto' = 40% of the available memory of the device that holds
    the Jacobian (RAM, page cache included, or the GPU's free memory on CUDA), at most 16 GiB."""
    if isinstance(spec, int):
        return spec
    if str(spec).strip().lower() == "auto":
        if device is not None and device.type == "cuda":
            free = torch.cuda.mem_get_info(device)[0]
        else:
            free = available_memory() or 10 * 2**30
        return int(min(AUTO_MEMORY_CAP, max(2**30, AUTO_MEMORY_FRACTION * free)))
    m = re.fullmatch(r"\s*([\d.]+)\s*([a-zA-Z]*)\s*", str(spec))
    if not m or m.group(2).lower() not in MEMORY_UNITS:
        raise InputError(f"memory size {spec!r} is not understood; write e.g. 512MiB or 4GiB.")
    return int(float(m.group(1)) * MEMORY_UNITS[m.group(2).lower()])


def select_trainable(adapter, spec: str) -> list[str]:
    """Trainable parameter names for a spec:

    ``head-only`` | ``all`` | ``top:K`` (last K layers + head) |
    ``freeze:K`` (first K layers frozen; embeddings, the other layers and the head trainable:
    the paper's BERT setting is freeze:8 of 12) | ``regex:PATTERN`` (matching names + head).
    With LoRA, only LoRA-B matrices (and the head) are trainable: the base weights are frozen by
    LoRA's design and LoRA-A gradients are identically zero at initialisation (B = 0).
    """
    groups = adapter.parameter_groups()
    n_layers = adapter.n_layers
    head = groups.get("head", [])
    layer = lambda i: groups.get(f"layer.{i}", [])  # noqa: E731
    kind, _, arg = spec.partition(":")
    if kind == "head-only":
        names = head
    elif kind == "all":
        names = [n for key, ns in groups.items() if key != "other" for n in ns]
    elif kind in ("top", "freeze"):
        try:
            k = int(arg)
        except ValueError:
            raise InputError(f"trainable {spec!r}: {kind}:K needs a whole number of layers.") from None
        if not 0 <= k <= n_layers:
            raise InputError(f"trainable {spec!r}: the model has {n_layers} layers.")
        if kind == "top":
            names = [n for i in range(n_layers - k, n_layers) for n in layer(i)] + head
        else:
            names = groups.get("embeddings", []) + [n for i in range(k, n_layers) for n in layer(i)] + head
    elif kind == "regex":
        try:
            pattern = re.compile(arg)
        except re.error as exc:
            raise InputError(f"trainable {spec!r}: bad regular expression ({exc}).") from None
        names = [n for n, _ in adapter.named_parameters() if pattern.search(n) and n not in head] + head
        if len(names) == len(head):
            raise InputError(f"trainable {spec!r} matches no parameter; names look like "
                             f"{next(iter(adapter.named_parameters()))[0]!r}.")
    else:
        raise InputError(f"trainable {spec!r} is unknown; use head-only, all, top:K, freeze:K or regex:PATTERN.")
    if adapter.lora_rank:
        names = [n for n in names if ".lora_B." in n or n in head]
    return names


@dataclass
class KernelOutput:
    k_train: np.ndarray
    k_test: np.ndarray
    test_diag: np.ndarray | None
    trainable_names: list[str]
    n_trainable: int
    info: dict = field(default_factory=dict)


def compute_ntk(adapter, train_examples: list[dict], test_examples: list[dict], *, trainable: str = "head-only",
                kernel: str = "class0", max_memory: str | int = "2GiB", batch_size: int = 0,
                test_diagonal: bool = False, device: str | torch.device = "cpu",
                progress: bool | None = None, shard: tuple[int, int] = (0, 1), gradients: str = "auto") -> KernelOutput:
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
    """
    if kernel not in KERNEL_MODES:
        raise InputError(f"kernel {kernel!r} is unknown; choose one of {', '.join(KERNEL_MODES)}.")
    device = torch.device(device)
    budget = parse_memory(max_memory, device)
    names = select_trainable(adapter, trainable)
    params = dict(adapter.named_parameters())
    for p in params.values():
        p.requires_grad_(False)  # torch.func and the factor passes switch on what they differentiate
    adapter.set_trainable(set(names))
    adapter.to(device)
    n, total = len(train_examples), len(train_examples) + len(test_examples)
    if n == 0:
        raise InputError("the training set is empty.")
    n_trainable = sum(params[k].numel() for k in names)
    word_table = adapter.word_table_name
    sparse_table = word_table in names  # its rows get the exact sparse path, not dense Jacobian columns
    dense_names = [k for k in names if not (sparse_table and k == word_table)]
    kernels = adapter.head.out_features if kernel == "per-class" else 1
    chunk_capacity, batch = _plan(budget, total, n, dense_names, params, batch_size, kernels)
    rank, world = shard
    # rows of J: training examples by length, then test examples by length (batches never mix them,
    # so the training rows are J[:n]); ``order`` maps those rows back to the caller's order
    order = _length_order(train_examples) + [n + i for i in _length_order(test_examples)]
    examples = [(list(train_examples) + list(test_examples))[i] for i in order]
    spans = [(lo, min(lo + batch, end)) for start, end in ((0, n), (n, total)) for lo in range(start, end, batch)]
    prefixes = [(lo, hi, adapter.prefix(_pad(examples[lo:hi], adapter, device)), _mask(examples[lo:hi], device))
                for lo, hi in spans]
    classes = [0] if kernel == "class0" else list(range(adapter.head.out_features))
    progress_off = rank > 0 or ((not sys.stderr.isatty()) if progress is None else not progress)
    estimate, room, (chunk_capacity, batch) = plan_with_factors(
        _factor_estimate(adapter, names, prefixes, classes, gradients), gradients, budget,
        lambda rest: _plan(rest, total, n, dense_names, params, batch, kernels))
    if world > 1:  # at least one chunk per rank
        chunk_capacity = min(chunk_capacity, max(1, math.ceil(sum(params[k].numel() for k in dense_names) / world)))
    chunks = _chunks(dense_names, params, chunk_capacity)
    mine = [u % world == rank for u in range(len(chunks) + sparse_table)]
    # units of work: my parameter chunks, then (as a chunk of its own) the word table's sparse share
    units = [c for c, is_mine in zip(chunks, mine) if is_mine] + ([[(word_table, 0, 0)]] if sparse_table and mine[-1]
                                                                   else [])
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
    passes = []
    for group in groups:
        store = collect_factors(adapter, group_names(group), batches, classes, bar) if estimate else None
        passes.append("vmap" if store is None else "factors")
        for unit in group:
            if unit[0][0] == word_table and sparse_table:
                for ci, c in enumerate(classes):
                    accumulate_word_table_gram(word_table_share(adapter, rows, c, ci, store, bar), n, *target(c))
                continue
            jac = buffer[:, :sum(hi - lo for _, lo, hi in unit)]
            for ci, c in enumerate(classes):
                fill_jacobian(jac, adapter, params, unit, c, ci, batches, store, bar)
                _accumulate_gram(jac, n, *target(c))
        del store
    del buffer
    bar.close()
    if world > 1:
        import torch.distributed as dist

        dist.all_reduce(k_rows)
        if diag is not None:
            dist.all_reduce(diag)
    inverse = torch.empty(total, dtype=torch.long)
    inverse[torch.as_tensor(order)] = torch.arange(total)
    k_rows = _mirror_lower(k_rows, n).cpu()[..., inverse, :][..., inverse[:n]]
    if diag is not None:
        diag = diag.cpu()[..., inverse[n:] - n]
    k_rows = k_rows.cpu().numpy()
    return KernelOutput(k_rows[..., :n, :], k_rows[..., n:, :], None if diag is None else diag.cpu().numpy(), names,
                        n_trainable,
                        {"chunks": len(chunks), "batch_size": batch, "chunk_capacity": chunk_capacity, "world": world,
                         "kernel": kernel, "trainable": trainable, "max_memory_bytes": budget,
                         "gradients": "factors" if passes and set(passes) == {"factors"} else "vmap",
                         "factor_passes": passes.count("factors"), "factor_bytes": room})


def fill_jacobian(jac: torch.Tensor, adapter, params: dict, chunk, c: int, ci: int, batches: list,
                  store: FactorStore | None, bar=None) -> None:
    """``jac[rows]`` = the per-example gradient columns of ``chunk`` (logit c, the store's class ci) for
    (rows, prefix, mask) batches: from the factors in ``store`` (its batch b is batch b here) for the tensors
    they cover, from ``vmap(grad)`` for the rest."""
    factored = store.sites if store is not None else {}
    theta = {k: params[k] for k in sorted({name for name, _, _ in chunk}) if k not in factored}

    def logit(theta, prefix, mask):
        return functional_call(adapter, theta, (prefix.unsqueeze(0), mask.unsqueeze(0)))[0, c]

    per_example = vmap(grad(logit), in_dims=(None, 0, 0))
    for b, (rows, prefix, mask) in enumerate(batches):
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


def collect_factors(adapter, names: list[str], batches: list, classes: list[int], bar=None) -> FactorStore | None:
    """The factors of ``names`` for (rows, prefix, mask) batches; None when no factor rule covers any."""
    sites = factor_sites(adapter, names)
    if not sites:
        return None
    store = FactorStore(adapter, sites)
    try:
        for _, prefix, mask in batches:
            store.collect(adapter, prefix, mask, classes)
            if bar is not None:
                bar.update(len(mask) * len(classes))
    except NotFactorable:
        return None
    return store if store.sites else None


def _factor_estimate(adapter, names: list[str], prefixes: list, classes: list[int], gradients: str
                     ) -> dict | None:
    """Bytes of each factored module's factors for the whole set (Site -> bytes), extrapolated by positions from
    the first batch (the shortest examples: per-example factors such as the head's are over-counted); None for
    vmap: ``gradients='vmap'`` or no factor rule covers any parameter."""
    if gradients not in GRADIENT_PATHS:
        raise InputError(f"gradients {gradients!r} is unknown; choose one of {', '.join(GRADIENT_PATHS)}.")
    if gradients == "vmap":
        return None
    lo, hi, prefix, mask = prefixes[0]
    probe = collect_factors(adapter, names, [(None, prefix, mask)], classes)
    if probe is None:
        return None
    scale = sum(m.numel() for _, _, _, m in prefixes) / mask.numel()
    return {site: int(size * scale) for site, size in probe.site_bytes.items()}


def plan_with_factors(estimate: dict | None, gradients: str, budget: int, plan) -> tuple[dict | None, int, tuple]:
    """(estimate, room, plan(budget - room)). The factors' room is all of them with ``gradients='factors'``,
    else at most FACTOR_SHARE of the budget; when (``auto``) the rest is too small for ``plan``: vmap, with
    (None, 0, plan(budget))."""
    if estimate:
        whole = sum(estimate.values())
        room = whole if gradients == "factors" else min(whole, int(FACTOR_SHARE * budget))
        try:
            return estimate, room, plan(budget - room)
        except InputError:
            if gradients == "factors":
                raise
    return None, 0, plan(budget)


def factor_groups(adapter, units: list, names: list[str], estimate: dict | None, room: int) -> list[list]:
    """The units of work (parameter chunks, the word table's share) in groups of one forward + backward each;
    one group without factors (vmap)."""
    return _factor_passes(units, factor_sites(adapter, names), estimate, room) if estimate else [units]


def group_names(group: list) -> list[str]:
    """The parameter names a group of units of work touches."""
    return sorted({name for unit in group for name, _, _ in unit})


def _factor_passes(units: list, sites: dict, estimate: dict, room: int) -> list[list]:
    """Consecutive units of work grouped so that each group's factors (its modules') fit ``room`` bytes: one
    forward + backward per group. A unit that alone exceeds it is a group of its own."""
    groups, current, held = [], [], set()
    for unit in units:
        wanted = held | {sites[name][0] for name, _, _ in unit if name in sites and sites[name][0] in estimate}
        if current and sum(estimate[site] for site in wanted) > room:
            groups.append(current)
            current, wanted = [], {sites[name][0] for name, _, _ in unit if name in sites and sites[name][0] in estimate}
        current.append(unit)
        held = wanted
    return groups + ([current] if current else [])


def _accumulate_gram(jac: torch.Tensor, n: int, k_rows: torch.Tensor, diag: torch.Tensor | None) -> None:
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


def plan_chunks(budget: int, fixed: int, bytes_per_param: int, names: list[str], params: dict, batch_size: int,
                what: str, remedy: str) -> tuple[int, int]:
    """(params per chunk, examples per gradient batch): 70% of the budget for ``fixed`` bytes plus
    ``bytes_per_param`` per chunk column, 30% for a batch of per-example gradients."""
    biggest = max((params[k].numel() for k in names), default=1)
    capacity = (int(budget * 0.7) - fixed) // bytes_per_param
    grads_room = int(budget * 0.3)
    if capacity < 1 or 4 * 3 * biggest > grads_room:
        need = max(fixed + bytes_per_param * 1024, 40 * biggest) / 0.7
        raise InputError(f"memory budget {budget / 2**20:.0f} MiB is too small for {what} and the largest trainable "
                         f"tensor ({biggest:,} values); raise --max-memory to at least {math.ceil(need / 2**20)} MiB "
                         f"or {remedy}.")
    capacity = min(capacity, max(1, sum(params[k].numel() for k in names)))
    batch = batch_size or max(1, min(8, grads_room // (4 * 3 * max(biggest, capacity))))
    return capacity, batch


def _chunks(names: list[str], params: dict, capacity: int) -> list[list[tuple[str, int, int]]]:
    chunks, current, used = [], [], 0
    for name in names:
        size, lo = params[name].numel(), 0
        while lo < size:
            take = min(size - lo, capacity - used)
            current.append((name, lo, lo + take))
            used += take
            lo += take
            if used == capacity:
                chunks.append(current)
                current, used = [], 0
    if current:
        chunks.append(current)
    return chunks


def _length_order(examples: list[dict]) -> list[int]:
    return sorted(range(len(examples)), key=lambda i: (len(examples[i]["input_ids"]), i))


def _pad(examples: list[dict], adapter, device) -> dict[str, torch.Tensor]:
    length = max(len(e["input_ids"]) for e in examples)
    pad_id = adapter.tokenizer.pad_token_id or 0
    out = {key: torch.tensor([e[key] + [pad_id if key == "input_ids" else 0] * (length - len(e[key]))
                              for e in examples], device=device)
           for key in ("input_ids", "token_type_ids") if key in examples[0]}
    out["attention_mask"] = _mask(examples, device)
    return out


def _mask(examples: list[dict], device) -> torch.Tensor:
    """0 = padding, 1 = token, 2 = the read-out position (mask token / answer position)."""
    length = max(len(e["input_ids"]) for e in examples)
    rows = []
    for e in examples:
        row = [1] * len(e["input_ids"]) + [0] * (length - len(e["input_ids"]))
        if e.get("read_at", -1) >= 0:
            row[e["read_at"]] = 2
        rows.append(row)
    return torch.tensor(rows, device=device)


@torch.no_grad()
def representations(adapter, examples: list[dict], batch_size: int = 32, device: torch.device | None = None
                    ) -> np.ndarray:
    """The vectors the adapter's head reads (pooled / mask / answer position) from the frozen model, (N, H)."""
    device = device or torch.device("cpu")
    head, first = adapter.head, adapter.first_trainable_layer
    adapter.head, adapter.first_trainable_layer = torch.nn.Identity(), adapter.n_layers
    try:
        order = _length_order(examples)
        out: list[np.ndarray | None] = [None] * len(examples)
        for start in range(0, len(order), batch_size):
            rows = order[start:start + batch_size]
            batch = _pad([examples[i] for i in rows], adapter, device)
            vectors = adapter(adapter.prefix(batch), batch["attention_mask"]).double().cpu().numpy()
            for i, vector in zip(rows, vectors):
                out[i] = vector
        return np.stack(out)
    finally:
        adapter.head, adapter.first_trainable_layer = head, first
