"""Decode attention over the paged cache in one Triton kernel that plans itself on the device.

A decode step has one query token per sequence. FlashInfer's decode kernels need a plan made on
the host every step (its page lists copied in), and in a CUDA graph they always split each
sequence's keys and merge the parts afterwards. On an H200 at 128 rows of ~200-token contexts its
kernel read the cache at 2.2 TB/s (45 µs a layer) where copies run at 4.2.

Here one program attends one (sequence, KV head) pair: the query heads sharing that KV head are
the rows of one tile (padded to the 16 a tensor-core product needs), and the program walks the
sequence's block table ``TILE`` tokens at a time with an online softmax. Each program reads its
sequence's length and blocks from the step's metadata on the device, so nothing is planned on
the host and a CUDA graph replays it for any lengths. When rows × KV heads cannot fill the device
(few rows), each sequence is cut into ``splits`` parts of whole blocks, attended by programs
side by side, and a second kernel merges their partial results; the number of parts is fixed by
the number of rows (a graph's grid is fixed), and parts past a short sequence's end return at
once. Half-precision caches only: the products round their inputs as FlashInfer's do (the
probabilities in the cache's dtype before the product with the values, accumulated in float32).
"""

from __future__ import annotations

import torch

from tgis_shard.layers import gpu

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU installs: FlashInfer's decode and the other backends run instead
    triton = None

# Tokens a program reads per iteration (several 16-token blocks per load keeps the loads wide).
TILE = 64
# Programs per multiprocessor a step's grid aims for before sequences are cut into parts.
PROGRAMS_PER_SM = 2
# The most parts a sequence is cut into (the merge reads every part of every row); a power of two.
MAX_SPLITS = 32
_HALF = (torch.float16, torch.bfloat16)


def serves(device: torch.device | str, dtype: torch.dtype) -> bool:
    """Whether the kernel runs for a cache of ``dtype`` on ``device``: a GPU, Triton, half precision."""
    return triton is not None and torch.device(device).type == "cuda" and dtype in _HALF


def splits_for(rows: int, kv_heads: int, multiprocessors: int) -> int:
    """Parts each sequence's keys are cut into: enough programs to fill the device, rounded up to
    a power of two. The count is a compile-time constant of the kernels, so it takes few values,
    and the decode graphs' buckets (1, 2, 4, 8, then multiples of 8), each captured at start-up,
    compile every one of them: halving the rows at most halves the rounded count. A mixed step's
    3 or 5 decodes once asked for 11 or 7 parts, a compilation of ~0.5 s inside a request's step."""
    wanted = -(-PROGRAMS_PER_SM * multiprocessors // (rows * kv_heads))
    return min(MAX_SPLITS, 1 << max(0, wanted - 1).bit_length())


def rows_for_each_part_count(max_rows: int, kv_heads: int, multiprocessors: int) -> list[int]:
    """The fewest rows of a step that take each part count ``splits_for`` gives for 1 to
    ``max_rows`` rows: steps of these sizes compile every variant of the kernel a step can run."""
    first: dict[int, int] = {}
    for rows in range(1, max_rows + 1):
        first.setdefault(splits_for(rows, kv_heads, multiprocessors), rows)
        if first.get(1):
            break  # past the first uncut count, every larger step is uncut too
    return sorted(first.values())


if triton is not None:
    # The block tables' row stride (as wide as a step's longest context needs, in eager steps)
    # is a plain argument: specialised, it compiled a new kernel whenever it first met a multiple
    # of 16 or 1 in a request's step.
    @triton.jit(do_not_specialize=["table_row"])
    def _attend_kernel(
        query,
        key_cache,
        value_cache,
        block_tables,
        context_lens,
        out,
        part_out,
        part_max,
        part_sum,
        scale_log2,
        query_row,
        query_head,
        table_row,
        cache_block,
        cache_token,
        cache_head,
        out_row,
        out_head,
        HEADS: tl.constexpr,
        GROUP: tl.constexpr,
        GROUP_PAD: tl.constexpr,
        HEAD_DIM: tl.constexpr,
        DIM_PAD: tl.constexpr,
        BLOCK_SIZE: tl.constexpr,
        TILE: tl.constexpr,
        SPLITS: tl.constexpr,
    ):
        row = tl.program_id(0)
        kv_head = tl.program_id(1)
        split = tl.program_id(2)
        context = tl.load(context_lens + row)
        # This part's tokens: whole blocks, so a tile never straddles two parts' blocks.
        per_split = tl.cdiv(tl.cdiv(context, BLOCK_SIZE), SPLITS) * BLOCK_SIZE
        start = split * per_split
        end = tl.minimum(start + per_split, context)
        g = tl.arange(0, GROUP_PAD)
        d = tl.arange(0, DIM_PAD)
        heads = kv_head * GROUP + g
        head_mask = (g[:, None] < GROUP) & (d[None, :] < HEAD_DIM)
        q = tl.load(query + row * query_row + heads[:, None] * query_head + d[None, :], mask=head_mask, other=0.0)
        best = tl.full([GROUP_PAD], float("-inf"), tl.float32)
        total = tl.zeros([GROUP_PAD], tl.float32)
        acc = tl.zeros([GROUP_PAD, DIM_PAD], tl.float32)
        t = tl.arange(0, TILE)
        for first in range(start, end, TILE):
            tokens = first + t
            valid = tokens < end
            block = tl.load(block_tables + row * table_row + tokens // BLOCK_SIZE, mask=valid, other=0)
            offsets = block.to(tl.int64) * cache_block + (tokens % BLOCK_SIZE) * cache_token + kv_head * cache_head
            kv_mask = valid[:, None] & (d[None, :] < HEAD_DIM)
            keys = tl.load(key_cache + offsets[:, None] + d[None, :], mask=kv_mask, other=0.0)
            scores = tl.dot(q, tl.trans(keys)) * scale_log2
            scores = tl.where(valid[None, :], scores, float("-inf"))
            # Every tile holds a valid token (parts start on a block inside the sequence), so
            # ``top`` is finite from the first tile on.
            top = tl.maximum(best, tl.max(scores, 1))
            weights = tl.exp2(scores - top[:, None])
            rescale = tl.exp2(best - top)
            total = total * rescale + tl.sum(weights, 1)
            values = tl.load(value_cache + offsets[:, None] + d[None, :], mask=kv_mask, other=0.0)
            acc = acc * rescale[:, None] + tl.dot(weights.to(values.dtype), values)
            best = top
        if SPLITS == 1:
            result = acc / total[:, None]
            target = out + row * out_row + heads[:, None] * out_head + d[None, :]
            tl.store(target, result.to(out.dtype.element_ty), mask=head_mask)
        else:
            # A part past the sequence's end stores best = -inf and total = 0: weight 0 when merged.
            part = (row * SPLITS + split) * HEADS + heads
            tl.store(part_out + part[:, None] * DIM_PAD + d[None, :], acc, mask=head_mask)
            tl.store(part_max + part, best, mask=g < GROUP)
            tl.store(part_sum + part, total, mask=g < GROUP)

    @triton.jit
    def _merge_kernel(
        part_out,
        part_max,
        part_sum,
        out,
        out_row,
        out_head,
        HEADS: tl.constexpr,
        HEAD_DIM: tl.constexpr,
        DIM_PAD: tl.constexpr,
        SPLITS: tl.constexpr,
        SPLITS_PAD: tl.constexpr,
    ):
        row = tl.program_id(0)
        head = tl.program_id(1)
        s = tl.arange(0, SPLITS_PAD)
        d = tl.arange(0, DIM_PAD)
        part = (row * SPLITS + s) * HEADS + head
        used = s < SPLITS
        best = tl.load(part_max + part, mask=used, other=float("-inf"))
        total = tl.load(part_sum + part, mask=used, other=0.0)
        weight = tl.exp2(best - tl.max(best, 0))  # a part with no tokens: exp2(-inf) = 0
        mask = used[:, None] & (d[None, :] < HEAD_DIM)
        acc = tl.load(part_out + part[:, None] * DIM_PAD + d[None, :], mask=mask, other=0.0)
        result = tl.sum(acc * weight[:, None], 0) / tl.sum(total * weight, 0)
        tl.store(out + row * out_row + head * out_head + d, result.to(out.dtype.element_ty), mask=d < HEAD_DIM)


def attend(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    splits: int | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention of one query token per sequence, ``query`` ``[B, heads, head_dim]``, over each
    sequence's ``context_lens[b]`` cached tokens (its own included) in the blocks
    ``block_tables[b]`` of ``key_cache`` / ``value_cache`` ``[blocks, block_size, kv_heads,
    head_dim]``. ``splits``: parts per sequence (default: ``splits_for`` this device). ``out``:
    where the result goes (rows of a larger step's output, say); a new tensor by default."""
    rows, heads, head_dim = query.shape
    _, block_size, kv_heads, _ = key_cache.shape
    if heads % kv_heads:
        raise ValueError(f"{heads} query heads are not a multiple of {kv_heads} kv heads")
    if key_cache.stride() != value_cache.stride() or key_cache.stride(-1) != 1 or query.stride(-1) != 1:
        raise ValueError("keys and values need one layout, contiguous in the head dimension")
    if out is None:
        out = torch.empty_like(query)
    elif out.shape != query.shape or out.stride(-1) != 1:
        raise ValueError("the output takes the query's shape, contiguous in the head dimension")
    if rows == 0:
        return out
    if splits is None:
        splits = splits_for(rows, kv_heads, gpu.multiprocessors(query.device))
    group = heads // kv_heads
    dim_pad = triton.next_power_of_2(head_dim)
    if splits > 1:
        parts = rows * splits * heads
        part_out = torch.empty((parts, dim_pad), dtype=torch.float32, device=query.device)
        part_max = torch.empty(parts, dtype=torch.float32, device=query.device)
        part_sum = torch.empty(parts, dtype=torch.float32, device=query.device)
    else:
        part_out = part_max = part_sum = out  # unread: one part writes ``out`` itself
    _attend_kernel[(rows, kv_heads, splits)](
        query,
        key_cache,
        value_cache,
        block_tables,
        context_lens,
        out,
        part_out,
        part_max,
        part_sum,
        scale * 1.4426950408889634,  # log2(e): the kernel works in powers of two
        query.stride(0),
        query.stride(1),
        block_tables.stride(0),
        key_cache.stride(0),
        key_cache.stride(1),
        key_cache.stride(2),
        out.stride(0),
        out.stride(1),
        HEADS=heads,
        GROUP=group,
        GROUP_PAD=max(16, triton.next_power_of_2(group)),
        HEAD_DIM=head_dim,
        DIM_PAD=dim_pad,
        BLOCK_SIZE=block_size,
        TILE=TILE,
        SPLITS=splits,
        num_warps=4,
    )
    if splits > 1:
        _merge_kernel[(rows, heads)](
            part_out,
            part_max,
            part_sum,
            out,
            out.stride(0),
            out.stride(1),
            HEADS=heads,
            HEAD_DIM=head_dim,
            DIM_PAD=dim_pad,
            SPLITS=splits,
            SPLITS_PAD=triton.next_power_of_2(splits),
            num_warps=1 if dim_pad <= 128 else 2,
        )
    return out
