"""What every engine provides to the shard server."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from tgis_proto import shard_pb2 as pb
from tgis_proto.plugins import Registry
from tgis_shard.logits import BatchTokenChooser, ChosenTokens, token_details, top_tokens
from tgis_shard.memory import MemorySettings
from tgis_shard.prefixes import PrefixesUnsupportedError, PrefixStore, PromptPrefix


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
    prefix_store_path: Path | None = None
    """Folder of prompt prefixes (PREFIX_STORE_PATH); None: requests naming one are refused."""
    prompt_cache_size_mb: int = 512

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
class GeneratedToken:
    """One new token of one request, with the details it asked for."""

    request_id: int
    token_id: int
    logprob: float = float("nan")
    rank: int = 0
    top_tokens: tuple[tuple[int, float], ...] = ()
    input_tokens: tuple[pb.Token, ...] = ()


class UnsupportedModelError(Exception):
    """The model cannot be served by this engine."""


class BatchState(ABC):
    """The tensors of requests decoding together; owned by the shard, named by the router."""

    batch_id: int
    ids: list[int]  # the batch's request ids, in row order

    @property
    def request_ids(self) -> list[int]:
        return list(self.ids)

    def filter(self, keep_request_ids: Sequence[int]) -> BatchState | None:
        """Keeps the listed requests (in this batch's order); None, released, when none remain."""
        keep = set(keep_request_ids)
        rows = [row for row, rid in enumerate(self.ids) if rid in keep]
        if len(rows) == len(self.ids):
            return self
        if not rows:
            self.release()
            return None
        self._keep_rows(rows)
        return self

    @abstractmethod
    def _keep_rows(self, rows: list[int]) -> None:
        """Drops every row but ``rows`` (a non-empty, proper subset, in batch order), in place."""

    def release(self) -> None:
        """Returns resources the batch holds beyond its tensors (KV cache blocks) when dropped."""
        return None  # tensors alone need nothing: garbage collection frees them


class Engine(ABC):
    """Runs prefill and decode steps for batches of one model."""

    ctx: ShardContext

    @abstractmethod
    def info(self) -> pb.InfoResponse: ...

    @abstractmethod
    def prefill(self, batch: pb.Batch) -> tuple[list[GeneratedToken], BatchState]:
        """Runs the prompts of a new batch and returns each request's first token."""

    @abstractmethod
    def concatenate(self, states: Sequence[BatchState]) -> BatchState:
        """Merges batches into one; the first one's id is kept. The merged batch owns what the
        parts held (cache blocks): afterwards only it is released."""

    @abstractmethod
    def decode(self, state: BatchState) -> list[GeneratedToken]:
        """Decodes one more token for every request of the batch, in place. When it raises, the
        batch is as it was before the call, so the caller may drop rows and decode again."""

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

    def run_synthetic(
        self, prompt_lengths: Sequence[int], decode_steps: int, before_decode: Callable[[], None] | None = None
    ) -> None:
        """Prefills a batch of placeholder prompts of these lengths, decodes it ``decode_steps``
        times and drops it: the engine's own start-up work (measuring, compiling)."""
        requests = [
            pb.Request(id=i, input_ids=[0] * n, max_new_tokens=decode_steps + 1) for i, n in enumerate(prompt_lengths)
        ]
        _, state = self.prefill(pb.Batch(id=0, requests=requests))
        if before_decode is not None:
            before_decode()
        for _ in range(decode_steps):
            self.decode(state)
        state.release()


def shard_info(
    ctx: ShardContext, eos_token_ids: list[int], *, model_kind: int, vocab_size: int, batch_padding: bool, engine: str
) -> pb.InfoResponse:
    """What every engine tells the router about itself; the rest comes from the context."""
    return pb.InfoResponse(
        model_kind=model_kind,
        eos_token_ids=eos_token_ids,
        vocab_size=vocab_size,
        batch_padding=batch_padding,
        engine=engine,
        model_type=ctx.model_type,
        dtype=str(ctx.dtype).removeprefix("torch."),
        world_size=ctx.world_size,
        device=str(ctx.device),
    )


def generated_tokens(ids: Sequence[int], chosen: ChosenTokens, chooser: BatchTokenChooser) -> list[GeneratedToken]:
    """Per-request results; each request gets only the details it asked for."""
    token_ids = chosen.token_ids.tolist()
    details = chosen.details
    if details is None:
        return [GeneratedToken(request_id=rid, token_id=token_ids[row]) for row, rid in enumerate(ids)]
    logprobs, ranks = details.logprobs.tolist(), details.ranks.tolist()
    top_ids = details.top_ids.tolist() if details.top_ids is not None else None
    top_lps = details.top_logprobs.tolist() if details.top_logprobs is not None else None
    results = []
    for row, rid in enumerate(ids):
        n = chooser.requests[row].details.top_n
        top = top_tokens(top_ids[row], top_lps[row], n) if top_ids is not None and top_lps is not None else ()
        results.append(GeneratedToken(rid, token_ids[row], logprobs[row], ranks[row], top))
    return results


def input_token_details(request: pb.Request, logits: torch.Tensor, end: int) -> tuple[pb.Token, ...]:
    """Details of a prompt's tokens from the prefill logits of its row (columns before ``end``).

    Token i is scored by the logits at position i - 1, from the raw model scores (the processor
    chain describes generation state that does not exist for the prompt). The first token has
    no predecessor: NaN, no rank, no top tokens.
    """
    ids = list(request.input_ids)
    first = pb.Token(id=ids[0], logprob=float("nan"))
    if len(ids) == 1:
        return (first,)
    logprobs = logits[end - len(ids) : end - 1].float().log_softmax(dim=-1)
    following = torch.tensor(ids[1:], device=logits.device)
    details = token_details(logprobs, following, request.details.top_n)
    values, ranks = details.logprobs.tolist(), details.ranks.tolist()
    top_ids = details.top_ids.tolist() if details.top_ids is not None else None
    top_lps = details.top_logprobs.tolist() if details.top_logprobs is not None else None
    tokens = [first]
    for i, token_id in enumerate(ids[1:]):
        top = top_tokens(top_ids[i], top_lps[i], request.details.top_n) if top_ids and top_lps else ()
        tokens.append(
            pb.Token(
                id=token_id,
                logprob=values[i],
                rank=ranks[i],
                top_tokens=[pb.TopToken(id=t, logprob=lp) for t, lp in top],
            )
        )
    return tuple(tokens)
