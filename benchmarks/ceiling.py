"""How close is the shipped detector to what the model can tell apart? (docs/evaluation.md, "The ceiling")

Reads a finished ``freeshap-dq evaluate`` folder, computes nothing new but one leave-one-out solve per setting,
and prints two Markdown tables:

- per noise mode, AUROC / FNR@noise (mean over the seeds) of the shipped detector, the two oracles
  (freeshap_dq.evaluation.oracles) and tuned cleanlab; the issue's goal (0.8 x cleanlab's misses), and the
  share of misses each has fewer than cleanlab (the mean of the per-seed ratios);
- per noise mode, the share of flipped labels that the kernel fitted to the clean labels itself assigns to the
  flipped class (they look right to anything built on it), and that kernel's leave-one-out accuracy.

    python benchmarks/ceiling.py eval/ [eval-ng/ ...]

It needs the run's ``suspicions.parquet`` (with its ``clean_label`` column) and its cached kernels (``kernels/``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from safetensors.numpy import load_file

from freeshap_dq.evaluation.detectors import SHIPPED
from freeshap_dq.evaluation.oracles import ORACLES
from freeshap_dq.evaluation.report import markdown_table
from freeshap_dq.valuation.utility import DTYPE, loo_train_scores, one_hot

BASELINE = "cl_logreg_tuned"
GOAL_SHARE = 0.8  # the goal: at least 20 % fewer misses than tuned cleanlab at the noise budget


def detection_table(run: Path) -> pd.DataFrame:
    results = pd.read_csv(run / "results.csv")
    detection = results[results["experiment"] == "detection"]
    rows = []
    for mode, frame in detection.groupby("noise_mode", sort=False):
        table = frame.pivot_table(index="seed", columns="detector", values=["auroc", "fnr@noise"])
        baseline = table["fnr@noise"][BASELINE]
        row = {"run": run.name, "noise": mode}
        for name in (SHIPPED, *ORACLES, BASELINE):
            if name in table["auroc"]:
                fewer = (1 - table["fnr@noise"][name] / baseline).mean()
                row[name] = (f"{table['auroc'][name].mean():.3f} / {table['fnr@noise'][name].mean():.3f} "
                             f"({100 * fewer:+.1f} %)")
        row["goal FNR"] = f"{GOAL_SHARE * baseline.mean():.3f}"
        rows.append(row)
    return pd.DataFrame(rows)


def _kernels(run: Path) -> list[dict[str, np.ndarray]]:
    kernels = [load_file(path) for path in sorted((run / "kernels").glob("*.safetensors"))]
    if not kernels:
        raise SystemExit(f"{run / 'kernels'} holds no cached kernels: rerun evaluate into {run}")
    return kernels


def _setting_kernel(kernels: list[dict[str, np.ndarray]], given: np.ndarray, clean: np.ndarray) -> np.ndarray:
    """The kernel a setting used: its own (fitted to its labels) or the one label-free kernel of the run."""
    for labels in (given, clean):
        for kernel in kernels:
            if np.array_equal(kernel["y_train"], labels):
                return kernel["k_train"]
    raise SystemExit("no cached kernel was computed on this setting's labels or on the clean ones")


def invisible_flips(run: Path) -> pd.DataFrame:
    scores = pd.read_parquet(run / "suspicions.parquet")
    if "clean_label" not in scores:
        raise SystemExit(f"{run / 'suspicions.parquet'} has no clean_label column: rerun evaluate into {run}")
    kernel_scale = json.loads((run / "manifest.json").read_text())["config"].get("kernel_scale", 1.0)
    kernels = _kernels(run)
    rows = []
    for (mode, seed), frame in scores.groupby(["noise_mode", "seed"], sort=False):
        given, clean, flipped = (frame[c].to_numpy().copy() for c in ("given_label", "clean_label", "flipped"))
        classes = int(max(given.max(), clean.max())) + 1
        k = torch.as_tensor(np.array(_setting_kernel(kernels, given, clean)), dtype=DTYPE) * kernel_scale
        predicted = loo_train_scores(k, one_hot(torch.as_tensor(clean), classes), float(frame["ridge"].iloc[0])
                                     ).numpy().argmax(1)
        rows.append({"noise": mode, "seed": seed, "flips it agrees with": (predicted[flipped] == given[flipped]).mean(),
                     "clean-label LOO accuracy": (predicted == clean).mean()})
    table = pd.DataFrame(rows).groupby("noise", sort=False)[["flips it agrees with", "clean-label LOO accuracy"]]
    return table.mean().round(3).reset_index().assign(run=run.name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="freeshap-dq evaluate output folders")
    args = parser.parse_args()
    detection = pd.concat([detection_table(run) for run in args.runs], ignore_index=True)
    flips = pd.concat([invisible_flips(run) for run in args.runs], ignore_index=True)
    print("AUROC / FNR@noise (fewer misses than tuned cleanlab), mean over the seeds\n")
    print(markdown_table(detection))
    print("\nFlipped labels that the kernel fitted to the clean labels assigns to the flipped class\n")
    print(markdown_table(flips[["run", "noise", "flips it agrees with", "clean-label LOO accuracy"]]))


if __name__ == "__main__":
    main()
