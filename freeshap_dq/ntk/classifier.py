"""A team's own fine-tuned classifier: the eNTK of the model's own logits.

``SequenceClassifier`` wraps any ``AutoModelForSequenceClassification`` checkpoint (BERT, RoBERTa, DistilBERT,
DeBERTa, ELECTRA, GPT-2, Llama-style decoders, ...): the logits are what the model itself computes, with its
own pooling (pooler, CLS, DistilBERT's pre-classifier, DeBERTa's context pooler, a decoder's last token) and
its own trained classification head, reordered to the data's classes by the model's ``id2label``. No layer
of the model is assumed: the model runs as it is, every example through every layer (nothing is cached), the
per-example gradients of linear, layer-norm, embedding and GPT-2 ``Conv1D`` parameters come from factors
(one batched backward; a trainable input embedding table's share summed token by token, ``word_table.py``),
and any other parameter's from a per-example loop (the transformers models' own
attention-mask code cannot run under ``torch.func.vmap``). ``--trainable`` keeps its meaning: ``head`` is
everything outside the model's base (its classifier), ``top:K`` the last K blocks of its block list.

**The frozen bottom is cached** when nothing trainable runs before the first trainable block (checked by
tracing the order in which the modules run): ``prefix`` runs the model once without gradients and keeps the
output of the last frozen block; ``forward`` runs the model again with the frozen blocks replaced by that
output, so only the top is computed with gradients. The replay is checked against a plain forward on the
first batch; where it differs (a model whose blocks pass more than the hidden states on), the cache is
switched off and the log says so.
"""

from __future__ import annotations

import contextlib
import inspect
import re
from collections.abc import Callable, Iterator

import torch
from torch import nn

from freeshap_dq.errors import InputError

GENERIC_LABEL = re.compile(r"LABEL_(\d+)")


def is_sequence_classifier(config) -> bool:
    """The checkpoint was saved with a sequence-classification head (its config says so)."""
    return any(str(a).endswith("ForSequenceClassification") for a in (getattr(config, "architectures", None) or []))


def class_order(config, label_names: tuple[str, ...], log: Callable[[str], None] = print) -> list[int]:
    """For each of the data's classes (sorted label names), the index of the model's logit for it: by name from
    ``config.id2label``; by index, with a warning, when the model's labels are the generic ``LABEL_i``."""
    id2label = {int(k): str(v) for k, v in (getattr(config, "id2label", None) or {}).items()}
    n_model = getattr(config, "num_labels", len(id2label))
    if n_model != len(label_names):
        raise InputError(f"the model has {n_model} output classes ({', '.join(id2label.values())}) but the data has "
                         f"{len(label_names)} ({', '.join(label_names)}); value data with the classes the model was "
                         f"trained on.")
    if all(GENERIC_LABEL.fullmatch(v) for v in id2label.values()):
        log(f"warning: the model's labels are generic ({', '.join(id2label[i] for i in sorted(id2label))}); mapping "
            f"them by index to the data's sorted labels {', '.join(label_names)}. Save the model with id2label to "
            f"map by name.")
        return list(range(len(label_names)))
    by_name = {label: index for index, label in id2label.items()}
    if set(by_name) != set(label_names):
        raise InputError(f"the model's labels ({', '.join(sorted(by_name))}) are not the data's labels "
                         f"({', '.join(label_names)}); relabel the data with the model's label names, or use the "
                         f"model that was trained on them.")
    return [by_name[label] for label in label_names]


def block_list(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The model's stack of transformer blocks: its largest ModuleList of modules of one kind."""
    candidates = [(name, module) for name, module in model.named_modules()
                  if isinstance(module, nn.ModuleList) and len(module) > 0
                  and len({type(child) for child in module}) == 1]
    if not candidates:
        raise InputError(f"{type(model).__name__} has no list of layers; --trainable top:K / freeze:K need one "
                         f"(head-only, all and regex:... still work).")
    return max(candidates, key=lambda item: sum(p.numel() for p in item[1].parameters()))


def classification_layer(model: nn.Module, n_classes: int, outside: str | None = None) -> str:
    """The name of the model's last ``Linear`` with ``n_classes`` outputs (not under ``outside``): its head."""
    heads = [name for name, m in model.named_modules() if isinstance(m, nn.Linear) and m.out_features == n_classes
             and not (outside and name.startswith(outside))]
    if not heads:
        where = f" outside {outside.rstrip('.')}" if outside else ""
        raise InputError(f"{type(model).__name__} has no classification layer (a Linear with {n_classes} outputs"
                         f"{where}) to read the logits from.")
    return heads[-1]


class SequenceClassifier(nn.Module):
    adapter_name = "sequence-classifier"
    lora_rank = 0
    vmap_compatible = False
    first_trainable_layer = -1  # nothing is cached: every example runs through the whole model

    def __init__(self, model: nn.Module, tokenizer, label_names: tuple[str, ...], max_length: int = 128,
                 log: Callable[[str], None] = print):
        super().__init__()
        self.log = log
        self.first_trainable_layer = -1
        self._replay_checked = False
        self._block_output_is_tuple = False
        self.model = model
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.class_order = class_order(model.config, label_names, log)
        base = getattr(model, "base_model_prefix", "") or ""
        if not base or not hasattr(model, base):
            raise InputError(f"{type(model).__name__} has no base model ({base!r}); is it a transformers "
                             f"sequence classifier?")
        self.base_prefix = f"model.{base}."
        layers_name, _ = block_list(getattr(model, base))
        self._layers_name = f"{base}.{layers_name}"  # not an attribute: a second path to the blocks would alias
        self.layers_prefix = f"model.{self._layers_name}."  # their parameters (functional_call restores only one)
        self._head_name = classification_layer(model, len(label_names), outside=f"{base}.")
        accepted = inspect.signature(model.forward).parameters
        self._token_types = "token_type_ids" in accepted and getattr(model.config, "type_vocab_size", 0) > 1
        self._use_cache_flag = "use_cache" in accepted
        if self.tokenizer.pad_token_id is None:
            pad = model.config.pad_token_id if model.config.pad_token_id is not None else self.tokenizer.eos_token_id
            if pad is None:
                raise InputError("the tokenizer has no padding token and the model names none; save the model with "
                                 "config.pad_token_id set.")
            self.tokenizer.pad_token_id = pad
            log(f"the tokenizer has no padding token: padding with token {pad} (the model's last-token scoring "
                f"skips it)")
        if model.config.pad_token_id is None:
            model.config.pad_token_id = self.tokenizer.pad_token_id
        limit = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None)
        self.position_limit = limit if isinstance(limit, int) else None

    @property
    def head(self) -> nn.Linear:
        """The model's final classification layer (C rows)."""
        return self.model.get_submodule(self._head_name)

    @property
    def word_table_name(self) -> str:
        """The input embedding table: its share of the kernel is summed token by token when it is trainable."""
        table = self.model.get_input_embeddings()
        return next(f"{name}.weight" for name, m in self.named_modules() if m is table)

    @property
    def layers(self) -> nn.ModuleList:
        return self.model.get_submodule(self._layers_name)

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    def tokenize(self, texts: list[str], pairs: list[str] | None = None) -> list[dict]:
        enc = self.tokenizer(texts, pairs, truncation=True, max_length=self.max_length)
        keys = ["input_ids"] + (["token_type_ids"] if self._token_types and "token_type_ids" in enc else [])
        return [{**{k: enc[k][i] for k in keys}, "read_at": -1} for i in range(len(texts))]

    def set_trainable(self, names: set[str]) -> None:
        """Cache the blocks below the first trainable one, when no trainable parameter runs before it."""
        blocks = [int(n[len(self.layers_prefix):].split(".", 1)[0]) for n in names if n.startswith(self.layers_prefix)]
        first = min(blocks) if blocks else self.n_layers
        self.first_trainable_layer = first if first > 0 and self._runs_after_block(first - 1, names) else -1
        self._replay_checked = False

    def _runs_after_block(self, block: int, names: set[str]) -> bool:
        """Every module holding a trainable parameter first runs after block ``block`` (traced on one example)."""
        order: dict[str, int] = {}
        modules = dict(self.named_modules())
        def first_call(name: str):
            def hook(module, args) -> None:  # records, changes nothing (a pre-hook's return value would)
                order.setdefault(name, len(order))
            return hook

        handles = [m.register_forward_pre_hook(first_call(name)) for name, m in modules.items()]
        try:
            example = self.tokenize(["a"])[0]
            ids = torch.tensor([example["input_ids"]], device=self.head.weight.device)
            with torch.no_grad():
                self._run(torch.stack([ids, torch.zeros_like(ids)], -1), torch.ones_like(ids))
        finally:
            for h in handles:
                h.remove()
        boundary = order.get(f"model.{self._layers_name}.{block}")
        owners = {n.rpartition(".")[0] for n in names}
        return boundary is not None and all(order.get(owner, -1) > boundary for owner in owners)

    @torch.no_grad()
    def prefix(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The ids and token types, and (with a cached bottom) the last frozen block's output beside them."""
        ids = batch["input_ids"]
        plain = torch.stack([ids, batch.get("token_type_ids", torch.zeros_like(ids))], -1)
        if self.first_trainable_layer <= 0:
            return plain
        mask = batch["attention_mask"]
        captured = []
        block = self.layers[self.first_trainable_layer - 1]
        hook = block.register_forward_hook(lambda m, a, out: captured.append(out))
        try:
            logits = self._run(plain, mask)
        finally:
            hook.remove()
        self._block_output_is_tuple = isinstance(captured[0], tuple)
        hidden = captured[0][0] if self._block_output_is_tuple else captured[0]
        packed = torch.cat([plain.to(hidden.dtype), hidden], -1)
        if not self._replay_checked:
            self._replay_checked = True
            try:
                same = torch.allclose(self.forward(packed, mask), logits[:, self.class_order], rtol=1e-4, atol=1e-5)
            except Exception:  # noqa: BLE001 - a block whose callers expect more than it hands on
                same = False
            if not same:
                self.log(f"the frozen bottom of {type(self.model).__name__} cannot be cached (its blocks pass more "
                         f"than the hidden states on): every example runs through the whole model")
                self.first_trainable_layer = -1
                return plain
        return packed

    def forward(self, prefix: torch.Tensor, mask: torch.Tensor, word_vectors: torch.Tensor | None = None
                ) -> torch.Tensor:
        if word_vectors is not None:  # the looked-up rows given (to differentiate with respect to them)
            return self._run(prefix[..., :2].long(), mask, word_vectors)[:, self.class_order]
        if self.first_trainable_layer <= 0 or prefix.shape[-1] == 2:  # ids and token types only: the whole model
            return self._run(prefix.long(), mask)[:, self.class_order]
        ids = prefix[..., :2].round().long()
        with self._frozen_bottom(prefix[..., 2:]):
            return self._run(ids, mask)[:, self.class_order]

    def _run(self, ids_and_types: torch.Tensor, mask: torch.Tensor, word_vectors: torch.Tensor | None = None
             ) -> torch.Tensor:
        """The model's logits, in its own class order; ``word_vectors`` stand in for the looked-up ids."""
        extra = {"token_type_ids": ids_and_types[..., 1]} if self._token_types else {}
        if self._use_cache_flag:
            extra["use_cache"] = False
        inputs = {"input_ids": ids_and_types[..., 0]} if word_vectors is None else {"inputs_embeds": word_vectors}
        return self.model(**inputs, attention_mask=(mask > 0).long(), **extra).logits

    @contextlib.contextmanager
    def _frozen_bottom(self, hidden: torch.Tensor) -> Iterator[None]:
        """The blocks below the first trainable one compute nothing: each hands on the last one's cached output."""
        output = (hidden,) if self._block_output_is_tuple else hidden

        def skipped(*args, **kwargs):
            return output

        blocks = list(self.layers)[:self.first_trainable_layer]
        for block in blocks:
            block.forward = skipped
        try:
            yield
        finally:
            for block in blocks:
                del block.forward  # the class's forward again

    def lookup(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model.get_input_embeddings()(ids)

    def parameter_groups(self) -> dict[str, list[str]]:
        """'head' (outside the base model: the classifier), 'embeddings', 'layer.<i>', 'other' (pooler, norms)."""
        groups: dict[str, list[str]] = {}
        embedding_modules = {name for name, m in self.named_modules() if isinstance(m, nn.Embedding)}
        for name, _ in self.named_parameters():
            module = name.rpartition(".")[0]
            if not name.startswith(self.base_prefix):
                role = "head"
            elif name.startswith(self.layers_prefix):
                role = f"layer.{name[len(self.layers_prefix):].split('.', 1)[0]}"
            elif module in embedding_modules or ".embeddings." in name:
                role = "embeddings"
            else:
                role = "other"
            groups.setdefault(role, []).append(name)
        return groups



class ModuleClassifier(SequenceClassifier):
    """Any ``nn.Module`` text classifier, from Python: ``module(input_ids=..., attention_mask=...)`` gives the
    logits (B, C), or an output with ``.logits``, in the order of the data's sorted labels. No layer is assumed:
    the head is its last ``Linear`` with C outputs, ``top:K`` counts its largest list of blocks (if it has one),
    factors cover what they can and a per-example loop the rest (named in the log). Nothing is cached."""

    adapter_name = "module-classifier"
    word_table_name = None  # an embedding table is differentiated densely, like any other parameter

    def __init__(self, module: nn.Module, tokenizer, n_classes: int, max_length: int = 128,
                 log: Callable[[str], None] = print):
        nn.Module.__init__(self)
        self.log, self.model, self.tokenizer, self.max_length = log, module, tokenizer, max_length
        self.first_trainable_layer, self._replay_checked, self._block_output_is_tuple = -1, False, False
        self.class_order = list(range(n_classes))
        self._head_name = classification_layer(module, n_classes)
        try:
            self._layers_name = block_list(module)[0]
        except InputError:
            self._layers_name = None
        self.layers_prefix = f"model.{self._layers_name}." if self._layers_name else "\0"
        self.base_prefix = "model."
        accepted = inspect.signature(module.forward).parameters
        self._token_types = "token_type_ids" in accepted
        self._use_cache_flag = False
        self.position_limit = None

    @property
    def layers(self) -> nn.ModuleList:
        return self.model.get_submodule(self._layers_name) if self._layers_name else nn.ModuleList()

    def set_trainable(self, names: set[str]) -> None:
        """Nothing is cached: the module runs whole for every example."""
        self.first_trainable_layer = -1

    def _run(self, ids_and_types: torch.Tensor, mask: torch.Tensor, word_vectors: torch.Tensor | None = None
             ) -> torch.Tensor:
        extra = {"token_type_ids": ids_and_types[..., 1]} if self._token_types else {}
        out = self.model(input_ids=ids_and_types[..., 0], attention_mask=(mask > 0).long(), **extra)
        return getattr(out, "logits", out)

    def parameter_groups(self) -> dict[str, list[str]]:
        head = f"model.{self._head_name}."
        groups = super().parameter_groups()
        regrouped: dict[str, list[str]] = {}
        for role, names in groups.items():
            for name in names:
                regrouped.setdefault("head" if name.startswith(head) else ("other" if role == "head" else role),
                                     []).append(name)
        return regrouped
