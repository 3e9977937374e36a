"""Launcher and router options: flags with upper-cased env-var equivalents, parsed once."""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields, replace
from typing import Any

from tgis_proto.logs import parse_bool, parse_log_level

DEFAULT_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
DTYPES = ("float32", "float16", "bfloat16")


class ConfigError(Exception):
    """A bad option value; the message is one line naming the option."""


def _positive_int(value: str) -> int:
    number = int(value)
    if number <= 0:
        raise ValueError(f"must be > 0, got {number}")
    return number


def _fraction(value: str) -> float:
    number = float(value)
    if not 0.0 <= number <= 1.0:
        raise ValueError(f"must be between 0 and 1, got {number}")
    return number


def _percent(value: str) -> int:
    number = int(value)
    if not 0 <= number < 100:
        raise ValueError(f"must be a percentage in [0, 100), got {number}")
    return number


def _port(value: str) -> int:
    number = int(value)
    if not 0 < number < 65536:
        raise ValueError(f"must be a port number, got {number}")
    return number


def _dtype(value: str) -> str:
    if value not in DTYPES:
        raise ValueError(f"must be one of {', '.join(DTYPES)}, got {value!r}")
    return value


def _log_level(value: str) -> str:
    parse_log_level(value)  # checked here, applied by each process's configure_logging
    return value


@dataclass(frozen=True)
class Option:
    field: str
    parse: Callable[[str], Any]
    help: str

    @property
    def env(self) -> str:
        return self.field.upper()

    @property
    def flag(self) -> str:
        return "--" + self.field.replace("_", "-")


@dataclass(frozen=True)
class LauncherConfig:
    """Every option of text-generation-launcher; built once by :func:`parse_config`."""

    model_name: str = DEFAULT_MODEL
    revision: str | None = None
    deployment_framework: str | None = None  # unset: tgis_router.launcher.choose_engine decides
    dtype_str: str | None = None
    dtype: str | None = None
    num_gpus: int | None = None
    num_shard: int | None = None
    max_concurrent_requests: int = 512
    max_sequence_length: int | None = None
    max_new_tokens: int = 1024
    max_batch_size: int = 12
    max_prefill_padding: float = 0.2
    batch_safety_margin: int = 20
    max_waiting_tokens: int = 24
    max_step_tokens: int = 2048
    max_prompt_tokens_while_decoding: int = 256
    kv_cache_manager_num_gpu_blocks: int | None = None
    port: int = 3000
    grpc_port: int = 8033
    shard_uds_path: str = "/tmp/tgis-shard"
    master_addr: str = "localhost"
    master_port: int = 29500
    tls_cert_path: str | None = None
    tls_key_path: str | None = None
    tls_client_ca_cert_path: str | None = None
    output_special_tokens: bool = False
    default_include_stop_seqs: bool = True
    prefix_store_path: str | None = None
    prompt_cache_size_mb: int = 512
    pt2_compile: bool = False
    cuda_graphs: bool = True
    prompt_graphs: bool = True
    fused_kernels: bool = True
    decode_kernel: bool = True
    hf_paged_cache: bool = True
    estimate_memory: str = "auto"
    tgis_plugins: str | None = None
    json_output: bool = False
    otlp_endpoint: str | None = None
    otlp_service_name: str = "text-generation-inference.router"  # TGIS's
    log_level: str = "info"
    tokenization_workers: int = 2
    shard_torch_threads: int | None = None
    cuda_visible_devices: str | None = None
    nvidia_visible_devices: str | None = None
    quantize: str | None = None
    max_prompt_prefix_length: int | None = None
    cuda_process_memory_fraction: float = 1.0
    # Not a launcher option: the HF hub cache the environment names (resolve_hub_cache).
    hub_cache: str | None = None
    max_batch_weight: int | None = None
    max_prefill_weight: int | None = None


OPTIONS: tuple[Option, ...] = (
    Option("model_name", str, "local model folder or hub id already in the HF cache"),
    Option("revision", str, "hub revision of MODEL_NAME"),
    Option(
        "deployment_framework",
        str,
        "engine: hf_transformers, tgis_native (hf_custom_tp), ...; unset: tgis_native on a GPU where an "
        "installed plugin serves the model, else hf_transformers",
    ),
    Option(
        "dtype_str",
        _dtype,
        "float32, float16 or bfloat16; unset: float32 on the CPU, on a GPU float16 unless the model's config "
        "says bfloat16",
    ),
    Option("dtype", _dtype, "TGIS's other name for DTYPE_STR; both set must agree"),
    Option("num_gpus", _positive_int, "number of shards (one per GPU)"),
    Option("num_shard", _positive_int, "same as NUM_GPUS"),
    Option("max_concurrent_requests", _positive_int, "inputs in flight (queued + running) before refusing"),
    Option("max_sequence_length", _positive_int, "input + output token limit (default from config.json)"),
    Option("max_new_tokens", _positive_int, "largest max_new_tokens a request may ask for"),
    Option("max_batch_size", _positive_int, "most requests decoding together"),
    Option("max_prefill_padding", _fraction, "largest fraction of padding in a prefill batch"),
    Option("batch_safety_margin", _percent, "percent of free memory kept out of the batch weight limit"),
    Option("max_waiting_tokens", _positive_int, "decode steps a waiting request may be passed over"),
    Option(
        "max_step_tokens",
        _positive_int,
        "tokens one step processes (decodes and prompt chunks); longer prompts are prefilled over several "
        "steps (tgis_native)",
    ),
    Option(
        "max_prompt_tokens_while_decoding",
        _positive_int,
        "prompt tokens a step takes beside its decodes, however many: chunks stay this small so that the "
        "decoding requests' tokens keep an even pace (tgis_native)",
    ),
    Option(
        "kv_cache_manager_num_gpu_blocks",
        _positive_int,
        "blocks of the paged KV cache (tgis_native; default: what fits in memory on a GPU, "
        "MAX_BATCH_SIZE sequences of MAX_SEQUENCE_LENGTH on the CPU)",
    ),
    Option("port", _port, "HTTP port for /health and /metrics"),
    Option("grpc_port", _port, "gRPC port of fmaas.GenerationService"),
    Option("shard_uds_path", str, "unix socket path prefix of the shards ({path}-{rank})"),
    Option("master_addr", str, "torch.distributed master address"),
    Option("master_port", _port, "torch.distributed master port"),
    Option("tls_cert_path", str, "server certificate (PEM) to serve gRPC over TLS"),
    Option("tls_key_path", str, "server private key (PEM)"),
    Option("tls_client_ca_cert_path", str, "CA certificate (PEM) to require client certificates (mTLS)"),
    Option("output_special_tokens", parse_bool, "keep special tokens in generated text"),
    Option("default_include_stop_seqs", parse_bool, "include the matched stop sequence in text by default"),
    Option("prefix_store_path", str, "folder of prompt prefixes (PEFT prompt tuning)"),
    Option("prompt_cache_size_mb", _positive_int, "memory for cached prompt prefixes"),
    Option(
        "pt2_compile",
        parse_bool,
        "run the model's forward pass through torch.compile (tgis_native, hf_transformers)",
    ),
    Option("cuda_graphs", parse_bool, "replay decode steps from CUDA graphs (paged engines on one GPU)"),
    Option(
        "prompt_graphs",
        parse_bool,
        "also replay steps with prompt chunks from CUDA graphs, in pieces around attention",
    ),
    Option(
        "fused_kernels", parse_bool, "fuse norms, rotary and activations into one kernel each on GPUs (torch.compile)"
    ),
    Option(
        "decode_kernel",
        parse_bool,
        "steps of decodes attend through tgis's Triton kernel, planned on the GPU, instead of the backend's",
    ),
    Option(
        "hf_paged_cache",
        parse_bool,
        "hf_transformers on a GPU: causal LMs that take transformers' attention functions run on the paged KV cache",
    ),
    Option("estimate_memory", str, "auto, manual or off"),
    Option("tgis_plugins", str, "comma-separated allow-list of installed plugins to load"),
    Option("json_output", parse_bool, "log as JSON lines"),
    Option("otlp_endpoint", str, "OpenTelemetry collector (OTLP over gRPC) to send traces to; needs tgis-router[otlp]"),
    Option("otlp_service_name", str, "service name of the traces"),
    Option("log_level", _log_level, "trace, debug, info, warn, error; per module: warn,tgis_router=debug"),
    Option("tokenization_workers", _positive_int, "threads tokenizing requests off the event loop"),
    Option("shard_torch_threads", _positive_int, "torch threads per shard process (default: torch's)"),
    Option("cuda_visible_devices", str, "GPUs the shards may use"),
    Option(
        "nvidia_visible_devices", str, "GPUs the container runtime exposes (counted when CUDA_VISIBLE_DEVICES is unset)"
    ),
    Option("quantize", str, "TGIS's weight quantization (gptq, bitsandbytes, ...): refused, not supported yet"),
    Option("max_prompt_prefix_length", _positive_int, "longest prompt prefix a request may name, in tokens"),
    Option("cuda_process_memory_fraction", _fraction, "share of each GPU's memory a shard may use (weights included)"),
    Option(
        "max_batch_weight", _positive_int, "TGIS's batch weight limit: ignored, memory is measured (ESTIMATE_MEMORY)"
    ),
    Option("max_prefill_weight", _positive_int, "TGIS's prefill weight limit: ignored, memory is measured"),
)
# TGIS's short forms.
SHORT_FLAGS = {"port": "-p", "grpc_port": "-g"}
# Options every process on this host reads itself; "" leaves them unset, as in TGIS.
_EMPTY_IS_A_VALUE = ("cuda_visible_devices", "nvidia_visible_devices")


def options_markdown() -> str:
    """The README's table of options (a test keeps the README equal to it)."""
    defaults = {f.name: f.default for f in fields(LauncherConfig)}
    rows = ["| env var | flag | default | what it does |", "|---|---|---|---|"]
    for option in OPTIONS:
        default = defaults[option.field]
        shown = "unset" if default is None else str(default).lower() if isinstance(default, bool) else str(default)
        flags = f"`{option.flag}`" + (f", `{SHORT_FLAGS[option.field]}`" if option.field in SHORT_FLAGS else "")
        rows.append(f"| `{option.env}` | {flags} | {shown} | {option.help.replace('|', '/')} |")
    return "\n".join(rows) + "\n"


def _arg_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="text-generation-launcher",
        description="Starts the model shards and the gRPC router. Every flag has an env-var "
        "equivalent: --max-batch-size is MAX_BATCH_SIZE; a flag wins over its env var.",
    )
    for option in OPTIONS:
        flags = [option.flag, *([SHORT_FLAGS[option.field]] if option.field in SHORT_FLAGS else [])]
        # A boolean flag alone means true (--json-output), as TGIS's launcher takes it.
        bare = {"nargs": "?", "const": "true"} if option.parse is parse_bool else {}
        parser.add_argument(*flags, dest=option.field, default=None, help=f"{option.help} [{option.env}]", **bare)
    return parser


# Options that are gone, with what replaced them: set, they stop the launcher with this message.
REMOVED_OPTIONS = {
    "MAX_STEP_TOKENS_WHILE_DECODING": "MAX_STEP_TOKENS_WHILE_DECODING is gone: set MAX_PROMPT_TOKENS_WHILE_DECODING, "
    "the prompt tokens a step takes beside its decodes (the decodes no longer count against it)",
}


def parse_config(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> LauncherConfig:
    """Flags win over env vars, env vars over defaults; each value is checked here, once."""
    environ = os.environ if environ is None else environ
    for name, message in REMOVED_OPTIONS.items():
        if name in environ:
            raise ConfigError(message)
    args = _arg_parser().parse_args(argv)
    values: dict[str, Any] = {}
    for option in OPTIONS:
        raw = getattr(args, option.field)
        source = option.flag
        if raw is None and option.env in environ:
            raw, source = environ[option.env], option.env
        if raw is None or (raw == "" and option.field not in _EMPTY_IS_A_VALUE):
            continue
        try:
            values[option.field] = option.parse(raw)
        except ValueError as e:
            raise ConfigError(f"invalid value for {source}: {e}") from None
    config = LauncherConfig(**values)
    _check(config)
    if config.dtype and not config.dtype_str:
        config = replace(config, dtype_str=config.dtype)
    return replace(config, hub_cache=resolve_hub_cache(environ))


# Names of the HF hub cache folder, newest first, as TGIS reads them.
HUB_CACHE_VARIABLES = ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "TRANSFORMERS_CACHE")
# Where a failed start writes its reason (tgis_router.launcher.write_termination_log).
TERMINATION_LOG_VARIABLE = "TERMINATION_LOG_PATH"


def launcher_environment() -> frozenset[str]:
    """Every environment variable the launcher reads: its options, the HF cache variables and the
    termination log's path (what a deployment manifest may set)."""
    return frozenset((*(option.env for option in OPTIONS), *HUB_CACHE_VARIABLES, TERMINATION_LOG_VARIABLE))


def resolve_hub_cache(environ: Mapping[str, str]) -> str | None:
    """The HF hub cache folder the environment names; the variables set must agree (TGIS's check)."""
    named = {name: environ[name] for name in HUB_CACHE_VARIABLES if environ.get(name)}
    folders = {os.path.normpath(value) for value in named.values()}
    if len(folders) > 1:
        listed = ", ".join(f"{name}={value}" for name, value in named.items())
        raise ConfigError(f"the HF cache variables name different folders ({listed}); set one, or all alike")
    return folders.pop() if folders else None


def ignored_options(config: LauncherConfig) -> list[str]:
    """TGIS options accepted so that deployments start, which do nothing here: one warning each."""
    return [
        f"{name} is ignored: batches are sized from measured memory (ESTIMATE_MEMORY, BATCH_SAFETY_MARGIN)"
        for name, value in (
            ("MAX_BATCH_WEIGHT", config.max_batch_weight),
            ("MAX_PREFILL_WEIGHT", config.max_prefill_weight),
        )
        if value is not None
    ]


def _check(config: LauncherConfig) -> None:
    if config.dtype and config.dtype_str and config.dtype != config.dtype_str:
        raise ConfigError(f"DTYPE ({config.dtype}) and DTYPE_STR ({config.dtype_str}) disagree")
    if config.quantize:
        raise ConfigError(f"QUANTIZE={config.quantize} is not supported yet: serve the model's unquantized weights")
    if config.num_gpus and config.num_shard and config.num_gpus != config.num_shard:
        raise ConfigError(f"NUM_GPUS ({config.num_gpus}) and NUM_SHARD ({config.num_shard}) disagree")
    if bool(config.tls_cert_path) != bool(config.tls_key_path):
        raise ConfigError("TLS_CERT_PATH and TLS_KEY_PATH must be given together")
    if config.tls_client_ca_cert_path and not config.tls_cert_path:
        raise ConfigError("TLS_CLIENT_CA_CERT_PATH needs TLS_CERT_PATH and TLS_KEY_PATH")
    if config.estimate_memory not in ("auto", "manual", "off"):
        raise ConfigError(
            f"invalid value for ESTIMATE_MEMORY: must be auto, manual or off, got {config.estimate_memory!r}"
        )
    if config.port == config.grpc_port:
        raise ConfigError(f"PORT and GRPC_PORT are both {config.port}")


def num_shards(config: LauncherConfig) -> int:
    """NUM_GPUS/NUM_SHARD, else the devices in CUDA_VISIBLE_DEVICES, else in NVIDIA_VISIBLE_DEVICES
    (whose "all", "none" and "void" name no count), else 1, as TGIS counts them."""
    if config.num_gpus or config.num_shard:
        return config.num_gpus or config.num_shard or 1
    visible = config.cuda_visible_devices
    if visible is None and config.nvidia_visible_devices not in (None, "all", "none", "void"):
        visible = config.nvidia_visible_devices
    devices = [d for d in (visible or "").split(",") if d.strip()]
    return max(1, len(devices))
