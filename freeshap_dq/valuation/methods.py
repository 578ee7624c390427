"""The valuation methods: one registry entry each (``config.method`` -> how it is computed and named).

- ``tmc``: Monte-Carlo Shapley over permutations (truncated when ``tolerance`` > 0);
- ``beta`` / ``banzhaf``: the same permutations, each marginal weighted by the semivalue's n p(s)
  (:mod:`freeshap_dq.valuation.semivalues`);
- ``exact``: every subset enumerated (n <= 16);
- ``loo``: closed-form leave-one-out from one factorisation.

Permutation methods can be valued on a landmark kernel and on Ray; the others need the whole kernel.
A new method is an entry here plus its branch in :func:`freeshap_dq.valuation.run.compute_values`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from freeshap_dq.config import METHODS, ValuationConfig
from freeshap_dq.valuation.semivalues import banzhaf_probabilities, beta_probabilities


@dataclass(frozen=True)
class Method:
    name: str
    describe: Callable[[ValuationConfig], str]  # the result's method name
    permutations: bool  # sampled over permutations (mergeable, resumable, spreadable on Ray)
    coalition_probabilities: Callable[[ValuationConfig, int], np.ndarray] | None = None  # semivalue p(s); None = Shapley


REGISTRY: dict[str, Method] = {method.name: method for method in (
    Method("tmc", lambda config: "tmc-shapley", permutations=True),
    Method("beta", lambda config: f"beta({config.beta_alpha:g},{config.beta_beta:g})-shapley", permutations=True,
           coalition_probabilities=lambda config, n: beta_probabilities(n, config.beta_alpha, config.beta_beta)),
    Method("banzhaf", lambda config: "banzhaf", permutations=True,
           coalition_probabilities=lambda config, n: banzhaf_probabilities(n)),
    Method("exact", lambda config: "exact-shapley", permutations=False),
    Method("loo", lambda config: "leave-one-out", permutations=False),
)}
assert set(REGISTRY) == set(METHODS), "config.METHODS and the registry must name the same methods"
PERMUTATION_METHODS = tuple(name for name in METHODS if REGISTRY[name].permutations)


def method_name(config: ValuationConfig) -> str:
    return REGISTRY[config.method].describe(config)


def samples_permutations(config: ValuationConfig) -> bool:
    return REGISTRY[config.method].permutations


def coalition_size_probabilities(config: ValuationConfig, n: int) -> np.ndarray | None:
    """The semivalue's p(s) for importance-weighting permutation marginals; None for plain Shapley."""
    probabilities = REGISTRY[config.method].coalition_probabilities
    return None if probabilities is None else probabilities(config, n)
