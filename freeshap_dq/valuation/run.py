"""Run a valuation: the one entry point that ties kernel, utility, engine, stopping and results.

``compute_values(problem, config)`` plans the run (:mod:`freeshap_dq.valuation.setup`: every refusal before
any kernel is read), builds the utility, then dispatches on ``config.method``
(:mod:`freeshap_dq.valuation.methods`):

- ``tmc`` / ``beta`` / ``banzhaf``: permutation sampling with the prefix engine. Permutation i is drawn from
  ``(seed, i)``, so a run is reproducible, splits into mergeable parts (``start``) and resumes
  from a checkpoint with bit-identical values. Sums are accumulated in groups of ``reduce_every``
  permutations aligned to the permutation index: each group is summed from zero in permutation
  order, then added to the totals in group order — the same arithmetic whether one process runs
  every group or workers run them (:mod:`freeshap_dq.valuation.ray`).
- ``exact``: enumeration of all subsets (n <= 16).
- ``loo``: closed-form leave-one-out, one factorisation.
"""

from __future__ import annotations

import logging
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from freeshap_dq.config import ValuationConfig
from freeshap_dq.contracts import Engine, Utility, ValuationProblem
from freeshap_dq.errors import CheckpointError, InputError
from freeshap_dq.result import ValuationResult
from freeshap_dq.valuation.accumulator import Accumulator, point_sink
from freeshap_dq.valuation.checkpoint import checkpoint_path, load_checkpoint
from freeshap_dq.valuation.interrupts import deferred_interrupts
from freeshap_dq.valuation.methods import coalition_size_probabilities, method_name, samples_permutations
from freeshap_dq.valuation.point_store import PointStore
from freeshap_dq.valuation.semivalues import exact_semivalues, position_weights, shapley_probabilities
from freeshap_dq.valuation.setup import auto_batch_size, make_engine, make_utility, plan, run_manifest
from freeshap_dq.valuation.stopping import MaxPermutations, MaxTime, StandardErrorBelow, StoppingCriterion
from freeshap_dq.valuation.utility import DTYPE

logger = logging.getLogger("freeshap_dq")


def permutation(seed: int, index: int, n: int) -> np.ndarray:
    return np.random.default_rng([seed, index]).permutation(n)


def permutations(seed: int, first: int, count: int, n: int) -> torch.Tensor:
    """Permutations first, ..., first + count - 1 of the run seeded ``seed``, (count, n)."""
    return torch.as_tensor(np.stack([permutation(seed, first + b, n) for b in range(count)]))


def _permutation_batch(problem: ValuationProblem, config: ValuationConfig, utility: Utility) -> int:
    """Permutations per engine call: ``--batch-size``, else 16 for the low-rank engine, else what fits the device."""
    return config.batch_size or (16 if config.low_rank else auto_batch_size(
        problem.n_train, problem.n_test, utility.device, problem.n_classes if problem.per_class else 1))


def compute_values(problem: ValuationProblem, config: ValuationConfig | None = None, *,
                   stopping: StoppingCriterion | None = None, checkpoint_dir: str | Path | None = None,
                   resume: bool = True, progress: bool | None = None,
                   point_dir: str | Path | None = None) -> ValuationResult:
    """Values of every training example; see the module docstring.

    ``point_dir``: with ``per_point``, the n x m per-point sums are accumulated on disk there (memory-mapped,
    :mod:`freeshap_dq.valuation.point_store`) instead of in memory, and the result's per-point matrices are
    memory maps.
    """
    if stopping is not None and not stopping.bounded:
        raise InputError(f"the stopping rule {stopping!r} may never fire, and the run would never end: combine it "
                         f"with a limit, e.g. stopping=rule | MaxPermutations(5000) or rule | MaxTime(3600).")
    config = plan(problem, config or ValuationConfig())
    started = time.monotonic()
    utility = make_utility(problem, config)
    manifest = run_manifest(problem, config, utility)
    if config.method == "exact":
        values, points = exact_semivalues(utility, shapley_probabilities(problem.n_train), config.per_point)
        result = ValuationResult.from_exact(method_name(config), values, points, manifest=manifest,
                                            train_ids=problem.train_ids, test_ids=problem.test_ids)
    elif config.method == "loo":
        acc, ce = (v.cpu().numpy() for v in utility.leave_one_out_point_values())
        result = ValuationResult.from_exact(
            method_name(config), {"accuracy": acc.mean(1), "ce": ce.mean(1)},
            {"accuracy": acc, "ce": ce} if config.per_point else None, manifest=manifest, train_ids=problem.train_ids,
            test_ids=problem.test_ids)
    else:
        engine = make_engine(problem, config, utility)
        manifest.update(engine.manifest_entries())
        result = sample_permutations(problem, config, utility, engine, manifest, stopping=stopping,
                                     checkpoint_dir=checkpoint_dir, resume=resume, progress=progress,
                                     point_dir=point_dir if config.per_point else None)
    result.manifest["elapsed_seconds"] = round(time.monotonic() - started, 3)
    return result


def compute_semivalues(problem: ValuationProblem, config: ValuationConfig, methods: tuple[str, ...],
                       progress: bool | None = None) -> dict[str, ValuationResult]:
    """Several permutation semivalues (``tmc``, ``beta``, ``banzhaf``) of one run: the same permutations give the
    same marginals, and each method weights them by its own n p(s). Each result is, bit for bit, what
    ``compute_values(problem, replace(config, method=m))`` gives, at the cost of one engine run instead of one per
    method. Plain runs only: ``config.permutations`` permutations, no checkpoint, per-point sums or stopping rule."""
    configs = {m: plan(problem, replace(config, method=m)) for m in methods}
    if not configs or not all(samples_permutations(c) for c in configs.values()):
        raise InputError(f"compute_semivalues values permutation methods only, not {', '.join(methods) or 'none'}.")
    first = next(iter(configs.values()))
    if first.per_point or first.max_seconds > 0 or first.stderr_target > 0:
        raise InputError("compute_semivalues makes plain runs: no per-point sums, --max-seconds or --stderr-target.")
    started = time.monotonic()
    utility = make_utility(problem, first)
    engine = make_engine(problem, first, utility)
    n = problem.n_train
    runs = {}
    for method, method_config in configs.items():
        manifest = {**run_manifest(problem, method_config, utility), **engine.manifest_entries()}
        result = ValuationResult.empty(method_name(method_config), n, problem.n_test, False,
                                       sources=[{"seed": first.seed, "start": first.start, "count": 0}],
                                       manifest=manifest, train_ids=problem.train_ids, test_ids=problem.test_ids)
        probs = coalition_size_probabilities(method_config, n)
        weights = None if probs is None else torch.as_tensor(position_weights(probs), dtype=DTYPE,
                                                             device=utility.device)
        runs[method] = (Accumulator(result, utility.device, first.start, first.reduce_every), weights)
    batch = _permutation_batch(problem, first, utility)
    done = 0
    with tqdm(total=first.permutations, unit="perm", file=sys.stderr, dynamic_ncols=True,
              disable=(not sys.stderr.isatty()) if progress is None else not progress,
              desc=f"{' + '.join(method_name(c) for c in configs.values())} n={n} m={problem.n_test}") as bar:
        while done < first.permutations:
            size = min(batch, first.permutations - done)
            perms = permutations(first.seed, first.start + done, size, n)
            marginals = engine.run(perms)
            for acc, weights in runs.values():
                acc.add(perms.to(utility.device), marginals, weights)
            done += size
            bar.update(size)
    out = {method: acc.snapshot() for method, (acc, _) in runs.items()}
    for result in out.values():
        result.manifest["elapsed_seconds"] = round(time.monotonic() - started, 3)
    return out


def default_stopping(config: ValuationConfig) -> StoppingCriterion:
    criterion: StoppingCriterion = MaxPermutations(config.permutations)
    if config.max_seconds > 0:
        criterion = criterion | MaxTime(config.max_seconds)
    if config.stderr_target > 0:
        criterion = criterion | StandardErrorBelow(config.stderr_target, config.rank_metric)
    return criterion


def sample_permutations(problem: ValuationProblem, config: ValuationConfig, utility: Utility, engine: Engine,
                        manifest: dict[str, Any], *, stopping: StoppingCriterion | None = None,
                        checkpoint_dir: str | Path | None = None, resume: bool = True, progress: bool | None = None,
                        point_dir: str | Path | None = None) -> ValuationResult:
    """Permutations ``config.start``, ... until ``stopping`` (default: ``config.permutations`` of them, or the
    time / standard-error targets), accumulated in groups, checkpointed every ``config.checkpoint_every``."""
    n = problem.n_train
    checkpoint = checkpoint_path(checkpoint_dir) if checkpoint_dir else None
    saved = load_checkpoint(checkpoint, manifest) if (checkpoint is not None and resume) else None
    result, partial = saved if saved is not None else (None, None)
    if saved is not None:
        done = result.count + (partial["count"] if partial else 0)
        if stopping is None and done > config.permutations:
            raise CheckpointError(
                f"{checkpoint}: the checkpoint already holds {done} permutations, more than the {config.permutations} "
                f"asked for (a run's sums cannot be cut back). Ask for --permutations {done} or more to resume it, or "
                f"start over with --no-resume or another --checkpoint-dir.")
        logger.info("resuming from the checkpoint in %s: %d of %s permutations done", checkpoint.parent, done,
                    config.permutations if stopping is None else "the stopping rule's")
    if result is None:
        result = ValuationResult.empty(method_name(config), n, problem.n_test, config.per_point,
                                       sources=[{"seed": config.seed, "start": config.start, "count": 0}],
                                       manifest=manifest, train_ids=problem.train_ids, test_ids=problem.test_ids)
    result.manifest.update(manifest)
    result.train_ids, result.test_ids = problem.train_ids, problem.test_ids
    points = _point_store(point_dir, result, saved is not None, checkpoint, problem)
    if points is not None:
        partial = None  # the open group is recomputed: its per-point sums were never saved
    acc = Accumulator(result, utility.device, config.start, config.reduce_every, partial, points)
    probs = coalition_size_probabilities(config, n)
    weights = None if probs is None else torch.as_tensor(position_weights(probs), dtype=DTYPE, device=utility.device)
    criterion = stopping or default_stopping(config)
    criterion.reset()
    cap = config.permutations if stopping is None else None
    batch = _permutation_batch(problem, config, utility)
    bar = tqdm(total=cap, initial=result.count, unit="perm", file=sys.stderr, dynamic_ncols=True,
               disable=(not sys.stderr.isatty()) if progress is None else not progress,
               desc=f"{method_name(config)} n={n} m={problem.n_test}")
    last_saved = result.count
    if points is not None:  # checkpoints at group boundaries only, when the per-point files are complete
        acc.on_fold = (lambda path=checkpoint: (acc.save_checkpoint(path), points.forget_previous())) \
            if checkpoint else points.forget_previous
        checkpoint = None
    try:
        while not criterion(acc.snapshot(with_points=False)):
            size = batch if cap is None else min(batch, cap - acc.count)
            if size <= 0:
                break
            first = config.start + acc.count
            if points is not None:  # a batch never spans two groups: its per-point sums go to the open group
                size = min(size, config.reduce_every - first % config.reduce_every)
            perms = permutations(config.seed, first, size, n)
            sink = None if points is None else point_sink(points, perms.numpy(), weights)
            marginals = engine.run(perms, point_sink=sink)
            with deferred_interrupts():  # a Ctrl-C / SIGTERM lands between permutations, never inside one
                acc.add(perms.to(utility.device), marginals, weights)
            bar.update(size)
            if checkpoint is not None and acc.count - last_saved >= config.checkpoint_every:
                acc.save_checkpoint(checkpoint)
                last_saved = acc.count
    except KeyboardInterrupt:
        if checkpoint is not None and acc.count > last_saved and not acc.torn:
            acc.save_checkpoint(checkpoint)
        logger.info(_interrupted_at(acc.count, cap, checkpoint_dir, points is not None))
        raise
    finally:
        bar.close()
    if checkpoint is not None and acc.count != last_saved:
        acc.save_checkpoint(checkpoint)
    return acc.snapshot()


def _interrupted_at(count: int, cap: int | None, checkpoint_dir, points_on_disk: bool) -> str:
    done = f"{count} of {cap}" if cap is not None else f"{count}"
    if checkpoint_dir is None:
        return (f"interrupted after {done} permutations; without a checkpoint folder nothing is kept (give "
                f"--checkpoint-dir to make a run resumable).")
    kept = "the last complete group of permutations" if points_on_disk else f"{count} permutations"
    return f"interrupted after {done} permutations; the checkpoint in {checkpoint_dir} keeps {kept}: rerun to resume."


def _point_store(point_dir, result: ValuationResult, resumed: bool, checkpoint, problem: ValuationProblem
                 ) -> PointStore | None:
    """The on-disk per-point store (None without ``point_dir``); a checkpoint of the other kind is refused."""
    if point_dir is None:
        if resumed and "point_store" in result.manifest:
            raise CheckpointError(f"{checkpoint}: this checkpoint keeps its per-point sums on disk "
                                  f"({result.manifest['point_store']['directory']}); resume it with the same "
                                  f"per-point folder (--save-result NAME.result), or start over with --no-resume.")
        return None
    if resumed and result.point_sums is not None:
        raise CheckpointError(f"{checkpoint}: this checkpoint keeps its per-point sums in memory; resume it with "
                              f"--save-result NAME.npz, or start over with --no-resume.")
    return PointStore(point_dir, problem.n_train, problem.n_test, completed_count=result.count if resumed else 0)
