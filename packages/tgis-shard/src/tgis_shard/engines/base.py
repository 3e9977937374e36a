"""What every engine provides to the shard server."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch

from tgis_proto import shard_pb2 as pb
from tgis_proto.plugins import Registry
from tgis_shard.logits import token_details, top_tokens
from tgis_shard.memory import MemorySettings
from tgis_shard.prefixes import PrefixesUnsupportedError, PrefixStore, PromptPrefix
from tgis_shard.sampler import GeneratedToken

# Ids of the requests of an engine's own start-up runs (measuring, compiling): above any id the
# router gives out.
SYNTHETIC_REQUEST_ID = 2**63


@dataclass(frozen=True)
class ShardContext:
    """Everything an engine needs to load its model on this rank."""

    model_dir: Path
    model_type: str
    dtype: torch.dtype
    device: torch.device
    rank: int
    world_size: int
    max_sequence_length: int
    registry: Registry
    max_batch_size: int = 12
    master_addr: str = "localhost"
    master_port: int = 29500
    estimate_memory: str = "auto"
    batch_safety_margin: int = 20
    attention_backend: str | None = None
    """Paged attention backend of tgis_native (flash, flex, torch); None: the fastest that runs."""
    hf_paged: bool = True
    """HF_PAGED_CACHE: hf_transformers runs a causal LM on the paged cache where it can
    (engines.hf_paged) on a GPU, or where ``attention_backend`` is set; False: padded batches in
    transformers' cache."""
    prefix_store_path: Path | None = None
    """Folder of prompt prefixes (PREFIX_STORE_PATH); None: requests naming one are refused."""
    prompt_cache_size_mb: int = 512
    kv_cache_blocks: int | None = None
    """Blocks of tgis_native's paged KV cache (KV_CACHE_MANAGER_NUM_GPU_BLOCKS); None: measured."""
    cache_dir: Path | None = None
    """Where converted files live (``text-generation-server --cache-dir``): ONNX exports among them."""
    cuda_graphs: bool = True
    """tgis_native on one GPU replays decode steps from CUDA graphs (CUDA_GRAPHS)."""
    prompt_graphs: bool = True
    """With ``cuda_graphs``, steps with prompt chunks replay in pieces too (PROMPT_GRAPHS)."""
    pt2_compile: bool = False
    """The model's forward pass runs through torch.compile (PT2_COMPILE), on engines that can."""
    decode_kernel: bool = True
    """Paged engines' steps of decodes attend through ``layers.paged_decode`` (DECODE_KERNEL)."""

    def prefix_store(self, width: int, encoder_decoder: bool = False) -> PrefixStore:
        """Prompt prefixes for a model whose embeddings are ``width`` wide."""
        return PrefixStore(
            self.prefix_store_path,
            width=width,
            max_length=self.max_sequence_length,
            dtype=self.dtype,
            device=self.device,
            cache_bytes=self.prompt_cache_size_mb * 2**20,
            encoder_decoder=encoder_decoder,
        )

    @property
    def memory_settings(self) -> MemorySettings:
        # Loaded prompt prefixes live on the device, up to PROMPT_CACHE_SIZE_MB, beside the batches.
        prefix_cache = self.prompt_cache_size_mb * 2**20 if self.prefix_store_path is not None else 0
        return MemorySettings(
            self.estimate_memory,
            self.batch_safety_margin,
            self.max_batch_size,
            self.max_sequence_length,
            reserved_bytes=prefix_cache,
        )


@dataclass(frozen=True)
class ScheduledWork:
    """One request's work in a step: its next ``tokens`` prompt tokens, or its last generated
    token (``tokens`` = 1 once the prompt is done), with the KV-cache blocks it gets for them."""

    request_id: int
    tokens: int
    new_blocks: tuple[int, ...] = ()


@dataclass(frozen=True)
class PendingStep:
    """A launched step: the requests it brings a token for, in order, and ``wait()``, which
    returns those tokens once the device has made them."""

    request_ids: tuple[int, ...]
    wait: Callable[[], list[GeneratedToken]]

    @classmethod
    def done(cls, tokens: list[GeneratedToken]) -> PendingStep:
        """A step that ran to its end already."""
        return cls(tuple(t.request_id for t in tokens), lambda: tokens)


class UnsupportedModelError(Exception):
    """The model cannot be served by this engine."""


class BatchLost(Exception):
    """A step failed where the batch cannot be restored: every request of it is lost."""


class Engine(ABC):
    """Runs the steps of one persistent batch of requests on one model.

    The router decides every step (``tgis_shard.steps`` applies it): requests ``join`` the batch,
    ``step`` processes the scheduled tokens of some of them and returns a token for each whose
    prompt is complete, requests ``leave``. Capabilities are declared on the class.
    """

    ctx: ShardContext
    chunked_prefill: ClassVar[bool] = False
    """The engine takes a prompt over several steps; otherwise each prompt is scheduled whole."""
    pt2_compile: ClassVar[bool] = False
    """The engine compiles its model with torch.compile when PT2_COMPILE asks; otherwise it runs
    eagerly and the shard says so."""

    @abstractmethod
    def info(self) -> pb.InfoResponse: ...

    @abstractmethod
    def join(self, request: pb.Request) -> None:
        """Takes a request into the batch. Raises, leaving the batch as it was, when the request
        cannot run (its prompt prefix, its parameters)."""

    @abstractmethod
    def leave(self, request_ids: Collection[int]) -> None:
        """Drops requests from the batch; ids it does not hold are ignored."""

    @abstractmethod
    def request_ids(self) -> list[int]:
        """The requests the batch holds."""

    @abstractmethod
    def step(self, work: Sequence[ScheduledWork]) -> list[GeneratedToken]:
        """Processes the listed requests' tokens in one pass and returns a token for each whose
        prompt is complete after it. When it raises, the batch is as it was before the call, so
        the caller may drop requests and run the rest again."""

    def launch(self, work: Sequence[ScheduledWork]) -> PendingStep:
        """Starts a step and returns before its tokens reach the host, so that the next step can
        be prepared while the device computes this one. The batch is the step's from the call on:
        the next ``launch`` may come before ``wait``. Raises as ``step`` does, leaving the batch as
        it was; a ``wait`` that raises has lost the batch. By default the step runs whole here."""
        return PendingStep.done(self.step(work))

    def reset(self) -> None:
        """Drops every request."""
        self.leave(self.request_ids())

    @abstractmethod
    def health_check(self) -> None:
        """Runs a real one-token forward pass; raises when the model cannot compute."""

    @abstractmethod
    def memory_model(self) -> pb.MemoryModel | None:
        """What batches cost in memory (see tgis_shard.memory); None when ESTIMATE_MEMORY=off."""

    def prompt_prefix(self, prefix_id: str) -> PromptPrefix:
        """A prompt prefix's embeddings (see tgis_shard.prefixes); loaded once, then cached."""
        info = self.info()
        raise PrefixesUnsupportedError(
            f"the {info.engine} engine does not support prompt prefixes for {info.model_type} models yet"
        )

    def warm_up(self) -> None:
        """Compiles what the first requests would otherwise wait for; nothing by default."""
        return None

    def measure_prefill(self, tokens: int) -> None:
        """Runs and drops a prefill of one ``tokens``-long prompt, to measure its memory."""
        self.run_synthetic([tokens], decode_steps=0)

    def measure_decode(self, rows: int, tokens: int, start_counting: Callable[[], None]) -> None:
        """Prefills ``rows`` prompts of ``tokens`` tokens, calls ``start_counting``, runs one decode
        step and drops the batch: the memory of a decode step over a cache of that size."""
        self.run_synthetic([tokens] * rows, decode_steps=1, before_decode=start_counting)

    def synthetic_blocks(self, lengths: Sequence[int]) -> list[tuple[int, ...]]:
        """KV-cache blocks for sequences of these lengths in a start-up run, when the batch is empty
        (paged engines); none by default."""
        return [() for _ in lengths]

    def run_synthetic(
        self,
        prompt_lengths: Sequence[int],
        decode_steps: int,
        before_decode: Callable[[], None] | None = None,
        joining: Sequence[int] = (),
    ) -> None:
        """Runs a batch of placeholder prompts of these lengths, decodes it ``decode_steps`` times
        and drops it: the engine's own start-up work (measuring, compiling) on an empty batch.
        ``joining``: prompts of these lengths join in the first decode step, after the batch's
        decodes, as requests arriving while others decode do (then they decode along)."""
        if joining and decode_steps < 1:
            raise ValueError("prompts join in a decode step: decode_steps must be at least 1")
        lengths = [*prompt_lengths, *joining]
        ids = [SYNTHETIC_REQUEST_ID + i for i in range(len(lengths))]
        first, later = ids[: len(prompt_lengths)], ids[len(prompt_lengths) :]
        blocks = self.synthetic_blocks([n + decode_steps for n in lengths])
        prompts = [ScheduledWork(rid, n, b) for rid, n, b in zip(ids, lengths, blocks, strict=True)]
        try:
            for rid, n in zip(ids, lengths, strict=True):
                self.join(pb.Request(id=rid, input_ids=[0] * n, max_new_tokens=decode_steps + 1))
            self.step(prompts[: len(first)])
            if before_decode is not None:
                before_decode()
            for i in range(decode_steps):
                joined = prompts[len(first) :] if i == 0 else [ScheduledWork(rid, 1) for rid in later]
                self.step([*(ScheduledWork(rid, 1) for rid in first), *joined])
        finally:
            self.leave(ids)


def shard_info(
    engine: Engine,
    eos_token_ids: list[int],
    *,
    model_kind: int,
    vocab_size: int,
    batch_padding: bool,
    name: str,
    kv_cache: pb.KVCacheLayout | None = None,
) -> pb.InfoResponse:
    """What every engine tells the router about itself; the rest comes from the context and the
    engine's declared capabilities."""
    ctx = engine.ctx
    return pb.InfoResponse(
        model_kind=model_kind,
        eos_token_ids=eos_token_ids,
        vocab_size=vocab_size,
        batch_padding=batch_padding,
        engine=name,
        model_type=ctx.model_type,
        dtype=str(ctx.dtype).removeprefix("torch."),
        world_size=ctx.world_size,
        device=str(ctx.device),
        kv_cache=kv_cache,
        chunked_prefill=engine.chunked_prefill,
    )


def input_token_details(
    input_ids: Sequence[int], top_n: int, logits: torch.Tensor, start: int, prefix_length: int = 0
) -> tuple[pb.Token, ...]:
    """Details of the input tokens that a stretch of a prompt's logits scores: ``logits`` [rows,
    vocab] are the model's at positions ``start``.. of the sequence [prompt prefix, input].

    Input token j (at position prefix_length + j) is scored by the logits at the position before
    it, from the raw model scores (the processor chain describes generation state that does not
    exist for the prompt). The first input token has no predecessor: NaN, no rank, no top tokens.
    A prompt processed in chunks gets each token's details from the chunk holding its scorer.
    """
    end = start + logits.shape[0]
    tokens = []
    if start <= prefix_length < end:
        tokens.append(pb.Token(id=input_ids[0], logprob=float("nan")))
    first, last = max(1, start + 1 - prefix_length), min(len(input_ids) - 1, end - prefix_length)
    if first > last:
        return tuple(tokens)
    rows = logits[prefix_length + first - 1 - start : prefix_length + last - start]
    following = torch.tensor(list(input_ids[first : last + 1]), device=logits.device)
    details = token_details(rows.float().log_softmax(dim=-1), following, top_n)
    columns = [following.double(), details.logprobs.double(), details.ranks.double()]
    if details.top_ids is not None and details.top_logprobs is not None:
        columns += [details.top_ids.double(), details.top_logprobs.double()]
    width = details.top_ids.shape[1] if details.top_ids is not None else 0
    for row in torch.column_stack(columns).tolist():
        top = top_tokens([int(i) for i in row[3 : 3 + width]], row[3 + width :], top_n) if width else ()
        tokens.append(
            pb.Token(
                id=int(row[0]),
                logprob=row[1],
                rank=int(row[2]),
                top_tokens=[pb.TopToken(id=t, logprob=lp) for t, lp in top],
            )
        )
    return tuple(tokens)
