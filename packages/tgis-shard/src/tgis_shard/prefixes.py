"""Prompt prefixes (PEFT prompt tuning): learned embeddings put in front of a request's prompt.

A prefix lives in ``PREFIX_STORE_PATH/<prefix_id>/`` as PEFT saves a prompt-tuning adapter
(``adapter_model.safetensors`` or ``adapter_model.bin`` holding ``prompt_embeddings``) or as
plain tensors, the layout TGIS used: ``decoder.pt`` for decoder-only models; ``encoder.pt`` and/or
``decoder.pt`` for encoder-decoder ones, in front of the encoder's input and of the decoder's
start token. A seq2seq adapter gives the encoder's prefix only, as PEFT's generate uses it.
Loaded prefixes are kept, least recently used first out, within PROMPT_CACHE_SIZE_MB.
"""

from __future__ import annotations

import json
import pickle
import re
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
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


@dataclass(frozen=True)
class PromptPrefix:
    """Learned embeddings, [length, width] each, in the model's dtype on its device."""

    input: torch.Tensor | None  # in front of the prompt (the encoder's input for encoder-decoders)
    decoder: torch.Tensor | None = None  # encoder-decoders: in front of the decoder start token

    @property
    def length(self) -> int:
        """Tokens the prefix adds to the request's sequences."""
        return sum(len(t) for t in (self.input, self.decoder) if t is not None)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.input, self.decoder) if t is not None)


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
        self._cache: OrderedDict[str, PromptPrefix] = OrderedDict()
        self._cached_bytes = 0
        self._lock = threading.Lock()

    def get(self, prefix_id: str) -> PromptPrefix:
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

    def _remember(self, prefix_id: str, prefix: PromptPrefix) -> None:
        size = prefix.nbytes
        if prefix_id in self._cache or size > self.cache_bytes:
            return  # loaded twice concurrently, or larger than the whole cache: served uncached
        while self._cache and self._cached_bytes + size > self.cache_bytes:
            _, evicted = self._cache.popitem(last=False)
            self._cached_bytes -= evicted.nbytes
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

    def _load(self, prefix_id: str) -> PromptPrefix:
        folder = self._folder(prefix_id)
        adapter = _read_adapter(folder, prefix_id)
        if adapter is not None:
            prefix = PromptPrefix(self._checked(adapter, prefix_id, "adapter"))
        elif self.encoder_decoder:
            encoder = _read_tensor(folder, "encoder.pt", prefix_id)
            decoder = _read_tensor(folder, "decoder.pt", prefix_id)
            if encoder is None and decoder is None:
                raise PrefixNotFoundError(f'prefix id "{prefix_id}" not found')
            prefix = PromptPrefix(
                self._checked(encoder, prefix_id, "encoder.pt"), self._checked(decoder, prefix_id, "decoder.pt")
            )
        else:
            decoder = _read_tensor(folder, "decoder.pt", prefix_id)
            if decoder is None:
                if (folder / "encoder.pt").is_file():
                    raise InvalidPrefixError(f"prefix {prefix_id!r} has only encoder.pt; this model takes decoder.pt")
                raise PrefixNotFoundError(f'prefix id "{prefix_id}" not found')
            prefix = PromptPrefix(self._checked(decoder, prefix_id, "decoder.pt"))
        if prefix.length >= self.max_length:
            raise InvalidPrefixError(
                f"prefix {prefix_id!r} has length {prefix.length}, which must be below {self.max_length}"
            )
        return prefix

    def _checked(self, tensor: torch.Tensor | None, prefix_id: str, source: str) -> torch.Tensor | None:
        """The tensor in the model's dtype on its device, once it is shown usable."""
        if tensor is None:
            return None
        where = f"prefix {prefix_id!r} ({source})"
        if tensor.dim() != 2:
            raise InvalidPrefixError(f"{where} must be 2-D [length, width], not {list(tensor.shape)}")
        length, width = tensor.shape
        if width != self.width:
            raise InvalidPrefixError(f"{where} has width {width}, the model's embeddings have {self.width}")
        if length == 0:
            raise InvalidPrefixError(f"{where} is empty")
        if not tensor.is_floating_point():
            raise InvalidPrefixError(f"{where} must hold finite floating-point values")
        converted = tensor.to(device=self.device, dtype=self.dtype)
        if not torch.isfinite(converted).all():
            # Finite in float32 can still overflow float16.
            raise InvalidPrefixError(f"{where} must hold finite floating-point values (in {self.dtype})")
        return converted


def _read_adapter(folder: Path, prefix_id: str) -> torch.Tensor | None:
    """The prompt embeddings of a PEFT prompt-tuning adapter in the folder, if it holds one."""
    for name, read in (("adapter_model.safetensors", load_file), ("adapter_model.bin", _torch_load)):
        loaded = _read(folder / name, read, prefix_id)
        if loaded is None:
            continue
        if not isinstance(loaded, dict) or not isinstance(loaded.get(_PEFT_KEY), torch.Tensor):
            raise InvalidPrefixError(f"prefix {prefix_id!r}: {name} holds no {_PEFT_KEY} (not prompt tuning)")
        return _first_submodule(loaded[_PEFT_KEY], folder / "adapter_config.json")
    return None


def _read_tensor(folder: Path, name: str, prefix_id: str) -> torch.Tensor | None:
    loaded = _read(folder / name, _torch_load, prefix_id)
    if loaded is not None and not isinstance(loaded, torch.Tensor):
        raise InvalidPrefixError(f"prefix {prefix_id!r}: {name} must hold one tensor")
    return loaded


def _read(path: Path, read: Callable[[Path], object], prefix_id: str) -> object | None:
    if not path.is_file():
        return None
    try:
        return read(path)
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError, SafetensorError) as e:
        raise InvalidPrefixError(f"prefix {prefix_id!r}: {path.name} could not be read: {e}") from e


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
