"""The ``tgis_native`` engine (alias ``hf_custom_tp``): model-family plugins, tensor parallel over
1..N ranks, one persistent padding-free (ragged) batch over a preallocated, block-paged KV cache.

The router owns the cache's blocks (``tgis_router.kv_blocks``): a step tells each request the
blocks it gets, and requests join and leave the batch without the cache ever being copied. One
step runs prompt chunks and decodes together in one forward pass; a request samples once its
prompt is complete. Encoder-decoder families (T5) are the exception: they run on the padded
``Seq2SeqLMEngine``.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field, replace
from itertools import accumulate
from pathlib import Path

import numpy as np
import torch
from transformers import AutoConfig, PretrainedConfig

from tgis_proto import shard_pb2 as pb
from tgis_proto.plugins import resolve
from tgis_shard import memory
from tgis_shard.engines.base import (
    Engine,
    PendingStep,
    ScheduledWork,
    ShardContext,
    UnsupportedModelError,
    input_token_details,
    shard_info,
)
from tgis_shard.engines.cuda_graphs import DecodeGraphs, graph_buckets
from tgis_shard.engines.decode_inputs import DecodeInputs
from tgis_shard.engines.hf_transformers import eos_token_ids
from tgis_shard.engines.prompt_graphs import PromptGraphs, token_buckets
from tgis_shard.engines.seq2seq import Seq2SeqLMEngine
from tgis_shard.families import NativeCausalLM, supports_prompt_prefixes
from tgis_shard.layers import gpu, paged_decode, split_k_matmul
from tgis_shard.layers.distributed import TensorParallel, agree_with_rank0, init_tensor_parallel
from tgis_shard.layers.embedding import EmbeddingOverrides
from tgis_shard.layers.flex_paged import QUERY_TILE
from tgis_shard.layers.linear import ParallelLinear
from tgis_shard.layers.paged_attention import (
    BLOCK_SIZES,
    AttentionMetadata,
    PagedKVCache,
    blocks_for,
    choose_backend,
    plan_attention,
    prepare_attention,
)
from tgis_shard.prefixes import PrefixesUnsupportedError, PromptPrefix
from tgis_shard.progress import progress
from tgis_shard.pt2 import compile_dynamic
from tgis_shard.sampler import GeneratedToken, Sampler, sampling_peak_bytes
from tgis_shard.staging import ids_to_device, to_device
from tgis_shard.weights import Weights

log = logging.getLogger(__name__)

# Prompt lengths of the warm-up batches. A compiled graph is specialised on each size that is 1
# (batch, query length, block-table width), so the batches cover one and several of each, and
# one to three query tiles, and a full tile, where the kernel choice changes (see NativeEngine.warm_up).
WARM_UP_PROMPT_LENGTHS = (
    [1],
    [2],
    [QUERY_TILE],
    [QUERY_TILE + 2],
    [2, 3],
    [QUERY_TILE, 2],
    [QUERY_TILE + 2, 1, 2],
    [2 * QUERY_TILE + 3, 5, 1, 1],
)
# Steps of decodes with prompts joining them (the batch's prompts, then those joining beside its
# first decodes), a kind of step of its own: FlashInfer's backend attends its leading decodes apart
# from the prompt chunks, so what those run first (the decode kernel over a slice of the step's
# block tables, or FlashInfer's eager decode with DECODE_KERNEL off) is built before serving too.
WARM_UP_JOINING = (
    ([2], [QUERY_TILE + 2]),
    ([2, 3], [5, 1]),
)
# Every warm-up batch: its prompts, and those joining it in its first decode step.
WARM_UP_BATCHES = [(lengths, []) for lengths in WARM_UP_PROMPT_LENGTHS] + list(WARM_UP_JOINING)
WARM_UP_DECODE_STEPS = 2
# Share of the memory left after loading the weights that the KV cache may take on a GPU.
GPU_CACHE_FRACTION = 0.85
# The cache's block 0 is the engine's own: block tables are padded with it, and health checks
# write there. The router hands out blocks 1..num_blocks.
SCRATCH_BLOCK = 0


@dataclass(eq=False)
class _Sequence:
    """A request in the batch: its prompt, how much of it the cache holds, its blocks."""

    request: pb.Request
    prompt: list[int]  # a placeholder id per prompt-prefix position, then the input ids
    prefix: torch.Tensor | None  # the prompt prefix's embeddings
    blocks: list[int] = field(default_factory=list)
    computed: int = 0  # tokens in the cache; past the prompt, every generated token but the last
    input_details: list[pb.Token] = field(default_factory=list)

    @property
    def prefix_length(self) -> int:
        return 0 if self.prefix is None else len(self.prefix)

    @property
    def decoding(self) -> bool:
        return self.computed >= len(self.prompt)

    @property
    def wants_input_details(self) -> bool:
        return self.request.details.input_tokens and not self.request.resumed_tokens


@dataclass(frozen=True)
class StepInputs:
    """What a step's forward pass and sampling read, ready before the pass."""

    input_ids: torch.Tensor
    meta: AttentionMetadata
    sampler_slots: torch.Tensor  # of the rows that sample, on the device
    host_slots: np.ndarray  # the same, on the host


@dataclass(frozen=True)
class _Row:
    """A request's rows in a step's ragged layout."""

    seq: _Sequence
    work: ScheduledWork
    start: int  # first token row
    slot: int  # its sampler slot, which indexes the engine's per-request buffers too

    @property
    def end(self) -> int:
        return self.start + self.work.tokens

    @property
    def prompt_chunk(self) -> list[int]:
        """The prompt tokens the step processes for it (none for a decode)."""
        seq = self.seq
        return [] if seq.decoding else seq.prompt[seq.computed : seq.computed + self.work.tokens]

    @property
    def samples(self) -> bool:
        """Its prompt is complete after this step: the last row's logits choose its next token."""
        return self.seq.computed + self.work.tokens >= len(self.seq.prompt)


class NativeEngine(Engine):
    chunked_prefill = True
    pt2_compile = True

    def __init__(
        self,
        model: NativeCausalLM,
        ctx: ShardContext,
        tp: TensorParallel,
        config: PretrainedConfig,
        cache: PagedKVCache,
        eos_token_ids: list[int],
        name: str = "tgis_native",
        capture_hint: str = "",
    ):
        self.name = name  # the engine the shard reports (hf_transformers runs on this one too)
        # What else a failed graph capture can be worked around with (the start fails saying it).
        self._capture_hint = capture_hint
        self.model = model
        self.ctx = ctx
        self.tp = tp
        self.config = config
        self.cache = cache
        self.block_size = cache.block_size
        self.num_blocks = cache.num_blocks - 1  # the router's; SCRATCH_BLOCK is not
        self.eos_token_ids = eos_token_ids
        self._takes_prefixes = supports_prompt_prefixes(model)
        self.prefixes = ctx.prefix_store(model.hidden_size if self._takes_prefixes else 0)
        capacity = max(ctx.max_batch_size, *(len(lengths) + len(joining) for lengths, joining in WARM_UP_BATCHES))
        self.sampler = Sampler(capacity, config.vocab_size, eos_token_ids, ctx.device)
        # Per sampler slot, the last token chosen: the input of the request's next decode, kept on
        # the device so that a step never waits for the previous one's tokens to reach the host.
        self._next_ids = torch.zeros(capacity, dtype=torch.long, device=ctx.device)
        max_blocks = blocks_for(ctx.max_sequence_length, self.block_size) + 1
        # Inference tensors, as the ones a step builds: compiled code guards on the difference.
        with torch.inference_mode():
            self._decode = DecodeInputs(capacity, max_blocks, self.block_size, ctx.device, SCRATCH_BLOCK)
        # PT2_COMPILE: the forward pass and the LM head through torch.compile; warm_up compiles them.
        self._forward = compile_dynamic(model.forward) if ctx.pt2_compile else model.forward
        self._compute_logits = compile_dynamic(model.compute_logits) if ctx.pt2_compile else model.compute_logits
        self._graphs: DecodeGraphs | None = None  # captured by warm_up on one GPU
        self._prompt_graphs: PromptGraphs | None = None  # likewise, steps with prompt chunks
        self._replay_prompts = True  # off while measuring what an eager step allocates
        self._graph_metas: dict[int, AttentionMetadata] = {}
        self._seqs: dict[int, _Sequence] = {}
        self._inputs_copied: torch.cuda.Event | None = None  # the last step's (see _wait_for_inputs_sent)

    def prompt_prefix(self, prefix_id: str) -> PromptPrefix:
        if not self._takes_prefixes:
            raise PrefixesUnsupportedError(
                f"the {self.config.model_type} model plugin does not support prompt prefixes "
                "(it does not declare SupportsPromptPrefixes)"
            )
        return self.prefixes.get(prefix_id)

    def info(self) -> pb.InfoResponse:
        return shard_info(
            self,
            self.eos_token_ids,
            model_kind=pb.DECODER_ONLY,
            vocab_size=self.config.vocab_size,
            batch_padding=False,
            name=self.name,
            kv_cache=pb.KVCacheLayout(num_blocks=self.num_blocks, block_size=self.block_size),
        )

    def join(self, request: pb.Request) -> None:
        if request.id in self._seqs:
            raise ValueError(f"request {request.id} is in the batch already")
        prefix = self.prompt_prefix(request.prefix_id).input if request.prefix_id else None
        # Prefix positions hold placeholder ids whose embeddings the prefix's replace.
        prompt = [0] * (0 if prefix is None else len(prefix)) + list(request.input_ids)
        self.sampler.add(request, request.input_ids)
        self._seqs[request.id] = _Sequence(request, prompt, prefix)

    def leave(self, request_ids: Collection[int]) -> None:
        for rid in request_ids:
            if self._seqs.pop(rid, None) is not None:
                self.sampler.remove(rid)

    def request_ids(self) -> list[int]:
        return list(self._seqs)

    def synthetic_blocks(self, lengths: Sequence[int]) -> list[tuple[int, ...]]:
        counts = [blocks_for(n, self.block_size) for n in lengths]
        if sum(counts) > self.num_blocks:
            raise ValueError(f"a start-up batch of {sum(counts)} blocks does not fit in {self.num_blocks}")
        firsts = accumulate(counts, initial=SCRATCH_BLOCK + 1)
        return [tuple(range(first, first + n)) for first, n in zip(firsts, counts, strict=False)]

    def _layout(self, work: Sequence[ScheduledWork]) -> list[_Row]:
        """The step's rows: decodes first, then prompt chunks; checked against each request's state."""
        rows: list[_Row] = []
        for decoding in (True, False):
            for item in work:
                seq = self._seqs.get(item.request_id)
                if seq is None:
                    raise ValueError(f"request {item.request_id} is not in the batch")
                if seq.decoding != decoding:
                    continue
                if decoding and item.tokens != 1:
                    raise ValueError(f"request {item.request_id} decodes one token per step, not {item.tokens}")
                if not decoding and not 0 < item.tokens <= len(seq.prompt) - seq.computed:
                    raise ValueError(
                        f"request {item.request_id} has {len(seq.prompt) - seq.computed} prompt tokens left, "
                        f"{item.tokens} scheduled"
                    )
                start = rows[-1].end if rows else 0
                rows.append(_Row(seq, item, start, self.sampler.slot_of(item.request_id)))
        return rows

    def _input_ids(self, rows: list[_Row]) -> torch.Tensor:
        """Decodes read their last token on the device; prompt chunks come from the host."""
        device = self.ctx.device
        parts = []
        decodes = [r.slot for r in rows if r.seq.decoding]
        if decodes:
            parts.append(self._next_ids[ids_to_device(decodes, device)])
        chunk = [t for r in rows for t in r.prompt_chunk]
        if chunk:
            parts.append(ids_to_device(chunk, device))
        return torch.cat(parts) if len(parts) > 1 else parts[0]

    def _embedding_overrides(self, rows: list[_Row]) -> EmbeddingOverrides | None:
        """The prompt-prefix embeddings of the prefix positions this step's chunks cover."""
        device = self.ctx.device
        token_rows, values = [], []
        for row in rows:
            seq = row.seq
            covered = min(seq.prefix_length, seq.computed + row.work.tokens) - seq.computed
            if seq.prefix is not None and not seq.decoding and covered > 0:
                token_rows.append(torch.arange(row.start, row.start + covered, device=device))
                values.append(seq.prefix[seq.computed : seq.computed + covered])
        if not token_rows:
            return None
        return EmbeddingOverrides(torch.cat(token_rows), torch.cat(values))

    def _decode_inputs(self, rows: list[_Row], padded_to: int | None = None) -> StepInputs:
        """A step of decodes only: the persistent buffers, filled in place (padded for a graph)."""
        slots = np.fromiter((r.slot for r in rows), dtype=np.int64, count=len(rows))
        for row in rows:
            if row.work.new_blocks:  # its token starts a block: the table grows first
                self._decode.commit(row.slot, len(row.seq.blocks), row.work.new_blocks, row.seq.computed)
        meta, sampler_slots = self._decode.prepare(slots, self._next_ids, padded_to)
        return StepInputs(self._decode.input_ids[: meta.num_seqs], meta, sampler_slots, slots)

    def _eager_forward(
        self, rows: list[_Row], sampling: list[_Row], detailed: list[_Row]
    ) -> tuple[StepInputs, torch.Tensor | None, torch.Tensor | None]:
        """Runs the step op by op. Returns its inputs, the logits of every row where input-token
        details need them (else of the sampling rows), and the sampling rows' logits."""
        decode_only = all(r.seq.decoding for r in rows)
        inputs = self._decode_inputs(rows) if decode_only else self._mixed_inputs(rows)
        meta = inputs.meta
        # Everything the attention backend derives per step is built before the forward pass.
        plan_attention(self.cache, meta)
        prepare_attention(self.cache, meta)
        self._inputs_sent()
        hidden = self._hidden_states(inputs.input_ids, meta, self._embedding_overrides(rows))
        if decode_only:  # every row samples
            logits = self._compute_logits(hidden)
            return inputs, logits, logits
        last_rows = ids_to_device([r.end - 1 for r in sampling], self.ctx.device)
        if detailed:  # input-token details need every prompt position
            logits = self._compute_logits(hidden)
            return inputs, logits, logits[last_rows] if sampling else None
        if not sampling:
            return inputs, None, None
        logits = self._compute_logits(hidden[last_rows])
        return inputs, logits, logits

    def _hidden_states(
        self, input_ids: torch.Tensor, meta: AttentionMetadata, overrides: EmbeddingOverrides | None
    ) -> torch.Tensor:
        """The forward pass of a step the decode graphs do not hold: replayed in pieces where a
        prompt-graph bucket holds its tokens, else op by op."""
        graphs = self._prompt_graphs
        if graphs is not None and self._replay_prompts:
            bucket = graphs.bucket_for(input_ids.shape[0])
            if bucket is not None:
                return graphs.run(input_ids, meta, bucket, overrides)
        # Without prefixes the keyword stays out: families that take no overrides serve the rest.
        extra = {} if overrides is None else {"embedding_overrides": overrides}
        return self._forward(input_ids, meta.positions, self.cache, meta, **extra)

    def _graph_bucket(self, rows: list[_Row]) -> int | None:
        """The captured batch size a decode-only step replays; None: the step runs eagerly."""
        if self._graphs is None or not all(r.seq.decoding for r in rows):
            return None
        return self._graphs.bucket_for(len(rows))

    def _graph_step(self, rows: int) -> torch.Tensor:
        """What a decode graph holds: a step of ``rows`` rows over the persistent buffers, from
        the attention backend's preparation to the logits. Its metadata was built before."""
        meta = replace(self._graph_metas[rows])  # derived tensors are made inside the graph
        prepare_attention(self.cache, meta)
        hidden = self._forward(self._decode.input_ids[:rows], meta.positions, self.cache, meta)
        return self._compute_logits(hidden)

    @torch.inference_mode()
    def capture_graphs(self) -> None:
        """Captures a decode graph per batch-size bucket up to MAX_BATCH_SIZE (after warm_up) and,
        with PROMPT_GRAPHS, the pieces of a prompt step per token bucket."""
        self._wait_for_inputs_sent()
        buckets = graph_buckets(self.ctx.max_batch_size)
        self._graphs = DecodeGraphs.capture(self._graph_step, buckets, self.ctx.device, self._prepare_graph)
        if not self.ctx.prompt_graphs or self.ctx.pt2_compile:
            return  # a compiled forward pass (PT2_COMPILE) is one graph already: not split at attention
        # Capturing a bucket runs a step of its size in free blocks: only sizes the cache holds.
        buckets = [
            tokens
            for tokens in token_buckets()
            if sum(blocks_for(n, self.block_size) for n in self._capture_lengths(tokens)) <= self.num_blocks
        ]
        if buckets:
            prefixes = (self.model.hidden_size, self.ctx.dtype) if self._takes_prefixes else None
            graphs = PromptGraphs(self._forward, self.cache, self.ctx.device, SCRATCH_BLOCK * self.block_size, prefixes)
            graphs.capture(buckets, self._capture_meta)
            self._prompt_graphs = graphs if graphs.buckets else None

    def _capture_lengths(self, tokens: int) -> list[int]:
        """A prompt step of ``tokens`` tokens as sequences no longer than a request can be."""
        longest = max(1, self.ctx.max_sequence_length - 1)
        return [min(longest, tokens - start) for start in range(0, tokens, longest)]

    def _capture_meta(self, tokens: int) -> AttentionMetadata:
        """A prompt step of ``tokens`` tokens in free blocks (the batch is empty), planned."""
        lengths = self._capture_lengths(tokens)
        blocks = self.synthetic_blocks(lengths)
        meta = AttentionMetadata.build(lengths, lengths, [list(b) for b in blocks], self.block_size, self.ctx.device)
        plan_attention(self.cache, meta)
        prepare_attention(self.cache, meta)
        return meta

    def _prepare_graph(self, rows: int) -> None:
        """Before the graph of ``rows`` rows is captured: its metadata over the persistent buffers
        (padding rows only: what the buffers hold does not matter, their addresses do) and its
        attention plan."""
        meta, _ = self._decode.prepare(np.empty(0, dtype=np.int64), self._next_ids, padded_to=rows)
        self._graph_metas[rows] = meta
        plan_attention(self.cache, meta, graph_rows=rows)

    def _mixed_inputs(self, rows: list[_Row]) -> StepInputs:
        """A step with prompt chunks: its metadata built for it."""
        device = self.ctx.device
        meta = AttentionMetadata.build(
            [r.work.tokens for r in rows],
            [r.seq.computed + r.work.tokens for r in rows],
            [r.seq.blocks + list(r.work.new_blocks) for r in rows],
            self.block_size,
            device,
        )
        slots = np.fromiter((r.slot for r in rows if r.samples), dtype=np.int64)
        return StepInputs(self._input_ids(rows), meta, to_device(torch.from_numpy(slots), device), slots)

    def step(self, work: Sequence[ScheduledWork]) -> list[GeneratedToken]:
        return self.launch(work).wait()

    @torch.inference_mode()
    def launch(self, work: Sequence[ScheduledWork]) -> PendingStep:
        """Queues the step on the device and applies it to the batch; the tokens follow.

        Everything the next step reads stays on the device (each decode's input is the token its
        request's last step chose, in ``_next_ids``) or is known without the tokens (lengths,
        blocks), so the next step is prepared and queued while this one computes.
        """
        if not work:
            return PendingStep.done([])
        self._wait_for_inputs_sent()
        rows = self._layout(work)
        sampling = [r for r in rows if r.samples]
        detailed = [r for r in rows if r.seq.wants_input_details and not r.seq.decoding]
        bucket = self._graph_bucket(rows)
        if bucket is not None:
            inputs = self._decode_inputs(rows, padded_to=bucket)
            plan_attention(self.cache, inputs.meta, graph_rows=bucket)
            self._inputs_sent()
            logits = sampled = self._graphs.replay(bucket)[: len(rows)]  # type: ignore[union-attr]
        else:
            inputs, logits, sampled = self._eager_forward(rows, sampling, detailed)
        choice = None
        if sampled is not None:
            sampled_ids = [r.seq.request.id for r in sampling]
            choice = self.sampler.choose(sampled, sampled_ids, inputs.sampler_slots, inputs.host_slots)
            agree_with_rank0(choice.token_ids)
        details = {
            r.seq.request.id: input_token_details(
                r.seq.request.input_ids,
                r.seq.request.details.top_n,
                logits[r.start : r.end],
                r.seq.computed,
                r.seq.prefix_length,
            )
            for r in detailed
        }
        tokens = choice.to_host() if choice is not None else None
        # Nothing below can fail: the batch changes only now.
        if choice is not None:
            choice.commit()
            self._next_ids[choice.slots] = choice.token_ids
        for row in rows:
            seq = row.seq
            self._decode.commit(row.slot, len(seq.blocks), row.work.new_blocks, seq.computed + row.work.tokens)
            seq.blocks.extend(row.work.new_blocks)
            seq.computed += row.work.tokens
            seq.input_details.extend(details.get(seq.request.id, ()))
        if tokens is None:
            return PendingStep.done([])
        # The input-token details go with every token of a request that asked for them.
        input_tokens = {r.seq.request.id: tuple(r.seq.input_details) for r in sampling if r.seq.wants_input_details}

        def wait() -> list[GeneratedToken]:
            return [
                replace(t, input_tokens=input_tokens[t.request_id]) if t.request_id in input_tokens else t
                for t in tokens.result()
            ]

        return PendingStep(tuple(tokens.request_ids), wait)

    def _inputs_sent(self) -> None:
        """Marks the point, in the device's queue, where this step's inputs have been copied in."""
        if self.ctx.device.type == "cuda":
            self._inputs_copied = torch.cuda.Event()
            self._inputs_copied.record(torch.cuda.current_stream(self.ctx.device))

    def _wait_for_inputs_sent(self) -> None:
        """A step's host staging (``DecodeInputs``) is reused by the next:
        before filling it, wait until the device has copied the last step's in. The device then
        runs the last step while this one is prepared: the host stays one step ahead, no more."""
        if self._inputs_copied is not None:
            self._inputs_copied.synchronize()
            self._inputs_copied = None

    def measure_prefill(self, tokens: int) -> None:
        """Op by op, as a step past the prompt graphs' buckets runs (their memory is held already)."""
        self._replay_prompts = False
        try:
            super().measure_prefill(tokens)
        finally:
            self._replay_prompts = True

    def memory_model(self) -> pb.MemoryModel | None:
        """The preallocated cache is the limit, counted in whole blocks; prefill activations live
        outside it, so a GPU caps prefill tokens by what remains free (measured)."""
        settings = self.ctx.memory_settings
        if settings.estimate == "off":
            return None
        per_token = memory.kv_bytes_per_token(
            self.model.num_layers, self.model.num_kv_heads, self.model.head_dim, self.ctx.dtype
        )
        model = pb.MemoryModel(
            limit_bytes=self.num_blocks * self.block_size * per_token,
            bytes_per_token=per_token,
            block_size=self.block_size,
        )
        if settings.estimate == "auto" and self.ctx.device.type == "cuda":
            tokens = min(memory.MEASURE_TOKENS, settings.max_sequence_length - 1)
            linear, quadratic = memory.measured_prefill_bytes(self.ctx.device, self.measure_prefill, tokens)
            free = memory.free_bytes_for_batches(self.ctx.device, settings)
            # Activations live outside the cache: cap prefill tokens by what stays free, counting
            # the quadratic part at a full-length prompt.
            per_token = linear + quadratic * settings.max_sequence_length
            model.max_prefill_tokens = self.tp.min_over_ranks(max(tokens, int(free // max(per_token, 1.0))))
            model.measured = True
        return model

    def warm_up(self) -> None:
        """Compiled code is built on first use: on GPUs the fused kernels (``layers.fused``),
        FlashInfer's kernels one per kind of step (its JIT) or FlexAttention a graph per new kind of
        shape; PT2_COMPILE the forward pass. Steps of each kind here build them and turn the sizes
        dynamic, so requests rarely wait for a compilation later. Then, on one GPU, the decode
        steps are captured as CUDA graphs. First, with SPLIT_K_MATMUL, each product's shape is timed
        against cuBLAS (``layers.split_k_matmul``), so that the steps compile what they run."""
        if self.ctx.device.type == "cuda":
            split_k_matmul.tune(m.weight for m in self.model.modules() if isinstance(m, ParallelLinear))
        # Tensor parallel steps stay eager: their all-reduces are not captured yet.
        captures = self.ctx.cuda_graphs and self.ctx.device.type == "cuda" and self.tp.world_size == 1
        if self.ctx.device.type == "cuda" or self.ctx.pt2_compile:
            started = time.monotonic()
            longest = self.ctx.max_sequence_length - WARM_UP_DECODE_STEPS - 1
            kinds = progress(
                len(WARM_UP_BATCHES),
                f"rank {self.tp.rank}: warm-up, kinds of step compiled",
                "steps",
                disable=self.tp.rank != 0,
                iterable=WARM_UP_BATCHES,
            )
            for lengths, joining in kinds:
                fit = [min(n, longest) for n in lengths]
                self.run_synthetic(fit, WARM_UP_DECODE_STEPS, joining=[min(n, longest) for n in joining])
            if self.cache.decode_kernel and not captures:
                # Each part count is a variant of the decode kernel, built before serving, not in a
                # request's step: the decode graphs' buckets build every one where they are captured.
                sms = gpu.multiprocessors(self.ctx.device)
                for rows in paged_decode.rows_for_each_part_count(
                    self.ctx.max_batch_size, self.model.num_kv_heads, sms
                ):
                    self.run_synthetic([1] * rows, 1)
            log.info(
                "rank %d: %d kinds of step compiled in %.1f s",
                self.tp.rank,
                len(WARM_UP_BATCHES),
                time.monotonic() - started,
            )
        if captures:
            try:
                self.capture_graphs()
            except Exception as e:
                hint = "; ".join(filter(None, ["CUDA_GRAPHS=false runs the steps eagerly", self._capture_hint]))
                raise RuntimeError(f"capturing {self.name}'s steps as CUDA graphs failed: {e} ({hint})") from e

    @torch.inference_mode()
    def health_check(self) -> None:
        self._wait_for_inputs_sent()
        device = self.ctx.device
        meta = AttentionMetadata.build([1], [1], [[SCRATCH_BLOCK]], self.block_size, device)
        ids = torch.zeros(1, dtype=torch.long, device=device)
        plan_attention(self.cache, meta)
        hidden = self._forward(ids, torch.zeros(1, dtype=torch.long, device=device), self.cache, meta)
        if not torch.isfinite(self._compute_logits(hidden)).all():
            raise RuntimeError("health check forward pass produced non-finite logits")


def _cache_blocks(ctx: ShardContext, model: NativeCausalLM, block_size: int, vocab_size: int) -> int:
    """Blocks for requests: KV_CACHE_MANAGER_NUM_GPU_BLOCKS when set; else on a GPU what fits in
    the memory left after the weights and what sampling MAX_BATCH_SIZE rows takes, on the CPU max
    batch × max length."""
    if ctx.kv_cache_blocks:
        return ctx.kv_cache_blocks
    if ctx.device.type == "cuda":
        # The prompt-prefix cache fills up later; sampling takes float32 work over the vocabulary
        # for every row (measured for MAX_BATCH_SIZE rows: at large ones, gigabytes).
        try:
            sampling = sampling_peak_bytes(ctx.max_batch_size, vocab_size, ctx.dtype, ctx.device)
        except torch.OutOfMemoryError as e:
            raise UnsupportedModelError(
                f"sampling MAX_BATCH_SIZE {ctx.max_batch_size} rows of a {vocab_size}-token vocabulary needs more "
                "memory than the weights leave; lower MAX_BATCH_SIZE"
            ) from e
        free = memory.device_free_bytes(ctx.device) - ctx.memory_settings.reserved_bytes - sampling
        element = torch.empty((), dtype=ctx.dtype).element_size()
        per_block = 2 * model.num_layers * block_size * model.num_kv_heads * model.head_dim * element
        return max(1, int(max(0, free) * GPU_CACHE_FRACTION) // per_block)
    return ctx.max_batch_size * blocks_for(ctx.max_sequence_length, block_size)


def load_config(model_dir: Path) -> PretrainedConfig:
    """The model's config; a model_type transformers no longer knows (Falcon's RefinedWeb and
    RefinedWebModel checkpoints) comes back as a plain config with every key of config.json,
    for the family plugin registered under that name to read."""
    try:
        return AutoConfig.from_pretrained(model_dir, local_files_only=True)
    except (ValueError, KeyError):
        raw = json.loads((model_dir / "config.json").read_text())
        config = PretrainedConfig.from_dict(raw)
        config.model_type = raw.get("model_type", "")
        return config


def create_engine(ctx: ShardContext) -> Engine:
    """Builds the model family registered for the config's model_type, sharded over the ranks.

    Encoder-decoder families (T5) batch with padding: their model has transformers' seq2seq
    interface and runs on the padded ``Seq2SeqLMEngine``, without the paged cache.
    """
    config = load_config(ctx.model_dir)
    family = ctx.registry.model_family(config.model_type, "tgis_native")
    build = resolve(family.target)
    if ctx.device.type == "cuda":
        torch.cuda.set_device(ctx.device)
    tp = init_tensor_parallel(ctx.rank, ctx.world_size, ctx.device, ctx.master_addr, ctx.master_port)
    with Weights(ctx.model_dir, tp, ctx.dtype, ctx.device) as weights:
        model = build(config, weights, tp)
    if getattr(config, "is_encoder_decoder", False):
        return Seq2SeqLMEngine(model, ctx, eos_token_ids(ctx.model_dir, config), engine="tgis_native", tp=tp)
    return paged_engine(ctx, model, tp, config, family.model_type)


def paged_engine(
    ctx: ShardContext,
    model: NativeCausalLM,
    tp: TensorParallel,
    config: PretrainedConfig,
    description: str,
    name: str = "tgis_native",
    capture_hint: str = "",
) -> NativeEngine:
    """The engine of a decoder-only ``model`` over a paged KV cache sized for this device and
    agreed by every rank; ``description`` names the model in the log, ``capture_hint`` what
    else than CUDA_GRAPHS=false avoids a graph capture that fails."""
    windowed = getattr(model, "uses_sliding_window", False)  # families have none; transformers' models may
    backend = ctx.attention_backend or choose_backend(ctx.device, ctx.dtype, model.head_dim, model.uses_alibi, windowed)
    block_size = BLOCK_SIZES[backend]
    blocks = tp.min_over_ranks(_cache_blocks(ctx, model, block_size, config.vocab_size))
    if blocks < blocks_for(ctx.max_sequence_length, block_size):
        raise UnsupportedModelError(
            f"the KV cache holds {blocks * block_size} tokens, less than one sequence of MAX_SEQUENCE_LENGTH "
            f"{ctx.max_sequence_length}"
        )
    cache = PagedKVCache(
        model.num_layers,
        blocks + 1,
        block_size,
        model.num_kv_heads,
        model.head_dim,
        ctx.dtype,
        ctx.device,
        backend,
        num_heads=model.num_heads,
        decode_kernel=ctx.decode_kernel,
    )
    log.info(
        "rank %d/%d: %s KV cache of %d blocks × %d tokens (%s attention%s)",
        tp.rank,
        tp.world_size,
        description,
        blocks,
        block_size,
        backend,
        ", decodes on tgis's decode kernel" if cache.decode_kernel else "",
    )
    return NativeEngine(model, ctx, tp, config, cache, eos_token_ids(ctx.model_dir, config), name, capture_hint)
