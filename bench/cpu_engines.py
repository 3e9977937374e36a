"""Engines side by side on the CPU, through the server: the embedded SmolLM2 served by each engine
in turn (the real launcher), closed-loop streaming clients at each concurrency, fixed prompt and
output lengths (EOS masked). hf_optimum_ort needs an export: made here if missing
(``text-generation-server convert-to-onnx``, into the default cache).

    python3 bench/cpu_engines.py --engines hf_transformers hf_optimum_ort --concurrency 1 8

An engine named ``ENGINE+pt2-compile`` is that engine with PT2_COMPILE on.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.load import sweep  # noqa: E402
from bench.serving import step_breakdown, step_sums  # noqa: E402
from tests.support.server import READY_TIMEOUT_S, launcher  # noqa: E402
from tgis_shard.embedded import DEFAULT_MODEL  # noqa: E402
from tgis_shard.model_files import default_cache_dir, resolve_model_dir  # noqa: E402
from tgis_shard.onnx_export import OnnxExportMissingError, find_export  # noqa: E402


def _ensure_export() -> None:
    model_dir = resolve_model_dir(DEFAULT_MODEL, None, default_cache_dir())
    try:
        find_export(Path(model_dir), default_cache_dir())
    except OnnxExportMissingError:
        subprocess.run([sys.executable, "-m", "tgis_shard.cli", "convert-to-onnx", DEFAULT_MODEL], check=True)


def _median_ms(values: list[float]) -> str:
    return f"{statistics.median(values) * 1000:.1f}" if values else "n/a"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--engines", nargs="+", default=["hf_transformers", "hf_optimum_ort"])
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=2, help="requests each client sends, one after the other")
    parser.add_argument("--shard-threads", type=int, default=2)
    args = parser.parse_args()
    if "hf_optimum_ort" in args.engines:
        _ensure_export()
    rates: dict[tuple[str, int], float] = {}
    rows = []
    steps: dict[str, list[str]] = {}
    for engine in args.engines:
        framework, _, variant = engine.partition("+")
        options = ["--deployment-framework", framework, "--max-batch-size", str(max(args.concurrency))]
        if variant:
            options += [f"--{variant}", "true"]
        # PT2_COMPILE's warm-up compiles the whole model four times: minutes on these cores.
        ready_timeout_s = 1800.0 if variant == "pt2-compile" else READY_TIMEOUT_S
        env = {"SHARD_TORCH_THREADS": str(args.shard_threads)}
        with launcher(None, *options, env=env, ready_timeout_s=ready_timeout_s) as server:
            address = f"localhost:{server.grpc_port}"
            metrics_url = f"http://localhost:{server.http_port}/metrics"
            results = sweep(
                address,
                args.concurrency,
                args.rounds,
                args.prompt_tokens,
                args.new_tokens,
                functools.partial(step_sums, metrics_url),
            )
        steps[engine] = step_breakdown(results)
        for streams, result in results.items():
            rates[engine, streams] = result["tokens_per_s"]
            rows.append((engine, streams, result))
    base = args.engines[0]
    print(
        f"SmolLM2-135M on the CPU ({args.shard_threads} shard threads), {args.prompt_tokens} prompt + "
        f"{args.new_tokens} new tokens, {args.rounds} requests per client"
    )
    print(f"| engine | streams | tok/s | TTFT p50 | ITL p50 | × {base} |")
    print("|---|---|---|---|---|---|")
    for engine, streams, result in rows:
        ratio = result["tokens_per_s"] / rates[base, streams]
        print(
            f"| {engine} | {streams} | {result['tokens_per_s']:.1f} | {_median_ms(result['ttft'])} ms "
            f"| {_median_ms(result['itl'])} ms | {ratio:.2f} |"
        )
    for engine, lines in steps.items():
        print(f"\nSteps {engine} ran (the router's metrics):", *lines, sep="\n")


if __name__ == "__main__":
    main()
