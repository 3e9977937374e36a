"""Prompt prefixes (PEFT prompt tuning): learned embeddings put in front of a request's prompt.

A prefix lives in ``PREFIX_STORE_PATH/<prefix_id>/`` as PEFT saves a prompt-tuning adapter
(``adapter_model.safetensors`` or ``adapter_model.bin`` holding ``prompt_embeddings``) or as a
plain tensor: ``decoder.pt`` for decoder-only models, ``encoder.pt`` for encoder-decoder ones,
whose prefix goes in front of the encoder's input (as PEFT's generate does; a seq2seq adapter's
second half, trained for the decoder, is not used there either). Loaded prefixes are kept, least
recently used first out, within PROMPT_CACHE_SIZE_MB.
"""

from __future__ import annotations

import json
import pickle
import re
import threading
from collections import OrderedDict
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

# Ids may name sub-folders ("team/task") but never climb out of the store.
_PREFIX_ID = re.compile(r"[\w\-]+(/[\w\-]+)*")
_PEFT_KEY = "prompt_embeddings"


class PrefixNotFoundError(LookupError):
    """No prefix with this id in the store."""


class InvalidPrefixError(ValueError):
    """The id or the stored tensor cannot be used with this model."""


class PrefixesUnsupportedError(Exception):
    """The engine cannot put prefixes in front of prompts (yet)."""


class PrefixStore:
    """Loads, checks and caches prompt prefixes for one model; safe to share between threads."""

    def __init__(
        self,
        root: Path | None,
        width: int,
        max_length: int,
        dtype: torch.dtype,
        device: torch.device,
        cache_bytes: int,
        encoder_decoder: bool = False,
    ) -> None:
        self.root = root
        self.encoder_decoder = encoder_decoder
        self.width = width
        self.max_length = max_length
        self.dtype = dtype
        self.device = device
        self.cache_bytes = cache_bytes
        self._cache: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._cached_bytes = 0
        self._lock = threading.Lock()

    def get(self, prefix_id: str) -> torch.Tensor:
        """The prefix's embeddings, [length, width], in the model's dtype on its device."""
        if self.root is None:
            raise PrefixNotFoundError(f'prefix id "{prefix_id}" not found: no PREFIX_STORE_PATH is configured')
        with self._lock:
            if prefix_id in self._cache:
                self._cache.move_to_end(prefix_id)
                return self._cache[prefix_id]
        prefix = self._load(prefix_id)
        with self._lock:
            self._remember(prefix_id, prefix)
        return prefix

    def _remember(self, prefix_id: str, prefix: torch.Tensor) -> None:
        size = prefix.numel() * prefix.element_size()
        if prefix_id in self._cache or size > self.cache_bytes:
            return  # loaded twice concurrently, or larger than the whole cache: served uncached
        while self._cache and self._cached_bytes + size > self.cache_bytes:
            _, evicted = self._cache.popitem(last=False)
            self._cached_bytes -= evicted.numel() * evicted.element_size()
        self._cache[prefix_id] = prefix
        self._cached_bytes += size

    def _folder(self, prefix_id: str) -> Path:
        assert self.root is not None
        if not _PREFIX_ID.fullmatch(prefix_id):
            raise InvalidPrefixError(
                f"invalid prefix id {prefix_id!r}: use letters, digits, '_', '-' and '/' between names"
            )
        folder = (self.root / prefix_id).resolve()
        if not folder.is_relative_to(self.root.resolve()):
            raise InvalidPrefixError(f"invalid prefix id {prefix_id!r}: it leaves the prefix store")
        return folder

    def _load(self, prefix_id: str) -> torch.Tensor:
        folder = self._folder(prefix_id)
        tensor = _read_prefix(folder, prefix_id, "encoder.pt" if self.encoder_decoder else "decoder.pt")
        return self._checked(tensor, prefix_id).to(device=self.device, dtype=self.dtype)

    def _checked(self, tensor: torch.Tensor, prefix_id: str) -> torch.Tensor:
        if tensor.dim() != 2:
            raise InvalidPrefixError(f"prefix {prefix_id!r} must be 2-D [length, width], not {list(tensor.shape)}")
        length, width = tensor.shape
        if width != self.width:
            raise InvalidPrefixError(
                f"prefix {prefix_id!r} has width {width}, the model's embeddings have {self.width}"
            )
        if not 0 < length < self.max_length:
            raise InvalidPrefixError(
                f"prefix {prefix_id!r} has length {length}, which must be between 1 and {self.max_length - 1}"
            )
        if not tensor.is_floating_point() or not torch.isfinite(tensor).all():
            raise InvalidPrefixError(f"prefix {prefix_id!r} must hold finite floating-point values")
        return tensor


def _read_prefix(folder: Path, prefix_id: str, plain_file: str) -> torch.Tensor:
    """The stored tensor, from the first of PEFT's safetensors, PEFT's .bin, or ``plain_file``."""
    for name, read in (
        ("adapter_model.safetensors", load_file),
        ("adapter_model.bin", _torch_load),
        (plain_file, _torch_load),
    ):
        path = folder / name
        if not path.is_file():
            continue
        try:
            loaded = read(path)
        except (OSError, RuntimeError, EOFError, pickle.UnpicklingError, SafetensorError) as e:
            raise InvalidPrefixError(f"prefix {prefix_id!r}: {name} could not be read: {e}") from e
        if name == plain_file:
            if not isinstance(loaded, torch.Tensor):
                raise InvalidPrefixError(f"prefix {prefix_id!r}: {name} must hold one tensor")
            return loaded
        if not isinstance(loaded, dict) or _PEFT_KEY not in loaded:
            raise InvalidPrefixError(f"prefix {prefix_id!r}: {name} holds no {_PEFT_KEY} (not prompt tuning)")
        return _first_submodule(loaded[_PEFT_KEY], folder / "adapter_config.json")
    other = "decoder.pt" if plain_file == "encoder.pt" else "encoder.pt"
    if (folder / other).is_file():
        raise InvalidPrefixError(f"prefix {prefix_id!r} has only {other}; this model takes {plain_file}")
    raise PrefixNotFoundError(f'prefix id "{prefix_id}" not found')


def _first_submodule(embeddings: torch.Tensor, config_path: Path) -> torch.Tensor:
    """PEFT stacks one block of virtual tokens per transformer submodule (encoder, then decoder,
    for seq2seq adapters); generation uses the first."""
    try:
        config = json.loads(config_path.read_text())
    except (OSError, ValueError):
        return embeddings
    virtual = config.get("num_virtual_tokens")
    submodules = config.get("num_transformer_submodules") or 1
    stacked = isinstance(virtual, int) and submodules > 1 and embeddings.dim() == 2
    if stacked and len(embeddings) == virtual * submodules:
        return embeddings[:virtual]
    return embeddings


def _torch_load(path: Path) -> object:
    # weights_only: a prefix file is data, never code to run.
    return torch.load(path, map_location="cpu", weights_only=True)
