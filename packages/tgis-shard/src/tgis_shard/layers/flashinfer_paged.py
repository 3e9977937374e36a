"""Paged attention through FlashInfer (``pip install tgis-shard[flashinfer]``): the GPU backend.

FlashInfer reads the cache in place, page by page, at close to the device's copy bandwidth in
decode (measured on an H200: ../shared/notes/gpu-kernels.md). Its kernels take a *plan*: the
step's page lists and lengths, turned on the host into a work schedule. A step is planned once,
before its forward pass, and every layer runs that plan (``plan_attention`` →
``FlashInferPlanner.plan``; ``paged_attention`` → ``FlashInferPlanner.attend``):

- a decode-only step runs the decode kernel with tensor cores (grouped heads in one tile);
- a step with prompt chunks runs the prefill kernel over ragged queries, causal from the end of
  each sequence's context, which is the layout every backend here computes;
- a decode step replayed from a CUDA graph runs a decode wrapper of its bucket's batch size over
  fixed buffers; the plan, host work that a graph cannot hold, fills them before each replay.

The plan is made from the step's host-side layout (``AttentionMetadata.host``) and reaches the
device from pinned memory in copies that do not block, so planning never waits for the device:
the engine plans the next step while the device computes the last one. Pages are the cache's blocks;
the cache keeps keys and values as separate ``[num_blocks, block_size, kv_heads, head_dim]``
tensors, FlashInfer's "NHD" layout.

Not covered, so ``choose_backend`` does not pick this backend for them: ALiBi (FlashInfer derives
its own slopes from the head count, which a tensor-parallel rank's slice of heads breaks) and
sliding windows (a plan has one window; no family served here uses one).
"""

from __future__ import annotations

import functools
import math
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from tgis_shard.staging import to_device

if TYPE_CHECKING:
    from tgis_shard.layers.paged_attention import AttentionMetadata, HostLayout

# FlashInfer's recommended scratch for split-KV partial results, shared by every wrapper (steps run
# one at a time).
WORKSPACE_BYTES = 128 * 2**20
# Head sizes FlashInfer's kernels are built for.
HEAD_DIMS = (64, 128, 256)


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
    ):
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
        self._active: Any = None

    def plan(self, meta: AttentionMetadata, graph_rows: int | None = None) -> None:
        """Plans the step ``meta`` describes; ``graph_rows``: for the decode graph of that many
        rows (``meta`` is padded to them)."""
        if meta.host is None:
            raise ValueError("the flashinfer backend plans from the step's host layout; this metadata has none")
        # Host arrays in pinned memory, the indices on the device already: FlashInfer copies host
        # page indices into a graph's buffers with a copy that blocks (see tgis_shard.staging).
        indptr, indices, last_page_len = (torch.from_numpy(a) for a in pages_of(meta.host, self.block_size))
        indptr, last_page_len = indptr.pin_memory(), last_page_len.pin_memory()
        indices = to_device(indices, self.device)
        geometry = (self.num_heads, self.num_kv_heads, self.head_dim, self.block_size)
        if meta.max_q == 1:
            wrapper = self._decode if graph_rows is None else self._graph_decode(graph_rows)
            wrapper.plan(indptr, indices, last_page_len, *geometry, q_data_type=self.dtype)
        else:
            if graph_rows is not None:
                raise ValueError("only decode steps replay from CUDA graphs")
            wrapper = self._prefill
            query_indptr = torch.from_numpy(meta.host.cu_seqlens_q.astype(np.int32)).pin_memory()
            # The context lengths too: the prefill plan derives them otherwise in pageable memory,
            # and its copy of them to the device waits for the device.
            context_lens = torch.from_numpy(meta.host.context_lens.astype(np.int32)).pin_memory()
            wrapper.plan(
                query_indptr,
                indptr,
                indices,
                last_page_len,
                *geometry,
                causal=True,
                q_data_type=self.dtype,
                seq_lens=context_lens,
            )
        self._active = wrapper

    def attend(self, query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scale: float) -> torch.Tensor:
        """This layer's attention under the current plan."""
        if self._active is None:
            raise RuntimeError("the flashinfer backend attends only after plan_attention planned the step")
        # The plan keeps FlashInfer's default 1/sqrt(head_dim); q_scale multiplies it.
        default = 1.0 / math.sqrt(self.head_dim)
        q_scale = None if math.isclose(scale, default) else scale / default
        return self._active.run(query, (keys, values), q_scale=q_scale)

    def _graph_decode(self, rows: int) -> Any:
        """The decode wrapper of a graph of ``rows`` rows: its page lists live in fixed buffers."""
        if rows not in self._graph_decodes:
            self._graph_decodes[rows] = self._flashinfer.BatchDecodeWithPagedKVCacheWrapper(
                self._workspace,
                "NHD",
                use_cuda_graph=True,
                use_tensor_cores=True,
                paged_kv_indptr_buffer=torch.zeros(rows + 1, dtype=torch.int32, device=self.device),
                # Real rows own distinct blocks; each padding row lists the scratch block once.
                paged_kv_indices_buffer=torch.zeros(self.num_blocks + rows, dtype=torch.int32, device=self.device),
                paged_kv_last_page_len_buffer=torch.zeros(rows, dtype=torch.int32, device=self.device),
            )
        return self._graph_decodes[rows]
