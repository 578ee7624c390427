"""Prefix engine vs two baselines on the same kernel and the same permutations.

Baselines (both float64, same device):
  (a) direct: re-solve every prefix from scratch (Cholesky of K_SS + lambda I, then solve);
  (b) reference-style: the reference implementation's algorithm - a growing explicit inverse
      updated by a block (Schur-complement) formula for each new point, recomputed per class as
      the reference does, with a fresh inverse every 500 points.
For large n the baselines are timed on a sample of prefixes and extrapolated (stated in the
output); values are compared on every prefix that was computed.

Usage:  python benchmarks/bench_engine.py [--sizes 1000,2000,5000] [--m 500] [--quick]
Prints a Markdown table; docs/benchmarks.md records a run with the machine it ran on.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from freeshap_dq import KernelProblem, ValuationConfig  # noqa: E402
from freeshap_dq.data.synthetic import rbf_kernel  # noqa: E402
from freeshap_dq.valuation.prefix_engine import PrefixEngine  # noqa: E402
from freeshap_dq.valuation.run import permutation  # noqa: E402
from freeshap_dq.valuation.utility import DTYPE, KernelRegressionUtility, point_utilities  # noqa: E402

REFRESH = 500


def make_utility(n: int, m: int, device: str, seed: int = 0) -> KernelRegressionUtility:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n + m)
    x = rng.normal(size=(n + m, 32)) + 0.8 * np.eye(2, 32)[y]
    k = rbf_kernel(x, x, bandwidth=4.0)
    problem = KernelProblem(k[:n, :n], k[n:, :n], y[:n], y[n:], source=f"<bench n={n}>")
    return KernelRegressionUtility(problem, ValuationConfig(ridge="rel:1", device=device))


def prefix_utilities_engine(u, perm):
    out = PrefixEngine(u).run(perm.unsqueeze(0))
    return torch.cumsum(out.ce[0], 0) + u.empty[1]


def direct_prefix(u, perm, p):
    s = perm[:p]
    chol = torch.linalg.cholesky(u.k_train[s][:, s] + u.ridge * torch.eye(p, dtype=DTYPE, device=u.device))
    scores = u.k_test[:, s] @ torch.cholesky_solve(u.targets[s], chol)
    return point_utilities(scores, u.y_test)[1].mean()


class ReferenceStyle:
    """The reference's per-prefix update: explicit inverse grown by one row/column per point."""

    def __init__(self, u):
        self.u = u
        self.inv = None

    def prefix(self, perm, p):
        u = self.u
        s = perm[:p]
        k_ss = u.k_train[s][:, s] + u.ridge * torch.eye(p, dtype=DTYPE, device=u.device)
        preds = []
        fresh = self.inv is None or self.inv.shape[0] != p - 1 or (p - 1) % REFRESH == 0
        for c in range(u.n_classes):
            y_c = u.targets[s, c]
            if fresh:
                inv = torch.inverse(k_ss)
            else:
                a_inv, b, d = self.inv, k_ss[:-1, -1:], k_ss[-1:, -1:]
                schur_inv = torch.inverse(d - b.T @ (a_inv @ b))
                a_inv_b = a_inv @ b
                inv = torch.cat([
                    torch.cat([a_inv + a_inv_b @ schur_inv @ a_inv_b.T, -a_inv_b @ schur_inv], dim=1),
                    torch.cat([-schur_inv @ a_inv_b.T, schur_inv], dim=1)], dim=0)
            preds.append(u.k_test[:, s] @ (inv @ y_c))
        self.inv = inv
        return point_utilities(torch.stack(preds, dim=1), u.y_test)[1].mean()


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def gemm_rate(device: str, size: int = 2000) -> float:
    a = torch.randn(size, size, dtype=DTYPE, device=device)
    a @ a
    sync(device)
    t = time.perf_counter()
    for _ in range(3):
        a @ a
    sync(device)
    return 3 * 2 * size**3 / (time.perf_counter() - t) / 1e9


def factor_solve_rate(u, perm) -> tuple[float, float]:
    """GFLOP/s of the engine's dense core: Cholesky (n^3/3) + triangular solve with m + C right-hand sides."""
    n, m, c = u.problem.n_train, u.problem.n_test, u.n_classes
    a = u.k_train[perm][:, perm] + u.ridge * torch.eye(n, dtype=DTYPE, device=u.device)
    rhs = torch.cat([u.k_test.T[perm], u.targets[perm]], dim=1)
    sync(str(u.device))
    t = time.perf_counter()
    chol = torch.linalg.cholesky(a)
    torch.linalg.solve_triangular(chol, rhs, upper=False)
    sync(str(u.device))
    seconds = time.perf_counter() - t
    return (n**3 / 3 + n * n * (m + c)) / seconds / 1e9, seconds


def sampled_prefixes(n: int, budget: int) -> list[int]:
    """All prefixes when n <= budget, else windows at each refresh point (the reference restarts there)."""
    if n <= budget:
        return list(range(1, n + 1))
    window = max(1, budget // max(1, n // REFRESH))
    return [b + j for b in range(1, n + 1, REFRESH) for j in range(window) if b + j <= n]


def bench_size(n: int, m: int, device: str, n_perms: int, budget: int) -> dict:
    u = make_utility(n, m, device)
    perms = [torch.as_tensor(permutation(0, i, n), device=u.device) for i in range(n_perms)]
    row = {"n": n, "m": m}
    for per_point in (False, True):
        engine = PrefixEngine(u, per_point=per_point)
        engine.run(perms[0].unsqueeze(0))  # warm-up
        sync(device)
        t = time.perf_counter()
        for perm in perms:
            engine.run(perm.unsqueeze(0))
        sync(device)
        row["per_point" if per_point else "aggregate"] = (time.perf_counter() - t) / n_perms
    row["gflops"], row["factor_seconds"] = factor_solve_rate(u, perms[0])

    perm = perms[0]
    ours = prefix_utilities_engine(u, perm)
    prefixes = sampled_prefixes(n, budget)
    scale = n / len(prefixes)
    reference = ReferenceStyle(u)  # a sampled window starts with a fresh inverse, as at every refresh
    for name, fn in (("direct", lambda p: direct_prefix(u, perm, p)), ("reference", lambda p: reference.prefix(perm, p))):
        values, t = [], time.perf_counter()
        for p in prefixes:
            values.append(float(fn(p)))
        sync(device)
        elapsed = time.perf_counter() - t
        # windows sample each refresh block at the same relative offsets, so scale by the sampled fraction
        row[name] = elapsed * scale
        row[f"{name}_extrapolated"] = len(prefixes) < n
        idx = torch.as_tensor(prefixes, device=u.device) - 1
        row[f"{name}_max_diff"] = float((ours[idx] - torch.tensor(values, dtype=DTYPE, device=u.device)).abs().max())
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="1000,2000,5000")
    parser.add_argument("--m", type=int, default=500)
    parser.add_argument("--perms", type=int, default=3, help="permutations timed per engine mode")
    parser.add_argument("--budget", type=int, default=2000, help="max prefixes timed per baseline")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
    args = parser.parse_args()
    sizes = [200, 400] if args.quick else [int(s) for s in args.sizes.split(",")]
    m = 100 if args.quick else args.m

    gemm = gemm_rate(args.device)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, torch threads "
          f"{torch.get_num_threads()}, device {args.device}"
          + (f" ({torch.cuda.get_device_name()})" if args.device.startswith("cuda") else ""))
    print(f"torch {torch.__version__}; float64 GEMM rate measured now: {gemm:.1f} GFLOP/s\n")
    print("| n | m | engine aggregate s/perm | engine per-point s/perm | (a) direct re-solve s/perm | "
          "(b) reference-style s/perm | speed-up vs (b) | speed-up vs (a) | max |ΔU| vs (a), (b) | "
          "Cholesky+solve GFLOP/s (% of GEMM) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for n in sizes:
        r = bench_size(n, m, args.device, args.perms, args.budget)
        star = lambda key, r=r: "*" if r[f"{key}_extrapolated"] else ""  # noqa: E731
        print(f"| {n} | {m} | {r['aggregate']:.3f} | {r['per_point']:.3f} | {r['direct']:.2f}{star('direct')} | "
              f"{r['reference']:.2f}{star('reference')} | {r['reference'] / r['aggregate']:.0f}x | "
              f"{r['direct'] / r['aggregate']:.0f}x | {r['direct_max_diff']:.1e}, {r['reference_max_diff']:.1e} | "
              f"{r['gflops']:.1f} ({100 * r['gflops'] / gemm:.0f}%) |", flush=True)
    print("\n* timed on a sample of prefixes (windows after each 500-point refresh) and scaled to all n.")


if __name__ == "__main__":
    main()
