"""A layer's write of this step's keys and values into the paged cache as one GPU kernel, with the
rotary embedding of queries and keys in the same kernel where the layer has one.

Eagerly (and through ``fused.rotate``) an attention layer spends four small kernels before the
attention itself: rotary for the queries, rotary for the keys, and one ``index_copy_`` each for
keys and values. On an H200 at one stream they were 7 µs a layer (2 × 1.1 + 2 × 2.4), 0.22 ms of
a 4.79 ms decode step. Here one Triton program per token and head (or group of heads) rotates the
query heads, or rotates the key heads and writes them and their value heads to the token's cache
slot. The rotation reads each half of a head as one contiguous run (vector loads), not each
element's partner from the other half.

Rounding is eager's: in half precision each product of the rotation and their sum are rounded
as PyTorch rounds them, so the cache holds the same bits as ``fused.rotate`` + ``index_copy_``.
That needs Triton's floating-point fusion off: with it the compiler contracts a product and the
sum into one fused multiply-add (``fma.rn.bf16`` / ``fma.rn.f32``), which skips a rounding.
Used on CUDA tensors with Triton installed and FUSED_KERNELS on (``fused.runs_fused``); the
caller falls back to the plain ops elsewhere.
"""

from __future__ import annotations

import torch

from tgis_shard.layers import fused

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU installs: the callers' plain ops run instead
    triton = None


def applies(*heads: torch.Tensor, cos: torch.Tensor | None = None) -> bool:
    """Whether the kernel serves this layer's step: on a GPU with Triton and fused kernels on,
    every one of ``heads`` (keys, values, queries: ``[T, heads, head_dim]``) contiguous in its
    last dimension, rotary tables (when given) as wide as a head."""
    if not (fused.runs_fused(heads[0]) and triton is not None) or any(h.stride(-1) != 1 for h in heads):
        return False
    return cos is None or (cos.shape[-1] == heads[0].shape[-1] and cos.stride(-1) == 1)


# A program per token and head while the step's tokens are few (a decode step's 40 heads spread
# over 40 multiprocessors); from this many tokens on, a program per token and 8 heads. One-warp
# programs for every head of a 4,096-token prefill were 164k of them and took 100 µs a layer on an
# H100 (~1 TB/s); ~32 such programs fit on a multiprocessor at a time, each waiting on a few
# memory round trips, which would explain it.
_HEADS_TOGETHER_FROM_TOKENS, _HEADS_TOGETHER = 128, 8

if triton is not None:

    @triton.jit
    def _rotate(source, target, half, rows, cos1, sin1, cos2, sin2, HALF: tl.constexpr):
        """Rotates the heads at ``source`` into ``target``, each half loaded and stored as a
        contiguous run (LLaMA's halves layout: rotate_half(x) = [-x2, x1]); every product and sum
        rounded as eager rounds it (negation is exact either way)."""
        first = tl.load(source + half, mask=rows, other=0.0)
        second = tl.load(source + HALF + half, mask=rows, other=0.0)
        x1, x2 = first.to(tl.float32), second.to(tl.float32)
        dtype = first.dtype
        out1 = (x1 * cos1).to(dtype).to(tl.float32) + (-x2 * sin1).to(dtype).to(tl.float32)
        out2 = (x2 * cos2).to(dtype).to(tl.float32) + (x1 * sin2).to(dtype).to(tl.float32)
        tl.store(target + half, out1.to(dtype), mask=rows)
        tl.store(target + HALF + half, out2.to(dtype), mask=rows)

    @triton.jit
    def _write_kernel(
        queries,
        keys,
        values,
        cos_table,
        sin_table,
        rotated_queries,
        key_cache,
        value_cache,
        slots,
        query_row,
        query_head,
        key_row,
        key_head,
        value_row,
        value_head,
        table_row,
        QUERY_HEADS: tl.constexpr,  # 0: no rotation, keys and values only
        KV_HEADS: tl.constexpr,
        HEAD_DIM: tl.constexpr,
        BLOCK: tl.constexpr,
        HALF_BLOCK: tl.constexpr,
        HEADS: tl.constexpr,  # heads a program takes: query heads first, then key-value heads
    ):
        token = tl.program_id(0).to(tl.int64)
        head = tl.program_id(1) * HEADS + tl.arange(0, HEADS)[:, None]
        d = tl.arange(0, BLOCK)[None, :]
        kv_head = head - QUERY_HEADS
        kv_rows = (kv_head >= 0) & (kv_head < KV_HEADS)
        kv_inside = kv_rows & (d < HEAD_DIM)
        slot = tl.load(slots + token)
        key_ptr = keys + token * key_row + kv_head * key_head
        target = slot * (KV_HEADS * HEAD_DIM) + kv_head * HEAD_DIM
        if QUERY_HEADS == 0:
            tl.store(key_cache + target + d, tl.load(key_ptr + d, mask=kv_inside), mask=kv_inside)
        else:
            HALF: tl.constexpr = HEAD_DIM // 2
            half = tl.arange(0, HALF_BLOCK)[None, :]
            half_inside = half < HALF
            table = token * table_row + half
            cos1 = tl.load(cos_table + table, mask=half_inside, other=0.0).to(tl.float32)
            sin1 = tl.load(sin_table + table, mask=half_inside, other=0.0).to(tl.float32)
            cos2 = tl.load(cos_table + table + HALF, mask=half_inside, other=0.0).to(tl.float32)
            sin2 = tl.load(sin_table + table + HALF, mask=half_inside, other=0.0).to(tl.float32)
            query_rows = (head < QUERY_HEADS) & half_inside
            _rotate(
                queries + token * query_row + head * query_head,
                rotated_queries + (token * QUERY_HEADS + head) * HEAD_DIM,
                half,
                query_rows,
                cos1,
                sin1,
                cos2,
                sin2,
                HALF,
            )
            _rotate(key_ptr, key_cache + target, half, kv_rows & half_inside, cos1, sin1, cos2, sin2, HALF)
        value_ptr = values + token * value_row + kv_head * value_head
        tl.store(value_cache + target + d, tl.load(value_ptr + d, mask=kv_inside), mask=kv_inside)


def write(
    keys: torch.Tensor,
    values: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    slots: torch.Tensor,
    queries: torch.Tensor | None = None,
    rotary: tuple[torch.Tensor, torch.Tensor] | None = None,
    rotated_out: torch.Tensor | None = None,
) -> torch.Tensor | None:
    """Writes ``keys`` and ``values`` ``[T, kv_heads, head_dim]`` at cache ``slots`` ``[T]`` of
    ``key_cache`` / ``value_cache`` (contiguous ``[blocks, block_size, kv_heads, head_dim]``).
    With ``rotary`` (cos, sin ``[T, head_dim]``), the keys are rotated first and the rotated
    ``queries`` ``[T, heads, head_dim]`` are returned: in ``rotated_out`` where given (contiguous,
    of the queries' shape), else in a new contiguous tensor."""
    tokens, kv_heads, head_dim = keys.shape
    if rotary is None:
        cos = sin = out = keys  # unread: the kernel's rotation is compiled out
        query_heads, source = 0, keys
    else:
        if queries is None:
            raise ValueError("a rotary write rotates the queries too")
        cos, sin = rotary
        query_heads, source = queries.shape[1], queries
        out = rotated_out
        if out is None:
            out = torch.empty((tokens, query_heads, head_dim), dtype=queries.dtype, device=queries.device)
    if tokens:
        heads = 1 if tokens < _HEADS_TOGETHER_FROM_TOKENS else _HEADS_TOGETHER
        _write_kernel[(tokens, triton.cdiv(query_heads + kv_heads, heads))](
            source,
            keys,
            values,
            cos,
            sin,
            out,
            key_cache,
            value_cache,
            slots,
            source.stride(0),
            source.stride(1),
            keys.stride(0),
            keys.stride(1),
            values.stride(0),
            values.stride(1),
            cos.stride(0),
            QUERY_HEADS=query_heads,
            KV_HEADS=kv_heads,
            HEAD_DIM=head_dim,
            BLOCK=triton.next_power_of_2(head_dim),
            HALF_BLOCK=triton.next_power_of_2(max(1, head_dim // 2)),
            HEADS=heads,
            num_warps=4 if heads > 1 else 1 if head_dim <= 128 else 2,
            enable_fp_fusion=False,  # eager's roundings (see the module's docstring)
        )
    return None if rotary is None else out
