"""The router's gRPC service and batching loop in this process, over fake shards (no launcher,
no torch): for the glue tests and the router-alone bench."""

from __future__ import annotations

import asyncio

import grpc

from tests.support.fake_shard import EOS_ID, FakeShards, rpc_error
from tests.support.ports import free_port
from tgis_proto import generation_pb2_grpc as fmaas_grpc
from tgis_router.admission import Admission, AdmissionConfig, MemoryModel
from tgis_router.batcher import Batcher
from tgis_router.grpc_server import GenerationService, ModelFacts, generation_server
from tgis_router.health import GenerationHealth
from tgis_router.kv_blocks import BlockPool
from tgis_router.prefixes import PrefixLengths
from tgis_router.queue import RequestQueue
from tgis_router.scheduler import PaddedScheduler, PagedScheduler, Scheduler
from tgis_router.tokenization import TokenizerPool
from tgis_router.validation import Limits

ROOMY = MemoryModel(limit=1e15, bytes_per_token=1.0, prefill_bytes_per_token=0.0, padded=False)


async def _no_prefixes(prefix_id: str) -> int:
    raise rpc_error(grpc.StatusCode.NOT_FOUND, f'prefix id "{prefix_id}" not found')


class RouterInProcess:
    """``async with RouterInProcess(...) as router``: ``router.stub`` talks to it over gRPC. Fake
    shards with a KV cache get the paged scheduler, others the padded one."""

    def __init__(
        self,
        tokenizer_file,
        shards: FakeShards,
        max_concurrent: int,
        max_batch_size: int = 8,
        max_sequence_length: int = 256,
        max_new_tokens: int = 100,
        eos_token_ids: frozenset[int] = frozenset({EOS_ID}),
        step_tokens: int = 2048,
        prompt_tokens_while_decoding: int | None = None,
    ):
        self.shards = shards
        self.max_concurrent = max_concurrent
        self.tokenizer = TokenizerPool(tokenizer_file, workers=1)
        queue = RequestQueue()
        self.service = GenerationService(
            ModelFacts(False, eos_token_ids, max_sequence_length, max_new_tokens),
            Limits(max_new_tokens, max_sequence_length, True),
            self.tokenizer,
            queue,
            max_concurrent,
            False,
            PrefixLengths(_no_prefixes),
        )
        scheduler: Scheduler
        if shards.kv_cache is not None:
            blocks = BlockPool(shards.kv_cache.num_blocks, shards.kv_cache.block_size)
            scheduler = PagedScheduler(queue, max_batch_size, blocks, step_tokens, prompt_tokens_while_decoding)
        else:
            scheduler = PaddedScheduler(queue, Admission(ROOMY, AdmissionConfig(max_batch_size=max_batch_size)))
        self.batcher = Batcher(shards, queue, scheduler, GenerationHealth(shards))  # type: ignore[arg-type]
        self.address = f"localhost:{free_port()}"

    async def __aenter__(self) -> RouterInProcess:
        self.server = generation_server(self.max_concurrent)
        fmaas_grpc.add_GenerationServiceServicer_to_server(self.service, self.server)
        self.server.add_insecure_port(self.address)
        await self.server.start()
        self.task = asyncio.create_task(self.batcher.run())
        self.channel = grpc.aio.insecure_channel(self.address)
        self.stub = fmaas_grpc.GenerationServiceStub(self.channel)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.channel.close()
        await self.server.stop(grace=None)
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)
        self.tokenizer.close()

    @property
    def in_flight(self) -> int:
        return self.service._in_flight
