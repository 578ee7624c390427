"""Model adapters: the C class logits f(x) whose parameter gradients make the eNTK.

Each adapter is an ``nn.Module`` with

- ``tokenize(texts, pairs)`` -> one dict per example (``input_ids``, maybe ``token_type_ids``,
  and ``read_at``: the position whose hidden state gives the logits, or -1 for pooling);
- ``prefix(batch)`` -> what the frozen bottom of the network computes (run once, no grad);
- ``forward(prefix, mask)`` -> (B, C) logits through the trainable top. ``mask`` is 0 for
  padding, 1 for tokens and 2 at the read-out position (mask token / answer position).

Adapters:

- ``EncoderHead``: BERT-like encoder + a seeded ``Linear(H, C)`` head on the mean-pooled (or CLS)
  last hidden state.
- ``PromptMLM``: masked LM with a template holding ``{mask}``; the logits are the label words'
  MLM logits at the mask: the MLM transform, then a C-row output layer initialised from the label
  words' rows of the decoder (tied to the embeddings) and the MLM bias.
- ``CausalLM``: decoder-only LM (Llama-like) with a prompt ending where the answer goes; the
  logits are the label words' LM-head logits at the last prompt token (a C-row output layer
  initialised from their LM-head rows). Optional LoRA: at initialisation B = 0, so every gradient
  with respect to LoRA-A is exactly zero and only LoRA-B is trainable.

When the embeddings and the first layers are frozen, their output is computed once and cached;
gradients then flow only through the trainable top. Attention masks are passed to the layers as
additive float masks (0 keep, dtype-min drop): this works under ``torch.func.vmap`` where the
transformers mask builders do not.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from freeshap_dq.errors import InputError

LAYER_INDEX = re.compile(r"\.layers?\.(\d+)\.")
SLOT = re.compile(r"\{(text|pair|mask)\}")
DEFAULT_MLM_TEMPLATE = "{text} It was {mask} ."
DEFAULT_CAUSAL_TEMPLATE = "Review: {text}\nSentiment:"
POOLINGS = ("mean", "cls")


def additive_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(B, L) mask (0 = padding) -> (B, 1, 1, L) additive mask."""
    return (mask[:, None, None, :] == 0).to(dtype) * torch.finfo(dtype).min


def causal_additive_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(B, L) mask -> (B, 1, L, L): no attention to later positions or to padding."""
    length = mask.shape[-1]
    future = torch.ones(length, length, dtype=torch.bool, device=mask.device).triu(1)
    blocked = future[None, None] | (mask[:, None, None, :] == 0)
    return blocked.to(dtype) * torch.finfo(dtype).min


def _seeded_linear(hidden: int, n_classes: int, seed: int) -> nn.Linear:
    generator = torch.Generator().manual_seed(seed)
    head = nn.Linear(hidden, n_classes)
    bound = hidden ** -0.5
    with torch.no_grad():
        head.weight.copy_(torch.empty(n_classes, hidden).uniform_(-bound, bound, generator=generator))
        head.bias.copy_(torch.empty(n_classes).uniform_(-bound, bound, generator=generator))
    head.requires_grad_(False)
    return head


class LayeredAdapter(nn.Module):
    """Shared machinery: embeddings -> a stack of layers -> read-out; cached frozen bottom."""

    adapter_name = "?"
    embeddings_prefix = "?"  # parameter-name prefix of the embedding tables
    layers_prefix = "?"
    word_table_name: str | None = None  # the embedding table summed sparsely when trainable
    lora_rank = 0
    position_limit: int | None = None  # the model's positions (max_position_embeddings), when it declares them
    vmap_compatible = True  # the layers run with additive masks, which vmap traces

    def __init__(self, tokenizer, max_length: int):
        super().__init__()
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.first_trainable_layer = 0  # -1 = embeddings trainable (nothing cached)

    # subclasses: layers, embed(ids, types), run_layer(layer, hidden, mask), readout(hidden, mask)
    @property
    def n_layers(self) -> int:
        return len(self.layers)

    def set_trainable(self, names: set[str]) -> None:
        if any(n.startswith(self.embeddings_prefix) for n in names):
            self.first_trainable_layer = -1
            return
        indices = [int(m.group(1)) for n in names if n.startswith(self.layers_prefix) and (m := LAYER_INDEX.search(n))]
        self.first_trainable_layer = min(indices) if indices else self.n_layers

    @torch.no_grad()
    def prefix(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        ids = batch["input_ids"]
        types = batch.get("token_type_ids", torch.zeros_like(ids))
        if self.first_trainable_layer < 0:
            return torch.stack([ids, types], -1)
        hidden = self.embed(ids, types)
        for layer in self.layers[: self.first_trainable_layer]:
            hidden = self.run_layer(layer, hidden, batch["attention_mask"])
        return hidden

    def forward(self, prefix: torch.Tensor, mask: torch.Tensor, word_vectors: torch.Tensor | None = None) -> torch.Tensor:
        """``word_vectors`` replaces the word-table lookup (to differentiate with respect to the looked-up rows)."""
        start = self.first_trainable_layer
        if start < 0:
            ids, types = prefix[..., 0], prefix[..., 1]
            hidden = self.embed(ids, types) if word_vectors is None else self.embed_vectors(word_vectors, types)
            start = 0
        else:
            hidden = prefix
        for layer in self.layers[start:]:
            hidden = self.run_layer(layer, hidden, mask)
        return self.readout(hidden, mask)

    def parameter_groups(self) -> dict[str, list[str]]:
        """Parameter names by role: 'head', 'embeddings', 'layer.<i>', 'top' (after the layers), 'other'."""
        groups: dict[str, list[str]] = {}
        for name, _ in self.named_parameters():
            groups.setdefault(self.role(name), []).append(name)
        return groups

    def role(self, name: str) -> str:
        if name.startswith("head."):
            return "head"
        if name.startswith(self.embeddings_prefix):
            return "embeddings"
        if name.startswith(self.layers_prefix) and (m := LAYER_INDEX.search(name)):
            return f"layer.{m.group(1)}"
        return "other"

    @staticmethod
    def read_position(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        select = (mask == 2).to(hidden.dtype).unsqueeze(-1)
        return (hidden * select).sum(1)


class _BertLike(LayeredAdapter):
    def _bind_bert(self, bert: nn.Module, attr: str) -> None:
        if not (hasattr(bert, "embeddings") and hasattr(bert, "encoder") and hasattr(bert.encoder, "layer")):
            raise InputError(f"{self.adapter_name} needs a BERT-like model (embeddings + encoder.layer); got "
                             f"{type(bert).__name__}.")
        self.embeddings_prefix = f"{attr}.embeddings."
        self.layers_prefix = f"{attr}.encoder."

    @property
    def layers(self) -> nn.ModuleList:
        return self.bert.encoder.layer

    @property
    def word_table_name(self) -> str:
        return self.embeddings_prefix + "word_embeddings.weight"

    def lookup(self, ids: torch.Tensor) -> torch.Tensor:
        return self.bert.embeddings.word_embeddings(ids)

    def embed(self, ids: torch.Tensor, types: torch.Tensor) -> torch.Tensor:
        return self.bert.embeddings(input_ids=ids, token_type_ids=types)

    def embed_vectors(self, vectors: torch.Tensor, types: torch.Tensor) -> torch.Tensor:
        return self.bert.embeddings(token_type_ids=types, inputs_embeds=vectors)

    def run_layer(self, layer: nn.Module, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return layer(hidden, additive_mask(mask, hidden.dtype))


class EncoderHead(_BertLike):
    adapter_name = "encoder-head"

    def __init__(self, encoder: nn.Module, tokenizer, n_classes: int, pooling: str = "mean",
                 head_seed: int = 0, max_length: int = 128):
        super().__init__(tokenizer, max_length)
        if pooling not in POOLINGS:
            raise InputError(f"pooling {pooling!r} is unknown; choose one of {', '.join(POOLINGS)}.")
        self.bert = encoder
        self._bind_bert(encoder, "bert")
        self.pooling = pooling
        self.head = _seeded_linear(encoder.config.hidden_size, n_classes, head_seed)

    @property
    def encoder(self) -> nn.Module:
        return self.bert

    def tokenize(self, texts: list[str], pairs: list[str] | None = None) -> list[dict]:
        enc = self.tokenizer(texts, pairs, truncation=True, max_length=self.max_length)
        keys = [k for k in ("input_ids", "token_type_ids") if k in enc]
        return [{**{k: enc[k][i] for k in keys}, "read_at": -1} for i in range(len(texts))]

    def readout(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if self.pooling == "cls":
            return self.head(hidden[:, 0])
        weights = (mask > 0).to(hidden.dtype).unsqueeze(-1)
        return self.head((hidden * weights).sum(1) / weights.sum(1))

    def role(self, name: str) -> str:
        return "other" if ".pooler." in name or name.startswith("bert.pooler") else super().role(name)


class _TemplateMixin:
    """Fill a template's {text}, {pair}, {mask} slots, truncating only the texts."""

    def _check_template(self, template: str, needs_mask: bool) -> list[str]:
        slots = SLOT.findall(template)
        if "text" not in slots:
            raise InputError(f"template {template!r} has no {{text}} slot.")
        if needs_mask and slots.count("mask") != 1:
            raise InputError(f"template {template!r} must contain exactly one {{mask}} slot (where the label "
                             f"word is predicted), e.g. {DEFAULT_MLM_TEMPLATE!r}.")
        if not needs_mask and "mask" in slots:
            raise InputError(f"template {template!r}: a causal LM template ends where the answer goes; drop {{mask}}.")
        return slots

    def _fill(self, template: str, text: str, pair: str | None, budget: int) -> tuple[list[int], int]:
        """Token ids of the filled template (no special tokens) and the {mask} index (-1 if none)."""
        pieces = SLOT.split(template)  # literal, slot, literal, slot, ...
        encoded: list[tuple[str, list[int]]] = []
        for i, piece in enumerate(pieces):
            if i % 2 == 0:
                if piece:
                    encoded.append(("literal", self.tokenizer(piece, add_special_tokens=False)["input_ids"]))
            elif piece == "mask":
                encoded.append(("mask", [self.tokenizer.mask_token_id]))
            else:
                value = text if piece == "text" else pair
                if value is None:
                    raise InputError(f"template {template!r} has a {{pair}} slot but no second text was given.")
                encoded.append((piece, self.tokenizer(" " + value if i > 1 else value,
                                                      add_special_tokens=False)["input_ids"]))
        excess = sum(len(ids) for _, ids in encoded) - budget
        while excess > 0:  # cut the longest text from its end; never the template or the mask
            idx = max((j for j, (kind, _) in enumerate(encoded) if kind in ("text", "pair")),
                      key=lambda j: len(encoded[j][1]))
            if not encoded[idx][1]:
                raise InputError(f"max_length {self.max_length} is too short for the template {template!r}.")
            encoded[idx] = (encoded[idx][0], encoded[idx][1][:-1])
            excess -= 1
        ids, mask_at = [], -1
        for kind, piece_ids in encoded:
            if kind == "mask":
                mask_at = len(ids)
            ids.extend(piece_ids)
        return ids, mask_at

    def _special_tokens(self) -> tuple[list[int], list[int]]:
        """The special tokens the tokenizer puts before and after a single sequence."""
        bare = self.tokenizer("x", add_special_tokens=False)["input_ids"]
        full = self.tokenizer("x")["input_ids"]
        for i in range(len(full) - len(bare) + 1):
            if full[i:i + len(bare)] == bare:
                return full[:i], full[i + len(bare):]
        return [], []

    def _label_word_ids(self, words: list[str], n_classes: int, vocab_size: int) -> list[int]:
        if len(words) != n_classes:
            raise InputError(f"{len(words)} label word(s) given for {n_classes} classes; give one word per class "
                             f"in the order of the label names.")
        ids = []
        for word in words:
            candidates = [self.tokenizer(w, add_special_tokens=False)["input_ids"] for w in (" " + word, word)]
            single = [c for c in candidates if len(c) == 1 and c[0] != self.tokenizer.unk_token_id]
            if not single:
                pieces = self.tokenizer.tokenize(" " + word)
                raise InputError(f"label word {word!r} is not a single token for this tokenizer (it splits into "
                                 f"{pieces}); choose a word that is one token.")
            ids.append(single[0][0])
        if len(set(ids)) != len(ids):
            raise InputError(f"label words {words} map to the same token; choose distinct words.")
        if max(ids) >= vocab_size:
            raise InputError("a label word's token id is outside the model's vocabulary.")
        return ids


class PromptMLM(_TemplateMixin, _BertLike):
    adapter_name = "prompt-mlm"

    def __init__(self, mlm: nn.Module, tokenizer, n_classes: int, label_words: list[str],
                 template: str = DEFAULT_MLM_TEMPLATE, max_length: int = 128):
        super().__init__(tokenizer, max_length)
        self._check_template(template, needs_mask=True)
        if tokenizer.mask_token_id is None:
            raise InputError("prompt-mlm needs a tokenizer with a mask token.")
        base_name = mlm.base_model_prefix
        self.bert = getattr(mlm, base_name)
        self._bind_bert(self.bert, "bert")
        self.template = template
        self.transform = _mlm_transform(mlm)
        decoder = mlm.get_output_embeddings()
        word_ids = self._label_word_ids(label_words, n_classes, decoder.weight.shape[0])
        self.label_word_ids = word_ids
        self.head = nn.Linear(decoder.weight.shape[1], n_classes)
        with torch.no_grad():
            self.head.weight.copy_(decoder.weight[word_ids])
            bias = decoder.bias if decoder.bias is not None else getattr(mlm.cls.predictions, "bias", None)
            self.head.bias.copy_(bias[word_ids] if bias is not None else torch.zeros(n_classes))
        self.head.requires_grad_(False)

    def tokenize(self, texts: list[str], pairs: list[str] | None = None) -> list[dict]:
        before, after = self._special_tokens()
        out = []
        for i, text in enumerate(texts):
            ids, mask_at = self._fill(self.template, text, None if pairs is None else pairs[i],
                                      self.max_length - len(before) - len(after))
            out.append({"input_ids": before + ids + after, "read_at": len(before) + mask_at})
        return out

    def readout(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.head(self.transform(self.read_position(hidden, mask)))

    def role(self, name: str) -> str:
        if name.startswith("transform."):
            return "head"  # the MLM transform is trained with the output layer (as in the paper)
        return super().role(name)


def _mlm_transform(mlm: nn.Module) -> nn.Module:
    """The hidden -> pre-decoder transform of a BERT or RoBERTa MLM head."""
    if hasattr(mlm, "cls") and hasattr(mlm.cls, "predictions"):
        return mlm.cls.predictions.transform
    head = getattr(mlm, "lm_head", None)
    if head is not None and hasattr(head, "dense") and hasattr(head, "layer_norm"):
        return nn.Sequential(head.dense, nn.GELU(), head.layer_norm)
    raise InputError(f"prompt-mlm does not know the MLM head of {type(mlm).__name__}; BERT- and RoBERTa-style "
                     f"heads are supported.")


class CausalLM(_TemplateMixin, LayeredAdapter):
    adapter_name = "causal-lm"
    embeddings_prefix = "decoder.embed_tokens."
    layers_prefix = "decoder.layers."

    def __init__(self, lm: nn.Module, tokenizer, n_classes: int, label_words: list[str],
                 template: str = DEFAULT_CAUSAL_TEMPLATE, max_length: int = 128, lora_rank: int = 0):
        super().__init__(tokenizer, max_length)
        self._check_template(template, needs_mask=False)
        decoder = getattr(lm, "model", None)
        if not all(hasattr(decoder, a) for a in ("embed_tokens", "layers", "norm", "rotary_emb")):
            raise InputError(f"causal-lm needs a Llama-like decoder (embed_tokens, layers, norm, rotary_emb); got "
                             f"{type(lm).__name__}.")
        self.template = template
        self.lora_rank = lora_rank
        if lora_rank:
            _inject_lora(decoder, lora_rank)
        self.decoder = decoder
        lm_head = lm.get_output_embeddings()
        word_ids = self._label_word_ids(label_words, n_classes, lm_head.weight.shape[0])
        self.label_word_ids = word_ids
        self.head = nn.Linear(lm_head.weight.shape[1], n_classes, bias=lm_head.bias is not None)
        with torch.no_grad():
            self.head.weight.copy_(lm_head.weight[word_ids])
            if lm_head.bias is not None:
                self.head.bias.copy_(lm_head.bias[word_ids])
        self.head.requires_grad_(False)

    @property
    def layers(self) -> nn.ModuleList:
        return self.decoder.layers

    def tokenize(self, texts: list[str], pairs: list[str] | None = None) -> list[dict]:
        bos, _ = self._special_tokens()  # nothing after the prompt: the answer comes next
        out = []
        for i, text in enumerate(texts):
            ids, _ = self._fill(self.template, text, None if pairs is None else pairs[i], self.max_length - len(bos))
            ids = bos + ids
            out.append({"input_ids": ids, "read_at": len(ids) - 1})
        return out

    word_table_name = "decoder.embed_tokens.weight"

    def lookup(self, ids: torch.Tensor) -> torch.Tensor:
        return self.decoder.embed_tokens(ids)

    def embed(self, ids: torch.Tensor, types: torch.Tensor) -> torch.Tensor:
        return self.decoder.embed_tokens(ids)

    def embed_vectors(self, vectors: torch.Tensor, types: torch.Tensor) -> torch.Tensor:
        return vectors

    def run_layer(self, layer: nn.Module, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(hidden.shape[1], device=hidden.device).unsqueeze(0)
        cos_sin = self.decoder.rotary_emb(hidden, position_ids=positions)
        out = layer(hidden, attention_mask=causal_additive_mask(mask, hidden.dtype), position_ids=positions,
                    position_embeddings=cos_sin)
        return out[0] if isinstance(out, tuple) else out

    def readout(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.head(self.decoder.norm(self.read_position(hidden, mask)))

    def role(self, name: str) -> str:
        if name.startswith("decoder.norm."):
            return "head"
        return super().role(name)

    def lora_parameter_names(self) -> tuple[list[str], list[str]]:
        """(LoRA-A names, LoRA-B names)."""
        names = [n for n, _ in self.named_parameters()]
        return [n for n in names if ".lora_A." in n], [n for n in names if ".lora_B." in n]


def _inject_lora(decoder: nn.Module, rank: int) -> None:
    try:
        from peft import LoraConfig, inject_adapter_in_model
    except ImportError:
        raise InputError("LoRA needs the peft package (pip install peft).") from None
    config = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0,
                        target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    inject_adapter_in_model(config, decoder)
    for p in decoder.parameters():
        p.requires_grad_(False)
