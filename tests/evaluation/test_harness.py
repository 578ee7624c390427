"""A tiny end-to-end run of every experiment on a tiny model, so the harness cannot rot."""

import json

import numpy as np
import pandas as pd
import pytest
import torch
from click.testing import CliRunner

from freeshap_dq.cli.main import cli
from freeshap_dq.errors import InputError
from freeshap_dq.evaluation import EvaluationConfig
from freeshap_dq.evaluation.harness import EVALUATION_PRECISION, EVALUATION_SKETCH
from freeshap_dq.ntk.precision import resolve_precision

WORDS = {"pos": ["good", "great", "fine"], "neg": ["bad", "awful", "poor"]}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("eval-data")
    rng = np.random.default_rng(0)
    for name, n in (("train", 40), ("test", 20)):
        labels = np.array(["pos", "neg"] * (n // 2))
        texts = [" ".join(list(rng.choice(WORDS[label], 2)) + ["movie", "plot"]) for label in labels]
        pd.DataFrame({"id": [f"{name}{i}" for i in range(n)], "text": texts, "label": labels}).to_csv(
            d / f"{name}.csv", index=False)
    return d


def test_every_experiment_end_to_end(data_dir, tiny_bert_path, tmp_path):
    out = tmp_path / "eval"
    res = CliRunner().invoke(cli, ["evaluate", "--train", str(data_dir / "train.csv"), "--test",
                                   str(data_dir / "test.csv"), "--model", str(tiny_bert_path), "--trainable",
                                   "head-only", "--seeds", "0", "--noise-modes", "symmetric", "--permutations", "20",
                                   "--robustness-sizes", "15,30", "--robustness-resamples", "2",
                                   "--robustness-targets", "4", "-o", str(out)])
    assert res.exit_code == 0, res.output
    results = pd.read_csv(out / "results.csv")
    assert set(results["experiment"]) == {"detection", "removal", "selection", "robustness", "fidelity"}
    detectors = set(results.loc[results["experiment"] == "detection", "detector"])
    assert {"freeshap_ce", "loo", "beta_shapley", "self_confidence", "combined", "random"} <= detectors
    assert {"cl_logreg_tuned", "cl_kernel_cv", "knn_shapley"} <= detectors  # cleanlab is in the dev extra
    assert {"oracle_kernel", "oracle_logreg"} <= detectors
    scores = pd.read_parquet(out / "suspicions.parquet")
    assert {"oracle_kernel", "oracle_logreg"} <= set(scores.columns)
    assert scores["flipped"].any() and (scores["given_label"] != scores["clean_label"]).equals(scores["flipped"])
    assert results.loc[results["experiment"] == "detection", "auroc"].between(0, 1).all()
    assert set(results.loc[results["experiment"] == "removal", "learner"]) == {"kernel_regression",
                                                                               "logreg_embeddings"}
    for name in ("results.md", "detection.png", "removal.png", "selection.png", "robustness.png", "manifest.json"):
        assert (out / name).stat().st_size > 0, name
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["config"]["seeds"] == "0" and manifest["n_train"] == 40
    summary = (out / "results.md").read_text()
    assert "## Wrong-label detection, symmetric noise" in summary
    assert "| oracle_kernel (oracle: reads the clean labels) |" in summary


def test_kernel_mode_is_honoured_with_a_fitted_head_over_three_classes(tmp_path, tiny_bert_path):
    """--kernel-mode auto is the sum over the classes' logits for a fitted head and C > 2; class0 and per-class (one
    kernel per class, which every detector reads) are asked for."""
    rng = np.random.default_rng(1)
    words = {"pos": ["good", "great"], "neg": ["bad", "awful"], "mid": ["fine", "poor"]}
    for name, n in (("train", 36), ("test", 12)):
        labels = np.array(list(words) * (n // 3))
        texts = [" ".join(list(rng.choice(words[label], 2)) + ["movie"]) for label in labels]
        pd.DataFrame({"id": [f"{name}{i}" for i in range(n)], "text": texts, "label": labels}).to_csv(
            tmp_path / f"{name}.csv", index=False)
    kernels = {}
    for mode in ("auto", "class0", "per-class"):
        out = tmp_path / mode
        res = CliRunner().invoke(cli, ["evaluate", "--train", str(tmp_path / "train.csv"), "--test",
                                       str(tmp_path / "test.csv"), "--model", str(tiny_bert_path), "--trainable",
                                       "top:1", "--kernel-mode", mode, "--seeds", "0", "--noise-modes", "symmetric",
                                       "--permutations", "10", "--experiments", "detection", "-o", str(out)])
        assert res.exit_code == 0, res.output
        manifest = json.loads((out / "manifest.json").read_text())
        assert manifest["config"]["kernel"] == mode
        assert manifest["kernel"]["sketch"] == EVALUATION_SKETCH  # evaluate's own default (value's is exact)
        passes = resolve_precision(EVALUATION_PRECISION, torch.device("cpu"))  # auto: bf16 where it is native
        assert manifest["kernel"].get("precision", "fp32") == passes
        assert manifest["kernel"]["gradient_dtype"] == {"fp32": "float32", "bf16": "bfloat16"}[passes]
        kernels[mode] = [setting["kernel"] for setting in manifest["setting_kernels"]]
    assert kernels == {"auto": ["sum"], "class0": ["class0"], "per-class": ["per-class"]}
    detection = pd.read_csv(tmp_path / "per-class" / "results.csv").query("experiment == 'detection'")
    assert {"freeshap_ce", "loo", "self_confidence", "cv_kernel", "combined"} <= set(detection["detector"])


@pytest.mark.parametrize("kwargs, message", [
    ({"kernel": "per_class"}, "kernel 'per_class' is unknown; choose one of auto, class0, sum, per-class"),
    ({"experiments": "detection,speed"}, "speed"),
    ({"noise_modes": "pairwise"}, "pairwise"),
    ({"train": "a.csv"}, "both --train and --test"),
    ({"noise": 0.6}, "--noise"),
    ({"seeds": "0,x"}, "--seeds"),
])
def test_bad_configs(kwargs, message):
    with pytest.raises(InputError, match=message):
        EvaluationConfig(**kwargs)
