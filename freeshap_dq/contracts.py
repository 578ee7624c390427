"""The extension points, as declared contracts (``typing.Protocol``).

- :class:`ValuationProblem`: what a valuation reads of a kernel problem. Implemented by
  :class:`~freeshap_dq.kernels.problem.KernelProblem` (the whole kernel, in memory or a memory-mapped kernel
  folder) and :class:`~freeshap_dq.kernels.landmarks.LandmarkKernel` (only r Nystrom columns).
- :class:`Utility`: the kernel-regression utility an engine evaluates prefixes of. Implemented by
  :class:`~freeshap_dq.valuation.utility.KernelRegressionUtility` (the whole kernel on the device) and
  :class:`~freeshap_dq.valuation.feature_utility.FeatureSpaceUtility` (Nystrom features only).
- :class:`Engine`: the marginals of every element of a batch of permutations. Implemented by
  :class:`~freeshap_dq.valuation.prefix_engine.PrefixEngine` (exact) and
  :class:`~freeshap_dq.valuation.lowrank_engine.LowRankPrefixEngine` (rank r).
- :class:`ModelAdapter`: a language model seen as a function from tokenised text to C class logits, whose
  eNTK :mod:`freeshap_dq.ntk` computes. Implemented by the adapters of :mod:`freeshap_dq.ntk.adapters`.

Code that consumes these reads only the members declared here: kinds are told apart by these members
(``landmark_rank``, ``features``, ``word_table_name``), never by ``isinstance`` or attribute sniffing.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np

if TYPE_CHECKING:
    import torch
    from torch import nn

    from freeshap_dq.kernels.nystrom import LowRankKernel
    from freeshap_dq.valuation.prefix_engine import PermutationMarginals
    from freeshap_dq.valuation.ridge import RidgeChoice

PointSink = Callable[[int, "torch.Tensor", "torch.Tensor"], None]


@runtime_checkable
class ValuationProblem(Protocol):
    """Labelled train and test examples and their kernel (or the part of it that is stored)."""

    y_train: np.ndarray  # (n,) class indices 0..C-1
    y_test: np.ndarray  # (m,)
    label_names: tuple[str, ...]
    train_ids: np.ndarray | None
    test_ids: np.ndarray | None
    source: str  # where it was loaded from, for messages

    @property
    def n_train(self) -> int: ...

    @property
    def n_test(self) -> int: ...

    @property
    def n_classes(self) -> int: ...

    @property
    def per_class(self) -> bool:
        """True for one kernel per class (C x n x n)."""

    @property
    def on_disk(self) -> bool:
        """True when the kernel is memory-mapped from a folder (read in blocks, never whole)."""

    @property
    def landmark_rank(self) -> int | None:
        """None when the whole kernel is stored; r when only r Nystrom landmark columns are."""

    def fingerprint(self) -> str: ...

    def diagonal(self) -> np.ndarray: ...

    def mean_diag(self) -> float: ...


@runtime_checkable
class Utility(Protocol):
    """U(S) = (mean accuracy, mean -cross-entropy) of kernel regression fitted on S; tensors on ``device``."""

    problem: ValuationProblem
    device: torch.device
    y_test: torch.Tensor  # (m,)
    targets: torch.Tensor  # (n, C) one-vs-rest 0/1 targets
    n_classes: int
    ridge: float  # in scaled-kernel units
    ridge_choice: RidgeChoice
    empty_point: tuple[torch.Tensor, torch.Tensor]  # per-test-point (accuracy, -CE) of the empty coalition
    full_point: tuple[torch.Tensor, torch.Tensor]  # ... of the whole training set

    @property
    def features(self) -> LowRankKernel | None:
        """The utility's own Nystrom features when it lives in feature space, else None."""

    @property
    def full(self) -> tuple[float, float]: ...

    @property
    def empty(self) -> tuple[float, float]: ...


@runtime_checkable
class Engine(Protocol):
    """Marginals of every position of each permutation in a batch, with the utility's truncation rule."""

    def run(self, perms: torch.Tensor, point_sink: PointSink | None = None) -> PermutationMarginals: ...

    def manifest_entries(self) -> dict[str, Any]:
        """What the run's manifest records about this engine (e.g. the low-rank set-up); {} for none."""


@runtime_checkable
class ModelAdapter(Protocol):
    """A language model as a function of tokenised text: logits (batch, C) from the head ``head``.

    The eNTK builders call, in this order: ``set_trainable(names)`` (which parameters the kernel differentiates),
    ``tokenize``, ``prefix(batch)`` (the frozen bottom, computed once without gradients), then
    ``forward(prefix, mask, word_vectors)`` per example block. ``word_table_name`` names the embedding table
    whose share of the kernel is summed sparsely when it is trainable (None: no such table).
    """

    adapter_name: str
    tokenizer: Any
    head: nn.Linear  # C output rows
    first_trainable_layer: int  # -1 = embeddings trainable (nothing cached)
    lora_rank: int  # 0 = no LoRA
    position_limit: int | None  # the most tokens the model reads (None: no declared limit)
    vmap_compatible: bool  # forward can run under torch.func.vmap (else per-example gradients loop over examples)

    @property
    def n_layers(self) -> int: ...

    @property
    def word_table_name(self) -> str | None: ...

    def tokenize(self, texts: list[str], pairs: list[str] | None = None) -> list[dict]: ...

    def set_trainable(self, names: set[str]) -> None: ...

    def parameter_groups(self) -> dict[str, list[str]]: ...

    def prefix(self, batch: dict[str, torch.Tensor]) -> torch.Tensor: ...

    def forward(self, prefix: torch.Tensor, mask: torch.Tensor,
                word_vectors: torch.Tensor | None = None) -> torch.Tensor: ...

    def lookup(self, ids: torch.Tensor) -> torch.Tensor: ...

    def named_parameters(self): ...

    def named_modules(self): ...

    def get_submodule(self, target: str) -> nn.Module: ...

    def to(self, device: torch.device) -> ModelAdapter: ...
