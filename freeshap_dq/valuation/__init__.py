"""Valuation: from a kernel problem and a configuration to values.

set-up (refusals, utility, engine) -> run loop (permutations, stopping, checkpoints, accumulator) -> result.
The utility is kernel regression (:mod:`.utility`, or :mod:`.feature_utility` in Nystrom feature space); the
engines value every prefix of a permutation at once (:mod:`.prefix_engine` exact, :mod:`.lowrank_engine` rank r).
"""
