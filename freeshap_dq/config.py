"""Typed configuration of a valuation run.

Every field has a default and help text; the CLI maps fields to options and every artifact
stores ``asdict(config)`` in its manifest so a run can be reproduced. A field's metadata declares,
once, what the rest derives: its ``choices`` (the CLI's choices and :func:`check_choices`) and whether
it ``changes_values`` (the resume keys of a checkpoint, the kernel cache key of an eNTK).

Ridge (``ridge``), in the units of the kernel after ``kernel_scale`` is applied:
- ``"auto"`` (default): the value on a grid ``mean(diag K) * 10^(k/2)``, k = -6..4, with the
  lowest closed-form leave-one-out squared error on the *training* labels (test labels are never
  used);
- ``"rel:X"``: ``X * mean(diag K)``;
- a number: that absolute value.
The ``paper`` preset reproduces the reference: K / 1e4 and ridge 1e-6, which equals the raw
kernel with ridge 1e-2.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from freeshap_dq.errors import InputError

METHODS = ("tmc", "exact", "loo", "beta", "banzhaf")
EMPTY_UTILITIES = ("random", "zero")
METRICS = ("accuracy", "ce")
# The shipped detector: every tool ranks by FreeShap with this utility (on the default eNTK, a fitted encoder
# head); docs/evaluation.md measures it against the other detectors and tuned cleanlab.
RANKING_METRIC = "ce"
LOW_RANK_METHODS = ("nystrom", "eigen")


def option(default: Any, help: str, *, choices: tuple[str, ...] | None = None, changes_values: bool = True,
           recorded_when_set: bool = False) -> Any:
    """A dataclass field with a default and help text (the CLI turns it into an option).

    ``choices``: the allowed values; ``changes_values``: False for how long, how fast, where and in how much
    memory a computation runs (permutation count, stopping, batching, device, memory budget) — what a resumed
    run or a reused kernel may differ in. Every other field must match for a checkpoint or cache to be used.
    ``recorded_when_set``: a value field added after artifacts were written: manifests (and the keys hashed from
    them) hold it only when it differs from its default, so the artifacts written before it stay valid."""
    return field(default=default, metadata={"help": help, "choices": choices, "changes_values": changes_values,
                                            "recorded_when_set": recorded_when_set})


def field_choices(config_class: type) -> dict[str, tuple[str, ...]]:
    """Field name -> allowed values, for the fields that declare them."""
    return {f.name: f.metadata["choices"] for f in dataclasses.fields(config_class) if f.metadata.get("choices")}


def value_fields(config_class: type) -> tuple[str, ...]:
    """The fields whose values can change the result (declared with ``changes_values``)."""
    return tuple(f.name for f in dataclasses.fields(config_class) if f.metadata.get("changes_values", True))


def recorded_fields(config: Any) -> dict[str, Any]:
    """The value fields of ``config`` a manifest records: every one, except a ``recorded_when_set`` field at its
    default."""
    fields = {f.name: f for f in dataclasses.fields(config)}
    return {name: getattr(config, name) for name in value_fields(type(config))
            if not (fields[name].metadata.get("recorded_when_set") and getattr(config, name) == fields[name].default)}


def check_choices(config: Any) -> None:
    """Refuse a field value outside its declared choices, naming them."""
    for name, choices in field_choices(type(config)).items():
        value = getattr(config, name)
        if value not in choices:
            raise InputError(f"{name} {value!r} is unknown; choose one of {', '.join(choices)}.")


@dataclass
class ValuationConfig:
    method: str = option("tmc", "tmc: truncated Monte-Carlo Shapley; exact: subset enumeration (n <= 16); "
                                "loo: closed-form leave-one-out; beta: Beta(alpha, beta) Shapley and banzhaf: "
                                "Banzhaf value, both from the same permutations by importance weights.",
                         choices=METHODS)
    permutations: int = option(200, "Number of permutations T (tmc, beta).", changes_values=False)
    tolerance: float = option(0.0, "Truncation tolerance: stop a permutation when |U(S)-U(N)| <= tol*|U(N)-U(empty)| "
                            "on both metrics for two consecutive prefixes. 0 = no truncation (plain Monte-Carlo).")
    ridge: str = option("auto", "Ridge lambda: 'auto' (leave-one-out on training labels), 'rel:X' (X*mean diag K) "
                      "or an absolute number in the kernel's units (after kernel_scale).")
    kernel_scale: float = option(1.0, "Multiply the kernel by this before adding the ridge (the paper uses 1e-4).")
    jitter: float = option(0.0, "Add jitter*mean(diag K) to the train kernel's diagonal to repair a kernel that is "
                         "not positive semidefinite (e.g. fp32 accumulation error).")
    empty_utility: str = option("random", "Utility of the empty set: 'random' = (-ln C, 1/C) as in the paper; "
                                          "'zero' = the all-zero predictor.", choices=EMPTY_UTILITIES)
    rank_metric: str = option(RANKING_METRIC, "Utility that ranks harm downstream: 'ce' (-cross-entropy, default: finds flipped "
                                    "labels far better) or 'accuracy' (the paper's primary score).",
                              choices=("ce", "accuracy"), changes_values=False)
    per_point: bool = option(False, "Also keep one value per (training example, test example): n x m per metric.")
    seed: int = option(0, "Seed; permutation i is drawn from (seed, i), so runs are reproducible and mergeable.")
    start: int = option(0, "Index of the first permutation (to split one long run into mergeable parts).")
    beta_alpha: float = option(16.0, "alpha of Beta Shapley (method beta); Beta(16,1) stresses small subsets.")
    beta_beta: float = option(1.0, "beta of Beta Shapley (method beta).")
    device: str = option("auto", "auto (CUDA when present), cpu, cuda or cuda:N.", changes_values=False)
    block_size: int = option(128, "Rows appended per step of the blocked Cholesky when truncating.")
    batch_size: int = option(0, "Permutations factorised together (batched Cholesky); 0 = auto (1 on CPU).",
                             changes_values=False)
    max_seconds: float = option(0.0, "Stop after this many seconds (0 = no limit); values stay valid.",
                                changes_values=False)
    stderr_target: float = option(0.0, "Stop when the largest standard error of the ranking metric is below this "
                                       "(0 = off).", changes_values=False)
    checkpoint_every: int = option(10, "Write a checkpoint every this many permutations when a checkpoint dir is set.",
                                   changes_values=False)
    low_rank: int = option(0, "Rank r of a low-rank kernel for large n (0 = exact engine): every prefix from r x r "
                              "updates, O(n (r^2 + m r)) per permutation instead of O(n^3).")
    low_rank_method: str = option("nystrom", "Low-rank features: nystrom (r random landmark columns) or eigen "
                                             "(top-r eigenpairs; exact at r = n).", choices=LOW_RANK_METHODS)
    reduce_every: int = option(32, "Permutations summed from zero into one partial sum, which is then added to the "
                                   "totals (groups aligned to the permutation index). Distributed workers compute "
                                   "whole groups, so their merged result is bit-identical to one process.")

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        check_choices(self)
        if self.permutations < 1:
            raise InputError(f"permutations must be at least 1, got {self.permutations}.")
        if not 0.0 <= self.tolerance < 1.0:
            raise InputError(f"tolerance must be in [0, 1), got {self.tolerance}.")
        if self.kernel_scale <= 0:
            raise InputError(f"kernel_scale must be positive, got {self.kernel_scale}.")
        if self.jitter < 0:
            raise InputError(f"jitter must be >= 0, got {self.jitter}.")
        if self.beta_alpha <= 0 or self.beta_beta <= 0:
            raise InputError("beta_alpha and beta_beta must be positive.")
        if self.low_rank < 0:
            raise InputError(f"low_rank must be >= 0, got {self.low_rank}.")
        if self.reduce_every < 1:
            raise InputError(f"reduce_every must be at least 1, got {self.reduce_every}.")
        if self.seed < 0:
            raise InputError(f"seed must be >= 0, got {self.seed}.")
        for name in ("max_seconds", "stderr_target"):
            value = getattr(self, name)
            if not (value >= 0 and math.isfinite(value)):
                raise InputError(f"{name} must be a finite number >= 0 (0 = off), got {value}.")
        if self.block_size < 1 or self.batch_size < 0 or self.checkpoint_every < 1 or self.start < 0:
            raise InputError("block_size and checkpoint_every must be >= 1, batch_size and start >= 0.")
        parse_ridge(self.ridge)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ValuationConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> ValuationConfig:
        if name not in PRESETS:
            raise InputError(f"preset {name!r} is unknown; choose one of {', '.join(PRESETS)}.")
        return cls(**{**PRESETS[name], **overrides})


VALUE_FIELDS = value_fields(ValuationConfig)  # a checkpoint resumes only when these all match

PRESETS: dict[str, dict[str, Any]] = {
    "default": {},
    "paper": {"permutations": 200, "tolerance": 0.05, "kernel_scale": 1e-4, "ridge": "1e-6",
              "empty_utility": "random", "rank_metric": "accuracy"},
}


def parse_ridge(spec: str | float) -> tuple[str, float]:
    """Return ("auto", 0) | ("relative", x) | ("absolute", x)."""
    if isinstance(spec, (int, float)):
        value, kind = float(spec), "absolute"
    else:
        text = str(spec).strip().lower()
        if text == "auto":
            return "auto", 0.0
        kind = "relative" if text.startswith("rel:") else "absolute"
        try:
            value = float(text[4:] if kind == "relative" else text)
        except ValueError:
            raise InputError(f"ridge {spec!r} is not understood; use 'auto', 'rel:10' or a number such as "
                             f"0.01.") from None
    if not value > 0 or value != value or value == float("inf"):
        raise InputError(f"ridge must be a positive finite number, got {spec!r}.")
    return kind, value
