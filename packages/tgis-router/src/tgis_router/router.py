"""The router: client-facing gRPC server, HTTP health/metrics, and the batching loop."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from tgis_proto import generation_pb2 as fmaas
from tgis_proto import generation_pb2_grpc as fmaas_grpc
from tgis_proto import shard_pb2 as shard_pb
from tgis_proto.runtime import freeze_startup_heap
from tgis_router import metrics
from tgis_router.admission import Admission, AdmissionConfig, memory_model
from tgis_router.batcher import Batcher
from tgis_router.config import LauncherConfig
from tgis_router.grpc_server import GenerationService, ModelFacts, generation_server
from tgis_router.health import GenerationHealth
from tgis_router.http_server import start_http_server
from tgis_router.kv_blocks import BlockPool
from tgis_router.prefixes import PrefixLengths
from tgis_router.queue import RequestQueue
from tgis_router.scheduler import PaddedScheduler, PagedScheduler, Scheduler
from tgis_router.shard_client import ShardClient
from tgis_router.tokenization import TokenizerPool
from tgis_router.validation import Limits

log = logging.getLogger(__name__)

# Running calls get this long to finish after a stop (a SIGTERM, a shard's exit); Kubernetes
# allows 30 s between SIGTERM and SIGKILL by default.
DRAIN_TIMEOUT_S = 30.0
REFUSAL_LINGER_S = 1.0
SERVICE_NAME = fmaas.DESCRIPTOR.services_by_name["GenerationService"].full_name


@dataclass(frozen=True)
class ModelSetup:
    """What ``text-generation-server prepare`` found, plus the resolved sequence limit."""

    tokenizer_file: Path
    max_sequence_length: int


def admission_config(config: LauncherConfig) -> AdmissionConfig:
    return AdmissionConfig(
        max_batch_size=config.max_batch_size,
        max_prefill_padding=config.max_prefill_padding,
        max_waiting_tokens=config.max_waiting_tokens,
    )


def step_token_budget(config: LauncherConfig, info: shard_pb.InfoResponse) -> int:
    """MAX_STEP_TOKENS, or less where the shard measured that a longer prefill runs out of memory."""
    measured = info.memory.max_prefill_tokens if info.HasField("memory") else 0
    return min(config.max_step_tokens, measured) if measured else config.max_step_tokens


def create_scheduler(config: LauncherConfig, info: shard_pb.InfoResponse, queue: RequestQueue) -> Scheduler:
    """Paged engines get the block-owning scheduler; padded ones dynamic batch sizing."""
    if info.HasField("kv_cache"):
        if not info.chunked_prefill:
            raise ValueError(f"the {info.engine} engine pages its KV cache but takes no chunked prefill")
        blocks = BlockPool(info.kv_cache.num_blocks, info.kv_cache.block_size)
        return PagedScheduler(
            queue,
            config.max_batch_size,
            blocks,
            step_token_budget(config, info),
            config.max_prompt_tokens_while_decoding,
        )
    admission = Admission(memory_model(info), admission_config(config))
    metrics.batch_weight_limit.set(admission.model.limit)
    return PaddedScheduler(queue, admission)


def _server_credentials(config: LauncherConfig) -> grpc.ServerCredentials | None:
    if not config.tls_cert_path:
        return None
    key = Path(config.tls_key_path or "").read_bytes()
    cert = Path(config.tls_cert_path).read_bytes()
    if config.tls_client_ca_cert_path:
        ca = Path(config.tls_client_ca_cert_path).read_bytes()
        return grpc.ssl_server_credentials([(key, cert)], root_certificates=ca, require_client_auth=True)
    return grpc.ssl_server_credentials([(key, cert)])


async def run_router(
    config: LauncherConfig, setup: ModelSetup, shards: ShardClient, info: shard_pb.InfoResponse, stop: asyncio.Event
) -> None:
    """Serves until ``stop`` is set, then drains gracefully."""
    model = ModelFacts(
        encoder_decoder=info.model_kind == shard_pb.ENCODER_DECODER,
        eos_token_ids=frozenset(info.eos_token_ids),
        max_sequence_length=setup.max_sequence_length,
        max_new_tokens=config.max_new_tokens,
    )
    limits = Limits(
        config.max_new_tokens,
        setup.max_sequence_length,
        config.default_include_stop_seqs,
        config.max_prompt_prefix_length,
    )
    tokenizer = TokenizerPool(setup.tokenizer_file, config.tokenization_workers)
    queue = RequestQueue()
    service = GenerationService(
        model,
        limits,
        tokenizer,
        queue,
        config.max_concurrent_requests,
        config.output_special_tokens,
        PrefixLengths(shards.prefix_lookup),
    )
    scheduler = create_scheduler(config, info, queue)
    health_state = GenerationHealth(shards)
    batcher_task = asyncio.create_task(Batcher(shards, queue, scheduler, health_state).run(), name="batcher")

    server = generation_server(config.max_concurrent_requests)
    fmaas_grpc.add_GenerationServiceServicer_to_server(service, server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    address = f"[::]:{config.grpc_port}"
    credentials = _server_credentials(config)
    if credentials is None:
        server.add_insecure_port(address)
    else:
        server.add_secure_port(address, credentials)
    await server.start()
    freeze_startup_heap("router")
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    http = start_http_server(config.port, health_state.check, asyncio.get_running_loop())
    log.info("router ready: gRPC on port %d, HTTP /health and /metrics on port %d", config.grpc_port, config.port)
    print(
        f"tgis is serving fmaas.GenerationService on localhost:{config.grpc_port}. Try:\n"
        f"  python -m tgis_router.client --address localhost:{config.grpc_port} 'The capital of France is'",
        flush=True,
    )
    stop_task = asyncio.create_task(stop.wait())
    try:
        await asyncio.wait((stop_task, batcher_task), return_when=asyncio.FIRST_COMPLETED)
        if batcher_task.done():
            raise RuntimeError(f"the batching loop stopped: {batcher_task.exception()!r}")
    finally:
        stop_task.cancel()
        # New calls get a clear UNAVAILABLE from the service itself while running ones finish,
        # and for a moment after, for the clients that raced the signal; only then the port closes.
        service.refuse_new_calls("the server is shutting down")
        await health_servicer.enter_graceful_shutdown()
        if not await service.wait_idle(DRAIN_TIMEOUT_S):
            log.warning("calls still running after %.0f s of shutdown are cancelled", DRAIN_TIMEOUT_S)
        await asyncio.sleep(REFUSAL_LINGER_S)
        await server.stop(grace=0)
        http.shutdown()
        batcher_task.cancel()
        await asyncio.gather(batcher_task, return_exceptions=True)
        tokenizer.close()
