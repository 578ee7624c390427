"""Running sums of a permutation run, grouped for bit-identical merging.

Sums live on the compute device: ``completed`` groups plus the ``partial`` sum of the open group. Each
permutation is added to ``partial`` in order; a group of ``reduce_every`` permutations (aligned to the
permutation index) is folded into ``completed`` when full. The same arithmetic as Ray's workers, which sum
whole groups from zero, so a merged Ray result equals one process bit for bit. Per-point sums are either
held here or streamed to a :class:`~freeshap_dq.valuation.point_store.PointStore` by the engine's point sink.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from freeshap_dq.config import METRICS
from freeshap_dq.result import ValuationResult
from freeshap_dq.valuation.checkpoint import partial_arrays
from freeshap_dq.valuation.prefix_engine import PermutationMarginals
from freeshap_dq.valuation.utility import DTYPE

STATISTICS = ("sums", "sq_sums", "point_sums")


class Accumulator:
    def __init__(self, result: ValuationResult, device: torch.device, start: int, group: int,
                 partial: dict[str, Any] | None = None, points=None):
        self.template = result
        self.points = points  # a PointStore: per-point sums are streamed to disk by the engine, not added here
        self.on_fold: Callable[[], None] = lambda: None
        self.torn = False  # True while a permutation is half added: such a state is never saved
        self.count = result.count
        self.start, self.group = start, group
        self.evaluated = list(result.evaluated.tolist())
        on_device = lambda d: None if d is None else {  # noqa: E731
            k: torch.as_tensor(v, dtype=DTYPE).to(device).clone() for k, v in d.items()}
        self.completed = {"sums": on_device(result.sums), "sq_sums": on_device(result.sq_sums),
                          "point_sums": None if points is not None else on_device(result.point_sums)}
        zeros = lambda d: None if d is None else {k: torch.zeros_like(v) for k, v in d.items()}  # noqa: E731
        self.partial = {key: zeros(value) for key, value in self.completed.items()}
        self.partial_count = 0
        if partial:
            self.partial = {key: on_device(partial.get(key)) if self.completed[key] is not None else None
                            for key in self.completed}
            self.partial_count = int(partial["count"])
            self.count += self.partial_count
            self.evaluated += [int(e) for e in partial["evaluated"]]

    def add(self, perms: torch.Tensor, marginals: PermutationMarginals, weights: torch.Tensor | None) -> None:
        per_metric = {"accuracy": (marginals.accuracy, marginals.point_accuracy),
                      "ce": (marginals.ce, marginals.point_ce)}
        sums, sq_sums, point_sums = (self.partial[k] for k in STATISTICS)
        for b in range(perms.shape[0]):
            self.torn = True
            for metric in METRICS:
                values, points = per_metric[metric]
                x = values[b] if weights is None else values[b] * weights
                sums[metric].index_add_(0, perms[b], x)
                sq_sums[metric].index_add_(0, perms[b], x * x)
                if point_sums is not None:
                    p = points[b] if weights is None else points[b] * weights.unsqueeze(-1)
                    point_sums[metric].index_add_(0, perms[b], p)
            self.evaluated.append(int(marginals.evaluated[b]))
            self.count += 1
            self.partial_count += 1
            if (self.start + self.count) % self.group == 0:
                self._fold()
            self.torn = False

    def _fold(self) -> None:
        for key, done in self.completed.items():
            if done is not None:
                for metric in done:
                    done[metric] += self.partial[key][metric]
                    self.partial[key][metric].zero_()
        self.partial_count = 0
        if self.points is not None:
            self.points.close_group(self.count)
        self.on_fold()

    def _part(self, state: dict[str, dict[str, torch.Tensor] | None], count: int, evaluated: list[int],
              with_points: bool) -> ValuationResult:
        # views, not copies: ValuationResult.sum copies the first part and adds the others into that copy
        as_numpy = lambda d: None if d is None else {m: v.cpu().numpy() for m, v in d.items()}  # noqa: E731
        r = self.template
        return ValuationResult(method=r.method, sums=as_numpy(state["sums"]), sq_sums=as_numpy(state["sq_sums"]),
                               count=count, point_sums=as_numpy(state["point_sums"]) if with_points else None,
                               evaluated=np.asarray(evaluated, dtype=np.int64), manifest=r.manifest,
                               train_ids=r.train_ids, test_ids=r.test_ids)

    def _result(self, with_partial: bool, with_points: bool) -> ValuationResult:
        done = self.count - self.partial_count
        keep_points = with_points and self.points is None
        parts = [self._part(self.completed, done, self.evaluated[:done], keep_points)]
        if with_partial and self.partial_count:
            parts.append(self._part(self.partial, self.partial_count, self.evaluated[done:], keep_points))
        count = sum(p.count for p in parts)
        sources = [dict(s) for s in self.template.sources]
        sources[-1]["count"] = count
        result = ValuationResult.sum(parts, sources=sources, manifest=dict(self.template.manifest))
        if self.points is not None and with_points:
            result.point_sums = self.points.totals(count)
        return result

    def snapshot(self, with_points: bool = True) -> ValuationResult:
        return self._result(with_partial=True, with_points=with_points)

    def save_checkpoint(self, path: Path) -> None:
        """The completed groups as a result, plus the open group's sums beside them (``partial_*``); with
        per-point sums on disk, the completed groups only (their files are named in the manifest)."""
        done = self.count - self.partial_count
        if self.points is not None:
            result = self._result(with_partial=False, with_points=False)
            result.manifest["point_store"] = {"count": done, "directory": str(self.points.dir)}
            result.save(path)
            return
        partial = {key: None if value is None else {m: v.cpu().numpy() for m, v in value.items()}
                   for key, value in self.partial.items()}
        extra = partial_arrays(partial, self.partial_count, self.evaluated[done:])
        self._result(with_partial=False, with_points=True).save(path, extra=extra)


def point_sink(points, perms: np.ndarray, weights: torch.Tensor | None):
    """The engine's per-point sink that streams each block's (weighted) per-point marginals to ``points``."""
    def sink(start: int, acc: torch.Tensor, ce: torch.Tensor) -> None:
        width = acc.shape[1]
        scale = None if weights is None else weights[start:start + width].unsqueeze(-1)
        for b in range(perms.shape[0]):
            rows = perms[b, start:start + width]
            for metric, marginals in (("accuracy", acc), ("ce", ce)):
                x = marginals[b] if scale is None else marginals[b] * scale
                points.add(metric, rows, x.cpu().numpy())

    return sink
