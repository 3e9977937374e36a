"""Finding a model's folder and describing it: never downloads anything at serve time."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from tgis_shard import embedded

log = logging.getLogger(__name__)

# config.json keys that carry the context length, by the model families that use them: TGIS's,
# in its order, then GPT-2's n_ctx.
_MAX_LENGTH_KEYS = (
    "max_position_embeddings",
    "n_positions",
    "max_seq_len",
    "seq_length",
    "max_sequence_length",
    "max_seq_length",
    "seq_len",
    "n_ctx",
)
DEFAULT_MAX_SEQUENCE_LENGTH = 2048


class ModelNotFoundError(Exception):
    """MODEL_NAME is neither a local folder, nor in the HF cache, nor embedded."""


@dataclass(frozen=True)
class ModelDescription:
    """What the launcher and router need to know about a model, written by ``prepare``."""

    model_dir: str
    model_type: str
    encoder_decoder: bool
    max_sequence_length: int
    tokenizer_file: str
    config_dtype: str | None = None  # the weights' dtype config.json names (torch_dtype or dtype)


def default_cache_dir() -> Path:
    """Where converted models and tokenizers go: $XDG_CACHE_HOME/tgis, else ~/.cache/tgis."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "tgis"


def resolve_model_dir(name: str, revision: str | None, cache_dir: Path) -> Path:
    """A local folder, a hub id already in the HF cache, or the embedded default model."""
    path = Path(name).expanduser()
    if path.is_dir():
        return path.resolve()
    from huggingface_hub import try_to_load_from_cache
    from huggingface_hub.errors import HFValidationError

    # The snapshot folder holding the cached config.json: download-weights fetches part of a
    # repo (its safetensors, not its .bin copies), which a whole-snapshot lookup calls incomplete.
    try:
        config = try_to_load_from_cache(name, "config.json", revision=revision)
    except HFValidationError:
        config = None
    if isinstance(config, str):
        return Path(config).parent
    if embedded.is_embedded(name):
        return embedded.embedded_model_dir(cache_dir / "models")
    raise ModelNotFoundError(
        f"model {name!r} not found: not a local folder and not in the HF cache "
        f"(fill it with `text-generation-server download-weights {name}`)"
    )


def read_config(model_dir: Path) -> dict:
    config_file = model_dir / "config.json"
    if not config_file.exists():
        raise ModelNotFoundError(f"model folder {model_dir} has no config.json")
    return json.loads(config_file.read_text())


def max_sequence_length(config: dict) -> int:
    """The context length from config.json, else a default."""
    for key in _MAX_LENGTH_KEYS:
        value = config.get(key)
        if isinstance(value, int) and value > 0:
            return value
    return DEFAULT_MAX_SEQUENCE_LENGTH


# tokenizer_config.json settings that change which special tokens an encoding adds. TGIS loads
# the tokenizer through transformers' AutoTokenizer, which applied them; tokenizer.json alone
# does not know them.
SPECIAL_TOKEN_SETTINGS = ("add_bos_token", "add_eos_token")


def tokenizer_file(model_dir: Path, cache_dir: Path) -> Path:
    """The tokenizer.json the router encodes with, as transformers' AutoTokenizer prepares it.

    The model's own file where it has one and its tokenizer_config.json sets none of
    ``SPECIAL_TOKEN_SETTINGS``; otherwise AutoTokenizer's (converted from slow tokenizer files,
    or with those settings applied to what it adds around a text), written once into the cache
    under the hash of the files it came from."""
    settings = {k: v for k, v in _tokenizer_config(model_dir).items() if k in SPECIAL_TOKEN_SETTINGS}
    existing = model_dir / "tokenizer.json"
    if existing.exists() and not settings:
        return existing
    target_dir = (
        cache_dir / "tokenizers" / f"{str(model_dir).strip('/').replace('/', '--')}-{_tokenizer_hash(model_dir)}"
    )
    target = target_dir / "tokenizer.json"
    if not target.exists():
        from transformers import AutoTokenizer

        log.info("preparing the tokenizer of %s with AutoTokenizer into %s", model_dir, target_dir)
        tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True, **settings)
        if not getattr(tokenizer, "is_fast", False):
            raise ModelNotFoundError(f"cannot build a fast tokenizer (tokenizer.json) for {model_dir}")
        target_dir.mkdir(parents=True, exist_ok=True)
        staging = target_dir / f".tokenizer.json.{os.getpid()}"
        tokenizer.backend_tokenizer.save(str(staging))
        staging.replace(target)  # whole or absent: shards and tools may prepare it at once
    return target


def _tokenizer_config(model_dir: Path) -> dict:
    path = model_dir / "tokenizer_config.json"
    return json.loads(path.read_text()) if path.exists() else {}


def _tokenizer_hash(model_dir: Path) -> str:
    """What the prepared tokenizer depends on: the tokenizer files' contents."""
    digest = hashlib.sha256()
    for path in sorted(model_dir.iterdir()):
        if path.is_file() and (
            path.name.startswith(("tokenizer", "special_tokens")) or path.suffix in (".model", ".txt")
        ):
            digest.update(path.name.encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


def describe(model_dir: Path, cache_dir: Path) -> ModelDescription:
    config = read_config(model_dir)
    model_type = config.get("model_type")
    if not model_type:
        raise ModelNotFoundError(f"{model_dir}/config.json has no model_type")
    return ModelDescription(
        model_dir=str(model_dir),
        model_type=model_type,
        encoder_decoder=bool(config.get("is_encoder_decoder", False)),
        max_sequence_length=max_sequence_length(config),
        tokenizer_file=str(tokenizer_file(model_dir, cache_dir)),
        config_dtype=config.get("torch_dtype") or config.get("dtype"),
    )
