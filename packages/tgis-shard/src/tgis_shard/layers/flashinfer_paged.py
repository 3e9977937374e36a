"""Paged attention through FlashInfer (``pip install tgis-shard[flashinfer]``): the GPU backend.

FlashInfer reads the cache in place, page by page, at close to the device's copy bandwidth in
decode (measured on an H200: ../shared/notes/gpu-kernels.md). Its kernels take a *plan*: the
step's page lists and lengths, turned on the host into a work schedule. A step is planned once,
before its forward pass, and every layer runs that plan (``plan_attention`` →
``FlashInferPlanner.plan``; ``paged_attention`` → ``FlashInferPlanner.attend``):

- a decode-only step runs the decode kernel with tensor cores (grouped heads in one tile);
- a step with prompt chunks runs the prefill kernel over ragged queries, causal from the end of
  each sequence's context, which is the layout every backend here computes; the decodes it
  carries (the engine lays them out first) run apart, through the decode kernel: the prefill
  kernel tiles each one-token query as if it were a prompt's (64 rows of a tile for its 4), and
  on an H100 (8B shape) it took 166 µs a layer for 128 decodes beside 4 prompts of 128 tokens,
  where the decode kernel takes 51 µs for the decodes alone;
- a decode step replayed from a CUDA graph runs a decode wrapper of its bucket's batch size over
  fixed buffers; the plan, host work that a graph cannot hold, fills them before each replay.

The plan is made from the step's host-side layout (``AttentionMetadata.host``) and reaches the
device from pinned memory in copies that do not block, so planning never waits for the device:
the engine plans the next step while the device computes the last one. Pages are the cache's blocks;
the cache keeps keys and values as separate ``[num_blocks, block_size, kv_heads, head_dim]``
tensors, FlashInfer's "NHD" layout.

Not covered, so ``choose_backend`` does not pick this backend for them: ALiBi (FlashInfer derives
its own slopes from the head count, which a tensor-parallel rank's slice of heads breaks) and
sliding windows shorter than the longest sequence (a plan has one window, where a model may mix
windowed and full layers; hf_transformers' windowed models run on FlexAttention instead).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from tgis_shard.layers import gpu
from tgis_shard.staging import to_device

if TYPE_CHECKING:
    from tgis_shard.layers.paged_attention import AttentionMetadata, HostLayout

# FlashInfer's recommended scratch for split-KV partial results, shared by every wrapper (steps run
# one at a time) unless a decode graph needs more (``decode_graph_workspace_bytes``).
WORKSPACE_BYTES = 128 * 2**20
# Head sizes FlashInfer's kernels are built for.
HEAD_DIMS = (64, 128, 256)
# Decode graphs of at least this many rows run the decode kernel with tensor cores (a KV head's
# grouped query heads as one tile's rows, planned as a prefill); smaller ones FlashInfer's
# CUDA-core decode kernel, whose split-KV scratch fits WORKSPACE_BYTES at any batch size.
TENSOR_CORE_GRAPH_ROWS = 1


@functools.cache
def flashinfer_available() -> bool:
    try:
        import flashinfer  # noqa: F401
    except ImportError:
        return False
    return True


def pages_of(host: HostLayout, block_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """FlashInfer's page lists from a step's host layout: ``indptr`` ``[B+1]`` (where each
    sequence's pages start in ``indices``), ``indices`` (the pages themselves, in order) and
    ``last_page_len`` ``[B]`` (tokens in each sequence's last page), all int32."""
    context = host.context_lens.astype(np.int32)
    pages = (context + block_size - 1) // block_size
    indptr = np.zeros(len(context) + 1, dtype=np.int32)
    np.cumsum(pages, out=indptr[1:])
    width = host.block_tables.shape[1]
    indices = host.block_tables[np.arange(width) < pages[:, None]].astype(np.int32)
    last_page_len = context - (pages - 1) * block_size
    return indptr, indices, last_page_len


def decode_graph_workspace_bytes(num_heads: int, num_kv_heads: int, head_dim: int, rows: int, sms: int) -> int:
    """Split-KV scratch a decode graph of ``rows`` rows asks for on a device of ``sms``
    multiprocessors. The decode kernel with tensor cores plans as a prefill; in CUDA-graph mode the
    plan reserves partial outputs (values and log-sum-exps, float32) for the most query tiles any
    step of that many rows could have: its tile holds 16 rows of heads sharing a KV head (64 past 16
    query heads per KV head, 128 past 64 below head size 256), and every row may start a tile. On an
    H100, 32 × 128 heads over 8 KV heads at 4,096 rows: 1.35 GB, past WORKSPACE_BYTES from 405
    rows on. (FlashInfer's scheduler.cuh, PrefillPlan.)"""
    group = num_heads // num_kv_heads
    tile = 128 if group > 64 and head_dim < 256 else 64 if group > 16 else 16
    tiles = -(-rows * group // tile) + rows - 1
    padded = max(tiles, 2 * sms // num_kv_heads)  # two CTAs per multiprocessor split the rest
    return num_heads * padded * tile * (head_dim + 1) * 4 + 2**20  # + alignment of each part


def leading_decodes(cu_seqlens_q: np.ndarray) -> int:
    """How many sequences at the start of a step have one query token each."""
    single = np.diff(cu_seqlens_q) == 1
    return len(single) if single.all() else int(np.argmin(single))


def split_pages(
    pages: tuple[np.ndarray, np.ndarray, np.ndarray], first: int
) -> tuple[tuple[np.ndarray, np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """``pages_of``'s lists of the first ``first`` sequences and of the rest, each starting at 0."""
    indptr, indices, last_page_len = pages
    cut = indptr[first]
    head = (indptr[: first + 1], indices[:cut], last_page_len[:first])
    tail = (indptr[first:] - cut, indices[cut:], last_page_len[first:])
    return head, tail


@dataclass(frozen=True)
class _Plan:
    """The wrappers planned for the current step: ``wrapper`` runs its queries, or with
    ``decodes`` set, the queries after the first ``decode_rows`` (which ``decodes`` runs).
    ``kernel_rows``: the step's leading decodes, left to ``paged_decode``'s kernel; ``wrapper``
    then runs the rows after them, and only those are passed to ``attend``."""

    wrapper: Any
    decodes: Any = None
    decode_rows: int = 0
    kernel_rows: int = 0


class FlashInferPlanner:
    """The wrappers of one cache and the plan of the current step."""

    def __init__(
        self,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        block_size: int,
        num_blocks: int,
        dtype: torch.dtype,
        device: torch.device,
        decodes_on_kernel: bool = False,
    ):
        """``decodes_on_kernel``: the cache's decodes attend through ``paged_decode``'s kernel
        (DECODE_KERNEL), so a step's leading decodes beside prompt chunks are left to it too."""
        import flashinfer

        self._flashinfer = flashinfer
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.dtype = dtype
        self.device = device
        self._workspace = torch.zeros(WORKSPACE_BYTES, dtype=torch.uint8, device=device)
        self._decode = flashinfer.BatchDecodeWithPagedKVCacheWrapper(self._workspace, "NHD", use_tensor_cores=True)
        self._prefill = flashinfer.BatchPrefillWithPagedKVCacheWrapper(self._workspace, "NHD")
        self._graph_decodes: dict[int, Any] = {}
        self.tensor_core_graph_rows = TENSOR_CORE_GRAPH_ROWS
        # A decode graph larger than WORKSPACE_BYTES holds: one buffer, grown for the largest first
        # (graphs are captured largest first); a graph captured with an older one keeps it alive.
        self._graph_workspace = self._workspace
        self._active: _Plan | None = None
        self.decodes_on_kernel = decodes_on_kernel

    def plan(self, meta: AttentionMetadata, graph_rows: int | None = None, decodes_apart: bool = True) -> None:
        """Plans the step ``meta`` describes; ``graph_rows``: for the decode graph of that many
        rows (``meta`` is padded to them). ``decodes_apart=False`` runs a step's leading decodes
        through the prefill kernel with its prompt chunks (a bench compares the two)."""
        if meta.host is None:
            raise ValueError("the flashinfer backend plans from the step's host layout; this metadata has none")
        pages = pages_of(meta.host, self.block_size)
        if meta.max_q == 1:
            wrapper = self._decode if graph_rows is None else self._graph_decode(graph_rows)
            self._plan_decode(wrapper, pages)
            self._active = _Plan(wrapper)
            return
        if graph_rows is not None:
            raise ValueError("only decode steps replay from CUDA graphs")
        decodes = leading_decodes(meta.host.cu_seqlens_q) if decodes_apart else 0
        decode_pages, prompt_pages = split_pages(pages, decodes)
        cu_seqlens_q = meta.host.cu_seqlens_q[decodes:] - meta.host.cu_seqlens_q[decodes]
        self._plan_prefill(cu_seqlens_q, meta.host.context_lens[decodes:], prompt_pages)
        if self.decodes_on_kernel:
            self._active = _Plan(self._prefill, kernel_rows=decodes)
            return
        if decodes:
            self._plan_decode(self._decode, decode_pages)
        self._active = _Plan(self._prefill, self._decode if decodes else None, decodes)

    @property
    def kernel_rows(self) -> int:
        """The current step's leading decodes that ``paged_decode``'s kernel attends; ``attend``
        takes the rows after them."""
        return 0 if self._active is None else self._active.kernel_rows

    def _staged(self, pages: tuple[np.ndarray, np.ndarray, np.ndarray]) -> tuple[torch.Tensor | int, ...]:
        """A plan's page lists and the geometry after them: host arrays in pinned memory, the
        indices on the device already (FlashInfer copies host page indices into a graph's buffers
        with a copy that blocks; see tgis_shard.staging)."""
        indptr, indices, last_page_len = (torch.from_numpy(a) for a in pages)
        lists = (indptr.pin_memory(), to_device(indices, self.device), last_page_len.pin_memory())
        return (*lists, self.num_heads, self.num_kv_heads, self.head_dim, self.block_size)

    def _plan_decode(self, wrapper: Any, pages: tuple[np.ndarray, np.ndarray, np.ndarray]) -> None:
        wrapper.plan(*self._staged(pages), q_data_type=self.dtype)

    def _plan_prefill(
        self, cu_seqlens_q: np.ndarray, context_lens: np.ndarray, pages: tuple[np.ndarray, np.ndarray, np.ndarray]
    ) -> None:
        self._prefill.plan(
            torch.from_numpy(cu_seqlens_q.astype(np.int32)).pin_memory(),
            *self._staged(pages),
            causal=True,
            q_data_type=self.dtype,
            # The context lengths too: the prefill plan derives them otherwise in pageable memory,
            # and its copy of them to the device waits for the device.
            seq_lens=torch.from_numpy(context_lens.astype(np.int32)).pin_memory(),
        )

    def attend(
        self,
        query: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        scale: float,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """This layer's attention under the current plan (of the rows after ``kernel_rows``),
        into ``out`` when given."""
        plan = self._active
        if plan is None:
            raise RuntimeError("the flashinfer backend attends only after plan_attention planned the step")
        # The plan keeps FlashInfer's default 1/sqrt(head_dim); q_scale multiplies it.
        default = 1.0 / math.sqrt(self.head_dim)
        q_scale = None if math.isclose(scale, default) else scale / default
        if plan.decodes is None:
            return plan.wrapper.run(query, (keys, values), q_scale=q_scale, out=out)
        if out is None:
            out = torch.empty(query.shape, dtype=query.dtype, device=query.device)  # contiguous, as FlashInfer's own
        rows = plan.decode_rows
        plan.decodes.run(query[:rows], (keys, values), q_scale=q_scale, out=out[:rows])
        plan.wrapper.run(query[rows:], (keys, values), q_scale=q_scale, out=out[rows:])
        return out

    def _graph_decode(self, rows: int) -> Any:
        """The decode wrapper of a graph of ``rows`` rows: its page lists live in fixed buffers.

        Its plans split keys over tiles (FlashInfer's split-KV, merged afterwards) even where no
        sequence needs it: in CUDA-graph mode the tensor-core plan launches a fixed grid, max(two
        CTAs per multiprocessor, the most tiles a step could have) per KV head, and only a split
        plan masks the CTAs past the step's work. Unsplit (``disable_split_kv``), they run on
        request indices the plan never wrote, from uninitialised pinned memory (FlashInfer
        0.6.12: scheduler.cuh PrefillPlan; prefill.cuh reads ``block_valid_mask`` only when split).
        """
        if rows not in self._graph_decodes:
            sms = gpu.multiprocessors(self.device)
            needed = decode_graph_workspace_bytes(self.num_heads, self.num_kv_heads, self.head_dim, rows, sms)
            tensor_cores = rows >= self.tensor_core_graph_rows
            if tensor_cores and needed > self._graph_workspace.numel():
                self._graph_workspace = torch.zeros(needed, dtype=torch.uint8, device=self.device)
            self._graph_decodes[rows] = self._flashinfer.BatchDecodeWithPagedKVCacheWrapper(
                self._graph_workspace,
                "NHD",
                use_cuda_graph=True,
                use_tensor_cores=tensor_cores,
                paged_kv_indptr_buffer=torch.zeros(rows + 1, dtype=torch.int32, device=self.device),
                # Real rows own distinct blocks; each padding row lists the scratch block once.
                paged_kv_indices_buffer=torch.zeros(self.num_blocks + rows, dtype=torch.int32, device=self.device),
                paged_kv_last_page_len_buffer=torch.zeros(rows, dtype=torch.int32, device=self.device),
            )
        return self._graph_decodes[rows]
