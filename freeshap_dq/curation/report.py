"""A summary of a valuation: text for the terminal, and one self-contained HTML file with plots.

Sections: the run (method, permutations, ridge, utilities), the value distribution (both
utilities), the most harmful and most helpful examples (with text and label when the data is
given), a per-class breakdown, and convergence diagnostics (standard errors relative to the
values' spread, how many values are confidently non-zero, truncation). Plots are PNGs made with
matplotlib (Agg backend) and embedded as base64, so the file can be mailed or attached as is.
"""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path

import numpy as np
import pandas as pd

from freeshap_dq.data.tables import TextDataset
from freeshap_dq.io import atomic_write
from freeshap_dq.result import ValuationResult
from freeshap_dq.scores import DEFAULT_METRIC, DEFAULT_Z, confidently_harmful, confidently_helpful


def summary_table(result: ValuationResult, data: TextDataset | None = None,
                  flipped: np.ndarray | None = None, owner: str = "the result") -> pd.DataFrame:
    """The values table with the training data's ids, labels and texts, joined by example id (see
    :meth:`ValuationResult.align`); ``flipped`` in the result's order."""
    df = result.to_dataframe()
    if data is not None:
        data = result.align(data, "training", owner)
        df["example_id"] = data.ids
        df["label"] = data.labels
        df["text"] = data.texts
    if flipped is not None:
        df["flipped"] = flipped
    return df


def diagnostics(result: ValuationResult, metric: str = DEFAULT_METRIC) -> dict[str, float]:
    values, se = result.values(metric), result.stderr(metric)
    spread = float(np.std(values)) or 1.0
    finite = np.isfinite(se)
    out = {"permutations": result.count,
           "median_stderr_over_spread": float(np.median(se[finite]) / spread) if finite.any() else float("nan"),
           "confidently_harmful": int(confidently_harmful(values, se).sum()),
           "confidently_helpful": int(confidently_helpful(values, se).sum())}
    out.update(result.truncation_summary())
    return out


DIAGNOSTIC_NAMES = {
    "permutations": "Permutations",
    "median_stderr_over_spread": "Median standard error / spread of the values (lower = better converged)",
    "confidently_harmful": f"Confidently harmful (value + {DEFAULT_Z} × stderr < 0)",
    "confidently_helpful": f"Confidently helpful (value − {DEFAULT_Z} × stderr > 0)",
    "mean_fraction_evaluated": "Mean fraction of each permutation evaluated (truncation)",
    "min_fraction_evaluated": "Smallest fraction of a permutation evaluated",
    "truncated_permutations": "Permutations cut short by truncation",
}


def diagnostics_table(result: ValuationResult) -> pd.DataFrame:
    """The diagnostics in words, one per row (the report's table)."""
    return pd.DataFrame([{"diagnostic": DIAGNOSTIC_NAMES.get(key, key), "value": value}
                         for key, value in diagnostics(result).items()])


def text_report(result: ValuationResult, df: pd.DataFrame, top: int = 10) -> str:
    man = result.manifest
    lines = [f"FreeShap report — {result.method}, {result.count} permutation(s), n_train={result.n_train}, "
             f"n_test={man.get('n_test')}",
             f"ridge {man.get('ridge', float('nan')):.4g} ({man.get('ridge_mode')}); "
             f"U(N) accuracy {man.get('utility_full', {}).get('accuracy', float('nan')):.4f}, "
             f"-CE {man.get('utility_full', {}).get('ce', float('nan')):.4f}"]
    diag = diagnostics(result)
    lines.append(f"convergence: median stderr / spread of values = {diag['median_stderr_over_spread']:.2f}; "
                 f"{diag['confidently_harmful']} confidently harmful, {diag['confidently_helpful']} confidently helpful")
    cols = [c for c in ("example_id", "label", "value_ce", "stderr_ce", "value", "flipped", "text") if c in df]
    for title, part in (("Most harmful (lowest -CE value)", df.nsmallest(top, "value_ce")),
                        ("Most helpful", df.nlargest(top, "value_ce"))):
        shown = part[cols].copy()
        if "text" in shown:
            shown["text"] = shown["text"].str.slice(0, 70)
        lines += ["", title + ":", shown.to_string(index=False)]
    if "label" in df:
        lines += ["", "Per class:", _per_class(df).to_string()]
    return "\n".join(lines) + "\n"


def _per_class(df: pd.DataFrame) -> pd.DataFrame:
    return df.groupby("label").agg(examples=("value_ce", "size"), mean_value_ce=("value_ce", "mean"),
                                   harmful=("value_ce", lambda v: int((v < 0).sum())),
                                   mean_value_accuracy=("value", "mean"))


def html_report(result: ValuationResult, df: pd.DataFrame, path: str | Path, top: int = 20) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    images = []
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.4))
    for ax, (col, title) in zip(axes, (("value_ce", "−cross-entropy utility"), ("value", "accuracy utility")), strict=True):
        ax.hist(df[col], bins=40, color="#4477aa")
        ax.axvline(0, color="black", lw=0.8)
        ax.set_title(f"Values ({title})")
        ax.set_xlabel("value (negative = harmful)")
    images.append(("Value distribution", _png(fig, plt)))
    if "label" in df:
        fig, ax = plt.subplots(figsize=(6, 3.4))
        labels = sorted(df["label"].unique())
        ax.boxplot([df.loc[df["label"] == label, "value_ce"] for label in labels], tick_labels=labels)
        ax.axhline(0, color="black", lw=0.8)
        ax.set_title("Values by class (−CE utility)")
        by_class = _png(fig, plt)
    fig, ax = plt.subplots(figsize=(6, 3.4))
    ax.scatter(df["value_ce"], df["stderr_ce"], s=6, alpha=0.6, c=df["flipped"] if "flipped" in df else "#4477aa")
    ax.plot(*_band(df), color="#cc6677", lw=1, label=f"|value| = {DEFAULT_Z} × stderr")
    ax.set_xlabel("value (−CE)")
    ax.set_ylabel("standard error")
    ax.set_title("Convergence: which values are distinguishable from 0"
                 + (" (yellow = flipped label)" if "flipped" in df else ""), fontsize=10)
    ax.legend(loc="upper right", fontsize=8)
    images.append(("Convergence", _png(fig, plt)))

    cols = [c for c in ("example_id", "label", "value_ce", "stderr_ce", "value", "flipped", "text") if c in df]
    body = [f"<h1>FreeShap report</h1><p>{html.escape(result.method)} · {result.count} permutation(s) · "
            f"n_train = {result.n_train} · n_test = {result.manifest.get('n_test')} · ridge "
            f"{result.manifest.get('ridge', float('nan')):.4g} ({html.escape(str(result.manifest.get('ridge_mode')))})</p>",
            "<h2>Diagnostics</h2>" + _table(diagnostics_table(result))]
    for title, data in images:
        body.append(f"<h2>{title}</h2><img alt='{title}' src='data:image/png;base64,{data}'>")
    body.append("<h2>Most harmful</h2>" + _table(df.nsmallest(top, "value_ce")[cols]))
    body.append("<h2>Most helpful</h2>" + _table(df.nlargest(top, "value_ce")[cols]))
    if "label" in df:
        body.append(f"<h2>Per class</h2><img alt='Values by class' src='data:image/png;base64,{by_class}'>"
                    + _table(_per_class(df).reset_index()))
    page = ("<!doctype html><html><head><meta charset='utf-8'><title>FreeShap report</title><style>"
            "body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}"
            "table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ccc;padding:3px 6px;text-align:left}"
            "img{max-width:100%}</style></head><body>" + "\n".join(body) + "</body></html>\n")
    with atomic_write(path) as tmp:
        Path(tmp).write_text(page, encoding="utf-8")


def _band(df: pd.DataFrame):
    top = float(df["stderr_ce"].max()) if len(df) else 1.0
    se = np.linspace(0, top if np.isfinite(top) else 1.0, 50)
    return np.concatenate([-DEFAULT_Z * se[::-1], DEFAULT_Z * se]), np.concatenate([se[::-1], se])


def _png(fig, plt) -> str:
    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png", dpi=90)
    plt.close(fig)
    return base64.b64encode(buffer.getvalue()).decode()


def _table(df: pd.DataFrame) -> str:
    return df.to_html(index=False, escape=True, float_format=lambda v: f"{v:.4g}", border=0)
