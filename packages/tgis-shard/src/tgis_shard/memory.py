"""The memory model a shard reports for the router's dynamic batch sizing.

On a GPU it is measured (ESTIMATE_MEMORY=auto): real prefill passes show the transient memory
per prompt token, a real decode step the memory per cached token, and the free memory after
loading the weights, less BATCH_SAFETY_MARGIN percent, is the limit. On the CPU, or with
ESTIMATE_MEMORY=manual, it is synthesised so that MAX_BATCH_SIZE requests of
MAX_SEQUENCE_LENGTH tokens fit exactly.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import torch

from tgis_proto import shard_pb2 as pb

ESTIMATE_MODES = ("auto", "manual", "off")
# Prompt length of the measuring prefill (capped by MAX_SEQUENCE_LENGTH).
MEASURE_TOKENS = 1024
# The measuring decode step: a batch of this many prompts (capped by MAX_BATCH_SIZE) of this
# many tokens; per-row costs (logits) spread over its tokens overstate a little, never under.
DECODE_PROBE_ROWS = 8
DECODE_PROBE_TOKENS = 256


# The padded engine's caches grow by one position per decode step: every layer's keys and values
# are reallocated a little larger while the old ones are still alive, so with fixed-size segments
# the freed blocks never fit the next request and reserved memory drifts far above what is
# allocated (on an H200 an 8B batch at a 99 GiB limit ran out of memory with 113 GiB allocated).
# Expandable segments map freed pages back where they are needed.
CUDA_ALLOCATOR_DEFAULT = "expandable_segments:True"
ALLOCATOR_ENV_NAMES = ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF")


def configure_cuda_allocator(environ: dict[str, str] | os._Environ = os.environ) -> None:
    """Uses expandable segments unless the operator configured the allocator; call before CUDA starts."""
    if not any(environ.get(name) for name in ALLOCATOR_ENV_NAMES):
        environ["PYTORCH_CUDA_ALLOC_CONF"] = CUDA_ALLOCATOR_DEFAULT


@dataclass(frozen=True)
class MemorySettings:
    estimate: str = "auto"
    safety_margin_percent: int = 20
    max_batch_size: int = 12
    max_sequence_length: int = 2048
    # Device memory that fills up after start-up outside the batches: the prompt-prefix cache.
    reserved_bytes: int = 0


def kv_bytes_per_token(num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
    """Keys and values of one token across all layers (on this rank)."""
    return 2 * num_layers * num_kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()


@dataclass(frozen=True)
class AttentionShape:
    """What a transformers config says about its attention caches."""

    layers: int  # decoder layers
    heads: int
    kv_heads: int
    head_dim: int
    caches: int  # per layer: 1, or 2 with an encoder-decoder's cross-attention

    @classmethod
    def of(cls, config: object) -> AttentionShape:
        heads = getattr(config, "num_attention_heads", None) or getattr(config, "num_heads", 1)
        hidden = getattr(config, "hidden_size", None) or getattr(config, "d_model", 0)
        layers = getattr(config, "num_decoder_layers", None) or getattr(config, "num_hidden_layers", None)
        return cls(
            layers=layers or getattr(config, "num_layers", 1),
            heads=heads,
            kv_heads=getattr(config, "num_key_value_heads", None) or heads,
            head_dim=getattr(config, "head_dim", None) or getattr(config, "d_kv", None) or hidden // heads,
            caches=2 if getattr(config, "is_encoder_decoder", False) else 1,
        )


def config_kv_bytes_per_token(config: object, dtype: torch.dtype) -> int:
    """The same from a transformers config; encoder-decoders also cache cross-attention."""
    shape = AttentionShape.of(config)
    return shape.caches * kv_bytes_per_token(shape.layers, shape.kv_heads, shape.head_dim, dtype)


def config_decode_bytes_per_token(config: object, dtype: torch.dtype) -> float:
    """KV bytes per cached token plus what a decode step of a padded (transformers) batch briefly
    adds, one layer at a time: growing the dynamic cache concatenates (the layer's old and new
    tensors coexist), and attention under a padding mask expands grouped KV heads to the query
    heads (``repeat_kv``: heads/kv_heads copies of the layer). The larger of the two counts."""
    shape = AttentionShape.of(config)
    transient_layers = max(1.0, shape.heads / shape.kv_heads)
    return config_kv_bytes_per_token(config, dtype) * (1 + transient_layers / shape.layers)


def synthesised(
    settings: MemorySettings, bytes_per_token: float, block_size: int = 1, cache_room_tokens: int = 0
) -> pb.MemoryModel:
    """Room for MAX_BATCH_SIZE requests of MAX_SEQUENCE_LENGTH tokens (and each one's slack)."""
    tokens = settings.max_batch_size * (settings.max_sequence_length + block_size - 1 + cache_room_tokens)
    return pb.MemoryModel(
        limit_bytes=tokens * bytes_per_token,
        bytes_per_token=bytes_per_token,
        prefill_bytes_per_token=0.0,
        block_size=block_size,
        measured=False,
        cache_room_tokens=cache_room_tokens,
    )


def _prefill_peak(device: torch.device, run_prefill: Callable[[int], None], tokens: int) -> float:
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    run_prefill(tokens)
    torch.cuda.synchronize(device)
    return float(torch.cuda.max_memory_allocated(device) - before)


def fit_prefill(short: int, short_peak: float, long: int, long_peak: float) -> tuple[float, float]:
    """``linear`` and ``quadratic`` with ``peak(n) = linear * n + quadratic * n**2`` through two
    measurements (clamped at zero: noise must not promise memory back)."""
    quadratic = max(0.0, (long_peak / long - short_peak / short) / (long - short)) if long > short else 0.0
    return max(0.0, long_peak / long - quadratic * long), quadratic


def measured_prefill_bytes(
    device: torch.device, run_prefill: Callable[[int], None], tokens: int
) -> tuple[float, float]:
    """Transient prefill memory of an n-token prompt as ``linear * n + quadratic * n**2``, fitted
    to two real prefills (``tokens`` and half as many): attention scores grow with the square."""
    short = max(1, tokens // 2)
    long_peak = _prefill_peak(device, run_prefill, tokens)
    short_peak = _prefill_peak(device, run_prefill, short)
    return fit_prefill(short, short_peak, tokens, long_peak)


def measured_decode_bytes_per_token(
    device: torch.device,
    run_decode: Callable[[int, int, Callable[[], None]], None],
    rows: int,
    tokens: int,
    cache_room_tokens: int = 0,
) -> float:
    """Peak memory of a decode step per cached token: ``run_decode(rows, tokens, start_counting)``
    prefills ``rows`` prompts of ``tokens`` tokens, calls ``start_counting`` and decodes once. The
    peak above the memory before the prefill holds the batch's cache and all the step adds. A
    cache with room holds ``tokens + cache_room_tokens`` positions per row from the prefill on."""
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)

    def start_counting() -> None:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)

    run_decode(rows, tokens, start_counting)
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - before) / (rows * (tokens + max(1, cache_room_tokens)))


# CUDA_PROCESS_MEMORY_FRACTION: the share of each GPU this process may use (limit_process_memory).
_process_memory_fraction = 1.0


def limit_process_memory(fraction: float, device: torch.device) -> None:
    """Caps this process's allocations at ``fraction`` of the device (TGIS's
    CUDA_PROCESS_MEMORY_FRACTION); what it measures as free stays within the cap."""
    global _process_memory_fraction
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"CUDA_PROCESS_MEMORY_FRACTION must be in (0, 1], got {fraction}")
    _process_memory_fraction = fraction
    torch.cuda.set_per_process_memory_fraction(fraction, device)


def device_free_bytes(device: torch.device) -> float:
    """Device memory this process may still take: free on the device, and within its share."""
    free, total = torch.cuda.mem_get_info(device)
    within_share = _process_memory_fraction * total - torch.cuda.memory_reserved(device)
    return max(0.0, min(float(free), within_share))


def free_bytes_for_batches(device: torch.device, settings: MemorySettings) -> float:
    """What batches may use of the device memory free now (after the weights)."""
    torch.cuda.empty_cache()
    return usable_bytes(device_free_bytes(device), settings)


def usable_bytes(free: float, settings: MemorySettings) -> float:
    """Free memory less what is reserved for later (prefix cache), less BATCH_SAFETY_MARGIN percent."""
    return max(0.0, free - settings.reserved_bytes) * (1 - settings.safety_margin_percent / 100)
