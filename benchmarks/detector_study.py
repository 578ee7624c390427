"""The detector study of docs/evaluation.md: random vs fitted head, 5 seeds x 2 noise modes, on Rotten Tomatoes
(2 classes) and 20 Newsgroups (4 classes), against tuned cleanlab.

    python benchmarks/detector_study.py --out study            # runs freeshap-dq evaluate 4 times, then reports
    python benchmarks/detector_study.py --out study --report   # the tables again from the finished runs
    python benchmarks/detector_study.py --out study --ablations  # + the levers tried beside the fitted head

The main runs use evaluate's defaults (``--trainable auto``: the top 3 of MiniLM's 6 layers) but the exact eNTK
(``--sketch 0``, what ``value`` computes); evaluate's own default, ``--sketch 64``, is an ablation. ``--ablations`` adds
the runs of ABLATIONS (detection only): the eNTK's depth (``top:1``, ``top:2``, the default before) and, at ``top:2``,
the ridge rule, and on 20 Newsgroups the class-0 kernel and one kernel per class instead of the sum over the 4 classes,
each against the same tuned cleanlab. A ridge run reuses the ``top:2`` run's cached kernels (hard
links), so it costs only the detectors; a depth run computes its own.

Each run is a plain ``freeshap-dq evaluate`` (its command is printed and kept in the run's manifest); kernels are
cached in each run's folder, so a rerun after a change to the detectors costs only the detectors. The report reads
``results.csv`` and ``suspicions.parquet`` of each run and prints Markdown: detection (AUROC, FNR@noise,
recall@10 %) per dataset x noise mode x head, the goals against tuned cleanlab, suspect removal, and seconds per
setting.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd

RUNS = {  # name: (dataset, head, n_train, n_test, seeds)
    "rotten-tomatoes-random": ("rotten-tomatoes", "random", 1000, 300, "0,1,2,3,4"),
    "rotten-tomatoes-fit": ("rotten-tomatoes", "fit", 1000, 300, "0,1,2,3,4"),
    "newsgroups-random": ("newsgroups", "random", 600, 300, "0,1,2,3,4"),
    "newsgroups-fit": ("newsgroups", "fit", 600, 300, "0,1,2,3,4"),
}
SYMMETRIC = ["--noise-modes", "symmetric"]
EXACT = ["--sketch", "0"]  # the study's runs take the exact eNTK (value's default); the sketch is an ablation
TOP2 = ["--trainable", "top:2"]
ABLATIONS = {  # name: (main run it varies, extra evaluate arguments, run whose cached kernels it shares or None)
    **{f"rotten-tomatoes-fit-ridge-{ridge.replace(':', '')}": (
        "rotten-tomatoes-fit", [*TOP2, "--ridge", ridge, *SYMMETRIC], "rotten-tomatoes-fit-top2")
       for ridge in ("rel:1", "rel:3", "rel:30", "auto")},
    "rotten-tomatoes-fit-top1": ("rotten-tomatoes-fit", ["--trainable", "top:1"], None),
    "rotten-tomatoes-fit-top2": ("rotten-tomatoes-fit", TOP2, None),
    "newsgroups-fit-top2": ("newsgroups-fit", TOP2, None),
    "newsgroups-fit-class0": ("newsgroups-fit", ["--kernel-mode", "class0"], None),
    **{f"{dataset}-fit-sketch64": (f"{dataset}-fit", ["--sketch", "64", "--experiments", "detection,removal"], None)
       for dataset in ("rotten-tomatoes", "newsgroups")},
    "newsgroups-fit-per-class-sketch64": ("newsgroups-fit", ["--sketch", "64", "--kernel-mode", "per-class",
                                                             "--experiments", "detection,removal"], None),
}
SHOWN = ("combined", "freeshap_ce", "self_confidence_calibrated", "loo", "cl_logreg_tuned", "knn_shapley", "oracle_kernel")
METRICS = ("auroc", "fnr@noise", "recall@10%")


def evaluate(out: Path, name: str, main_run: str, *extra: str) -> None:
    """``freeshap-dq evaluate`` on ``main_run``'s data, head and seeds (``extra`` appended), into ``out / name``."""
    dataset, head, n_train, n_test, seeds = RUNS[main_run]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    command = [sys.executable, "-m", "freeshap_dq.cli", "evaluate", "--dataset", dataset, "--head", head,
               "--n-train", str(n_train), "--n-test", str(n_test), "--seeds", seeds, "--max-length", "64",
               "--no-progress", *EXACT, *extra, "-o", str(out / name)]
    print("$", " ".join(command[2:]), flush=True)
    subprocess.run(command, check=True, env=env, stdout=subprocess.DEVNULL)


def run(out: Path, names: list[str]) -> None:
    for name in names:
        evaluate(out, name, name, "--experiments", "detection,removal")


def run_ablations(out: Path, names: list[str]) -> None:
    for name in sorted(names, key=lambda name: ABLATIONS[name][2] is not None):  # kernels' owners first
        main_run, extra, shares = ABLATIONS[name]
        if shares and (out / shares / "kernels").is_dir() and not (out / name).exists():
            (out / name).mkdir(parents=True)
            shutil.copytree(out / shares / "kernels", out / name / "kernels", copy_function=os.link)
        evaluate(out, name, main_run, "--experiments", "detection", *extra)


def ablation_report(out: Path) -> str:
    rows = []
    compared = {"rotten-tomatoes-fit": "rotten-tomatoes-fit", "newsgroups-fit": "newsgroups-fit",
                **{name: main_run for name, (main_run, _, _) in ABLATIONS.items()}}
    for name, main_run in compared.items():
        path = out / name / "results.csv"
        if not path.exists():
            continue
        frame = replay_combined(out, name, pd.read_csv(path), main_run)
        detection = frame[frame["experiment"] == "detection"]
        manifest = json.loads((out / name / "manifest.json").read_text())
        config, trainable = manifest["config"], manifest["kernel"]["trainable"]  # the layers auto resolved to
        for mode, by_mode in detection.groupby("noise_mode", sort=False):
            table = by_mode.pivot_table(index="seed", columns="detector", values=["auroc", "fnr@noise"])
            gain = table["auroc"]["freeshap_ce"] - table["auroc"]["cl_logreg_tuned"]
            rows.append({"dataset": RUNS[main_run][0], "trainable": trainable, "kernel": config.get("kernel", "auto") + (
                             f", sketch {config['sketch']}" if config.get("sketch") else ""),
                         "ridge": config["ridge"],
                         "noise": mode, "seeds": len(table),
                         "FreeShap −CE AUROC": f"{table['auroc']['freeshap_ce'].mean():.3f}",
                         "− cleanlab (mean, worst seed)": f"{gain.mean():+.3f}, {gain.min():+.3f}",
                         "FNR@noise (cleanlab)": f"{table['fnr@noise']['freeshap_ce'].mean():.3f} "
                                                 f"({table['fnr@noise']['cl_logreg_tuned'].mean():.3f})",
                         "combined AUROC": f"{table['auroc']['combined'].mean():.3f}"})
    return "\n".join(["### Levers beside the fitted head (FreeShap −CE; the first rows are the main runs)", "",
                      _markdown(pd.DataFrame(rows)), ""])


def _cell(values: pd.Series) -> str:
    return f"{values.mean():.3f} ± {values.std():.3f}"


def replay_combined(out: Path, name: str, results: pd.DataFrame, main_run: str | None = None) -> pd.DataFrame:
    """The rows of ``combined`` recomputed by the shipped rule from the run's suspicions.parquet (so runs made before
    a change to the rule report the rule as it is now): its detection rows, and its removal rows wherever the rule
    falls back to FreeShap (the removal of the same ranking: FreeShap's rows; elsewhere the rank mean is what it
    was). ``main_run`` names the main run whose data an ablation shares."""
    from freeshap_dq.data.datasets import newsgroups, rotten_tomatoes
    from freeshap_dq.data.tables import encode_labels, label_mapping
    from freeshap_dq.evaluation.detectors import combined_suspicion, one_directional
    from freeshap_dq.evaluation.metrics import detection_metrics

    dataset, _, n_train, n_test, _ = RUNS[main_run or name]
    train, test = newsgroups(n_train, n_test, seed=0) if dataset == "newsgroups" else rotten_tomatoes(
        n_train, n_test, noise=0.0, seed=0)[:2]
    names = label_mapping(train, test)
    y_test = encode_labels(test, names)
    scores = pd.read_parquet(out / name / "suspicions.parquet")
    if "loo_prediction" not in scores:  # a run made before the asymmetry test: its combined rows as they were
        return results
    rows, fallbacks = [], []
    for (mode, seed), frame in scores.groupby(["noise_mode", "seed"], sort=False):
        given, predicted = frame["given_label"].to_numpy(), frame["loo_prediction"].to_numpy()
        combined = combined_suspicion(frame["freeshap_ce"].to_numpy(), frame["self_confidence_calibrated"].to_numpy(),
                                      given, y_test, predicted, len(names))
        rows.append({"experiment": "detection", "noise_mode": mode, "seed": seed, "detector": "combined",
                     **detection_metrics(combined, frame["flipped"].to_numpy())})
        if one_directional(given, y_test, predicted, len(names)):
            fallbacks.append((mode, seed))
    replaced = (results["experiment"] == "detection") & (results["detector"] == "combined")
    removal = results["experiment"] == "removal"
    fell_back = pd.MultiIndex.from_frame(results[["noise_mode", "seed"]]).isin(fallbacks)
    removed_from = results["removed_from"] if "removed_from" in results else pd.Series("", index=results.index)
    replaced |= removal & fell_back & (removed_from == "suspects of combined")
    freeshap_removal = results[removal & fell_back & (removed_from == "suspects of freeshap_ce")].assign(
        removed_from="suspects of combined")
    return pd.concat([results[~replaced], pd.DataFrame(rows), freeshap_removal], ignore_index=True)


def report(out: Path) -> str:
    parts = []
    frames = {name: replay_combined(out, name, pd.read_csv(out / name / "results.csv")) for name in RUNS
              if (out / name / "results.csv").exists()}
    for dataset in dict.fromkeys(spec[0] for spec in RUNS.values()):
        runs = {RUNS[name][1]: frame for name, frame in frames.items() if RUNS[name][0] == dataset}
        if not runs:
            continue
        for mode in ("symmetric", "class-conditional"):
            rows = []
            for head, frame in runs.items():
                detection = frame[(frame["experiment"] == "detection") & (frame["noise_mode"] == mode)]
                for detector in SHOWN:
                    if detector.startswith(("cl_", "knn")) and head != "random":
                        continue  # cleanlab's baselines do not use the kernel: the same in both runs
                    mine = detection[detection["detector"] == detector]
                    if len(mine):
                        label = detector if detector.startswith(("cl_", "knn")) else f"{detector} ({head} head)"
                        rows.append({"detector": label, **{m: _cell(mine[m]) for m in METRICS}})
            parts += [f"### {dataset}, {mode} noise (mean ± std over the seeds)", "", _markdown(pd.DataFrame(rows)), ""]
        parts += _goals(dataset, runs) + _removal(dataset, runs) + _seconds(dataset, out)
    return "\n".join(parts)


def _goals(dataset: str, runs: dict[str, pd.DataFrame]) -> list[str]:
    rows = []
    for head, frame in runs.items():
        detection = frame[frame["experiment"] == "detection"]
        for mode, by_mode in detection.groupby("noise_mode", sort=False):
            table = by_mode.pivot_table(index="seed", columns="detector", values=["auroc", "fnr@noise"])
            baseline_auroc, baseline_fnr = table["auroc"]["cl_logreg_tuned"], table["fnr@noise"]["cl_logreg_tuned"]
            for detector in ("combined", "freeshap_ce"):
                gain = table["auroc"][detector] - baseline_auroc
                fewer = 1 - table["fnr@noise"][detector] / baseline_fnr
                rows.append({"head": head, "noise": mode, "detector": detector,
                             "AUROC − cleanlab (mean, worst seed)": f"{gain.mean():+.3f}, {gain.min():+.3f}",
                             "fewer misses at the noise budget (mean)": f"{100 * fewer.mean():+.0f} %",
                             "best component beaten on": _never_worse(table["auroc"]) if detector == "combined"
                             else ""})
    return [f"### {dataset}: goals against tuned cleanlab (+0.03 AUROC, −20 % FNR@noise)", "",
            _markdown(pd.DataFrame(rows)), ""]


def _never_worse(auroc: pd.DataFrame) -> str:
    best = auroc[["freeshap_ce", "self_confidence_calibrated"]].max(axis=1)
    worse = int((auroc["combined"] < best - 1e-12).sum())
    return f"{len(auroc) - worse}/{len(auroc)} seeds ≥ best component (worst {float((auroc['combined'] - best).min()):+.3f})"


def _removal(dataset: str, runs: dict[str, pd.DataFrame]) -> list[str]:
    rows = []
    for head, frame in runs.items():
        removal = frame[frame["experiment"] == "removal"]
        none = removal[removal["fraction_removed"] == 0].groupby("learner")["accuracy"].mean()
        ten = removal[(removal["fraction_removed"] == 0.1) & removal["removed_from"].str.startswith("suspects")]
        for (source, learner), accuracy in ten.groupby(["removed_from", "learner"])["accuracy"].mean().items():
            rows.append({"head": head, "removed": source.replace("suspects of ", "10 % by "), "learner": learner,
                         "test accuracy": f"{accuracy:.3f}", "change": f"{accuracy - none[learner]:+.3f}"})
    return [f"### {dataset}: removing the 10 % most suspicious (test accuracy, mean over the settings)", "",
            _markdown(pd.DataFrame(rows)), ""]


def _seconds(dataset: str, out: Path) -> list[str]:
    rows = []
    for name, (ds, head, n_train, n_test, _) in RUNS.items():
        path = out / name / "manifest.json"
        if ds != dataset or not path.exists():
            continue
        manifest = json.loads(path.read_text())
        kernels = [k["seconds"] for k in manifest.get("setting_kernels", []) if k.get("seconds")]
        timing = manifest.get("timing", {})
        rows.append({"head": head, "n": f"{n_train} / {n_test}", "run (s)": manifest["seconds"],
                     "per setting (s)": timing.get("per_setting_seconds", ""),
                     "eNTK per setting (s)": f"{np.mean(kernels):.0f}" if kernels else "once"})
    return [f"### {dataset}: time (2 CPU cores)", "", _markdown(pd.DataFrame(rows)), ""]


def plot(out: Path, folder: Path) -> list[Path]:
    """One figure per dataset: AUROC and FNR@noise (mean ± std over the seeds) of the SHOWN detectors, random and
    fitted head side by side, one panel per noise mode; written as ``folder / study-<dataset>.png``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    frames = {name: replay_combined(out, name, pd.read_csv(out / name / "results.csv")) for name in RUNS
              if (out / name / "results.csv").exists()}
    written = []
    for dataset in dict.fromkeys(spec[0] for spec in RUNS.values()):
        runs = {RUNS[name][1]: frame for name, frame in frames.items() if RUNS[name][0] == dataset}
        if not runs:
            continue
        fig, axes = plt.subplots(2, 2, figsize=(11, 7), squeeze=False)
        for col, mode in enumerate(("symmetric", "class-conditional")):
            for row, metric in enumerate(("auroc", "fnr@noise")):
                ax = axes[row][col]
                for offset, (head, frame) in zip((-0.2, 0.2), runs.items(), strict=False):
                    detection = frame[(frame["experiment"] == "detection") & (frame["noise_mode"] == mode)]
                    stats = detection.groupby("detector")[metric].agg(["mean", "std"]).reindex(SHOWN)
                    ax.bar(np.arange(len(SHOWN)) + offset, stats["mean"], 0.4, yerr=stats["std"], capsize=2,
                           label=f"{'fitted' if head == 'fit' else head} head")
                ax.set_xticks(np.arange(len(SHOWN)), [d.replace("_", " ") for d in SHOWN], rotation=30, ha="right",
                              fontsize=8)
                ax.set(title=f"{dataset}, {mode} noise", ylabel=metric + (" (lower is better)" if "fnr" in metric
                                                                           else ""))
                if metric == "auroc":
                    ax.set_ylim(0.5, 1.0)
        fig.legend(*axes[0][0].get_legend_handles_labels(), loc="upper center", ncol=2)
        fig.tight_layout(rect=(0, 0, 1, 0.95))
        path = folder / f"study-{dataset}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written


def _markdown(frame: pd.DataFrame) -> str:
    if frame.empty:
        return "(no rows)"
    lines = ["| " + " | ".join(map(str, frame.columns)) + " |", "|" + "---|" * len(frame.columns)]
    lines += ["| " + " | ".join(map(str, row)) + " |" for row in frame.itertuples(index=False)]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("detector-study"))
    parser.add_argument("--report", action="store_true", help="only the tables, from finished runs")
    parser.add_argument("--runs", default=",".join(RUNS), help="comma-separated subset of " + ", ".join(RUNS))
    parser.add_argument("--ablations", action="store_true", help="also the runs of ABLATIONS: " + ", ".join(ABLATIONS))
    parser.add_argument("--plots", type=Path, help="also write study-<dataset>.png figures into this folder")
    args = parser.parse_args()
    if not args.report:
        run(args.out, [name for name in args.runs.split(",") if name])
        if args.ablations:
            run_ablations(args.out, list(ABLATIONS))
    print(report(args.out))
    if args.ablations:
        print(ablation_report(args.out))
    for path in plot(args.out, args.plots) if args.plots else ():
        print(f"wrote {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
