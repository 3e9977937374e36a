"""``text-generation-launcher``: prepares the model, starts the shards and the router, watches them.

Exits non-zero (after stopping the rest) when any child dies; forwards SIGTERM/SIGINT.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import signal
import sys
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path

from tgis_proto import shard_pb2 as shard_pb
from tgis_proto.logs import configure_logging
from tgis_proto.plugins import PluginError, Registry, load_registry
from tgis_router import tracing
from tgis_router.admission import Admission, memory_model
from tgis_router.config import (
    TERMINATION_LOG_VARIABLE,
    ConfigError,
    LauncherConfig,
    ignored_options,
    num_shards,
    parse_config,
)
from tgis_router.kv_blocks import blocks_for
from tgis_router.router import ModelSetup, admission_config, run_router
from tgis_router.shard_client import ShardClient

log = logging.getLogger("tgis_router.launcher")

SHARD_READY_TIMEOUT_S = 1800.0
SHARD_STOP_TIMEOUT_S = 10.0


class LaunchError(Exception):
    """Start-up cannot continue; the message is one line for the user."""


def _server_command() -> list[str]:
    executable = shutil.which("text-generation-server")
    return [executable] if executable else [sys.executable, "-m", "tgis_shard.cli"]


def _model_args(config: LauncherConfig) -> list[str]:
    args = [config.model_name]
    if config.deployment_framework:
        args += ["--deployment-framework", config.deployment_framework]
    if config.revision:
        args += ["--revision", config.revision]
    return args


# Without DEPLOYMENT_FRAMEWORK: the fast engine where a family plugin serves the model and a GPU
# (or tensor parallelism) is there to run it; the engine that runs any transformers model elsewhere.
FAST_ENGINE = "tgis_native"
PORTABLE_ENGINE = "hf_transformers"


def choose_engine(
    requested: str | None, registry: Registry, model_type: str, cuda_devices: int, shards: int
) -> tuple[str, str]:
    """The engine to run, and why, in a line for the log; an explicit DEPLOYMENT_FRAMEWORK wins."""
    if requested:
        return requested, f"DEPLOYMENT_FRAMEWORK={requested}"
    family = registry.model_families.get(model_type)
    served = family is not None and FAST_ENGINE in family.engines
    if served and (cuda_devices or shards > 1):
        where = f"{cuda_devices} GPU(s)" if cuda_devices else f"tensor parallelism over {shards} shards"
        return FAST_ENGINE, f"{FAST_ENGINE}: {where}, and the {family.plugin} plugin serves model_type {model_type!r}"
    if served:
        return PORTABLE_ENGINE, f"{PORTABLE_ENGINE}: no GPU ({FAST_ENGINE} with the {family.plugin} plugin is for GPUs)"
    return PORTABLE_ENGINE, f"{PORTABLE_ENGINE}: no installed {FAST_ENGINE} plugin serves model_type {model_type!r}"


def _check_plugins(config: LauncherConfig, registry: Registry) -> None:
    if not config.deployment_framework:
        return  # chosen once the model is known
    try:
        engine = registry.engine(config.deployment_framework)
    except PluginError as e:
        raise LaunchError(str(e)) from None
    if not engine.needs_model_family and engine.name == "hf_transformers" and num_shards(config) > 1:
        raise LaunchError(
            f"engine hf_transformers runs on one device but {num_shards(config)} shards were asked; "
            "use DEPLOYMENT_FRAMEWORK=tgis_native to shard a model"
        )


def _check_one_request_fits(config: LauncherConfig, info: shard_pb.InfoResponse, max_sequence_length: int) -> None:
    """A configuration in which one maximum-length request cannot run would fail requests later."""
    if info.HasField("kv_cache"):
        layout = info.kv_cache
        if blocks_for(max_sequence_length, layout.block_size) > layout.num_blocks:
            raise LaunchError(
                f"one request of MAX_SEQUENCE_LENGTH {max_sequence_length} tokens does not fit in the KV cache "
                f"({layout.num_blocks} blocks of {layout.block_size} tokens); lower MAX_SEQUENCE_LENGTH or raise "
                "KV_CACHE_MANAGER_NUM_GPU_BLOCKS"
            )
        return
    admission = Admission(memory_model(info), admission_config(config))
    if not admission.fits_alone(max_sequence_length - 1, 1):
        model = admission.model
        raise LaunchError(
            f"one request of MAX_SEQUENCE_LENGTH {max_sequence_length} tokens does not fit in the memory "
            f"for batches ({model.limit / 2**20:.0f} MiB, {model.tokens_fit()} tokens); lower "
            "MAX_SEQUENCE_LENGTH or BATCH_SAFETY_MARGIN, or use more GPUs"
        )


def clamp_max_new_tokens(config: LauncherConfig, max_sequence_length: int) -> LauncherConfig:
    """As TGIS: an output can be at most MAX_SEQUENCE_LENGTH - 1 tokens (the input takes one)."""
    if config.max_new_tokens < max_sequence_length:
        return config
    log.warning(
        "MAX_NEW_TOKENS %d is not below MAX_SEQUENCE_LENGTH %d; using %d",
        config.max_new_tokens,
        max_sequence_length,
        max_sequence_length - 1,
    )
    return replace(config, max_new_tokens=max_sequence_length - 1)


async def _prepare(config: LauncherConfig) -> dict:
    """Runs ``text-generation-server prepare`` (which may convert the embedded model once)."""
    process = await asyncio.create_subprocess_exec(
        *_server_command(),
        "prepare",
        *_model_args(config),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=_child_env(config),
    )
    stdout, stderr = await process.communicate()
    if process.returncode != 0:
        lines = [line for line in stderr.decode(errors="replace").splitlines() if line.strip()]
        last = lines[-1].removeprefix("text-generation-server: error: ") if lines else ""
        raise LaunchError(last or f"model preparation failed with code {process.returncode}")
    return json.loads(stdout.decode().strip().splitlines()[-1])


# What TGIS sets for its shards, unless the operator did: NCCL errors end a shard instead of
# hanging it, NCCL does not record streams of freed tensors, safetensors loads straight to a GPU.
_SHARD_ENV_DEFAULTS = {
    "NCCL_ASYNC_ERROR_HANDLING": "1",
    "TORCH_NCCL_AVOID_RECORD_STREAMS": "1",
    "SAFETENSORS_FAST_GPU": "1",
}


def _child_env(config: LauncherConfig, **extra: str) -> dict[str, str]:
    env = {**_SHARD_ENV_DEFAULTS, **os.environ}
    if env.get("PYTORCH_CUDA_ALLOC_CONF") == "":  # TGIS: set but empty means unset
        del env["PYTORCH_CUDA_ALLOC_CONF"]
    env["CUDA_PROCESS_MEMORY_FRACTION"] = str(config.cuda_process_memory_fraction)
    if config.hub_cache:  # under the name huggingface_hub reads first
        env["HF_HUB_CACHE"] = config.hub_cache
    env["LOG_LEVEL"] = config.log_level
    # Shards log like the launcher, so a collector reads one format from the whole pod.
    env["JSON_OUTPUT"] = "true" if config.json_output else "false"
    if config.tgis_plugins:
        env["TGIS_PLUGINS"] = config.tgis_plugins
    env.update(extra)
    return env


def shard_serve_args(config: LauncherConfig, model_dir: str, max_sequence_length: int, rank: int) -> list[str]:
    """``text-generation-server serve`` arguments of one rank, from the launcher's options."""
    args = [
        "serve",
        model_dir,
        "--deployment-framework",
        str(config.deployment_framework),
        "--uds-path",
        f"{config.shard_uds_path}-{rank}",
        "--max-sequence-length",
        str(max_sequence_length),
        "--max-batch-size",
        str(config.max_batch_size),
        "--estimate-memory",
        config.estimate_memory,
        "--batch-safety-margin",
        str(config.batch_safety_margin),
        "--prompt-cache-size-mb",
        str(config.prompt_cache_size_mb),
    ]
    if config.dtype_str:
        args += ["--dtype-str", config.dtype_str]
    if config.prefix_store_path:
        args += ["--prefix-store-path", config.prefix_store_path]
    if config.kv_cache_manager_num_gpu_blocks:
        args += ["--kv-cache-blocks", str(config.kv_cache_manager_num_gpu_blocks)]
    if not config.cuda_graphs:
        args.append("--no-cuda-graphs")
    if not config.prompt_graphs:
        args.append("--no-prompt-graphs")
    if not config.fused_kernels:
        args.append("--no-fused-kernels")
    args.append("--decode-kernel" if config.decode_kernel else "--no-decode-kernel")
    if not config.hf_paged_cache:
        args.append("--no-hf-paged-cache")
    if config.pt2_compile:
        args.append("--pt2-compile")
    return args


async def _start_shards(
    config: LauncherConfig, model_dir: str, max_sequence_length: int
) -> list[asyncio.subprocess.Process]:
    world_size = num_shards(config)
    processes = []
    for rank in range(world_size):
        args = [*_server_command(), *shard_serve_args(config, model_dir, max_sequence_length, rank)]
        env = _child_env(
            config,
            RANK=str(rank),
            WORLD_SIZE=str(world_size),
            LOCAL_RANK=str(rank),
            MASTER_ADDR=config.master_addr,
            MASTER_PORT=str(config.master_port),
            # Weights come from local folders only; a shard must never reach a hub.
            HF_HUB_OFFLINE="1",
            TRANSFORMERS_OFFLINE="1",
        )
        if config.shard_torch_threads:
            env["TGIS_TORCH_THREADS"] = str(config.shard_torch_threads)
        processes.append(await asyncio.create_subprocess_exec(*args, env=env))
    return processes


async def _first_exit(processes: Sequence[asyncio.subprocess.Process]) -> tuple[int, int]:
    """Waits until any child exits; returns (index, exit code)."""
    waits = {asyncio.ensure_future(p.wait()): i for i, p in enumerate(processes)}
    try:
        done, _ = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        task = next(iter(done))
        return waits[task], task.result()
    finally:
        for task in waits:
            task.cancel()


async def _stop_processes(processes: Sequence[asyncio.subprocess.Process]) -> None:
    for process in processes:
        if process.returncode is None:
            process.terminate()
    try:
        await asyncio.wait_for(asyncio.gather(*(p.wait() for p in processes)), SHARD_STOP_TIMEOUT_S)
    except TimeoutError:
        for process in processes:
            if process.returncode is None:
                process.kill()
        await asyncio.gather(*(p.wait() for p in processes))


async def _launch(config: LauncherConfig) -> int:
    registry = load_registry(allow_list=config.tgis_plugins)
    _check_plugins(config, registry)
    description = await _prepare(config)
    engine, why = choose_engine(
        config.deployment_framework,
        registry,
        description["model_type"],
        description["cuda_devices"],
        num_shards(config),
    )
    log.info("engine %s", why)
    config = replace(config, deployment_framework=engine)
    _check_plugins(config, registry)
    try:
        registry.check_servable(engine, description["model_type"])
    except PluginError as e:
        raise LaunchError(str(e)) from None
    max_sequence_length = config.max_sequence_length or description["max_sequence_length"]
    config = clamp_max_new_tokens(config, max_sequence_length)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)

    processes = await _start_shards(config, description["model_dir"], max_sequence_length)
    shards = ShardClient([f"{config.shard_uds_path}-{rank}" for rank in range(len(processes))])
    children_exit = asyncio.ensure_future(_first_exit(processes))
    stop_wait = asyncio.ensure_future(stop.wait())
    router: asyncio.Task | None = None
    try:
        info_task = asyncio.ensure_future(shards.info(timeout=SHARD_READY_TIMEOUT_S))
        await asyncio.wait((info_task, children_exit, stop_wait), return_when=asyncio.FIRST_COMPLETED)
        if not info_task.done():
            info_task.cancel()
            if children_exit.done():
                rank, code = children_exit.result()
                raise LaunchError(f"shard {rank} exited with code {code} before it was ready")
            return 0
        info = info_task.result()
        log.info("%d shard(s) ready: %s on %s (%s)", len(processes), info.engine, info.device, info.dtype)
        _check_one_request_fits(config, info, max_sequence_length)
        setup = ModelSetup(Path(description["tokenizer_file"]), max_sequence_length)
        router = asyncio.ensure_future(run_router(config, setup, shards, info, stop))
        await asyncio.wait((router, children_exit, stop_wait), return_when=asyncio.FIRST_COMPLETED)
        if children_exit.done():
            rank, code = children_exit.result()
            log.error("shard %d exited with code %d; stopping", rank, code)
            return 1
        if router.done() and router.exception() is not None:
            log.error("router failed: %s", router.exception())
            return 1
        log.info("signal received; shutting down")
        return 0
    finally:
        stop.set()
        if router is not None:
            await asyncio.gather(router, return_exceptions=True)
        children_exit.cancel()
        stop_wait.cancel()
        await _stop_processes(processes)
        await shards.close()


# Kubernetes mounts this file in every container and shows what is written there as the
# termination message; TERMINATION_LOG_PATH (TERMINATION_LOG_VARIABLE) names another.
DEFAULT_TERMINATION_LOG = "/dev/termination-log"


def write_termination_log(reason: str, environ: Mapping[str, str] = os.environ) -> None:
    """The one-line reason a start-up failed, where the orchestrator shows it. The default path is
    written only where it exists (in a pod): elsewhere stderr has the line already."""
    path = environ.get(TERMINATION_LOG_VARIABLE) or DEFAULT_TERMINATION_LOG
    if path == DEFAULT_TERMINATION_LOG and not os.path.exists(path):
        return
    try:
        with open(path, "w") as log_file:
            log_file.write(reason + "\n")
    except OSError as e:
        log.warning("cannot write the termination log %s: %s", path, e)


def _fail_start(reason: str) -> int:
    print(f"text-generation-launcher: error: {reason}", file=sys.stderr)
    write_termination_log(reason)
    return 2


def main(argv: Sequence[str] | None = None) -> int:
    try:
        config = parse_config(argv)
    except ConfigError as e:
        return _fail_start(str(e))
    configure_logging(config.log_level, config.json_output)
    for warning in ignored_options(config):
        log.warning(warning)
    try:
        tracing.configure(config.otlp_endpoint, config.otlp_service_name)
    except tracing.TracingUnavailableError as e:
        return _fail_start(str(e))
    if config.otlp_endpoint:
        log.info("tracing to %s as %s", config.otlp_endpoint, config.otlp_service_name)
    try:
        return asyncio.run(_launch(config))
    except LaunchError as e:
        return _fail_start(str(e))


if __name__ == "__main__":
    sys.exit(main())
