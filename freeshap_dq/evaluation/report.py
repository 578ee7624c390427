"""Summary tables (Markdown, mean +- std over seeds) and PNG plots of an evaluation's results."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from freeshap_dq.evaluation.detectors import SHIPPED
from freeshap_dq.evaluation.oracles import ORACLES
from freeshap_dq.io import atomic_write

DETECTION_COLUMNS = ("auroc", "auprc", "recall@5%", "recall@10%", "recall@20%", "f1_2means", "fnr@noise")


def _mean_std(frame: pd.DataFrame, by: list[str], columns) -> pd.DataFrame:
    grouped = frame.groupby(by, sort=False)[list(columns)]
    mean, std = grouped.mean(), grouped.std().fillna(0.0)
    out = mean.copy().astype(object)
    for column in columns:
        out[column] = [f"{m:.3f} ± {s:.3f}" for m, s in zip(mean[column], std[column], strict=True)]
    return out.reset_index()


def markdown_table(frame: pd.DataFrame, floatfmt: str = ".3f") -> str:
    """A GitHub-flavoured Markdown table (no tabulate dependency)."""
    def cell(value) -> str:
        if isinstance(value, float):
            return "" if value != value else format(value, floatfmt)
        return str(value)

    header = [str(c) for c in frame.columns]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join(lines)


HEAD_TO_HEAD = ("freeshap_ce", "self_confidence_calibrated", "self_confidence", "cl_logreg_tuned", "loo",
                "beta_shapley", "knn_shapley")


def detector_label(name: str, bold: bool = False) -> str:
    """How a table or a plot names a detector: the shipped one marked, an oracle said to read the clean labels."""
    if name == SHIPPED:
        return f"**{name}** (shipped)" if bold else f"{name} (shipped)"
    if name in ORACLES:
        return f"{name} (oracle: reads the clean labels)"
    return name


def _head_to_head(detection: pd.DataFrame) -> pd.DataFrame:
    """For every noise mode and rival: on how many seeds ``combined`` has the higher AUROC / AUPRC / recall@10%."""
    rows = []
    for mode, frame in detection.groupby("noise_mode", sort=False):
        table = frame.set_index(["detector", "seed"])
        if "combined" not in table.index.get_level_values(0):
            continue
        mine = table.loc["combined"]
        for rival in HEAD_TO_HEAD:
            if rival not in table.index.get_level_values(0):
                continue
            theirs = table.loc[rival]
            row = {"noise_mode": mode, "rival": rival}
            for metric in ("auroc", "auprc", "recall@10%"):
                wins = int((mine[metric] > theirs.loc[mine.index, metric]).sum())
                row[metric] = f"{wins}/{len(mine)} (Δ {float((mine[metric] - theirs[metric]).mean()):+.3f})"
            rows.append(row)
    return pd.DataFrame(rows)


def markdown_summary(results: pd.DataFrame) -> str:
    parts = ["# Evaluation results", ""]
    if "experiment" not in results:
        return "\n".join(parts)
    detection = results[results["experiment"] == "detection"]
    if len(detection):
        seeds = detection["seed"].nunique()
        for mode, frame in detection.groupby("noise_mode", sort=False):
            table = _mean_std(frame, ["detector"], DETECTION_COLUMNS).sort_values("auroc", ascending=False)
            table["detector"] = [detector_label(d, bold=True) for d in table["detector"]]
            parts += [f"## Wrong-label detection, {mode} noise ({seeds} seeds, mean ± std)", "",
                      markdown_table(table, ".3f"), ""]
        if detection["detector"].isin(ORACLES).any():
            parts += ["The oracles are not detectors: fitted to the clean labels, they are what the model itself can "
                      "tell apart if every other label were clean (freeshap_dq.evaluation.oracles). A detector well "
                      "below them leaves wrong labels this model could find; one level with them has found about "
                      "what it can, and finding more takes a better model.", ""]
        head_to_head = _head_to_head(detection)
        if len(head_to_head):
            parts += ["## Combined vs each signal, paired by seed (seeds where combined is higher / all)", "",
                      markdown_table(head_to_head, ".3f"), ""]
    removal = results[results["experiment"] == "removal"]
    if len(removal):
        pivot = removal.groupby(["learner", "removed_from", "fraction_removed"])["accuracy"].mean().unstack()
        parts += ["## Data removal: test accuracy after removing a fraction (mean over settings)", "",
                  markdown_table(pivot.reset_index(), ".3f"), ""]
    selection = results[results["experiment"] == "selection"]
    if len(selection):
        pivot = selection.groupby(["learner", "ranking", "fraction_kept"])["accuracy"].mean().unstack()
        parts += ["## Data selection: test accuracy training on the top fraction (mean over settings)", "",
                  markdown_table(pivot.reset_index(), ".3f"), ""]
    robustness = results[results["experiment"] == "robustness"]
    if len(robustness):
        pivot = robustness.astype({"size": int}).pivot_table(index="size", columns="method",
                                                             values="pct_not_unanimous")
        parts += ["## Sign robustness: % of targets whose sign is not unanimous across resampled training sets",
                  "", markdown_table(pivot.reset_index(), ".1f"), ""]
    fidelity = results[results["experiment"] == "fidelity"]
    if "metric" in fidelity:
        exact = fidelity[fidelity["metric"].notna()].dropna(axis=1, how="all").drop(columns=["experiment"])
        parts += ["## Fidelity: FreeShap (TMC) vs exact Shapley on a small subset", "", markdown_table(exact, ".4g"), ""]
    if "learner" in fidelity:
        learners = fidelity[fidelity["learner"].notna()][["learner", "accuracy"]]
        parts += ["## Fidelity: clean-label test accuracy of the eNTK kernel regression vs a trained head", "",
                  markdown_table(learners, ".3f"), ""]
    return "\n".join(parts)


def curve_styles(count: int) -> list[tuple[str, str]]:
    """(colour, line style) for ``count`` curves, no two alike: the ten tab10 colours, solid, then dashed, then
    dotted (matplotlib's default cycle repeats its colours after ten, and a detection plot has twelve curves)."""
    styles = ("-", "--", ":", "-.")
    if count > 10 * len(styles):
        raise ValueError(f"{count} curves are more than {10 * len(styles)} distinct styles")
    return [(f"C{i % 10}", styles[i // 10]) for i in range(count)]


def save_plots(results: pd.DataFrame, plots: dict, output_dir: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []

    def save(fig, name: str) -> None:
        with atomic_write(output_dir / name) as tmp:
            fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
        plt.close(fig)
        written.append(name)

    if "detection" in plots:
        mode, seed, curves = plots["detection"]
        fig, ax = plt.subplots(figsize=(6, 4.5))
        for (name, (x, y)), (color, style) in zip(curves.items(), curve_styles(len(curves)), strict=True):
            oracle = name in ORACLES
            ax.plot(x, y, label=detector_label(name), color=color, ls=":" if oracle else style,
                    lw=2.2 if name in ("combined", "freeshap_ce") else 1.2)
        ax.plot([0, 1], [0, 1], "k:", lw=0.8)
        ax.set(xlim=(0, 0.5), xlabel="fraction of the training set inspected (most suspicious first)",
               ylabel="share of wrong labels found", title=f"Wrong-label detection ({mode} noise, seed {seed})")
        ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5))  # 14 entries would cover the curves
        save(fig, "detection.png")
    for experiment, x, group in (("removal", "fraction_removed", "removed_from"),
                                 ("selection", "fraction_kept", "ranking")):
        frame = results[results["experiment"] == experiment]
        if not len(frame):
            continue
        learners = list(frame["learner"].unique())
        fig, axes = plt.subplots(1, len(learners), figsize=(5.5 * len(learners), 4), squeeze=False)
        for ax, learner in zip(axes[0], learners, strict=True):
            mean = frame[frame["learner"] == learner].groupby([group, x])["accuracy"].mean().unstack(0)
            mean.plot(ax=ax, marker="o")
            ax.set(title=learner, xlabel=x.replace("_", " "), ylabel="test accuracy")
        save(fig, f"{experiment}.png")
    frame = results[results["experiment"] == "robustness"]
    if len(frame):
        fig, ax = plt.subplots(figsize=(5, 4))
        frame.pivot_table(index="size", columns="method", values="pct_not_unanimous").plot.bar(ax=ax)
        ax.set(ylabel="% targets with non-unanimous sign", xlabel="training-set size")
        save(fig, "robustness.png")
    return written


