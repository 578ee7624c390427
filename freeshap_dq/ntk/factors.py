r"""Per-example gradients from one batched backward, kept as factors.

A linear layer applied at the tokens t of an example, :math:`y_t = W a_t + b`, has the per-example
gradients :math:`\partial f/\partial W = \sum_t g_t a_t^\top` and :math:`\partial f/\partial b = \sum_t g_t`,
with :math:`g_t = \partial f/\partial y_t`. Likewise a layer norm :math:`y_t = \gamma \circ \hat x_t + \beta`
(:math:`\partial f/\partial\gamma = \sum_t g_t \circ \hat x_t`; an RMS norm has :math:`\hat x_t = x_t/\mathrm{rms}(x_t)`
and no :math:`\beta`), an embedding table (:math:`\partial f/\partial E[v] = \sum_{t: x_t = v} g_t`) and GPT-2's
``Conv1D``, a linear layer stored transposed (:math:`y_t = a_t W + b`, so :math:`\partial f/\partial W = \sum_t a_t g_t^\top`).
Examples in a batch do not interact, so one backward of :math:`\sum_x f(x)` gives every :math:`g_t`.

The factors :math:`(a_t, g_t)` take :math:`T(d_{in} + d_{out})` numbers per example and layer where the
gradient takes :math:`d_{in} d_{out}`, so they are kept for every example, and each parameter chunk's
Jacobian columns are formed from them by a batched product: the network runs forward and backward once
per class instead of once per chunk. Parameters of any other kind of module are left to ``vmap(grad)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from freeshap_dq.ntk.precision import passes

RMS_NORMS = ("LlamaRMSNorm", "Qwen2RMSNorm", "MistralRMSNorm")  # weight * x / rms(x), computed in float32
TRANSPOSED_LINEARS = ("Conv1D",)  # transformers' GPT-2 layer: y = x @ weight + bias, weight (in, out)


class NotFactorable(RuntimeError):
    """A module was called in a way the factor rules do not cover (the caller falls back to vmap)."""


@dataclass(frozen=True)
class Site:
    """A module whose trainable ``weight``/``bias`` get their per-example gradients from factors."""

    module: str
    rule: str  # linear | norm | rms | embedding


def factor_sites(adapter: nn.Module, names: list[str]) -> dict[str, tuple[Site, str]]:
    """Parameter name -> (site, 'weight' | 'bias') for the names a factor rule covers."""
    modules = dict(adapter.named_modules())
    out = {}
    for name in names:
        module_name, _, attr = name.rpartition(".")
        rule = _rule(modules.get(module_name), attr)
        if rule:
            out[name] = (Site(module_name, rule), attr)
    return out


def _rule(module: nn.Module | None, attr: str) -> str | None:
    if attr not in ("weight", "bias") or module is None:
        return None
    if isinstance(module, nn.Linear):
        return "linear"
    if type(module).__name__ in TRANSPOSED_LINEARS and getattr(module, "weight", None) is not None \
            and module.weight.dim() == 2:
        return "conv1d"
    if isinstance(module, nn.LayerNorm) and len(module.normalized_shape) == 1 and module.elementwise_affine:
        return "norm"
    if type(module).__name__ in RMS_NORMS and attr == "weight":
        return "rms"
    if isinstance(module, nn.Embedding) and attr == "weight" and module.max_norm is None:
        return "embedding"
    return None


class FactorStore:
    """The factors of every site for a list of batches: per batch and site, the calls' (a, g per class)."""

    def __init__(self, adapter: nn.Module, sites: dict[str, tuple[Site, str]], precision: str = "fp32"):
        self.modules = dict(adapter.named_modules())
        self.sites = sites
        self.precision = precision  # of the passes (freeshap_dq.ntk.precision); the factors keep their dtype
        self.site_bytes: dict[Site, int] = {}  # per site; an input shared by sites (q, k, v) counted for each
        self.batches: list[dict[Site, list[tuple[torch.Tensor, list[torch.Tensor]]]]] = []

    @property
    def nbytes(self) -> int:
        """The kept factors' bytes (an upper bound: shared inputs counted once per site)."""
        return sum(self.site_bytes.values())

    def collect(self, adapter: nn.Module, prefix: torch.Tensor, mask: torch.Tensor, classes: list[int]) -> None:
        """Run one batch forward, then backward once per class, and keep its factors. On the first batch, a site
        whose output is not one row per example (say, a module applied to the flattened batch), or whose module
        never ran, is dropped from ``sites`` (its parameters are left to vmap); on a later one it raises
        ``NotFactorable``. An embedding
        lookup broadcast over the batch (position ids of shape (1, L)) is given one copy per example."""
        sites = sorted({site for site, _ in self.sites.values()}, key=lambda s: s.module)
        captured: dict[Site, list[tuple[torch.Tensor, torch.Tensor]]] = {site: [] for site in sites}
        unfit: set[Site] = set()
        handles = [self.modules[site.module].register_forward_hook(self._hook(site, len(mask), captured[site], unfit))
                   for site in sites]
        own = [p for site in sites for p in self.modules[site.module].parameters(recurse=False)
               if not p.requires_grad]
        for p in own:
            p.requires_grad_(True)
        try:
            with passes(self.precision, prefix.device):
                logits = adapter(prefix, mask)
        finally:
            for h in handles:
                h.remove()
            for p in own:
                p.requires_grad_(False)
        # a site that never ran: its module was not called, though its weights may be used directly (PyTorch's
        # attention reads out_proj.weight without calling out_proj), so its gradient cannot come from factors
        unfit |= {site for site in sites if not captured[site]}
        if unfit:
            if self.batches:
                raise NotFactorable(f"{sorted(s.module for s in unfit)} changed shape between batches")
            self.sites = {name: (site, attr) for name, (site, attr) in self.sites.items() if site not in unfit}
            sites = [site for site in sites if site not in unfit]
        calls = [(site, a, out) for site in sites for a, out in captured[site]]
        if any(not out.requires_grad for _, _, out in calls):
            raise NotFactorable("a factored module's output is not on the gradient path")
        keep = mask > 0
        with passes(self.precision, prefix.device):
            grads = [torch.autograd.grad(logits[:, c].sum(), [out for _, _, out in calls], retain_graph=True,
                                         allow_unused=True) for c in classes] if calls else []
        batch: dict[Site, list[tuple[torch.Tensor, list[torch.Tensor]]]] = {site: [] for site in sites}
        for i, (site, a, out) in enumerate(calls):
            gs = []
            for per_class in grads:
                g = _tokens(torch.zeros_like(out) if per_class[i] is None else per_class[i].detach(), len(mask))
                if g.shape[1] == keep.shape[1]:
                    g = g * keep[:, :, None].to(g.dtype)
                gs.append(g)
            if gs and a.is_floating_point():
                a = a.to(gs[0].dtype)  # a pair's products are formed in one dtype: bf16 under bf16 passes
            batch[site].append((a, gs))
            self.site_bytes[site] = (self.site_bytes.get(site, 0) + a.numel() * a.element_size()
                                     + sum(g.numel() * g.element_size() for g in gs))
        self.batches.append(batch)

    def _hook(self, site: Site, batch: int, sink: list, unfit: set):
        def hook(module, inputs, output):
            x = inputs[0] if inputs else None
            if not (isinstance(output, torch.Tensor) and isinstance(x, torch.Tensor) and output.dim() >= 2):
                unfit.add(site)
                return None
            shared = None
            if site.rule == "embedding" and batch > 1 and output.shape[0] == 1 == x.shape[0]:
                # one lookup broadcast over the batch (position ids are (1, L)): each example gets its own
                # copy, so that the backward keeps the examples' gradients apart
                output = shared = output.expand(batch, *output.shape[1:])
                x = x.expand(batch, *x.shape[1:])
            if output.shape[0] != batch or x.shape[0] != batch:
                unfit.add(site)
                return None
            with torch.no_grad():
                if site.rule == "embedding":
                    a = x.reshape(batch, -1)
                elif site.rule in ("linear", "conv1d"):
                    a = _tokens(x.detach(), batch)
                elif site.rule == "norm":
                    a = _tokens(F.layer_norm(x.detach(), module.normalized_shape, None, None, module.eps), batch)
                else:
                    h = x.detach().to(torch.float32)
                    a = (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + module.variance_epsilon)).to(x.dtype)
                    a = _tokens(a, batch)
            sink.append((a, output))
            return shared
        return hook

    def calls(self, batch: int, name: str) -> list[tuple[torch.Tensor, list[torch.Tensor]]]:
        """(a, g per class) of each call of the module that owns ``name``, for one batch."""
        return self.batches[batch][self.sites[name][0]]

    def piece(self, batch: int, name: str, class_index: int, lo: int, hi: int, out: torch.Tensor) -> None:
        """Write columns lo..hi of the flattened per-example gradient of ``name`` for one batch into ``out``
        (B x (hi - lo), a view whose last axis is contiguous). Whole rows of a linear weight are multiplied
        straight into it when the factors have its dtype (no temporary of the gradient's size)."""
        site, attr = self.sites[name]
        param = getattr(self.modules[site.module], attr)
        calls = self.batches[batch][site]
        if site.rule == "linear" and attr == "weight" and lo % param.shape[1] == 0 and hi % param.shape[1] == 0 \
                and calls[0][0].dtype == out.dtype:
            rows = out.view(len(out), (hi - lo) // param.shape[1], param.shape[1])
            for i, (a, gs) in enumerate(calls):
                g = gs[class_index][:, :, lo // param.shape[1]:hi // param.shape[1]].transpose(1, 2)
                torch.bmm(g, a, out=rows) if i == 0 else rows.baddbmm_(g, a)
            return
        total = None
        for a, gs in calls:
            g = gs[class_index]
            if attr == "bias":
                part = g.sum(1)[:, lo:hi]
            elif site.rule in ("norm", "rms"):
                part = (g * a).sum(1)[:, lo:hi]
            elif site.rule == "linear":
                width = param.shape[1]
                r0, r1 = lo // width, -(-hi // width)
                part = torch.bmm(g[:, :, r0:r1].transpose(1, 2), a).reshape(len(g), -1)
                part = part[:, lo - r0 * width:hi - r0 * width]
            elif site.rule == "conv1d":  # weight (in, out): row r of the gradient is sum_t a_t[r] g_t
                width = param.shape[1]
                r0, r1 = lo // width, -(-hi // width)
                part = torch.bmm(a[:, :, r0:r1].transpose(1, 2), g).reshape(len(g), -1)
                part = part[:, lo - r0 * width:hi - r0 * width]
            else:
                part = _embedding_rows(param, self.modules[site.module].padding_idx, a, g, lo, hi)
            total = part if total is None else total + part
        out.copy_(total)


def _tokens(t: torch.Tensor, batch: int) -> torch.Tensor:
    """(B, ..., d) -> (B, T, d): one row per position the module was applied at."""
    return t.reshape(batch, -1, t.shape[-1])


def _embedding_rows(table: torch.Tensor, padding_idx: int | None, ids: torch.Tensor, g: torch.Tensor, lo: int,
                    hi: int) -> torch.Tensor:
    """Columns lo..hi of the flattened table gradient: row v gathers the g_t of the positions holding id v
    (the padding row, if any, gets none)."""
    width = table.shape[1]
    r0, r1 = lo // width, -(-hi // width)
    inside = (ids >= r0) & (ids < r1)
    if padding_idx is not None:
        inside &= ids != padding_idx
    out = torch.zeros(len(g), r1 - r0, width, dtype=g.dtype, device=g.device)
    index = ((ids - r0).clamp(0, r1 - r0 - 1))[:, :, None].expand(-1, -1, width)
    out.scatter_add_(1, index, g * inside[:, :, None].to(g.dtype))
    return out.reshape(len(g), -1)[:, lo - r0 * width:hi - r0 * width]
