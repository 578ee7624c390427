r"""Permutations on Ray: the kernel once in the object store, workers run whole permutation groups.

A run of T permutations starting at index s is cut into groups at multiples of ``reduce_every``
(R): ``[s, ceil(s/R) R), ..., [..., s + T)``. Permutation i is drawn from ``(seed, i)`` and a group's
sums are accumulated from zero in permutation order — exactly what ``compute_values`` does in one
process, which then adds the groups to its totals in order. Workers return each group's
sufficient statistics (sums, sums of squares, per-point sums, evaluated prefix lengths: never
per-permutation histories) and the driver adds them in group order, so the result is
bit-identical to one process on CPU when the workers use the same number of threads (the
default: the driver's). The ridge is resolved once by the driver and sent as a number.

Each worker is a Ray actor that builds the utility (ridge, U(N), factorisations) and engine once
and then runs any number of groups. A worker that dies is restarted by Ray (``max_retries``) and
its groups are recomputed from their seeds. With ``checkpoint_dir``, every finished group is written to
``groups/group-<first>.npz``; a rerun reads them and computes only the missing groups.
"""

from __future__ import annotations

import dataclasses
import resource
import sys
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from freeshap_dq.config import ValuationConfig
from freeshap_dq.errors import CheckpointError, InputError
from freeshap_dq.kernels.problem import KernelProblem
from freeshap_dq.result import ValuationResult
from freeshap_dq.valuation.checkpoint import RESUME_KEYS
from freeshap_dq.valuation.methods import method_name, samples_permutations
from freeshap_dq.valuation.run import compute_values, sample_permutations
from freeshap_dq.valuation.setup import make_engine, make_utility, plan, run_manifest

EXECUTORS = ("local", "ray")


def permutation_groups(start: int, count: int, group: int) -> list[tuple[int, int]]:
    """(first, count) of each group covering [start, start + count), cut at multiples of ``group``."""
    out, first, end = [], start, start + count
    while first < end:
        stop = min(end, (first // group + 1) * group)
        out.append((first, stop - first))
        first = stop
    return out

def run_group(problem: KernelProblem, config: ValuationConfig, first: int, count: int,
              threads: int | None = None) -> ValuationResult:
    """One group's sufficient statistics, from scratch."""
    return GroupRunner(problem, config, threads).run(first, count)

class GroupRunner:
    """A worker's state: the utility (factorisations, ridge) and engine built once, then any number of groups."""

    def __init__(self, problem: KernelProblem | tuple[str, str], config: ValuationConfig, threads: int | None = None):
        if threads:
            torch.set_num_threads(threads)
        if isinstance(problem, tuple):  # a kernel folder, opened by path (memory-mapped) on the worker's machine
            path, fingerprint = problem
            problem = KernelProblem.load(path)
            if problem.fingerprint() != fingerprint:
                raise CheckpointError(f"{path}: the kernel folder seen by this Ray worker differs from the driver's "
                                      f"(fingerprint {problem.fingerprint()} vs {fingerprint}); workers need the "
                                      f"same folder on a shared file system.")
        self.problem, self.config = problem, config
        self.utility = make_utility(problem, config)
        self.engine = make_engine(problem, config, self.utility)
        self.manifest = {**run_manifest(problem, config, self.utility), **self.engine.manifest_entries()}

    def run(self, first: int, count: int) -> ValuationResult:
        group = dataclasses.replace(self.config, start=first, permutations=count)
        part = sample_permutations(self.problem, group, self.utility, self.engine,
                                   {**self.manifest, "config": group.to_dict()}, resume=False, progress=False)
        part.manifest["worker_peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        return part

def merge_groups(parts: list[ValuationResult], config: ValuationConfig) -> ValuationResult:
    """Add groups in index order, as the single-process accumulator does (:meth:`ValuationResult.sum`)."""
    manifest = dict(parts[0].manifest)
    manifest.pop("elapsed_seconds", None)
    manifest["worker_peak_rss_bytes"] = max(int(p.manifest.get("worker_peak_rss_bytes", 0)) for p in parts)
    count = sum(p.count for p in parts)
    return ValuationResult.sum(parts, sources=[{"seed": config.seed, "start": config.start, "count": count}],
                               manifest=manifest)

def resolved_config(problem: KernelProblem, config: ValuationConfig) -> ValuationConfig:
    """The configuration with the ridge as a number (resolved once, by the driver)."""
    ridge = make_utility(problem, dataclasses.replace(config, device="cpu")).ridge
    return dataclasses.replace(config, ridge=repr(float(ridge)))

def compute_values_ray(problem: KernelProblem, config: ValuationConfig | None = None, *,
                       address: str | None = None, workers: int | None = None, threads: int | None = None,
                       checkpoint_dir: str | Path | None = None, resume: bool = True, max_retries: int = 3,
                       progress: bool | None = None) -> ValuationResult:
    """``compute_values`` with the permutation groups spread over Ray workers (local or a cluster)."""
    try:
        import ray
    except ImportError:
        raise InputError("the Ray executor needs Ray: pip install 'freeshap-dq[ray]'") from None
    config = plan(problem, config or ValuationConfig())
    if not samples_permutations(config):
        return compute_values(problem, config, progress=progress)  # exact / loo: nothing to spread
    if config.max_seconds or config.stderr_target:
        raise InputError("the Ray executor runs a fixed number of permutations (--permutations); --max-seconds and "
                         "--stderr-target stop a local run adaptively: drop them or use --executor local.")
    threads = threads or torch.get_num_threads()
    config = resolved_config(problem, config)
    groups = permutation_groups(config.start, config.permutations, config.reduce_every)
    store = _GroupStore(checkpoint_dir, problem, config) if checkpoint_dir else None
    done: dict[int, ValuationResult] = store.load(resume) if store else {}

    if not ray.is_initialized():
        ray.init(address=address, num_cpus=None if address else workers, include_dashboard=False,
                 log_to_driver=False, ignore_reinit_error=True, configure_logging=False)
    todo = [(first, count) for first, count in groups if first not in done]
    n_workers, resources = actor_plan(ray.available_resources(), config.device, workers, len(todo))
    runner = ray.remote(**resources, max_restarts=max_retries, max_task_retries=max_retries)(GroupRunner)
    # a kernel folder travels as its path (workers memory-map it; it must be on a shared file system on a
    # cluster), an in-memory problem through the object store, once
    problem_ref = (str(Path(problem.source).resolve()), problem.fingerprint()) if problem.on_disk else ray.put(problem)
    actors = [runner.remote(problem_ref, config, threads) for _ in range(n_workers)] if todo else []
    pending: dict[Any, tuple[int, Any]] = {}
    bar = tqdm(total=config.permutations, initial=sum(done[f].count for f in done), unit="perm", file=sys.stderr,
               disable=(not sys.stderr.isatty()) if progress is None else not progress,
               desc=f"{method_name(config)} on Ray ({n_workers} workers, {len(groups)} groups)")
    try:
        queue = list(todo)
        for actor in actors:  # two groups in flight per worker: one running, one waiting
            for _ in range(2):
                if queue:
                    first, count = queue.pop(0)
                    pending[actor.run.remote(first, count)] = (first, actor)
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            first, actor = pending.pop(ready[0])
            done[first] = ray.get(ready[0])
            if store:
                store.save(first, done[first])
            bar.update(done[first].count)
            if queue:
                nxt, count = queue.pop(0)
                pending[actor.run.remote(nxt, count)] = (nxt, actor)
    finally:
        bar.close()
        for actor in actors:
            ray.kill(actor)
    result = merge_groups([done[first] for first, _ in groups], config)
    result.manifest.update({"executor": "ray", "groups": len(groups), "worker_threads": threads,
                            "workers": n_workers, "worker_resources": resources})
    return result

def actor_plan(available: dict[str, float], device: str, workers: int | None, groups: int
               ) -> tuple[int, dict[str, float]]:
    """(number of actors, resources of each): one actor per GPU when the cluster has GPUs and the device is not
    forced to the CPU (Ray sets each actor's CUDA_VISIBLE_DEVICES, so ``auto`` finds its GPU), else one per CPU."""
    gpus = int(available.get("GPU", 0)) if device != "cpu" else 0
    if gpus:
        return max(1, min(groups, workers or gpus)), {"num_cpus": 1, "num_gpus": 1}
    return max(1, min(groups, workers or int(available.get("CPU", 1)))), {"num_cpus": 1}


class _GroupStore:
    """Finished groups on disk (``groups/group-<first>.npz``), checked against the run's settings."""

    def __init__(self, checkpoint_dir: str | Path, problem: KernelProblem, config: ValuationConfig):
        self.folder = Path(checkpoint_dir) / "groups"
        self.folder.mkdir(parents=True, exist_ok=True)
        self.fingerprint = problem.fingerprint()
        self.settings = {k: getattr(config, k) for k in RESUME_KEYS if k != "start"}  # each group has its own
        self.groups = dict(permutation_groups(config.start, config.permutations, config.reduce_every))

    def load(self, resume: bool) -> dict[int, ValuationResult]:
        out = {}
        for path in sorted(self.folder.glob("group-*.npz")):
            if not resume:
                path.unlink()
                continue
            part = ValuationResult.load(path)
            saved = part.manifest.get("config", {})
            first = int(part.sources[0]["start"])
            if part.manifest.get("kernel_fingerprint") != self.fingerprint or self.groups.get(first) != part.count or any(
                    saved.get(k) != v for k, v in self.settings.items()):
                raise CheckpointError(f"{path} belongs to another run (kernel, seed or settings differ); use another "
                                      f"--checkpoint-dir or --no-resume.")
            out[first] = part
        return out

    def save(self, first: int, part: ValuationResult) -> None:
        part.save(self.folder / f"group-{first:09d}.npz")

