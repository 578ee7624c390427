r"""The sketched eNTK (``--sketch k``): every large weight's per-example gradient compressed by a seeded projection.

A linear layer applied at the tokens t of an example has the per-example gradient
:math:`G = \partial f/\partial W = \sum_t g_t a_t^\top` (:math:`d_{out} \times d_{in}`, :mod:`factors`). The sketch
replaces it by the k x k matrix

.. math::  \hat G = S_{out}^\top G\, S_{in} = \sum_t (S_{out}^\top g_t)(S_{in}^\top a_t)^\top

with :math:`S_{out}` (:math:`d_{out} \times k`) and :math:`S_{in}` (:math:`d_{in} \times k`) of independent
:math:`N(0, 1/k)` entries, seeded by ``--sketch-seed`` and the tensor's name. As :math:`E[S S^\top] = I` and the two
are independent, :math:`E\langle \hat G, \hat G'\rangle = \langle G, G'\rangle`: the kernel is **unbiased**, each
weight's share formed from :math:`k^2` numbers per example instead of :math:`d_{out} d_{in}`, straight from the
factors (:math:`T k (d_{in} + d_{out})` work, the gradient never formed). GPT-2's ``Conv1D`` (stored transposed)
is sketched the same way with the roles of a and g swapped. Every other trainable tensor (biases, norms, a weight
of at most :math:`k^2` entries, such as MiniLM's head at k = 64, a tensor no factor rule covers) keeps its exact
gradient columns.

The error is a sum over the sketched weights of independent zero-mean terms. Measured on MiniLM at ``top:3``
(18 sketched weights, n = 1,000 Rotten Tomatoes snippets), k = 64 gives a 4.5 % relative (Frobenius) kernel error
(falling slowly with k), 89 k numbers per example instead of 5.3 M parameters, and the same wrong-label detection
as the exact kernel (docs/ntk.md, docs/evaluation.md).
The cost is one forward and backward per batch (the factors of all classes at once), then one Gram product of the
sketched rows: the exact eNTK's Gram product, the bulk of its time, shrinks by :math:`5.3\,M / 89\,k`.

The sketch is for the in-memory kernel (one process); kernel folders (blocks, landmarks) and torchrun take the exact
eNTK. A trainable word-embedding table is refused: its gradient is sparse, and the exact path sums it sparsely.
"""

from __future__ import annotations

import hashlib
import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from freeshap_dq.contracts import ModelAdapter
from freeshap_dq.errors import InputError
from freeshap_dq.ntk.batching import fill_jacobian
from freeshap_dq.ntk.compute import KernelOutput, accumulate_gram, caller_order, length_batches
from freeshap_dq.ntk.factors import FactorStore, NotFactorable, factor_sites
from freeshap_dq.ntk.setup import prepare

SKETCHED_RULES = ("linear", "conv1d")  # weights with per-example gradients sum_t g_t a_t^T (conv1d: a_t g_t^T)
MIN_SKETCH = 4
SKETCH_BATCH = 16  # examples per forward + backward when --grad-batch-size is not given


@dataclass(frozen=True)
class Projection:
    """The two Gaussian matrices of one sketched weight: ``rows`` (weight rows x k) and ``columns`` (columns x k)."""

    rows: torch.Tensor
    columns: torch.Tensor


def check_sketch(sketch: int) -> None:
    if sketch != 0 and sketch < MIN_SKETCH:
        raise InputError(f"--sketch must be 0 (the exact eNTK) or at least {MIN_SKETCH}, got {sketch}; 64 is a "
                         f"good start (docs/ntk.md).")


def sketch_projections(adapter: ModelAdapter, names: list[str], sketch: int, seed: int) -> dict[str, Projection]:
    """The projections of the weights the sketch compresses among ``names``: every weight a linear or conv1d factor
    rule covers with more than ``sketch``\u00b2 entries. Each pair is drawn from a generator seeded by ``seed`` and
    the tensor's name, so it does not depend on which other tensors are trainable."""
    check_sketch(sketch)
    params = dict(adapter.named_parameters())
    out = {}
    for name, (site, attr) in factor_sites(adapter, names).items():
        weight = params[name]
        if site.rule in SKETCHED_RULES and attr == "weight" and weight.numel() > sketch * sketch:
            digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
            generator = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))
            scale = sketch ** -0.5
            out[name] = Projection(torch.randn(weight.shape[0], sketch, generator=generator) * scale,
                                   torch.randn(weight.shape[1], sketch, generator=generator) * scale)
    return out


def compute_sketched_ntk(adapter: ModelAdapter, train_examples: list[dict], test_examples: list[dict], *, sketch: int,
                         sketch_seed: int = 0, trainable: str = "head-only", kernel: str = "class0",
                         max_memory: str | int = "2GiB", batch_size: int = 0, test_diagonal: bool = False,
                         device: str | torch.device = "cpu", progress: bool | None = None,
                         prefix: Callable[[dict], torch.Tensor] | None = None, precision: str = "fp32") -> KernelOutput:
    """The sketched eNTK rows (train + test) x columns (train), as :func:`freeshap_dq.ntk.compute.compute_ntk`."""
    check_sketch(sketch)
    if sketch == 0:
        raise InputError(f"compute_sketched_ntk needs a sketch of at least {MIN_SKETCH}; compute_ntk is the exact eNTK.")
    s = prepare(adapter, train_examples, trainable, kernel, max_memory, device, precision)
    if s.sparse_table:
        raise InputError(f"--sketch does not cover a trainable word-embedding table ({adapter.word_table_name}, "
                         f"from --trainable {trainable}); give --trainable auto or top:K, or drop --sketch.")
    n, total = len(train_examples), len(train_examples) + len(test_examples)
    batch = batch_size or SKETCH_BATCH
    order, prefixes = length_batches(adapter, train_examples, test_examples, batch, s.device, prefix)
    probe = _probe(adapter, s.names, prefixes[0], s.classes, s.precision)
    sites = probe.sites if probe is not None else {}
    projections = {name: Projection(p.rows.to(s.device), p.columns.to(s.device))
                   for name, p in sketch_projections(adapter, [k for k in s.names if k in sites], sketch,
                                                     sketch_seed).items()}
    exact = [(name, 0, s.params[name].numel()) for name in s.names if name not in projections]
    sketched_width = sketch * sketch * len(projections)
    width = sketched_width + sum(hi for _, _, hi in exact)
    per_class = kernel == "per-class"
    _check_budget(s.budget, total, n, width, len(s.classes), per_class, sketch)

    features = [torch.zeros(total, width, dtype=torch.float32, device=s.device) for _ in s.classes]
    bar = tqdm(total=total, unit="ex", file=sys.stderr, dynamic_ncols=True,
               disable=(not sys.stderr.isatty()) if progress is None else not progress,
               desc=f"eNTK {adapter.adapter_name} sketched to {width:,} numbers per example ({len(projections)} "
                    f"weight(s) at k = {sketch})")
    for lo, hi, prefix, mask in prefixes:
        store = probe if lo == 0 and probe is not None else _collect(adapter, sites, prefix, mask, s.classes,
                                                                     s.precision)
        if set(store.sites) != set(sites):
            lost = sorted(set(sites) - set(store.sites))
            raise InputError(f"the sketch needs the factors of every sketched weight, and {lost[0]} gave none on "
                             f"the batch of rows {lo}..{hi}; drop --sketch for the exact eNTK.")
        for index, (name, projection) in enumerate(projections.items()):
            col = index * sketch * sketch
            for ci, sketched in enumerate(_sketched_gradients(store, name, projection, len(s.classes))):
                features[ci][lo:hi, col:col + sketch * sketch] = sketched.reshape(hi - lo, -1)
        if exact:
            for ci, c in enumerate(s.classes):
                fill_jacobian(features[ci][lo:hi, sketched_width:], adapter, s.params, exact, c, ci,
                              [(slice(0, hi - lo), prefix, mask)], store, precision=s.precision)
        bar.update(hi - lo)
    bar.close()

    stack = (len(s.classes),) if per_class else ()
    k_rows = torch.zeros(*stack, total, n, dtype=torch.float64, device=s.device)
    diag = torch.zeros(*stack, total - n, dtype=torch.float64, device=s.device) if test_diagonal else None
    for ci, rows in enumerate(features):
        accumulate_gram(rows, n, k_rows[ci] if per_class else k_rows,
                        None if diag is None else (diag[ci] if per_class else diag))
    del features
    k_train, k_test, diag = caller_order(k_rows, diag, order, n)
    n_trainable = sum(s.params[k].numel() for k in s.names)
    unfactored = sorted(name for name, _, _ in exact if name not in sites)
    return KernelOutput(k_train, k_test, diag, s.names, n_trainable,
                        {"chunks": 1, "batch_size": batch, "world": 1, "kernel": kernel, "trainable": trainable,
                         "max_memory_bytes": s.budget, "gradients": "factors", "factor_passes": 1,
                         "precision": s.precision,
                         "without_factors": unfactored,
                         "fallback": "vmap" if adapter.vmap_compatible else "per-example loop",
                         "sketch": sketch, "sketch_width": width, "sketched_weights": len(projections)})


def _sketched_gradients(store: FactorStore, name: str, projection: Projection, classes: int) -> list[torch.Tensor]:
    """Per class (B, k, k): the sketch of ``name``'s per-example gradient for one batch, from its factors (the
    input's projection, shared by the classes, made once)."""
    site, _ = store.sites[name]
    totals: list[torch.Tensor | None] = [None] * classes
    for a, gs in store.calls(0, name):
        if projection.rows.dtype != a.dtype:  # bf16 factors: projected in bf16 (fp32 accumulation), written in fp32
            projection = Projection(projection.rows.to(a.dtype), projection.columns.to(a.dtype))
        if site.rule == "linear":  # sum_t (S_rows^T g_t)(S_columns^T a_t)^T
            shared = a @ projection.columns
            parts = [torch.bmm((g @ projection.rows).transpose(1, 2), shared) for g in gs]
        else:  # conv1d, weight (in, out): sum_t (S_rows^T a_t)(S_columns^T g_t)^T
            shared = (a @ projection.rows).transpose(1, 2)
            parts = [torch.bmm(shared, g @ projection.columns) for g in gs]
        totals = [part if total is None else total + part for total, part in zip(totals, parts, strict=True)]
    return totals


def _probe(adapter: ModelAdapter, names: list[str], first_batch: tuple, classes: list[int], precision: str
           ) -> FactorStore | None:
    """The first batch's factors, whose sites are those of ``names`` the model really calls (a site that never ran,
    or is not one row per example, is dropped); None when no factor can be kept. The loop reuses it for batch 0."""
    probe = FactorStore(adapter, factor_sites(adapter, names), precision)
    _, _, prefix, mask = first_batch
    try:
        probe.collect(adapter, prefix, mask, classes)
    except NotFactorable:
        return None
    return probe


def _collect(adapter: ModelAdapter, sites: dict, prefix: torch.Tensor, mask: torch.Tensor, classes: list[int],
             precision: str) -> FactorStore:
    store = FactorStore(adapter, sites, precision)
    try:
        store.collect(adapter, prefix, mask, classes)
    except NotFactorable as exc:
        raise InputError(f"the sketch needs the factors of every sketched weight, and the model changed between "
                         f"batches ({exc}); drop --sketch for the exact eNTK.") from None
    return store


def _check_budget(budget: int, total: int, n: int, width: int, classes: int, per_class: bool, sketch: int) -> None:
    need = 4 * total * width * classes + 8 * total * n * (classes if per_class else 1)
    if need > budget:
        raise InputError(f"the sketched eNTK needs {need / 2**20:,.0f} MiB for {total} examples x {width:,} sketched "
                         f"numbers{f' x {classes} classes' if classes > 1 else ''} and the Gram; raise --max-memory "
                         f"to at least {-(-need // 2**20)}MiB, or give a smaller --sketch than {sketch}.")

