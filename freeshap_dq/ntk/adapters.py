"""Model adapters: the C class logits f(x) whose parameter gradients make the eNTK.

Each adapter is an ``nn.Module`` with

- ``tokenize(texts, pairs)`` -> one dict of token lists per example;
- ``prefix(batch)`` -> what the frozen bottom of the network computes (run once, no grad);
- ``forward(prefix, mask)`` -> (B, C) logits from the prefix through the trainable top.

Adapters:

- ``EncoderHead``: a BERT-like encoder + a seeded ``Linear(H, C)`` head on the mean-pooled
  (or CLS) last hidden state. With the embeddings and the first layers frozen, their output
  is computed once and cached; gradients then flow only through the trainable top.

Attention masks are passed to the layers as 4-D additive float masks (0 keep, dtype-min drop):
this works under ``torch.func.vmap`` where the 2-D mask builder does not.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from ..errors import InputError

LAYER_INDEX = re.compile(r"\.layers?\.(\d+)\.")


def additive_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(B, L) 0/1 mask -> (B, 1, 1, L) additive mask."""
    return (1.0 - mask[:, None, None, :].to(dtype)) * torch.finfo(dtype).min


class EncoderHead(nn.Module):
    adapter_name = "encoder-head"

    def __init__(self, encoder: nn.Module, tokenizer, n_classes: int, pooling: str = "mean",
                 head_seed: int = 0, max_length: int = 128):
        super().__init__()
        if pooling not in ("mean", "cls"):
            raise InputError(f"pooling {pooling!r} is unknown; choose mean or cls.")
        if not (hasattr(encoder, "embeddings") and hasattr(encoder, "encoder") and hasattr(encoder.encoder, "layer")):
            raise InputError(f"encoder-head needs a BERT-like encoder (embeddings + encoder.layer); got "
                             f"{type(encoder).__name__}.")
        self.encoder = encoder
        self.tokenizer = tokenizer
        self.pooling = pooling
        self.max_length = max_length
        hidden = encoder.config.hidden_size
        generator = torch.Generator().manual_seed(head_seed)
        self.head = nn.Linear(hidden, n_classes)
        bound = hidden ** -0.5
        with torch.no_grad():
            self.head.weight.copy_(torch.empty(n_classes, hidden).uniform_(-bound, bound, generator=generator))
            self.head.bias.copy_(torch.empty(n_classes).uniform_(-bound, bound, generator=generator))
        self.head.requires_grad_(False)
        self.first_trainable_layer = 0  # set by set_trainable; -1 = embeddings trainable

    @property
    def layers(self) -> nn.ModuleList:
        return self.encoder.encoder.layer

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    def tokenize(self, texts: list[str], pairs: list[str] | None = None) -> list[dict[str, list[int]]]:
        enc = self.tokenizer(texts, pairs, truncation=True, max_length=self.max_length)
        keys = [k for k in ("input_ids", "token_type_ids") if k in enc]
        return [{k: enc[k][i] for k in keys} for i in range(len(texts))]

    def set_trainable(self, names: set[str]) -> None:
        """Record which parameters are trainable; the bottom below them is cached."""
        if any(n.startswith("encoder.embeddings.") for n in names):
            self.first_trainable_layer = -1
            return
        indices = [int(m.group(1)) for n in names if (m := LAYER_INDEX.search(n)) and n.startswith("encoder.encoder.")]
        self.first_trainable_layer = min(indices) if indices else self.n_layers

    @torch.no_grad()
    def prefix(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if self.first_trainable_layer < 0:
            return torch.stack([batch["input_ids"], batch.get("token_type_ids", torch.zeros_like(batch["input_ids"]))], -1)
        hidden = self._embed(batch["input_ids"], batch.get("token_type_ids"))
        mask = additive_mask(batch["attention_mask"], hidden.dtype)
        for layer in self.layers[: self.first_trainable_layer]:
            hidden = layer(hidden, mask)
        return hidden

    def _embed(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None) -> torch.Tensor:
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        return self.encoder.embeddings(input_ids=input_ids, token_type_ids=token_type_ids)

    def forward(self, prefix: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        start = self.first_trainable_layer
        if start < 0:
            hidden = self._embed(prefix[..., 0], prefix[..., 1])
            start = 0
        else:
            hidden = prefix
        mask = additive_mask(attention_mask, hidden.dtype)
        for layer in self.layers[start:]:
            hidden = layer(hidden, mask)
        if self.pooling == "cls":
            pooled = hidden[:, 0]
        else:
            weights = attention_mask.to(hidden.dtype).unsqueeze(-1)
            pooled = (hidden * weights).sum(1) / weights.sum(1)
        return self.head(pooled)

    def parameter_groups(self) -> dict[str, list[str]]:
        """Names of parameters by role: 'head', 'embeddings', 'layer.<i>', 'other'."""
        groups: dict[str, list[str]] = {}
        for name, _ in self.named_parameters():
            if name.startswith("head."):
                key = "head"
            elif name.startswith("encoder.embeddings."):
                key = "embeddings"
            elif (m := LAYER_INDEX.search(name)) and name.startswith("encoder.encoder."):
                key = f"layer.{m.group(1)}"
            else:
                key = "other"
            groups.setdefault(key, []).append(name)
        return groups
