"""The router alone: streaming clients → the real router (gRPC service, batcher, detokenizer) →
a fake shard that answers each step at once or after a fixed time.

What it measures is what the router costs: the tokens per second it streams when the shard takes
no time, and how long the shard sits idle between two steps (the router's turn-around) when a
step takes ``--step-ms``. The clients run in a separate process on the same cores.

    python3 bench/router_alone.py --streams 128 --seconds 10 --step-ms 0 5
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import grpc  # noqa: E402

from tests.support.fake_shard import FakeShards  # noqa: E402
from tests.support.router_in_process import RouterInProcess  # noqa: E402
from tgis_proto import generation_pb2 as fmaas  # noqa: E402
from tgis_proto import generation_pb2_grpc as fmaas_grpc  # noqa: E402
from tgis_proto import shard_pb2 as pb  # noqa: E402

PROMPT = "The lighthouse keeper climbed the spiral stairs every evening at dusk."
MAX_BATCH_SIZE = 256


class TimedShards(FakeShards):
    """Records how long the shard waits between the end of one step and the start of the next."""

    def __init__(self, step_delay: float, kv_cache: pb.KVCacheLayout | None):
        super().__init__(step_delay=step_delay, kv_cache=kv_cache, record_steps=False, check_protocol=False)
        self.idle_gaps: list[float] = []
        self._last_end: float | None = None
        self.step_count = 0

    async def _run(self, request):
        # Timed inside the shard's lock: from when it starts a step to when it answers.
        started = time.perf_counter()
        if self._last_end is not None:
            self.idle_gaps.append(started - self._last_end)
        try:
            return await super()._run(request)
        finally:
            self._last_end = time.perf_counter()
            self.step_count += 1


async def _clients(address: str, streams: int, seconds: float, max_new_tokens: int) -> dict:
    params = fmaas.Parameters(
        stopping=fmaas.StoppingCriteria(max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens)
    )
    request = fmaas.SingleGenerationRequest(request=fmaas.GenerationRequest(text=PROMPT), params=params)
    tokens = 0
    calls = 0
    async with grpc.aio.insecure_channel(address) as channel:
        stub = fmaas_grpc.GenerationServiceStub(channel)
        await stub.ModelInfo(fmaas.ModelInfoRequest(), wait_for_ready=True)
        deadline = time.monotonic() + seconds

        async def one_client() -> None:
            nonlocal tokens, calls
            while time.monotonic() < deadline:
                last = 0
                async for message in stub.GenerateStream(request):
                    last = message.generated_token_count or last
                tokens += last
                calls += 1

        started = time.monotonic()
        await asyncio.gather(*(one_client() for _ in range(streams)))
        elapsed = time.monotonic() - started
    return {"tokens": tokens, "calls": calls, "seconds": elapsed}


async def _serve(
    tokenizer_file: Path, step_ms: float, streams: int, seconds: float, max_new_tokens: int, padded: bool
) -> dict:
    # A paged engine's shard (tgis_native, the fast path) with room for every stream, or a padded one's.
    kv_cache = None if padded else pb.KVCacheLayout(num_blocks=streams * 64, block_size=16)
    shards = TimedShards(step_ms / 1000, kv_cache)
    router = RouterInProcess(
        tokenizer_file,
        shards,
        max_concurrent=4 * MAX_BATCH_SIZE,
        max_batch_size=MAX_BATCH_SIZE,
        max_sequence_length=4096,
        max_new_tokens=1024,
        eos_token_ids=frozenset({2}),  # SmolLM2's <|im_end|>; the fake shard never sends it
    )
    async with router:
        client = await asyncio.create_subprocess_exec(
            sys.executable,
            __file__,
            "--client",
            router.address,
            "--streams",
            str(streams),
            "--seconds",
            str(seconds),
            "--max-new-tokens",
            str(max_new_tokens),
            stdout=asyncio.subprocess.PIPE,
        )
        out, _ = await client.communicate()
    result = json.loads(out.decode().strip().splitlines()[-1])
    gaps_ms = sorted(g * 1000 for g in shards.idle_gaps[len(shards.idle_gaps) // 10 :])  # past the ramp-up
    result.update(
        steps=shards.step_count,
        idle_p50_ms=statistics.median(gaps_ms) if gaps_ms else float("nan"),
        idle_p90_ms=gaps_ms[int(len(gaps_ms) * 0.9)] if gaps_ms else float("nan"),
    )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--streams", type=int, default=128)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--step-ms", type=float, nargs="+", default=[0.0, 5.0], help="fake shard step times")
    parser.add_argument("--padded", action="store_true", help="a padded engine's scheduler (dynamic batch sizing)")
    parser.add_argument("--client", metavar="ADDRESS", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.client:
        print(json.dumps(asyncio.run(_clients(args.client, args.streams, args.seconds, args.max_new_tokens))))
        return
    from tgis_shard.embedded import DEFAULT_MODEL
    from tgis_shard.model_files import default_cache_dir, resolve_model_dir

    tokenizer_file = Path(resolve_model_dir(DEFAULT_MODEL, None, default_cache_dir())) / "tokenizer.json"
    scheduler = "padded (dynamic batch sizing)" if args.padded else "paged (router-owned KV blocks)"
    print(
        f"{args.streams} streaming clients, {args.max_new_tokens} tokens each, {args.seconds:.0f} s per row, "
        f"{scheduler} scheduler"
    )
    print("| shard step | tokens/s | calls | steps | steps/s | shard idle between steps p50 / p90 |")
    print("|---|---|---|---|---|---|")
    for step_ms in args.step_ms:
        r = asyncio.run(_serve(tokenizer_file, step_ms, args.streams, args.seconds, args.max_new_tokens, args.padded))
        print(
            f"| {step_ms:g} ms | {r['tokens'] / r['seconds']:,.0f} | {r['calls']} | {r['steps']} | "
            f"{r['steps'] / r['seconds']:,.0f} | {r['idle_p50_ms']:.2f} / {r['idle_p90_ms']:.2f} ms |"
        )


if __name__ == "__main__":
    main()
