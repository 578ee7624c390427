"""Re-push of a large review project against a real local Label Studio server.

A project of N tasks (every example pushed: the worst case) is pushed with one value run, then re-pushed with
a second run whose values differ everywhere. Measured in the same run, on the same server:

  (a) the push of the new run as shipped: unreviewed tasks imported again in batches with their new numbers and
      the old versions deleted in one request per 1,000, reviewed tasks (a few, annotated here) updated in place,
      their predictions imported in batches;
  (b) the baseline, the previous design: one PATCH per task (and one prediction request per task), timed on a
      sample of tasks and extrapolated to N (stated in the output).

Needs the server installed by ``scripts/labelstudio-server.sh install`` (``make test`` does it).

Usage:  python benchmarks/bench_labelstudio.py [--tasks 10000] [--reviewed 50] [--sample 200]
Prints a Markdown table; docs/benchmarks.md records a run with the machine it ran on.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests" / "integrations"))

from labelstudio_server import LabelStudioServer, install_home  # noqa: E402

from freeshap_dq.integrations import labelstudio as ls  # noqa: E402


def review(n: int, seed: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    labels = np.array(["negative", "positive"])[np.arange(n) % 2]
    table = pd.DataFrame({"example_id": [f"ex-{i:06d}" for i in range(n)],
                          "text": [f"review number {i}: " + "words " * 20 for i in range(n)], "label": labels,
                          "value_ce": rng.normal(scale=0.01, size=n), "stderr_ce": np.abs(rng.normal(scale=0.002,
                                                                                                     size=n))})
    table["value"], table["stderr"] = table["value_ce"], table["stderr_ce"]
    return ls.review_table(table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, default=10_000)
    parser.add_argument("--reviewed", type=int, default=50, help="Tasks annotated between the two pushes.")
    parser.add_argument("--sample", type=int, default=200, help="Tasks the per-task baseline is timed on.")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as scratch:
        server = LabelStudioServer(install_home(), Path(scratch) / "server").start()
        try:
            client = ls.Client(ls.Connection(server.url, server.token, timeout=600))
            first, second = review(args.tasks, 0), review(args.tasks, 1)
            everything = pd.Series(True, index=range(args.tasks))
            started = time.perf_counter()
            report = ls.push(client, first, everything, ls.ReviewRun("run-1"), title="re-push benchmark",
                             batch_size=500, progress=False)
            initial = time.perf_counter() - started
            tasks = client.tasks(report.project_id)
            for task in tasks[:args.reviewed]:
                client.sdk.annotations.create(id=task.id, result=[{
                    "from_name": "label", "to_name": "text", "type": "choices",
                    "value": {"choices": [task.data["given_label"]]}}])

            started = time.perf_counter()
            again = ls.push(client, second, everything, ls.ReviewRun("run-2"), project_id=report.project_id,
                            batch_size=500, progress=False)
            repush = time.perf_counter() - started
            assert again.refreshed + again.updated == args.tasks, again
            assert len(client.tasks(report.project_id)) == args.tasks

            sample = [t for t in client.tasks(report.project_id) if not ls.was_reviewed(t)][:args.sample]
            rows = {r["example_id"]: r for r in first.to_dict(orient="records")}
            control = ls.choice_control(client.project(report.project_id))
            started = time.perf_counter()
            for task in sample:  # the previous design: one update and one prediction request per task
                row = rows[task.data["example_id"]]
                client.update_task(task.id, ls.task_data(row), ls.task_meta(row, ls.ReviewRun("run-3")))
                client.add_prediction(task.id, ls.task_prediction(row, ls.ReviewRun("run-3"), control))
            per_task = (time.perf_counter() - started) / len(sample)
        finally:
            server.stop()

    baseline = per_task * args.tasks
    print(f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, Python "
          f"{platform.python_version()}; Label Studio server on 127.0.0.1 (SQLite)\n")
    print("| step | tasks | seconds |")
    print("|---|---|---|")
    print(f"| first push (import) | {args.tasks:,} | {initial:.1f} |")
    print(f"| re-push, new run: {again.refreshed:,} refreshed in batches, {again.updated} reviewed updated in place "
          f"| {args.tasks:,} | **{repush:.1f}** |")
    print(f"| baseline: one update + one prediction request per task ({per_task * 1000:.0f} ms per task, timed on "
          f"{len(sample)} tasks, extrapolated) | {args.tasks:,} | {baseline:.0f} |")
    print(f"\nSpeed-up of the re-push over the baseline: {baseline / repush:.0f}x")


if __name__ == "__main__":
    main()
