"""Paged KV cache and causal attention over padding-free (ragged) batches.

The tgis_native engine flattens every token of every sequence of a step into one ``[T, ...]``
tensor. Keys and values live in a cache preallocated as fixed-size blocks; each sequence owns a
list of block ids (its block table, handed out by the router), so requests join and leave by
taking and returning blocks, never by reallocating or concatenating the cache.

A step goes: ``AttentionMetadata.build`` once, then per layer ``cache.store`` of the new keys and
values, then ``paged_attention`` (which reads the new keys back from the cache). The cache is
created for one backend, which fixes its block size; all backends give the same results:

- ``"flash"``: flash-attn 2.x paged kernels, where installed. flash-attn only pages with
  ``block_size % 256 == 0`` (and needs fp16/bf16 on CUDA, and ``block_table`` on its varlen
  kernel, added in 2.6).
- ``"flex"``: FlexAttention's compiled kernel reading the cache in place through a block mask
  (``flex_paged``): the fused path on any CUDA GPU without flash-attn.
- ``"flashinfer"``: FlashInfer's paged kernels (``flashinfer_paged``), where installed: the GPU
  path for models without ALiBi; it plans each step on the host (``plan_attention``).
- ``"torch"``: plain torch (CPU): gathers each sequence's blocks into a padded batch and runs
  ``scaled_dot_product_attention`` with an explicit mask.

Shapes depend only on the batch size, ``max_q`` and the block table width, and all per-step data
are tensors, so a later CUDA-graph runner can copy metadata into fixed buffers of a bucket's size.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from types import ModuleType
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
import torch
import torch.nn.functional as F

from tgis_shard.layers import fused, kv_write, paged_decode
from tgis_shard.staging import to_device

if TYPE_CHECKING:
    from tgis_shard.layers.flashinfer_paged import FlashInferPlanner

# Tokens per cache block each backend is run with. flash-attn pages KV only in multiples of 256
# (csrc/flash_api.cpp); FlexAttention visits whole blocks, and 128 is its kernels' key tile; the
# torch path gathers blocks, so small ones waste the least.
# FlashInfer pages at any size; 16 is what its decode kernels are tuned for.
BLOCK_SIZES = {"flash": 256, "flashinfer": 16, "flex": 128, "torch": 16}
# Both fused kernels stop at this head size and want multiples of 8.
FUSED_MAX_HEAD_DIM = 256
_HALF_DTYPES = (torch.float16, torch.bfloat16)


Tokens = TypeVar("Tokens", int, torch.Tensor)


def blocks_for(num_tokens: Tokens, block_size: int) -> Tokens:
    """Blocks a sequence of ``num_tokens`` tokens occupies (elementwise for an integer tensor)."""
    return -(-num_tokens // block_size)


class PagedKVCache:
    """Per layer, one key and one value tensor of shape ``[num_blocks, block_size, kv_heads, head_dim]``.

    That layout is flash-attn's paged layout, and token ``slot = block * block_size + offset`` is
    row ``slot`` of the tensor viewed as ``[num_blocks * block_size, kv_heads, head_dim]``.
    Zero-initialised because masked entries still pass through the attention product: garbage
    that is not finite (NaN, inf) would poison real outputs even with zero weight.
    """

    def __init__(
        self,
        num_layers: int,
        num_blocks: int,
        block_size: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str,
        backend: str = "torch",
        num_heads: int | None = None,
        decode_kernel: bool = False,
    ) -> None:
        """``num_heads``: query heads per layer (on this rank), which the flashinfer backend plans
        with. ``decode_kernel``: steps of decodes only run ``paged_decode``'s kernel instead of the
        backend's, where it serves this cache (half precision on a GPU); on FlashInfer, which
        attends a step's leading decodes apart from its prompt chunks, those decodes too."""
        if backend not in BLOCK_SIZES:
            raise ValueError(f"unknown attention backend {backend!r}; one of {sorted(BLOCK_SIZES)}")
        if backend == "flash" and block_size % BLOCK_SIZES["flash"] != 0:
            raise ValueError(f"flash-attn pages only blocks of a multiple of {BLOCK_SIZES['flash']} tokens")
        self.backend = backend
        self.num_layers = num_layers
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.dtype = dtype
        self.device = torch.device(device)
        shape = (num_blocks, block_size, num_kv_heads, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=self.device) for _ in range(num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=self.device) for _ in range(num_layers)]
        self.decode_kernel = decode_kernel and paged_decode.serves(self.device, dtype)
        self.planner: FlashInferPlanner | None = None
        if backend == "flashinfer":
            if num_heads is None:
                raise ValueError("the flashinfer backend needs the number of query heads")
            from tgis_shard.layers.flashinfer_paged import FlashInferPlanner

            self.planner = FlashInferPlanner(
                num_heads, num_kv_heads, head_dim, block_size, num_blocks, dtype, self.device, self.decode_kernel
            )

    def decodes_on_kernel(self, meta: AttentionMetadata) -> bool:
        """Whether the step ``meta`` describes attends through ``paged_decode``'s kernel: a step of
        decodes only on a cache made with ``decode_kernel`` where it serves."""
        return self.decode_kernel and meta.max_q == 1

    def store(self, layer: int, keys: torch.Tensor, values: torch.Tensor, slots: torch.Tensor) -> None:
        """Writes this step's ``[T, kv_heads, head_dim]`` keys and values at ``slots`` ``[T]``
        (one kernel on GPUs: ``kv_write``)."""
        if kv_write.applies(keys, values):
            kv_write.write(keys, values, self.keys[layer], self.values[layer], slots)
            return
        flat = (-1, self.num_kv_heads, self.head_dim)
        self.keys[layer].view(flat).index_copy_(0, slots, keys)
        self.values[layer].view(flat).index_copy_(0, slots, values)

    def rotate_and_store(
        self,
        layer: int,
        queries: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        rotary: tuple[torch.Tensor, torch.Tensor],
        slots: torch.Tensor,
        rotated_out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``store`` of the keys rotated by ``rotary`` (cos, sin ``[T, head_dim]``); returns the
        queries rotated the same way, in ``rotated_out`` where given (contiguous, the queries'
        shape). One kernel on GPUs, with the rotation of ``fused.rotate``."""
        if rotated_out is not None and (rotated_out.shape != queries.shape or not rotated_out.is_contiguous()):
            raise ValueError("the rotated queries' buffer must be contiguous, of the queries' shape")
        if kv_write.applies(keys, values, queries, cos=rotary[0]):
            rotated = kv_write.write(
                keys, values, self.keys[layer], self.values[layer], slots, queries, rotary, rotated_out
            )
            assert rotated is not None
            return rotated
        queries, keys = fused.rotate(queries, keys, *rotary)
        self.store(layer, keys, values, slots)
        return queries if rotated_out is None else rotated_out.copy_(queries)


@dataclass(eq=False)
class HostLayout:
    """A step's layout as host arrays, for a backend that plans on the CPU (FlashInfer) without
    waiting for the device. Valid until the next step is prepared (the arrays may be views of
    reused staging buffers)."""

    cu_seqlens_q: np.ndarray
    """[B+1]: query tokens of sequence b are rows cu_seqlens_q[b]:cu_seqlens_q[b+1]."""
    context_lens: np.ndarray
    """[B]: tokens in the cache per sequence, this step's included."""
    block_tables: np.ndarray
    """[B, width]: each sequence's blocks, at least as many as its context needs."""


# Not frozen: torch.compile (PT2_COMPILE) wraps a frozen dataclass passed to compiled code field
# by field, guarding on every tensor and array in it; a plain one it passes through untouched.
@dataclass(eq=False)
class AttentionMetadata:
    """Where each sequence of a step sits in the ragged batch and in the cache; shared by all layers.
    Treated as read-only once built."""

    cu_seqlens_q: torch.Tensor
    """[B+1] int32: query tokens of sequence b are rows cu_seqlens_q[b]:cu_seqlens_q[b+1]."""
    context_lens: torch.Tensor
    """[B] int32: tokens in the cache per sequence, this step's included."""
    block_tables: torch.Tensor
    """[B, max_blocks] int32, padded with block 0 (never read past context_lens)."""
    slots: torch.Tensor
    """[T] int64: cache slot of each new token."""
    max_q: int
    max_context: int
    positions: torch.Tensor
    """[T] int64: absolute position of each new token (also what rotary embeddings need)."""
    query_rows: torch.Tensor
    """[T] int64: each token's row in the padded [B * max_q] query layout of the torch backend."""
    cu_seqlens_k: torch.Tensor
    """[B+1] int32: cumulative context_lens, as flash-attn's varlen kernel wants them."""
    host: HostLayout | None = field(default=None, compare=False)
    _derived: dict[Hashable, Any] = field(default_factory=dict, init=False, repr=False, compare=False)

    @property
    def num_seqs(self) -> int:
        return self.context_lens.shape[0]

    def derived(self, key: Hashable, make: Callable[[], Any]) -> Any:
        """What a backend builds once per step and every layer reuses (``make()`` on first use)."""
        if key not in self._derived:
            self._derived[key] = make()
        return self._derived[key]

    def pad_rows(self, rows: torch.Tensor, fill: float = 0) -> torch.Tensor:
        """Per-token ``[T, ...]`` → per-sequence ``[B, max_q, ...]``, ``fill`` after each sequence's tokens."""
        tail = rows.shape[1:]
        padded = rows.new_full((self.num_seqs * self.max_q, *tail), fill).index_copy_(0, self.query_rows, rows)
        return padded.view(self.num_seqs, self.max_q, *tail)

    def unpad_rows(self, padded: torch.Tensor) -> torch.Tensor:
        """``[B, max_q, ...]`` → ``[T, ...]``: the inverse of ``pad_rows``."""
        return padded.reshape(self.num_seqs * self.max_q, *padded.shape[2:])[self.query_rows]

    @classmethod
    def build(
        cls,
        query_lens: Sequence[int],
        context_lens: Sequence[int],
        block_tables: Sequence[Sequence[int]],
        block_size: int,
        device: torch.device | str,
        max_blocks: int | None = None,
    ) -> AttentionMetadata:
        """Metadata of one step; the new tokens are the last ``query_len`` positions of each context.

        ``max_blocks`` pads the block tables to a fixed width (a CUDA-graph bucket's); by default
        they are as wide as the longest context needs.
        """
        if not (len(query_lens) == len(context_lens) == len(block_tables)):
            raise ValueError("query_lens, context_lens and block_tables must have one entry per sequence")
        if not query_lens:
            raise ValueError("a step needs at least one sequence")
        needed = [blocks_for(ctx, block_size) for ctx in context_lens]
        for seq, (q_len, ctx, table, n) in enumerate(zip(query_lens, context_lens, block_tables, needed, strict=True)):
            if not 1 <= q_len <= ctx:
                raise ValueError(f"sequence {seq}: need 1 <= query_len ({q_len}) <= context_len ({ctx})")
            if len(table) < n:
                raise ValueError(f"sequence {seq}: {ctx} tokens need {n} blocks, its table has {len(table)}")
        width = max(needed)
        if max_blocks is not None:
            if max_blocks < width:
                raise ValueError(f"max_blocks={max_blocks} is below the {width} blocks this step needs")
            width = max_blocks
        padded = [list(table[:n]) + [0] * (width - n) for table, n in zip(block_tables, needed, strict=True)]
        tables = torch.tensor(padded, dtype=torch.long)

        q_lens = torch.tensor(query_lens, dtype=torch.long)
        ctx_lens = torch.tensor(context_lens, dtype=torch.long)
        num_seqs = len(query_lens)
        max_q = int(q_lens.max())
        cu_q = F.pad(q_lens.cumsum(0), (1, 0))
        seq_of_token = torch.repeat_interleave(torch.arange(num_seqs), q_lens)
        index_in_query = torch.arange(int(cu_q[-1])) - cu_q[seq_of_token]
        positions = (ctx_lens - q_lens)[seq_of_token] + index_in_query
        slots = tables[seq_of_token, positions // block_size] * block_size + positions % block_size

        return cls(
            cu_seqlens_q=to_device(cu_q, device, torch.int32),
            context_lens=to_device(ctx_lens, device, torch.int32),
            block_tables=to_device(tables, device, torch.int32),
            slots=to_device(slots, device),
            max_q=max_q,
            max_context=int(ctx_lens.max()),
            positions=to_device(positions, device),
            query_rows=to_device(seq_of_token * max_q + index_in_query, device),
            cu_seqlens_k=to_device(F.pad(ctx_lens.cumsum(0), (1, 0)), device, torch.int32),
            host=HostLayout(cu_q.numpy(), ctx_lens.numpy(), tables.numpy()),
        )


@functools.cache
def _flash_attn() -> ModuleType | None:
    """flash_attn when installed and recent enough for paged varlen attention (2.6), else None."""
    try:
        import flash_attn
    except ImportError:
        return None
    return flash_attn if _major_minor(flash_attn.__version__) >= (2, 6) else None


def _major_minor(version: str) -> tuple[int, int]:
    major, minor = version.split(".")[:2]
    return int(major), int(minor)


# FlexAttention's paged use here (full-block lists, FORCE_USE_FLEX_ATTENTION) is verified from
# this release on; older torch keeps the plain path.
FLEX_MIN_TORCH = (2, 11)


@functools.cache
def _flex_available() -> bool:
    """Triton (which compiles FlexAttention) is importable and torch is recent enough."""
    if _major_minor(torch.__version__) < FLEX_MIN_TORCH:
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def choose_backend(
    device: torch.device | str, dtype: torch.dtype, head_dim: int, alibi: bool = False, sliding_window: bool = False
) -> str:
    """The fastest backend that runs here: flash-attn, else FlashInfer (without ALiBi or sliding
    windows), else FlexAttention on CUDA, else torch."""
    fused = torch.device(device).type == "cuda" and head_dim % 8 == 0 and 16 <= head_dim <= FUSED_MAX_HEAD_DIM
    if fused and dtype in _HALF_DTYPES and _flash_attn() is not None:
        return "flash"
    if fused and dtype in _HALF_DTYPES and not alibi and not sliding_window and _flashinfer_serves(head_dim):
        return "flashinfer"
    if fused and _flex_available():
        return "flex"
    return "torch"


def _flashinfer_serves(head_dim: int) -> bool:
    from tgis_shard.layers.flashinfer_paged import HEAD_DIMS, flashinfer_available

    return head_dim in HEAD_DIMS and flashinfer_available()


def plan_attention(cache: PagedKVCache, meta: AttentionMetadata, graph_rows: int | None = None) -> None:
    """The host's share of a step's attention, outside any CUDA graph and before the forward pass
    (or the replay of the decode graph of ``graph_rows`` rows): FlashInfer's plan. A step of
    decodes on the cache's decode kernel needs none."""
    if cache.planner is not None and not cache.decodes_on_kernel(meta):
        cache.planner.plan(meta, graph_rows)


def prepare_attention(cache: PagedKVCache, meta: AttentionMetadata) -> None:
    """Builds what the cache's backend derives once per step (FlexAttention's block mask), before
    the forward pass rather than in its first layer. Layers with a sliding window derive their
    own variant on first use."""
    if cache.backend == "flex":
        from tgis_shard.layers.flex_paged import prepare_flex_attention

        prepare_flex_attention(meta, cache.num_blocks, cache.block_size)


def paged_attention(
    query: torch.Tensor,
    cache: PagedKVCache,
    layer: int,
    meta: AttentionMetadata,
    scale: float,
    alibi_slopes: torch.Tensor | None = None,
    sliding_window: int | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """Causal attention of ``query`` ``[T, heads, head_dim]`` over each sequence's cached keys.

    Query token j of sequence b sits at position ``context_lens[b] - query_len_b + j`` and sees
    its own sequence's keys up to that position (the last ``sliding_window`` of them, itself
    included, when given). ``heads`` must be a multiple of the cache's kv heads (GQA/MQA).
    ``alibi_slopes`` ``[heads]`` adds ``slope * (key_pos - query_pos)`` to the scores.
    Call after ``cache.store`` for this layer. ``backend`` overrides the cache's (naming the
    cache's own is the same as leaving it out: the step runs as planned).
    """
    heads = query.shape[1]
    if heads % cache.num_kv_heads != 0:
        raise ValueError(f"{heads} query heads are not a multiple of {cache.num_kv_heads} kv heads")
    name = backend or cache.backend
    # A decode-only step on the cache's kernel has no FlashInfer plan (plan_attention skips it).
    own = name == cache.backend
    if own and cache.decodes_on_kernel(meta) and alibi_slopes is None and sliding_window is None:
        keys, values = cache.keys[layer], cache.values[layer]
        return paged_decode.attend(query, keys, values, meta.block_tables, meta.context_lens, scale)
    if name == "flashinfer":
        # Runs the plan made for this step, which lives with the cache (plan_attention).
        if cache.planner is None:
            raise ValueError("the flashinfer backend runs on a cache created for it")
        if alibi_slopes is not None or sliding_window is not None:
            raise ValueError("the flashinfer backend serves neither ALiBi nor sliding windows")
        keys, values = cache.keys[layer], cache.values[layer]
        rows = cache.planner.kernel_rows
        if not rows:
            return cache.planner.attend(query, keys, values, scale)
        out = torch.empty(query.shape, dtype=query.dtype, device=query.device)  # contiguous, as FlashInfer writes
        decodes = slice(0, rows)
        tables, lens = meta.block_tables[decodes], meta.context_lens[decodes]
        paged_decode.attend(query[decodes], keys, values, tables, lens, scale, out=out[decodes])
        cache.planner.attend(query[rows:], keys, values, scale, out=out[rows:])
        return out
    attend = _backends().get(name)
    if attend is None:
        raise ValueError(f"unknown attention backend {name!r}")
    return attend(query, cache.keys[layer], cache.values[layer], meta, scale, alibi_slopes, sliding_window)


def _torch_paged_attention(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    alibi_slopes: torch.Tensor | None,
    sliding_window: int | None,
) -> torch.Tensor:
    heads = query.shape[1]
    kv_heads = key_cache.shape[2]
    # One gather over the block tables: [B, max_blocks * block_size, kv_heads, head_dim].
    keys = key_cache[meta.block_tables].flatten(1, 2)
    values = value_cache[meta.block_tables].flatten(1, 2)
    if kv_heads != heads:
        # Expanded rather than SDPA's enable_gqa: that needs torch 2.5, and on CUDA it rules out
        # the memory-efficient kernel whenever a mask is given.
        keys = keys.repeat_interleave(heads // kv_heads, dim=2)
        values = values.repeat_interleave(heads // kv_heads, dim=2)

    # Padding query rows sit at position 0 so they see key 0 and stay finite.
    query_pos = meta.pad_rows(meta.positions).unsqueeze(-1)
    key_pos = torch.arange(keys.shape[1], device=query.device)
    # key_pos <= query_pos < context_len also keeps out the table's padding and stale slots.
    distance = key_pos - query_pos  # [B, max_q, K]
    allowed = distance <= 0
    if sliding_window is not None:
        allowed &= distance > -sliding_window
    if alibi_slopes is None:
        mask = allowed.unsqueeze(1)
    else:
        bias = alibi_slopes.to(torch.float32).view(1, heads, 1, 1) * distance.unsqueeze(1)
        mask = bias.masked_fill(~allowed.unsqueeze(1), -math.inf).to(query.dtype)

    out = F.scaled_dot_product_attention(
        meta.pad_rows(query).transpose(1, 2),
        keys.transpose(1, 2),
        values.transpose(1, 2),
        attn_mask=mask,
        scale=scale,
    )
    return meta.unpad_rows(out.transpose(1, 2))


def _flash_paged_attention(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    alibi_slopes: torch.Tensor | None,
    sliding_window: int | None,
) -> torch.Tensor:
    flash_attn = _flash_attn()
    if flash_attn is None:
        raise RuntimeError("the flash backend needs flash-attn >= 2.6")
    # flash-attn's window (left, right) includes left keys before the query besides itself; its
    # causal mask is bottom-right aligned, and its ALiBi bias -slope * |query_pos - key_pos| equals
    # slope * (key_pos - query_pos) on the causal side: both match the torch backend.
    window = (-1, -1) if sliding_window is None else (sliding_window - 1, 0)
    slopes = None if alibi_slopes is None else alibi_slopes.to(torch.float32)
    if meta.max_q == 1 and query.shape[0] == meta.num_seqs:
        # Pure decode: the kv-cache kernel splits long contexts across blocks of the GPU.
        out = flash_attn.flash_attn_with_kvcache(
            query.unsqueeze(1),
            key_cache,
            value_cache,
            cache_seqlens=meta.context_lens,
            block_table=meta.block_tables,
            softmax_scale=scale,
            causal=True,
            window_size=window,
            alibi_slopes=slopes,
        )
        return out.squeeze(1)
    return flash_attn.flash_attn_varlen_func(
        query,
        key_cache,
        value_cache,
        cu_seqlens_q=meta.cu_seqlens_q,
        cu_seqlens_k=meta.cu_seqlens_k,
        max_seqlen_q=meta.max_q,
        max_seqlen_k=meta.max_context,
        softmax_scale=scale,
        causal=True,
        window_size=window,
        alibi_slopes=slopes,
        block_table=meta.block_tables,
    )


@functools.cache
def _backends() -> dict[str, Callable[..., torch.Tensor]]:
    # flex_paged builds on this module (metadata, block arithmetic), so it is imported once this
    # module is complete.
    from tgis_shard.layers.flex_paged import flex_paged_attention

    return {"flash": _flash_paged_attention, "flex": flex_paged_attention, "torch": _torch_paged_attention}
