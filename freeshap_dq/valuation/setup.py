"""Set-up of a valuation: every refusal checked before any kernel is touched, then the utility and engine.

:func:`plan` resolves the configuration for the problem (a landmark kernel is valued by its Nystrom
features at its own rank) and refuses combinations that cannot run — from the problem's declared members
(:class:`freeshap_dq.contracts.ValuationProblem`) and the configuration alone, so nothing n x n has been
read or built when it says no. :func:`make_utility` and :func:`make_engine` then build what the plan says.
"""

from __future__ import annotations

import dataclasses
import platform
from typing import Any

import numpy as np
import torch

from freeshap_dq import __version__
from freeshap_dq.config import METRICS, ValuationConfig
from freeshap_dq.contracts import Engine, Utility, ValuationProblem
from freeshap_dq.errors import InputError
from freeshap_dq.io import available_memory
from freeshap_dq.valuation.methods import PERMUTATION_METHODS, samples_permutations
from freeshap_dq.valuation.semivalues import check_enumerable

IN_MEMORY_COPIES = 4  # the kernel, its scaled copy, a factorisation and the engine's permuted copy


def plan(problem: ValuationProblem, config: ValuationConfig) -> ValuationConfig:
    """The configuration this problem is valued with, after every refusal (see the module docstring)."""
    config = fit_config(problem, config)
    config.validate()
    if config.method == "exact":
        check_enumerable(problem.n_train)
    if config.low_rank and problem.per_class:
        raise InputError("--low-rank approximates one kernel; these are per-class kernels (C x n x n). Use a single "
                         "kernel (eNTK --kernel class0 or sum) or the exact engine.")
    if problem.on_disk and not uses_feature_space(problem, config):
        check_room_for(problem, config)
    return config


def fit_config(problem: ValuationProblem, config: ValuationConfig) -> ValuationConfig:
    """A landmark kernel is valued by its Nystrom features: the configuration says so (rank r, nystrom), and
    methods that need the whole kernel are refused."""
    rank = problem.landmark_rank
    if rank is None:
        return config
    if not samples_permutations(config):
        raise InputError(f"{problem.source} holds only {rank} landmark columns of the kernel; method "
                         f"{config.method!r} needs the whole kernel. Use {', '.join(PERMUTATION_METHODS[:-1])} or "
                         f"{PERMUTATION_METHODS[-1]} (permutations on the Nystrom kernel), or compute a full kernel.")
    if config.low_rank not in (0, rank) or config.low_rank_method != "nystrom":
        raise InputError(f"{problem.source} holds {rank} landmark columns: it is valued with the Nystrom "
                         f"kernel of exactly those (--low-rank {rank} --low-rank-method nystrom, or leave "
                         f"both out), not --low-rank {config.low_rank} {config.low_rank_method}.")
    return dataclasses.replace(config, low_rank=rank, low_rank_method="nystrom")


def uses_feature_space(problem: ValuationProblem, config: ValuationConfig) -> bool:
    """True when the utility is set up from Nystrom features only, never holding an n x n matrix: a landmark
    kernel, or a kernel folder valued by permutations with ``--low-rank r`` (nystrom)."""
    if problem.landmark_rank is not None:
        return True
    return bool(problem.on_disk and config.low_rank and config.low_rank_method == "nystrom"
                and samples_permutations(config))


def check_room_for(problem: ValuationProblem, config: ValuationConfig) -> None:
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


def make_utility(problem: ValuationProblem, config: ValuationConfig, device: torch.device | None = None) -> Utility:
    """The kernel-regression utility of a planned configuration: in feature space (never an n x n matrix) when
    :func:`uses_feature_space`, else over the whole kernel."""
    if uses_feature_space(problem, config):
        from freeshap_dq.valuation.feature_utility import FeatureSpaceUtility

        return FeatureSpaceUtility(problem, config, device)
    from freeshap_dq.valuation.utility import KernelRegressionUtility

    return KernelRegressionUtility(problem, config, device)


def make_engine(problem: ValuationProblem, config: ValuationConfig, utility: Utility) -> Engine:
    """The exact prefix engine, or with ``low_rank`` the rank-r one on the utility's own features (feature space)
    or on features computed here from the whole kernel."""
    from freeshap_dq.valuation.prefix_engine import PrefixEngine

    if not config.low_rank:
        return PrefixEngine(utility, tolerance=config.tolerance, per_point=config.per_point,
                            block_size=config.block_size)
    from freeshap_dq.kernels.nystrom import low_rank_features
    from freeshap_dq.valuation.lowrank_engine import LowRankPrefixEngine

    features = utility.features or low_rank_features(
        utility.k_train, utility.k_test, min(config.low_rank, problem.n_train), config.low_rank_method, config.seed)
    return LowRankPrefixEngine(utility, features, tolerance=config.tolerance, per_point=config.per_point,
                               block_size=config.block_size)


FULL_POINTS_LIMIT = 100_000  # test examples whose full-data accuracy and -CE the manifest records (for explain)


def run_manifest(problem: ValuationProblem, config: ValuationConfig, utility: Utility) -> dict[str, Any]:
    """What a result records about how it was made (configuration, kernel, ridge, utilities, versions)."""
    choice = utility.ridge_choice
    return {
        "config": config.to_dict(),
        "kernel_fingerprint": problem.fingerprint(),
        "kernel_source": problem.source,
        "n_train": problem.n_train, "n_test": problem.n_test, "n_classes": problem.n_classes,
        "label_names": list(problem.label_names),
        "ridge": choice.value, "ridge_mode": choice.mode,
        "ridge_grid": [{"ridge": lam, "loo_squared_error": err} for lam, err in choice.grid],
        "utility_full": dict(zip(METRICS, utility.full, strict=True)),
        "full_data_test_points": {metric: point.detach().cpu().double().tolist()
                                  for metric, point in zip(METRICS, utility.full_point, strict=True)}
        if problem.n_test <= FULL_POINTS_LIMIT else None,
        "utility_empty": dict(zip(METRICS, utility.empty, strict=True)),
        "device": str(utility.device),
        "versions": {"freeshap_dq": __version__, "torch": torch.__version__, "numpy": np.__version__,
                     "python": platform.python_version()},
    }


def auto_batch_size(n: int, m: int, device: torch.device, kernels: int = 1) -> int:
    """Permutations factorised together: 1 on the CPU; on a GPU as many as a quarter of its free memory holds."""
    if device.type != "cuda":
        return 1
    free, _ = torch.cuda.mem_get_info(device)
    per_perm = 8 * (3 * n * n + 4 * n * m) * kernels
    return int(max(1, min(64, (free // 4) // per_perm)))
