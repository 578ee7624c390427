"""Tiny random transformers models with a fixed-vocabulary WordPiece tokenizer, built on the fly (seconds, offline)."""

from __future__ import annotations

from pathlib import Path

CORPUS = [
    "a great movie with a wonderful cast", "a boring film and a dull plot", "it was great", "it was bad",
    "the actors are funny and the script is clever", "the script is a mess and the actors hate it",
    "i loved every minute", "i hated every minute", "not very good", "very good indeed", "terrible",
    "brilliant", "moving and sincere", "long and tedious",
]
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
PROMPT_WORDS = ["review", "sentiment", "answer"]  # the adapters' default templates, one token each


def train_wordpiece(folder: Path):
    """A WordPiece tokenizer with a fixed vocabulary: the specials, every letter and digit (alone and as a
    ``##`` continuation), common punctuation, and every word of CORPUS and PROMPT_WORDS. Built, not trained:
    ``WordPieceTrainer`` breaks ties between equally frequent merges in hash order, so each process got a
    different vocabulary (and tiny models built from it different kernels)."""
    import string

    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import BertTokenizerFast

    characters = sorted(string.ascii_lowercase + string.digits)
    words = sorted({word for line in CORPUS for word in line.split()} - set(characters) | set(PROMPT_WORDS))
    vocab = [*SPECIALS, *characters, *(f"##{c}" for c in characters), *".,:;!?'-", *words]
    tok = Tokenizer(models.WordPiece({token: i for i, token in enumerate(vocab)}, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    fast = BertTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                             sep_token="[SEP]", mask_token="[MASK]")
    fast.save_pretrained(folder)
    return fast


def _save_tiny(folder: Path, seed: int, make_model) -> Path:
    """Train the tokenizer into ``folder``, then save ``make_model(tokenizer)`` built under ``seed``."""
    import torch

    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = train_wordpiece(folder)
    torch.manual_seed(seed)
    make_model(tokenizer).save_pretrained(folder)
    return folder


def tiny_bert(folder: Path, seed: int = 0) -> Path:
    """A 3-layer BertForMaskedLM (hidden 32) saved with its tokenizer."""
    from transformers import BertConfig, BertForMaskedLM

    return _save_tiny(folder, seed, lambda tok: BertForMaskedLM(BertConfig(
        vocab_size=len(tok), hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=64, pad_token_id=tok.pad_token_id)))


def tiny_llama(folder: Path, seed: int = 0) -> Path:
    """A 2-layer LlamaForCausalLM (hidden 32) saved with a WordPiece tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    return _save_tiny(folder, seed, lambda tok: LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, pad_token_id=tok.pad_token_id,
        bos_token_id=tok.cls_token_id, eos_token_id=tok.sep_token_id, tie_word_embeddings=False)))


CLASSIFIER_ARCHITECTURES = ("bert", "roberta", "xlm-roberta", "distilbert", "electra", "deberta-v2", "modernbert", "gpt2",
                            "llama", "qwen2", "mistral")


def tiny_classifier(folder: Path, architecture: str, id2label: dict[int, str] | None = None, seed: int = 0) -> Path:
    """A tiny random ``<Arch>ForSequenceClassification`` (hidden 32, 2 layers) saved with a WordPiece tokenizer."""
    import transformers as tf

    id2label = id2label or {0: "neg", 1: "pos"}

    def build(tok):
        common = dict(vocab_size=len(tok), pad_token_id=tok.pad_token_id, num_labels=len(id2label),
                      id2label=id2label, label2id={v: k for k, v in id2label.items()})
        decoder = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, max_position_embeddings=64, bos_token_id=tok.cls_token_id,
                       eos_token_id=tok.sep_token_id, **common)
        encoder = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                       max_position_embeddings=64, **common)
        configs = {
            "bert": lambda: tf.BertForSequenceClassification(tf.BertConfig(**encoder)),
            "roberta": lambda: tf.RobertaForSequenceClassification(tf.RobertaConfig(**{**encoder,
                                                                                       "max_position_embeddings": 80})),
            "electra": lambda: tf.ElectraForSequenceClassification(tf.ElectraConfig(embedding_size=16, **encoder)),
            "deberta-v2": lambda: tf.DebertaV2ForSequenceClassification(tf.DebertaV2Config(
                relative_attention=True, position_biased_input=False, pos_att_type=["p2c", "c2p"], **encoder)),
            "distilbert": lambda: tf.DistilBertForSequenceClassification(tf.DistilBertConfig(
                dim=32, n_layers=2, n_heads=4, hidden_dim=64, max_position_embeddings=64, **common)),
            "gpt2": lambda: tf.GPT2ForSequenceClassification(tf.GPT2Config(
                n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=tok.cls_token_id,
                eos_token_id=tok.sep_token_id, **common)),
            "llama": lambda: tf.LlamaForSequenceClassification(tf.LlamaConfig(**decoder)),
            "qwen2": lambda: tf.Qwen2ForSequenceClassification(tf.Qwen2Config(**decoder)),
            "mistral": lambda: tf.MistralForSequenceClassification(tf.MistralConfig(**decoder)),
            "xlm-roberta": lambda: tf.XLMRobertaForSequenceClassification(tf.XLMRobertaConfig(
                **{**encoder, "max_position_embeddings": 80})),
            "modernbert": lambda: tf.ModernBertForSequenceClassification(tf.ModernBertConfig(
                hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=64, global_attn_every_n_layers=1, bos_token_id=tok.cls_token_id,
                eos_token_id=tok.sep_token_id, cls_token_id=tok.cls_token_id, sep_token_id=tok.sep_token_id,
                **common)),
        }
        return configs[architecture]()

    return _save_tiny(folder, seed, build)


def tiny_decoder(folder: Path, architecture: str, seed: int = 0) -> Path:
    """A tiny random causal LM (``qwen2`` or ``mistral``; ``tiny_llama`` for Llama) with a WordPiece tokenizer."""
    import transformers as tf

    model, config = {"qwen2": (tf.Qwen2ForCausalLM, tf.Qwen2Config),
                     "mistral": (tf.MistralForCausalLM, tf.MistralConfig)}[architecture]
    return _save_tiny(folder, seed, lambda tok: model(config(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, pad_token_id=tok.pad_token_id,
        bos_token_id=tok.cls_token_id, eos_token_id=tok.sep_token_id, tie_word_embeddings=False)))
