"""``text-generation-server``: serve | prepare | plugins | download-weights | convert-to-safetensors |
convert-to-fast-tokenizer | convert-to-onnx."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from dataclasses import asdict
from pathlib import Path

from tgis_proto.logs import configure_logging_from_env, parse_bool
from tgis_proto.plugins import PluginError
from tgis_shard import model_files
from tgis_shard.embedded import DEFAULT_MODEL, EmbeddedModelError
from tgis_shard.engines.base import UnsupportedModelError
from tgis_shard.hub import DEFAULT_EXTENSIONS
from tgis_shard.memory import ESTIMATE_MODES, configure_cuda_allocator, limit_process_memory
from tgis_shard.onnx_export import ExportRefusedError
from tgis_shard.registry import shard_registry

log = logging.getLogger("tgis_shard")

_DTYPES = ("float32", "float16", "bfloat16")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="text-generation-server", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    def model_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("model_name", nargs="?", default=DEFAULT_MODEL, help="local folder or hub id in the HF cache")
        p.add_argument("--revision", default=None)
        p.add_argument(
            "--cache-dir", type=Path, default=model_files.default_cache_dir(), help="where converted files go"
        )
        p.add_argument("--deployment-framework", default="hf_transformers", help="engine name")

    prepare = sub.add_parser("prepare", help="resolve the model folder and print its description as JSON")
    model_args(prepare)

    serve = sub.add_parser("serve", help="serve one rank on a unix socket")
    model_args(serve)
    serve.add_argument("--uds-path", type=Path, required=True)
    serve.add_argument("--dtype-str", choices=_DTYPES, default=None)
    serve.add_argument("--max-sequence-length", type=int, default=None)
    serve.add_argument("--max-batch-size", type=int, default=12, help="sizes the KV cache on CPU")
    serve.add_argument("--estimate-memory", choices=ESTIMATE_MODES, default="auto")
    serve.add_argument("--batch-safety-margin", type=int, default=20, help="percent of free memory kept back")
    serve.add_argument(
        "--prefix-store-path",
        type=Path,
        default=os.environ.get("PREFIX_STORE_PATH") or None,
        help="folder of prompt prefixes (PEFT prompt tuning), one sub-folder per prefix id",
    )
    serve.add_argument("--prompt-cache-size-mb", type=int, default=512, help="memory for loaded prompt prefixes")
    serve.add_argument(
        "--kv-cache-blocks", type=int, default=None, help="blocks of tgis_native's paged KV cache (default: measured)"
    )
    serve.add_argument(
        "--no-cuda-graphs",
        dest="cuda_graphs",
        action="store_false",
        help="run tgis_native's decode steps eagerly instead of replaying CUDA graphs",
    )
    serve.add_argument(
        "--no-prompt-graphs",
        dest="prompt_graphs",
        action="store_false",
        help="run tgis_native's steps with prompt chunks eagerly instead of replaying them in CUDA-graph pieces",
    )
    serve.add_argument(
        "--no-hf-paged-cache",
        dest="hf_paged",
        action="store_false",
        help="run hf_transformers' causal LMs in left-padded batches in transformers' cache, never on the paged cache",
    )
    serve.add_argument(
        "--no-fused-kernels",
        dest="fused_kernels",
        action="store_false",
        help="run norms, rotary and activations as eager PyTorch ops on GPUs instead of one compiled kernel each",
    )
    serve.add_argument(
        "--decode-kernel",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="steps of decodes attend through tgis's Triton decode kernel (half precision, GPU), not the backend's",
    )
    serve.add_argument(
        "--pt2-compile",
        action="store_true",
        help="run the model's forward pass through torch.compile (tgis_native; hf_transformers causal LMs)",
    )

    sub.add_parser("plugins", help="list installed plugins, engines and model families")

    download = sub.add_parser("download-weights", help="fill the HF cache with a model's files")
    download.add_argument("model_name")
    download.add_argument("--revision", default=None)
    download.add_argument(
        "--extension",
        default=DEFAULT_EXTENSIONS,
        help="comma-separated file endings; one weight ending also brings the model's metadata files",
    )
    download.add_argument(
        "--auto-convert",
        type=parse_bool,
        default=True,
        help="convert .bin weights to safetensors and write a fast tokenizer where the model lacks them",
    )
    download.add_argument("--cache-dir", type=Path, default=model_files.default_cache_dir())

    convert = sub.add_parser("convert-to-safetensors", help="convert .bin weights to .safetensors")
    convert.add_argument("model_name")
    convert.add_argument("--revision", default=None)
    convert.add_argument("--cache-dir", type=Path, default=model_files.default_cache_dir())

    fast = sub.add_parser(
        "convert-to-fast-tokenizer", help="write a fast tokenizer (tokenizer.json) for a model that has a slow one only"
    )
    fast.add_argument("model_name")
    fast.add_argument("--revision", default=None)
    fast.add_argument("--cache-dir", type=Path, default=model_files.default_cache_dir())

    onnx = sub.add_parser("convert-to-onnx", help="export an LM to ONNX for DEPLOYMENT_FRAMEWORK=hf_optimum_ort")
    onnx.add_argument("model_name")
    onnx.add_argument("--revision", default=None)
    onnx.add_argument("--cache-dir", type=Path, default=model_files.default_cache_dir())
    return parser


def _prepare(args: argparse.Namespace) -> model_files.ModelDescription:
    model_dir = model_files.resolve_model_dir(args.model_name, args.revision, args.cache_dir)
    description = model_files.describe(model_dir, args.cache_dir)
    registry = shard_registry(os.environ.get("TGIS_PLUGINS"))
    registry.check_servable(args.deployment_framework, description.model_type)
    return description


def default_dtype(device_type: str, config_dtype: str | None) -> str:
    """DTYPE_STR unset: TGIS's choice. float32 on the CPU; on a GPU float16, or bfloat16 where the
    model's config says so (float16's range would overflow weights trained in bfloat16)."""
    if device_type != "cuda":
        chosen, why = "float32", "the CPU"
    elif config_dtype == "bfloat16":
        chosen, why = "bfloat16", "a GPU, and the model's config says bfloat16"
    else:
        chosen, why = "float16", f"a GPU, and the model's config says {config_dtype or 'no dtype'}"
    log.info("dtype %s: DTYPE_STR unset, %s", chosen, why)
    return chosen


def _serve(args: argparse.Namespace) -> None:
    configure_cuda_allocator()
    import torch

    from tgis_shard.progress import library_bars_follow_terminal

    library_bars_follow_terminal()

    from tgis_shard.engines.base import ShardContext
    from tgis_shard.layers import fused
    from tgis_shard.server import serve

    rank = int(os.environ.get("RANK", "0"))
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    threads = os.environ.get("TGIS_TORCH_THREADS")
    if threads:
        torch.set_num_threads(int(threads))
    description = _prepare(args)
    model_dir = Path(description.model_dir)
    device = torch.device(f"cuda:{rank % torch.cuda.device_count()}" if torch.cuda.is_available() else "cpu")
    dtype_name = args.dtype_str or default_dtype(device.type, description.config_dtype)
    if device.type == "cuda":
        limit_process_memory(float(os.environ.get("CUDA_PROCESS_MEMORY_FRACTION", "1")), device)
    registry = shard_registry(os.environ.get("TGIS_PLUGINS"))
    ctx = ShardContext(
        model_dir=model_dir,
        model_type=description.model_type,
        dtype=getattr(torch, dtype_name),
        device=device,
        rank=rank,
        world_size=world_size,
        max_sequence_length=args.max_sequence_length or description.max_sequence_length,
        registry=registry,
        max_batch_size=args.max_batch_size,
        master_addr=os.environ.get("MASTER_ADDR", "localhost"),
        master_port=int(os.environ.get("MASTER_PORT", "29500")),
        estimate_memory=args.estimate_memory,
        batch_safety_margin=args.batch_safety_margin,
        prefix_store_path=args.prefix_store_path,
        prompt_cache_size_mb=args.prompt_cache_size_mb,
        kv_cache_blocks=args.kv_cache_blocks,
        cuda_graphs=args.cuda_graphs,
        prompt_graphs=args.prompt_graphs,
        decode_kernel=args.decode_kernel,
        hf_paged=args.hf_paged,
        pt2_compile=args.pt2_compile,
        cache_dir=args.cache_dir,
    )
    from tgis_proto.plugins import resolve

    fused.enable(args.fused_kernels)
    create_engine = resolve(registry.engine(args.deployment_framework).target)
    engine = create_engine(ctx)
    log.info("rank %d/%d: %s loaded on %s as %s", rank, world_size, model_dir, device, dtype_name)
    if ctx.pt2_compile and not engine.pt2_compile:
        log.warning("PT2_COMPILE: the %s engine does not compile its model; it runs eagerly", args.deployment_framework)
    serve(engine, args.uds_path)


def _plugins() -> None:
    registry = shard_registry(os.environ.get("TGIS_PLUGINS"))
    print("plugins:", ", ".join(registry.plugins) or "none")
    print("engines:")
    for name in registry.engine_names():
        entry = registry.engine(name)
        aliases = f" (aliases: {', '.join(entry.aliases)})" if entry.aliases else ""
        print(f"  {name}{aliases} [{entry.plugin}] {entry.description}")
    print("model families:")
    for model_type, entry in sorted(registry.model_families.items()):
        print(f"  {model_type} -> {entry.target} [{entry.plugin}] engines: {', '.join(entry.engines)}")
    if not registry.model_families:
        print("  none")


# Failures the user can act on: one line, exit code 2.
USER_ERRORS = (
    model_files.ModelNotFoundError,
    EmbeddedModelError,
    PluginError,
    FileNotFoundError,
    ExportRefusedError,
    UnsupportedModelError,
)


def _progress(message: str) -> None:
    """Long work says where it is, on the terminal and in the logs alike."""
    print(f"text-generation-server: {message}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    configure_logging_from_env()
    try:
        if args.command == "prepare":
            import torch

            # The launcher (which has no torch) chooses the engine knowing whether there is a GPU.
            print(json.dumps({**asdict(_prepare(args)), "cuda_devices": torch.cuda.device_count()}))
        elif args.command == "serve":
            _serve(args)
        elif args.command == "plugins":
            _plugins()
        elif args.command == "download-weights":
            from tgis_shard.hub import download_weights

            print(download_weights(args.model_name, args.revision, args.extension, args.cache_dir, args.auto_convert))
        elif args.command == "convert-to-safetensors":
            from tgis_shard.hub import convert_to_safetensors

            model_dir = model_files.resolve_model_dir(args.model_name, args.revision, args.cache_dir)
            for path in convert_to_safetensors(model_dir):
                print(path)
        elif args.command == "convert-to-fast-tokenizer":
            model_dir = model_files.resolve_model_dir(args.model_name, args.revision, args.cache_dir)
            print(model_files.tokenizer_file(model_dir, args.cache_dir))  # the model's own when it has one
        elif args.command == "convert-to-onnx":
            from tgis_shard.onnx_export import export, export_dir

            model_dir = model_files.resolve_model_dir(args.model_name, args.revision, args.cache_dir)
            out = export(model_dir, export_dir(model_dir, args.cache_dir), progress=_progress)
            print(out)
    except USER_ERRORS as e:
        print(f"text-generation-server: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
