"""Scaling: the exact engine vs the low-rank engine vs Ray, on synthetic kernels of growing n.

For each n (m test points, RBF kernel on clustered Gaussian features, 2 classes):
  - set-up (utility: ridge, U(N), PSD check; low-rank features) timed apart from the engine;
  - exact engine: seconds per permutation (no truncation, the worst case), the baseline;
  - low-rank engine (Nystrom, rank r): seconds per permutation, speed-up over exact, and how far its
    values are from the exact ones on the *same* permutations (so the difference is the kernel
    approximation, not Monte-Carlo noise): max |error| / range of the exact values, Spearman rho;
  - Ray (local, --workers processes): wall time for T permutations vs one process, bit-identical check.

Usage:  python benchmarks/bench_scaling.py [--sizes 1000,2000,5000,10000] [--m 500] [--ranks 128,512]
        [--perms 2] [--batch-perms 16] [--ray-sizes 2000,5000] [--ray-perms 8] [--workers 2]
Prints Markdown tables; docs/scaling.md records a run with the machine it ran on.
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from freeshap_dq import KernelProblem, ValuationConfig, compute_values  # noqa: E402
from freeshap_dq.data.synthetic import rbf_kernel  # noqa: E402
from freeshap_dq.kernels.nystrom import low_rank_features
from freeshap_dq.valuation.lowrank_engine import LowRankPrefixEngine  # noqa: E402
from freeshap_dq.valuation.prefix_engine import PrefixEngine  # noqa: E402
from freeshap_dq.valuation.run import permutation  # noqa: E402
from freeshap_dq.valuation.utility import KernelRegressionUtility  # noqa: E402


def make_problem(n: int, m: int, seed: int = 0) -> KernelProblem:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n + m)
    x = rng.normal(size=(n + m, 32)) + 0.8 * np.eye(2, 32)[y]
    k = rbf_kernel(x[:n + m], x[:n], bandwidth=6.0)
    return KernelProblem(k[:n], k[n:], y[:n], y[n:])


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1])


def timed(problem: KernelProblem, config: ValuationConfig):
    started = time.perf_counter()
    result = compute_values(problem, config, progress=False)
    return result, time.perf_counter() - started


def engine_values(engine, perms: torch.Tensor, n: int) -> tuple[np.ndarray, float]:
    """(-CE values from these permutations, seconds per permutation of engine.run alone)."""
    values = np.zeros(n)
    started = time.perf_counter()
    for lo in range(0, len(perms), engine_batch(engine)):
        batch = perms[lo:lo + engine_batch(engine)]
        marginals = engine.run(batch)
        for b in range(len(batch)):
            values[batch[b].numpy()] += marginals.ce[b].numpy()
    return values / len(perms), (time.perf_counter() - started) / len(perms)


def engine_batch(engine) -> int:
    return 16 if isinstance(engine, LowRankPrefixEngine) else 1


def engine_rows(sizes, m, ranks, perms, batch_perms, skip_exact=False):
    print("| n | engine | set-up s | s / permutation | speed-up vs exact | max error / range | Spearman vs exact |")
    print("|---|---|---|---|---|---|---|")
    for n in sizes:
        problem = make_problem(n, m)
        config = ValuationConfig(ridge="rel:1", tolerance=0.0)
        started = time.perf_counter()
        utility = KernelRegressionUtility(problem, config)
        setup = time.perf_counter() - started
        order = torch.as_tensor(np.stack([permutation(0, i, n) for i in range(max(perms, batch_perms))]))
        per_exact, reference = None, None
        if not skip_exact:
            reference, per_exact = engine_values(PrefixEngine(utility), order[:perms], n)
            print(f"| {n} | exact | {setup:.1f} | {per_exact:.2f} | 1.0x | 0 | 1 |", flush=True)
        for r in ranks:
            if r >= n:
                continue
            started = time.perf_counter()
            features = low_rank_features(utility.k_train, utility.k_test, r, "nystrom", 0)
            engine = LowRankPrefixEngine(utility, features)
            lr_setup = time.perf_counter() - started
            _, per_low = engine_values(engine, order[:batch_perms], n)
            if reference is None:
                print(f"| {n} | low-rank r={r} | +{lr_setup:.1f} | {per_low:.3f} | - | - | - |", flush=True)
                continue
            values, _ = engine_values(engine, order[:perms], n)
            error = np.abs(values - reference).max() / np.ptp(reference)
            print(f"| {n} | low-rank r={r} | +{lr_setup:.1f} | {per_low:.3f} | {per_exact / per_low:.1f}x | "
                  f"{error:.3f} | {spearman(values, reference):.3f} |", flush=True)
        del utility


def ray_rows(sizes, m, perms, workers):
    try:
        import ray
    except ImportError:
        print("\n(Ray not installed: pip install 'freeshap-dq[ray]')")
        return
    from freeshap_dq.valuation.ray import compute_values_ray

    ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False, configure_logging=False)
    all_threads = torch.get_num_threads()
    threads = max(1, all_threads // workers)
    print(f"\n| n | T | one process, {all_threads} threads | one process, {threads} thread | Ray, {workers} workers x "
          f"{threads} thread | Ray speed-up (vs {all_threads} threads) | Ray speed-up (vs {threads} thread) | "
          f"bit-identical to {threads}-thread run | peak RSS per worker |")
    print("|---|---|---|---|---|---|---|---|---|")
    for n in sizes:
        problem = make_problem(n, m)
        config = ValuationConfig(permutations=perms, ridge="rel:1", tolerance=0.0, reduce_every=max(1, perms // 8))
        torch.set_num_threads(all_threads)
        _, t_all = timed(problem, config)
        torch.set_num_threads(threads)
        local, t_local = timed(problem, config)
        torch.set_num_threads(all_threads)
        started = time.perf_counter()
        remote = compute_values_ray(problem, config, threads=threads)
        t_ray = time.perf_counter() - started
        same = all(np.array_equal(local.sums[k], remote.sums[k]) for k in local.sums)
        worker_gib = remote.manifest.get("worker_peak_rss_bytes", 0) / 2**30
        print(f"| {n} | {perms} | {t_all:.1f} s | {t_local:.1f} s | {t_ray:.1f} s | {t_all / t_ray:.2f}x | "
              f"{t_local / t_ray:.2f}x | {same} | {worker_gib:.2f} GiB |", flush=True)
    ray.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="1000,2000,5000")
    parser.add_argument("--m", type=int, default=500)
    parser.add_argument("--ranks", default="128,512")
    parser.add_argument("--perms", type=int, default=2, help="Permutations timed on the exact engine.")
    parser.add_argument("--batch-perms", type=int, default=16, help="Permutations timed on the low-rank engine.")
    parser.add_argument("--ray-sizes", default="2000,5000")
    parser.add_argument("--ray-perms", type=int, default=8)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--skip-exact", action="store_true", help="Time only the low-rank engine (very large n).")
    args = parser.parse_args()
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch "
          f"{torch.__version__}, {torch.get_num_threads()} threads\n")
    if args.sizes:
        engine_rows([int(s) for s in args.sizes.split(",")], args.m, [int(r) for r in args.ranks.split(",")],
                    args.perms, args.batch_perms, args.skip_exact)
    if args.ray_sizes:
        ray_rows([int(s) for s in args.ray_sizes.split(",")], args.m, args.ray_perms, args.workers)
    print(f"\npeak RSS of this process: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB")


if __name__ == "__main__":
    main()
