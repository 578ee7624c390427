"""Run a valuation: the one entry point that ties kernel, utility, engine, stopping and results.

``compute_values(problem, config)`` dispatches on ``config.method``:

- ``tmc`` / ``beta`` / ``banzhaf``: permutation sampling with the prefix engine. Permutation i is drawn from
  ``(seed, i)``, so a run is reproducible, splits into mergeable parts (``start``) and resumes
  from a checkpoint with bit-identical values. Sums are accumulated in groups of ``reduce_every``
  permutations aligned to the permutation index: each group is summed from zero in permutation
  order, then added to the totals in group order — the same arithmetic whether one process runs
  every group or workers run them (``freeshap_dq.valuation.ray``).
- ``exact``: enumeration of all subsets (n <= 16).
- ``loo``: closed-form leave-one-out, one factorisation.
"""

from __future__ import annotations

import contextlib
import dataclasses
import platform
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from freeshap_dq import __version__
from freeshap_dq.config import METRICS, ValuationConfig
from freeshap_dq.valuation.prefix_engine import PermutationMarginals, PrefixEngine
from freeshap_dq.errors import CheckpointError, InputError
from freeshap_dq.io import available_memory
from freeshap_dq.kernels.problem import KernelProblem
from freeshap_dq.valuation.utility import DTYPE, KernelRegressionUtility
from freeshap_dq.result import ValuationResult
from freeshap_dq.valuation.semivalues import (
    banzhaf_probabilities, beta_probabilities, exact_semivalues, position_weights, shapley_probabilities,
)
from freeshap_dq.valuation.stopping import MaxPermutations, MaxTime, StandardErrorBelow, StoppingCriterion

CHECKPOINT_NAME = "checkpoint.npz"
# Fields that change the values: a checkpoint is only resumed when they all match.
RESUME_KEYS = ("reduce_every", "low_rank", "low_rank_method", "method", "tolerance", "ridge", "kernel_scale", "jitter", "empty_utility", "per_point",
               "seed", "start", "beta_alpha", "beta_beta", "block_size")


def permutation(seed: int, index: int, n: int) -> np.ndarray:
    return np.random.default_rng([seed, index]).permutation(n)


def method_name(config: ValuationConfig) -> str:
    if config.method == "beta":
        return f"beta({config.beta_alpha:g},{config.beta_beta:g})-shapley"
    return {"tmc": "tmc-shapley", "exact": "exact-shapley", "loo": "leave-one-out",
            "banzhaf": "banzhaf"}[config.method]


def coalition_size_probabilities(config: ValuationConfig, n: int) -> np.ndarray | None:
    """The semivalue's p(s) for importance-weighting permutation marginals; None for plain Shapley."""
    if config.method == "beta":
        return beta_probabilities(n, config.beta_alpha, config.beta_beta)
    if config.method == "banzhaf":
        return banzhaf_probabilities(n)
    return None


def compute_values(problem: KernelProblem, config: ValuationConfig | None = None, *,
                   stopping: StoppingCriterion | None = None, checkpoint_dir: str | Path | None = None,
                   resume: bool = True, progress: bool | None = None,
                   point_dir: str | Path | None = None) -> ValuationResult:
    """Values of every training example; see the module docstring.

    ``point_dir``: with ``per_point``, the n x m per-point sums are accumulated on disk there (memory-mapped,
    :mod:`freeshap_dq.valuation.point_store`) instead of in memory, and the result's per-point matrices are memory maps.
    """
    config = fit_config(problem, config or ValuationConfig())
    config.validate()
    started = time.monotonic()
    utility = make_utility(problem, config)
    manifest = _manifest(problem, config, utility)
    if config.method == "exact":
        probs = shapley_probabilities(problem.n_train)
        values, points = exact_semivalues(utility, probs, config.per_point)
        result = ValuationResult.from_exact(method_name(config), values, points, manifest=manifest,
                                            train_ids=problem.train_ids)
    elif config.method == "loo":
        acc, ce = (v.cpu().numpy() for v in utility.leave_one_out_point_values())
        result = ValuationResult.from_exact(
            method_name(config), {"accuracy": acc.mean(1), "ce": ce.mean(1)},
            {"accuracy": acc, "ce": ce} if config.per_point else None, manifest=manifest, train_ids=problem.train_ids)
    else:
        result = _sample_permutations(problem, config, utility, manifest, stopping, checkpoint_dir, resume, progress,
                                      point_dir=point_dir if config.per_point else None)
    result.manifest["elapsed_seconds"] = round(time.monotonic() - started, 3)
    return result


def fit_config(problem, config: ValuationConfig) -> ValuationConfig:
    """A landmark kernel is valued by its Nystrom features: the configuration says so (rank r, nystrom), and
    methods that need the whole kernel are refused."""
    from freeshap_dq.kernels.landmarks import LandmarkKernel

    if not isinstance(problem, LandmarkKernel):
        return config
    if config.method not in ("tmc", "beta", "banzhaf"):
        raise InputError(f"{problem.source} holds only {problem.rank} landmark columns of the kernel; method "
                         f"{config.method!r} needs the whole kernel. Use tmc, beta or banzhaf (permutations on the "
                         f"Nystrom kernel), or compute a full kernel.")
    if config.low_rank not in (0, problem.rank) or config.low_rank_method != "nystrom":
        raise InputError(f"{problem.source} holds {problem.rank} landmark columns: it is valued with the Nystrom "
                         f"kernel of exactly those (--low-rank {problem.rank} --low-rank-method nystrom, or leave "
                         f"both out), not --low-rank {config.low_rank} {config.low_rank_method}.")
    return dataclasses.replace(config, low_rank=problem.rank, low_rank_method="nystrom")


def make_utility(problem: KernelProblem, config: ValuationConfig, device: torch.device | None = None):
    """The kernel-regression utility; for a kernel folder valued with a Nystrom low-rank kernel, or a landmark
    kernel, its feature-space set-up, which never holds an n x n matrix (:mod:`freeshap_dq.valuation.feature_utility`)."""
    from freeshap_dq.kernels.landmarks import LandmarkKernel

    if isinstance(problem, LandmarkKernel):
        from freeshap_dq.valuation.feature_utility import FeatureSpaceUtility

        return FeatureSpaceUtility(problem, fit_config(problem, config), device)
    if problem.on_disk and config.low_rank and config.low_rank_method == "nystrom" and config.method not in ("exact", "loo"):
        from freeshap_dq.valuation.feature_utility import FeatureSpaceUtility

        return FeatureSpaceUtility(problem, config, device)
    if problem.on_disk:
        _check_room_for(problem, config)
    return KernelRegressionUtility(problem, config, device)


IN_MEMORY_COPIES = 4  # the kernel, its scaled copy, a factorisation and the engine's permuted copy


def _check_room_for(problem: KernelProblem, config: ValuationConfig) -> None:
    """Refuse, with what to do instead, to load a kernel folder that cannot fit in this machine's memory."""
    need = IN_MEMORY_COPIES * 8 * problem.n_train * (problem.n_train + problem.n_test)
    free = available_memory()
    if free is None:  # pragma: no cover - no way to tell
        return
    if need > free:
        raise InputError(
            f"{problem.source}: valuing this kernel (n = {problem.n_train:,}) with "
            f"{'the exact engine' if not config.low_rank else 'the ' + config.low_rank_method + ' low-rank set-up'} "
            f"needs about {need / 2**30:.1f} GiB in memory and {free / 2**30:.1f} GiB are available. Use --low-rank r with "
            f"--low-rank-method nystrom (it reads only r landmark rows of the folder), or a machine with more memory.")


def default_stopping(config: ValuationConfig) -> StoppingCriterion:
    criterion: StoppingCriterion = MaxPermutations(config.permutations)
    if config.max_seconds > 0:
        criterion = criterion | MaxTime(config.max_seconds)
    if config.stderr_target > 0:
        criterion = criterion | StandardErrorBelow(config.stderr_target, config.rank_metric)
    return criterion


def _sample_permutations(problem, config, utility, manifest, stopping, checkpoint_dir, resume, progress, engine=None,
                         point_dir=None):
    n = problem.n_train
    checkpoint = Path(checkpoint_dir) / CHECKPOINT_NAME if checkpoint_dir else None
    if checkpoint is not None:
        Path(checkpoint_dir).mkdir(parents=True, exist_ok=True)
        for stale in Path(checkpoint_dir).glob(f".{CHECKPOINT_NAME}.*.tmp"):  # left by a killed write
            stale.unlink(missing_ok=True)
    saved = _load_checkpoint(checkpoint, manifest) if (checkpoint is not None and resume) else None
    result, partial = saved if saved is not None else (None, None)
    if result is None:
        result = ValuationResult.empty(method_name(config), n, problem.n_test, config.per_point,
                                       sources=[{"seed": config.seed, "start": config.start, "count": 0}],
                                       manifest=manifest, train_ids=problem.train_ids)
    result.manifest.update(manifest)
    points = _point_store(point_dir, result, saved is not None, checkpoint, problem)
    if points is not None:
        partial = None  # the open group is recomputed: its per-point sums were never saved
    acc = _Accumulator(result, utility.device, config.start, config.reduce_every, partial, points)
    probs = coalition_size_probabilities(config, n)
    weights = None if probs is None else torch.as_tensor(position_weights(probs), dtype=DTYPE, device=utility.device)
    engine = engine or _engine(problem, config, utility, result.manifest)
    criterion = stopping or default_stopping(config)
    criterion.reset()
    cap = config.permutations if stopping is None else None
    batch = config.batch_size or (16 if config.low_rank else _auto_batch_size(
        n, problem.n_test, utility.device, problem.k_train.shape[0] if problem.per_class else 1))
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
            perms = torch.as_tensor(np.stack([permutation(config.seed, first + b, n) for b in range(size)]))
            sink = None if points is None else _point_sink(points, perms.numpy(), weights)
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
        raise
    finally:
        bar.close()
    if checkpoint is not None and acc.count != last_saved:
        acc.save_checkpoint(checkpoint)
    return acc.snapshot()


def _point_store(point_dir, result: ValuationResult, resumed: bool, checkpoint, problem: KernelProblem):
    """The on-disk per-point store (None without ``point_dir``); a checkpoint of the other kind is refused."""
    from freeshap_dq.valuation.point_store import PointStore

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


def _point_sink(points, perms: np.ndarray, weights: torch.Tensor | None):
    def sink(start: int, acc: torch.Tensor, ce: torch.Tensor) -> None:
        width = acc.shape[1]
        scale = None if weights is None else weights[start:start + width].unsqueeze(-1)
        for b in range(perms.shape[0]):
            rows = perms[b, start:start + width]
            for metric, marginals in (("accuracy", acc), ("ce", ce)):
                x = marginals[b] if scale is None else marginals[b] * scale
                points.add(metric, rows, x.cpu().numpy())

    return sink


def sample_group(problem: KernelProblem, config: ValuationConfig, utility: KernelRegressionUtility,
                 manifest: dict[str, Any], engine: PrefixEngine) -> ValuationResult:
    """Permutations ``config.start`` .. + ``config.permutations`` with a utility and engine built once (workers)."""
    manifest = {**manifest, "config": config.to_dict()}
    return _sample_permutations(problem, config, utility, manifest, None, None, False, False, engine)


def make_engine(problem: KernelProblem, config: ValuationConfig, utility: KernelRegressionUtility
                ) -> tuple[PrefixEngine, dict[str, Any]]:
    """The engine for ``config`` and the run's manifest (built once per worker)."""
    manifest = _manifest(problem, config, utility)
    return _engine(problem, config, utility, manifest), manifest


def _engine(problem: KernelProblem, config: ValuationConfig, utility: KernelRegressionUtility,
            manifest: dict[str, Any]) -> PrefixEngine:
    if not config.low_rank:
        return PrefixEngine(utility, tolerance=config.tolerance, per_point=config.per_point,
                            block_size=config.block_size)
    from freeshap_dq.kernels.nystrom import low_rank_features
    from freeshap_dq.valuation.lowrank_engine import LowRankPrefixEngine

    if problem.per_class:
        raise InputError("--low-rank approximates one kernel; these are per-class kernels (C x n x n). Use a single "
                         "kernel (eNTK --kernel class0 or sum) or the exact engine.")
    rank = min(config.low_rank, problem.n_train)
    features = getattr(utility, "features", None) or low_rank_features(
        utility.k_train, utility.k_test, rank, config.low_rank_method, config.seed)
    engine = LowRankPrefixEngine(utility, features, tolerance=config.tolerance, per_point=config.per_point,
                                 block_size=config.block_size)
    manifest["low_rank"] = {"rank": int(features.phi.shape[1]), "method": features.method,
                            "trace_captured": features.captured,
                            "utility_full": dict(zip(METRICS, engine._full.tolist()))}
    return engine


@contextlib.contextmanager
def deferred_interrupts():
    """Hold SIGINT/SIGTERM until the block ends, then raise KeyboardInterrupt (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    for sig, handler in previous.items():
        if handler not in (signal.SIG_IGN, None):
            signal.signal(sig, lambda signum, frame: received.append(signum))
    try:
        yield
    finally:
        for sig, handler in previous.items():
            if handler not in (signal.SIG_IGN, None):
                signal.signal(sig, handler)
    if received:
        raise KeyboardInterrupt


class _Accumulator:
    """Running sums on the compute device: ``completed`` groups plus the ``partial`` sum of the open group,
    each permutation added to ``partial`` in order; a full group is folded into ``completed``."""

    def __init__(self, result: ValuationResult, device: torch.device, start: int, group: int,
                 partial: dict[str, dict[str, np.ndarray]] | None = None, points=None):
        self.template = result
        self.points = points  # a PointStore: per-point sums are streamed to disk by the engine, not added here
        self.on_fold = lambda: None
        self.torn = False  # True while a permutation is half added: such a state is never saved
        self.count = result.count
        self.start, self.group = start, group
        self.evaluated = list(result.evaluated.tolist())
        t = lambda d: None if d is None else {k: torch.as_tensor(v, dtype=DTYPE).to(device).clone() for k, v in d.items()}  # noqa: E731
        self.completed = {"sums": t(result.sums), "sq_sums": t(result.sq_sums),
                          "point_sums": None if points is not None else t(result.point_sums)}
        zeros = lambda d: None if d is None else {k: torch.zeros_like(v) for k, v in d.items()}  # noqa: E731
        self.partial = {key: zeros(value) for key, value in self.completed.items()}
        self.partial_count = 0
        if partial:
            self.partial = {key: t(partial.get(key)) if self.completed[key] is not None else None
                            for key in self.completed}
            self.partial_count = int(partial["count"])
            self.count += self.partial_count
            self.evaluated += [int(e) for e in partial["evaluated"]]

    def add(self, perms: torch.Tensor, marginals: PermutationMarginals, weights: torch.Tensor | None) -> None:
        per_metric = {"accuracy": (marginals.accuracy, marginals.point_accuracy),
                      "ce": (marginals.ce, marginals.point_ce)}
        sums, sq_sums, point_sums = (self.partial[k] for k in ("sums", "sq_sums", "point_sums"))
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

    def _result(self, parts: list[dict], count: int, evaluated: list[int], with_points: bool) -> ValuationResult:
        r = self.template
        total = lambda key: None if parts[0][key] is None else {  # noqa: E731
            m: sum((p[key][m] for p in parts[1:]), parts[0][key][m]).cpu().numpy().copy() for m in parts[0][key]}
        sources = [dict(s) for s in r.sources]
        sources[-1]["count"] = count
        if self.points is not None:
            point_sums = self.points.totals(count) if with_points else None
        else:
            point_sums = total("point_sums") if with_points else None
        return ValuationResult(r.method, total("sums"), total("sq_sums"), count, point_sums,
                               np.asarray(evaluated, dtype=np.int64), sources, False, dict(r.manifest), r.train_ids)

    def snapshot(self, with_points: bool = True) -> ValuationResult:
        parts = [self.completed, self.partial] if self.partial_count else [self.completed]
        return self._result(parts, self.count, self.evaluated, with_points)

    def save_checkpoint(self, path: Path) -> None:
        """The completed groups as a result, plus the open group's sums beside them (``partial_*``); with
        per-point sums on disk, the completed groups only (their files are named in the manifest)."""
        done = self.count - self.partial_count
        if self.points is not None:
            result = self._result([self.completed], done, self.evaluated[:done], False)
            result.manifest["point_store"] = {"count": done, "directory": str(self.points.dir)}
            result.save(path)
            return
        extra = {"partial_count": np.array(self.partial_count),
                 "partial_evaluated": np.asarray(self.evaluated[done:], dtype=np.int64)}
        for key, prefix in (("sums", "sum"), ("sq_sums", "sqsum"), ("point_sums", "point_sum")):
            if self.partial[key] is not None:
                extra.update({f"partial_{prefix}_{m}": v.cpu().numpy() for m, v in self.partial[key].items()})
        self._result([self.completed], done, self.evaluated[:done], True).save(path, extra=extra)


def load_partial(path: Path) -> dict[str, Any] | None:
    """The open group saved beside a checkpoint's completed groups (None when there is none)."""
    with np.load(path, allow_pickle=False) as data:
        if "partial_count" not in data.files or int(data["partial_count"]) == 0:
            return None
        out: dict[str, Any] = {"count": int(data["partial_count"]), "evaluated": data["partial_evaluated"]}
        for key, prefix in (("sums", "sum"), ("sq_sums", "sqsum"), ("point_sums", "point_sum")):
            if f"partial_{prefix}_accuracy" in data.files:
                out[key] = {m: data[f"partial_{prefix}_{m}"] for m in METRICS}
        return out


def _auto_batch_size(n: int, m: int, device: torch.device, kernels: int = 1) -> int:
    if device.type != "cuda":
        return 1
    free, _ = torch.cuda.mem_get_info(device)
    per_perm = 8 * (3 * n * n + 4 * n * m) * kernels
    return int(max(1, min(64, (free // 4) // per_perm)))


def _manifest(problem: KernelProblem, config: ValuationConfig, utility: KernelRegressionUtility) -> dict[str, Any]:
    choice = utility.ridge_choice
    return {
        "config": config.to_dict(),
        "kernel_fingerprint": problem.fingerprint(),
        "kernel_source": problem.source,
        "n_train": problem.n_train, "n_test": problem.n_test, "n_classes": problem.n_classes,
        "label_names": list(problem.label_names),
        "ridge": choice.value, "ridge_mode": choice.mode,
        "ridge_grid": [{"ridge": lam, "loo_squared_error": err} for lam, err in choice.grid],
        "utility_full": dict(zip(METRICS, utility.full)), "utility_empty": dict(zip(METRICS, utility.empty)),
        "device": str(utility.device),
        "versions": {"freeshap_dq": __version__, "torch": torch.__version__, "numpy": np.__version__,
                     "python": platform.python_version()},
    }


def _load_checkpoint(path: Path, manifest: dict[str, Any]) -> tuple[ValuationResult, dict | None] | None:
    if not path.exists():
        return None
    saved = ValuationResult.load(path)
    if saved.manifest.get("kernel_fingerprint") != manifest["kernel_fingerprint"]:
        raise CheckpointError(f"{path}: the checkpoint was computed on a different kernel "
                              f"(fingerprint {saved.manifest.get('kernel_fingerprint')} vs "
                              f"{manifest['kernel_fingerprint']}). Use another --checkpoint-dir or --no-resume.")
    old, new = saved.manifest.get("config", {}), manifest["config"]
    diff = [k for k in RESUME_KEYS if old.get(k) != new.get(k)]
    if diff:
        details = ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in diff)
        raise CheckpointError(f"{path}: the checkpoint was made with different settings ({details}). Use the "
                              f"same settings to resume, another --checkpoint-dir, or --no-resume to start over.")
    return saved, load_partial(path)
