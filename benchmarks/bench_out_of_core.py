"""Out-of-core: kernels and per-point results larger than memory, each measured in its own process.

1. eNTK by example blocks into a kernel folder vs the one-pass in-memory eNTK (baseline), same model
   and data: wall time, peak RSS, largest difference. Model: a random 3-layer BERT (hidden 32, the
   test suite's tiny model, built on the fly), ``top:1`` trainable, synthetic short texts.
2. Nyström valuation (``--low-rank r``) of a kernel folder whose k_train alone is larger than what the
   in-memory path could hold three copies of (synthetic RBF kernel written by row blocks): set-up and
   engine time, peak RSS.
3. Per-point values on that folder: per-point sums in memory (baseline) vs streamed to disk.
4. The landmark (Nyström) eNTK at a size whose full kernel could not be stored here (n = 100,000:
   80 GB as float64): only K[:, L], K[T, L] and diag(K), then its values. Baseline in the same run:
   the blocked full eNTK on a 5,000-example slice, extrapolated by its n² cost.

Usage:  python benchmarks/bench_out_of_core.py [--ntk-n 20000] [--ntk-m 2000] [--ntk-block 5000]
        [--n 40000] [--m 5000] [--rank 128] [--perms 4] [--landmark-n 100000] [--landmarks 256]
        [--slice-n 5000] [--parts 1,2,4] [--workdir DIR]
Prints Markdown tables; docs/scaling.md records a run with the machine it ran on.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

WORDS = ("good bad great dull movie film plot cast funny boring clever mess moving tedious loved hated script "
         "actors wonderful terrible brilliant sincere long every minute very not indeed").split()


class MemoryPeaks:
    """Peak anonymous memory (RssAnon: what the process allocates) and peak resident set (VmRSS: also the pages
    of memory-mapped files it touched, which the kernel can drop or write back), sampled every 50 ms.
    ``ru_maxrss`` is not used: Linux carries it over fork and exec, so a child would report its parent's peak."""

    def __init__(self) -> None:
        self.anon = self.rss = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while not self._stop.is_set():
            self._take()
            time.sleep(0.05)

    def _take(self) -> None:
        fields = _status(("RssAnon", "VmRSS"))
        self.anon, self.rss = max(self.anon, fields["RssAnon"]), max(self.rss, fields["VmRSS"])

    def stop(self) -> dict[str, float]:
        self._stop.set()
        self._thread.join()
        self._take()
        return {"peak_anon_gib": self.anon / 2**30, "peak_rss_gib": self.rss / 2**30}


def _status(keys: tuple[str, ...]) -> dict[str, int]:
    out = dict.fromkeys(keys, 0)
    with open("/proc/self/status") as fh:
        for line in fh:
            key = line.split(":")[0]
            if key in out:
                out[key] = int(line.split()[1]) * 1024
    return out


def texts(count: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=rng.integers(3, 12))) for _ in range(count)]


def child_ntk(args) -> dict:
    import torch

    from freeshap_dq.kernels.folder import KernelFolderWriter, save_kernel_folder
    from freeshap_dq.kernels.problem import KernelProblem
    from freeshap_dq.ntk.adapters import EncoderHead
    from freeshap_dq.ntk.blocked import compute_ntk_blocks
    from freeshap_dq.ntk.compute import compute_ntk
    from freeshap_dq.ntk.models import load_model_and_tokenizer

    torch.set_num_threads(os.cpu_count() or 1)
    model, tokenizer, _ = load_model_and_tokenizer(args.model_dir, "encoder")
    adapter = EncoderHead(model, tokenizer, n_classes=2, head_seed=0)
    train, test = adapter.tokenize(texts(args.ntk_n, 1)), adapter.tokenize(texts(args.ntk_m, 2))
    y_train, y_test = np.arange(args.ntk_n) % 2, np.arange(args.ntk_m) % 2
    sampler = MemoryPeaks()
    started = time.perf_counter()
    if args.mode == "one-pass":
        out = compute_ntk(adapter, train, test, trainable="top:1", max_memory="16GiB", progress=False)
        seconds = time.perf_counter() - started
        peaks = sampler.stop()
        save_kernel_folder(KernelProblem(out.k_train, out.k_test, y_train, y_test), args.out)
    else:
        with KernelFolderWriter(args.out, args.ntk_n, args.ntk_m) as writer:
            compute_ntk_blocks(adapter, train, test, writer.k_train, writer.k_test, trainable="top:1",
                               max_memory="2GiB", example_block=args.ntk_block, progress=False)
            seconds = time.perf_counter() - started  # the eNTK, before the folder's one-off validation
            peaks = sampler.stop()
            writer.finish(y_train, y_test)
    return {"seconds": seconds, **peaks}


def child_landmarks(args) -> dict:
    import torch

    from freeshap_dq import KernelProblem, ValuationConfig, compute_values
    from freeshap_dq.kernels.folder import KernelFolderWriter
    from freeshap_dq.kernels.nystrom import nystrom_landmarks
    from freeshap_dq.ntk.adapters import EncoderHead
    from freeshap_dq.ntk.blocked import compute_ntk_blocks, compute_ntk_landmarks
    from freeshap_dq.ntk.models import load_model_and_tokenizer

    torch.set_num_threads(os.cpu_count() or 1)
    model, tokenizer, _ = load_model_and_tokenizer(args.model_dir, "encoder")
    adapter = EncoderHead(model, tokenizer, n_classes=2, head_seed=0)
    n, m = args.landmark_n, args.ntk_m
    train, test = adapter.tokenize(texts(n, 1)), adapter.tokenize(texts(m, 2))
    y_train, y_test = np.arange(n) % 2, np.arange(m) % 2
    sampler = MemoryPeaks()
    started = time.perf_counter()
    if args.mode == "full-slice":  # the baseline: the whole kernel of a slice, to extrapolate by n^2
        with KernelFolderWriter(args.out, args.slice_n, m) as writer:
            compute_ntk_blocks(adapter, train[:args.slice_n], test, writer.k_train, writer.k_test, trainable="top:1",
                               max_memory="2GiB", example_block=2048, progress=False)
            seconds = time.perf_counter() - started
            writer.finish(y_train[:args.slice_n], y_test)
        return {"seconds": seconds, **sampler.stop()}
    landmarks = nystrom_landmarks(n, args.landmarks, 0)
    with KernelFolderWriter(args.out, n, m, landmarks=landmarks) as writer:
        compute_ntk_landmarks(adapter, train, test, landmarks, writer.k_train, writer.k_test, writer.diagonal,
                              trainable="top:1", max_memory="2GiB", example_block=2048, progress=False)
        seconds = time.perf_counter() - started
        writer.finish(y_train, y_test)
    started = time.perf_counter()
    result = compute_values(KernelProblem.load(args.out), ValuationConfig(permutations=args.perms, ridge="auto"),
                            progress=False)
    return {"seconds": seconds, "value_seconds": time.perf_counter() - started, "rank": len(landmarks),
            "finite": bool(np.isfinite(result.values("ce")).all()), **sampler.stop()}


def child_value(args) -> dict:
    from freeshap_dq import KernelProblem, ValuationConfig, compute_values

    sampler = MemoryPeaks()
    started = time.perf_counter()
    problem = KernelProblem.load(args.kernel)
    loaded = time.perf_counter() - started
    config = ValuationConfig(permutations=args.perms, low_rank=args.rank, per_point=args.mode != "aggregate",
                             reduce_every=2, ridge="0.01", batch_size=1)
    result = compute_values(problem, config, point_dir=args.points if args.mode == "streamed" else None,
                            progress=False)
    total = time.perf_counter() - started
    if args.mode != "aggregate":
        result.save(args.out)
    return {"load_seconds": loaded, "seconds": total, **sampler.stop(),
            "value_checksum": float(np.sum(result.values("ce")))}


def run_child(kind: str, **options) -> dict:
    cmd = [sys.executable, __file__, "--child", kind] + [f"--{k.replace('_', '-')}={v}" for k, v in options.items()]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def write_rbf_folder(path: Path, n: int, m: int, seed: int = 0) -> float:
    from freeshap_dq.data.synthetic import rbf_kernel
    from freeshap_dq.kernels.folder import KernelFolderWriter

    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n + m)
    x = rng.normal(size=(n + m, 32)) + 0.8 * np.eye(2, 32)[y]
    started = time.perf_counter()
    with KernelFolderWriter(path, n, m) as writer:
        for lo in range(0, n + m, 2000):
            hi = min(lo + 2000, n + m)
            block = rbf_kernel(x[lo:hi], x[:n], bandwidth=6.0)
            if lo < n:
                writer.k_train[lo:min(hi, n)] = block[:min(hi, n) - lo]
            if hi > n:
                writer.k_test[max(lo, n) - n:hi - n] = block[max(lo, n) - lo:]
        writer.finish(y[:n], y[n:])
    return time.perf_counter() - started


def max_relative_difference(a: Path, b: Path) -> float:
    ka, kb = (np.load(p / "k_train.npy", mmap_mode="r") for p in (a, b))
    ta, tb = (np.load(p / "k_test.npy", mmap_mode="r") for p in (a, b))
    scale = max(float(np.abs(ka[lo:lo + 2000]).max()) for lo in range(0, ka.shape[0], 2000))
    diff = max(float(np.abs(ka[lo:lo + 2000] - kb[lo:lo + 2000]).max()) for lo in range(0, ka.shape[0], 2000))
    diff = max(diff, max(float(np.abs(ta[lo:lo + 2000] - tb[lo:lo + 2000]).max()) for lo in range(0, ta.shape[0], 2000)))
    return diff / scale


def landmark_part(args, work: Path, model_dir: Path) -> None:
    common = dict(model_dir=model_dir, landmark_n=args.landmark_n, ntk_m=args.ntk_m, landmarks=args.landmarks,
                  perms=args.perms)
    full = run_child("landmarks", mode="full-slice", out=work / "slice.kernel", slice_n=args.slice_n, **common)
    shutil.rmtree(work / "slice.kernel")
    ours = run_child("landmarks", mode="landmarks", out=work / "landmarks.kernel", **common)
    size = sum(f.stat().st_size for f in (work / "landmarks.kernel").iterdir()) / 2**30
    shutil.rmtree(work / "landmarks.kernel")
    n, m = args.landmark_n, args.ntk_m
    scaled = full["seconds"] * (n * (n + m)) / (args.slice_n * (args.slice_n + m))
    print(f"## 4. The landmark eNTK, n = {n:,}, m = {m:,}, r = {ours['rank']} (tiny BERT, top:1)\n")
    print("| method | seconds | peak allocated GiB | on disk |")
    print("|---|---|---|---|")
    print(f"| full eNTK by blocks, n = {args.slice_n:,} slice (baseline) | {full['seconds']:.1f} | "
          f"{full['peak_anon_gib']:.2f} | {8 * args.slice_n * (args.slice_n + m) / 2**30:.2f} GiB |")
    print(f"| full eNTK at n = {n:,}, extrapolated by n (n + m) | ≈ {scaled:.0f} | — | "
          f"{8 * n * (n + m) / 2**30:.0f} GiB |")
    print(f"| landmark eNTK, r = {ours['rank']} | {ours['seconds']:.1f} | {ours['peak_anon_gib']:.2f} | {size:.2f} GiB |")
    print(f"\nthen {args.perms} permutations on it (auto ridge, set-up included): {ours['value_seconds']:.1f} s; "
          f"values finite: {ours['finite']}\n")


def ntk_part(args, work, model_dir) -> None:
    """Part 1: the blocked eNTK into a kernel folder against the one-pass eNTK."""
    base = dict(model_dir=model_dir, ntk_n=args.ntk_n, ntk_m=args.ntk_m, ntk_block=args.ntk_block)
    one = run_child("ntk", mode="one-pass", out=work / "one.kernel", **base)
    blocks = run_child("ntk", mode="blocks", out=work / "blocks.kernel", **base)
    gram_gib = 8 * (args.ntk_n + args.ntk_m) * args.ntk_n / 2**30
    print(f"## 1. eNTK, n = {args.ntk_n:,}, m = {args.ntk_m:,} (the fp64 Gram alone: {gram_gib:.1f} GiB)\n")
    print("| method | seconds | peak allocated GiB | peak RSS GiB (incl. mapped file pages) | vs one pass |")
    print("|---|---|---|---|---|")
    print(f"| one pass in memory (baseline) | {one['seconds']:.1f} | {one['peak_anon_gib']:.2f} | "
          f"{one['peak_rss_gib']:.2f} | 1.00× time |")
    print(f"| example blocks of {args.ntk_block:,} into a kernel folder | {blocks['seconds']:.1f} | "
          f"{blocks['peak_anon_gib']:.2f} | {blocks['peak_rss_gib']:.2f} | {blocks['seconds'] / one['seconds']:.2f}× "
          f"time, {blocks['peak_anon_gib'] / one['peak_anon_gib']:.2f}× allocated memory |")
    print(f"\nmax |difference| / max |K|: {max_relative_difference(work / 'one.kernel', work / 'blocks.kernel'):.1e}\n")
    shutil.rmtree(work / "one.kernel")
    shutil.rmtree(work / "blocks.kernel")


def folder_part(args, work) -> None:
    """Parts 2-3: Nystrom values and streamed per-point sums of a large RBF kernel folder."""
    folder = work / "rbf.kernel"
    written = write_rbf_folder(folder, args.n, args.m)
    size = sum(f.stat().st_size for f in folder.iterdir()) / 2**30
    print(f"## 2–3. Nyström r = {args.rank} on a kernel folder, n = {args.n:,}, m = {args.m:,} "
          f"({size:.1f} GiB on disk, written in {written:.0f} s), T = {args.perms}\n")
    print("| run | load s | total s | peak allocated GiB | peak RSS GiB (incl. mapped file pages) |")
    print("|---|---|---|---|---|")
    common = dict(kernel=folder, rank=args.rank, perms=args.perms)
    rows = [("values only", run_child("value", mode="aggregate", out=work / "a.npz", **common)),
            ("per point, sums in memory (baseline)", run_child("value", mode="memory", out=work / "r.npz", **common)),
            ("per point, streamed to disk", run_child("value", mode="streamed", out=work / "r.result",
                                                      points=work / "points", **common))]
    for name, r in rows:
        print(f"| {name} | {r['load_seconds']:.1f} | {r['seconds']:.1f} | {r['peak_anon_gib']:.2f} | "
              f"{r['peak_rss_gib']:.2f} |")
    from freeshap_dq import ValuationResult

    a, b = ValuationResult.load(work / "r.npz"), ValuationResult.load(work / "r.result")
    same = all(np.array_equal(a.point_sums[k], b.point_sums[k]) for k in ("accuracy", "ce"))
    print(f"\nper-point sums streamed == in memory (bit for bit): {same}; "
          f"allocated memory saved: {rows[1][1]['peak_anon_gib'] - rows[2][1]['peak_anon_gib']:.2f} GiB")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ntk-n", type=int, default=20000)
    p.add_argument("--ntk-m", type=int, default=2000)
    p.add_argument("--ntk-block", type=int, default=5000)
    p.add_argument("--n", type=int, default=40000)
    p.add_argument("--m", type=int, default=5000)
    p.add_argument("--rank", type=int, default=128)
    p.add_argument("--perms", type=int, default=4)
    p.add_argument("--landmark-n", type=int, default=100000)
    p.add_argument("--landmarks", type=int, default=256)
    p.add_argument("--slice-n", type=int, default=5000)
    p.add_argument("--parts", default="1,2,4", help="Which parts to run (2 includes 3).")
    p.add_argument("--workdir", default=None, help="Where the kernel folders go (default: a temporary folder).")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--mode", default=None, help=argparse.SUPPRESS)
    for hidden in ("model-dir", "out", "kernel", "points"):
        p.add_argument(f"--{hidden}", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps({"ntk": child_ntk, "value": child_value, "landmarks": child_landmarks}[args.child](args)))
        return

    os.environ.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    work = Path(args.workdir or tempfile.mkdtemp(prefix="freeshap-ooc-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"# Out-of-core benchmark — {platform.machine()}, {os.cpu_count()} CPU(s), "
          f"{os.sysconf('SC_PHYS_PAGES') * os.sysconf('SC_PAGE_SIZE') / 2**30:.0f} GiB RAM\n")
    try:
        from tiny_models import tiny_bert

        model_dir = tiny_bert(work / "tiny-bert")
        parts = args.parts.split(",")
        if "4" in parts:
            landmark_part(args, work, model_dir)
        if "1" in parts:
            ntk_part(args, work, model_dir)
        if "2" in parts:
            folder_part(args, work)
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
