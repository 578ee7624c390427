r"""The set-up every eNTK path shares (in memory, kernel folders by blocks, landmark columns).

Which parameters are trainable (``--trainable``), the memory budget (``--max-memory``), how the trainable
tensors are cut into chunks of Jacobian columns that fit it, and how chunks are grouped into factor passes
(one forward + backward per group, see :mod:`freeshap_dq.ntk.factors`). :func:`prepare` applies a selection
to an adapter.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch

from freeshap_dq.contracts import ModelAdapter
from freeshap_dq.errors import InputError
from freeshap_dq.io import available_memory
from freeshap_dq.ntk.factors import factor_sites
from freeshap_dq.ntk.precision import PRECISIONS

KERNEL_MODES = ("class0", "sum", "per-class")


GRADIENT_PATHS = ("auto", "factors", "vmap")


FACTOR_SHARE = 0.5  # at most this part of the memory budget holds factors (auto); else vmap(grad) per chunk


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


AUTO_DEPTH = 3  # ``auto``: the last 3 layers + head (docs/evaluation.md, "Levers beside the fitted head": depth)
DEFAULT_TRAINABLE = "auto"  # the eNTK of every command and of evaluate


def resolve_trainable(spec: str, n_layers: int) -> str:
    """The concrete spec ``auto`` stands for on a model of ``n_layers`` layers: ``top:AUTO_DEPTH``, or every layer
    (``top:n_layers``) of a shallower model; any other spec unchanged."""
    return f"top:{min(AUTO_DEPTH, n_layers)}" if spec == "auto" else spec


def parse_trainable(spec: str) -> tuple[str, int | re.Pattern | None]:
    """The kind of a ``--trainable`` spec and its argument (a layer count or a compiled pattern), checked
    before any model is loaded; whether the count fits the model is checked by :func:`select_trainable`."""
    kind, _, arg = spec.partition(":")
    if kind in ("head-only", "all", "auto") and not arg:
        return kind, None
    if kind in ("top", "freeze"):
        try:
            k = int(arg)
        except ValueError:
            raise InputError(f"trainable {spec!r}: {kind}:K needs a whole number of layers.") from None
        if k < 0:
            raise InputError(f"trainable {spec!r}: the layer count must be >= 0.")
        return kind, k
    if kind == "regex":
        try:
            return kind, re.compile(arg)
        except re.error as exc:
            raise InputError(f"trainable {spec!r}: bad regular expression ({exc}).") from None
    raise InputError(f"trainable {spec!r} is unknown; use auto, head-only, all, top:K, freeze:K or regex:PATTERN.")


def select_trainable(adapter: ModelAdapter, spec: str) -> list[str]:
    """Trainable parameter names for a spec:

    ``auto`` (see :func:`resolve_trainable`) | ``head-only`` | ``all`` | ``top:K`` (last K layers + head) |
    ``freeze:K`` (first K layers frozen; embeddings, the other layers and the head trainable:
    the paper's BERT setting is freeze:8 of 12) | ``regex:PATTERN`` (matching names + head).
    With LoRA, only LoRA-B matrices (and the head) are trainable: the base weights are frozen by
    LoRA's design and LoRA-A gradients are identically zero at initialisation (B = 0).
    """
    groups = adapter.parameter_groups()
    n_layers = adapter.n_layers
    head = groups.get("head", [])
    layer = lambda i: groups.get(f"layer.{i}", [])  # noqa: E731
    spec = resolve_trainable(spec, n_layers)
    kind, arg = parse_trainable(spec)
    if kind == "head-only":
        names = head
    elif kind == "all":
        names = [n for key, ns in groups.items() if key != "other" for n in ns]
    elif kind in ("top", "freeze"):
        if arg > n_layers:
            raise InputError(f"trainable {spec!r}: the model has {n_layers} layers (blocks the adapter can "
                             f"select); give --trainable top:{n_layers} (all of them) or a smaller K.")
        if kind == "top":
            names = [n for i in range(n_layers - arg, n_layers) for n in layer(i)] + head
        else:
            names = groups.get("embeddings", []) + [n for i in range(arg, n_layers) for n in layer(i)] + head
    else:
        names = [n for n, _ in adapter.named_parameters() if arg.search(n) and n not in head] + head
        if len(names) == len(head):
            raise InputError(f"trainable {spec!r} matches no parameter; names look like "
                             f"{next(iter(adapter.named_parameters()))[0]!r}.")
    if adapter.lora_rank:
        names = [n for n in names if ".lora_B." in n or n in head]
    return names


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


def factor_groups(adapter: ModelAdapter, units: list, names: list[str], estimate: dict | None, room: int) -> list[list]:
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


def parameter_chunks(names: list[str], params: dict, capacity: int) -> list[list[tuple[str, int, int]]]:
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


@dataclass
class Setup:
    """What every eNTK path works from: the device and budget, the trainable names (``dense_names``: those whose
    Jacobian columns are formed; the word table, when trainable, is summed sparsely), the classes' logits."""

    device: torch.device
    budget: int
    names: list[str]
    params: dict
    dense_names: list[str]
    sparse_table: bool
    vocab: int
    classes: list[int]
    precision: str = "fp32"  # of the forward and backward passes (freeshap_dq.ntk.precision)


def prepare(adapter: ModelAdapter, train_examples: list[dict], trainable: str, kernel: str, max_memory: str | int,
            device: str | torch.device, precision: str = "fp32") -> Setup:
    """Check the kernel mode and precision, select and expose the trainable parameters, move the adapter to the
    device. The in-memory, blocked and landmark eNTKs all start here."""
    if kernel not in KERNEL_MODES:
        raise InputError(f"kernel {kernel!r} is unknown; choose one of {', '.join(KERNEL_MODES)}.")
    if precision not in PRECISIONS:
        raise InputError(f"precision {precision!r} is unknown here; choose one of {', '.join(PRECISIONS)} (auto is "
                         f"resolved by the kernel builder).")
    if not train_examples:
        raise InputError("the training set is empty.")
    device = torch.device(device)
    names = select_trainable(adapter, trainable)
    params = dict(adapter.named_parameters())
    for p in params.values():
        p.requires_grad_(False)  # torch.func and the factor passes switch on what they differentiate
    adapter.set_trainable(set(names))
    adapter.to(device)
    word_table = adapter.word_table_name
    sparse_table = word_table in names
    return Setup(device, parse_memory(max_memory, device), names, params,
                  [k for k in names if not (sparse_table and k == word_table)], sparse_table,
                  params[word_table].shape[0] if sparse_table else 0,
                  [0] if kernel == "class0" else list(range(adapter.head.out_features)), precision)
