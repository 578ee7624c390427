"""Evaluation harness: does FreeShap find the bad data better than what a team already has?

``metrics`` (detection scores), ``noise`` (seeded label flips), ``detectors`` (FreeShap and the
baselines that need no extra package), ``experiments`` (detection, removal, selection, sign
robustness, fidelity) and ``harness`` (one seeded run that writes tables, plots and a manifest).
"""

from freeshap_dq.evaluation.harness import EvaluationConfig, run_evaluation  # noqa: F401
