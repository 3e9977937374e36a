"""Finding a model's folder and describing it: never downloads anything at serve time."""

from __future__ import annotations

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
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id=name, revision=revision, local_files_only=True))
    except (LocalEntryNotFoundError, HFValidationError, FileNotFoundError):
        pass
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


def tokenizer_file(model_dir: Path, cache_dir: Path) -> Path:
    """The model's tokenizer.json; converted from a slow tokenizer into the cache if missing."""
    existing = model_dir / "tokenizer.json"
    if existing.exists():
        return existing
    from transformers import AutoTokenizer

    target_dir = cache_dir / "tokenizers" / str(model_dir).strip("/").replace("/", "--")
    target = target_dir / "tokenizer.json"
    if not target.exists():
        log.info("writing a fast tokenizer for %s to %s", model_dir, target_dir)
        tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
        if not getattr(tokenizer, "is_fast", False):
            raise ModelNotFoundError(f"cannot build a fast tokenizer (tokenizer.json) for {model_dir}")
        tokenizer.save_pretrained(target_dir)
    return target


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
