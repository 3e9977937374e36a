"""The router alone: streaming clients → the real router (gRPC service, batcher, detokenizer) →
a fake shard that answers each step at once or after a fixed time.

What it measures is what the router costs: the tokens per second it streams when the shard takes
no time, and how long the shard sits idle between two steps (the router's turn-around) when a
step takes ``--step-ms``. The clients run in a separate process on the same cores.

    python3 bench/router_alone.py --streams 128 --seconds 10 --step-ms 0 5

With ``--prompt-tokens`` and ``--prompt-token-ms`` the fake shard takes a device's time for the
steps the serving bench runs on a GPU: a step costs ``--step-ms`` plus ``--prompt-token-ms`` per
prompt token in it (the steps in which prompts join the decodes last longer), and the table gives
the inter-token latency the clients see against the fake shard's own step times: what the router
adds to the tail.

    python3 bench/router_alone.py --streams 128 --seconds 10 --step-ms 8.6 --prompt-tokens 128 \
        --max-new-tokens 128 --prompt-token-ms 0.0208

With ``--knee-rows`` the step's time follows the device's two limits instead: ``--step-ms`` plus
``--decode-row-ms`` per decode (reading the weights and each decode's cache), plus
``--prompt-token-ms`` for each row past the knee (rows = decodes + prompt tokens: below the knee
the products are bound by reading the weights, so a prompt's rows ride along for free; past it
by the tensor cores). ``--rounds N`` runs the serving bench's closed loop instead of a timed one:
each stream sends N requests, one after the other, and the run lasts until the last one ends.

    python3 bench/router_alone.py --streams 128 --rounds 2 --prompt-tokens 128 --max-new-tokens 128 \
        --step-ms 5.02 --decode-row-ms 0.0194 --knee-rows 270 --prompt-token-ms 0.02235   # an H200, 8B shape
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import grpc  # noqa: E402

from bench.load import one_request, prompt  # noqa: E402
from tests.support.fake_shard import FakeShards  # noqa: E402
from tests.support.router_in_process import RouterInProcess  # noqa: E402
from tgis_proto import generation_pb2 as fmaas  # noqa: E402
from tgis_proto import generation_pb2_grpc as fmaas_grpc  # noqa: E402
from tgis_proto import shard_pb2 as pb  # noqa: E402
from tgis_router.config import LauncherConfig  # noqa: E402

PROMPT = "The lighthouse keeper climbed the spiral stairs every evening at dusk."


async def _sleep_until(deadline: float) -> None:
    """Sleeps to ``deadline`` (``time.perf_counter``) within microseconds. The event loop's timer
    wakes up to 1 ms late (epoll's resolution: ~0.5 ms a step, where a step takes a few), and a
    thread's sleep waits for the GIL behind the router; so the last millisecond yields to the
    loop's other tasks in a spin."""
    coarse = deadline - time.perf_counter() - 0.0015
    if coarse > 0:
        await asyncio.sleep(coarse)
    while time.perf_counter() < deadline:
        await asyncio.sleep(0)


@dataclass(frozen=True)
class StepCost:
    """Seconds a fake step takes: ``base`` + ``per_decode`` a decode + ``per_prompt_token`` a
    prompt token, or with ``knee_rows`` a row (decode or prompt token) past the knee."""

    base: float
    per_decode: float = 0.0
    per_prompt_token: float = 0.0
    knee_rows: int | None = None

    def seconds(self, decodes: int, prompt_tokens: int) -> float:
        past_knee = prompt_tokens if self.knee_rows is None else max(0, decodes + prompt_tokens - self.knee_rows)
        return self.base + self.per_decode * decodes + self.per_prompt_token * past_knee


class TimedShards(FakeShards):
    """Records how long the shard waits between the end of one step and the start of the next,
    and how long each step takes (``cost``)."""

    def __init__(self, cost: StepCost, kv_cache: pb.KVCacheLayout | None):
        super().__init__(step_delay=0.0, kv_cache=kv_cache, record_steps=False, check_protocol=False)
        self.idle_gaps: list[float] = []
        self.step_times: list[float] = []
        self._last_end: float | None = None
        self._cost = cost
        self.step_count = 0

    async def _run(self, request):
        # Timed inside the shard's lock: from when it starts a step to when it answers.
        started = time.perf_counter()
        if self._last_end is not None:
            self.idle_gaps.append(started - self._last_end)
        # A decode is one token; more is a prompt chunk.
        prompt_tokens = sum(n for n in request.num_tokens if n > 1)
        decodes = sum(1 for n in request.num_tokens if n == 1)
        await _sleep_until(started + self._cost.seconds(decodes, prompt_tokens))
        try:
            return await super()._run(request)
        finally:
            self._last_end = time.perf_counter()
            self.step_times.append(self._last_end - started)
            self.step_count += 1


async def _clients(
    address: str, streams: int, seconds: float, max_new_tokens: int, prompt_tokens: int, rounds: int
) -> dict:
    """Closed-loop streams for ``seconds``, or ``rounds`` requests each; with ``prompt_tokens``,
    each prompt is cut to that many."""
    rng = random.Random(0)
    text = prompt(rng, 2 * prompt_tokens) if prompt_tokens else PROMPT
    tokens, calls, inter_token, time_to_first = 0, 0, [], []
    async with grpc.aio.insecure_channel(address) as channel:
        stub = fmaas_grpc.GenerationServiceStub(channel)
        await stub.ModelInfo(fmaas.ModelInfoRequest(), wait_for_ready=True)
        deadline = time.monotonic() + seconds

        async def one_client() -> None:
            nonlocal tokens, calls
            sent = 0
            while (sent < rounds) if rounds else (time.monotonic() < deadline):
                sent += 1
                # Sentence prompts keep the requests of the issue-11 rows (no token details);
                # cut prompts are the serving bench's requests.
                sample = await one_request(stub, text, max_new_tokens, prompt_tokens, token_details=prompt_tokens > 0)
                if sample.error is not None:
                    raise RuntimeError(sample.error)
                tokens += sample.tokens
                calls += 1
                inter_token.extend(sample.inter_token)
                time_to_first.append(sample.ttft)

        started = time.monotonic()
        await asyncio.gather(*(one_client() for _ in range(streams)))
        elapsed = time.monotonic() - started
    return {
        "tokens": tokens,
        "calls": calls,
        "seconds": elapsed,
        **_p50_p99("itl", inter_token),
        **_p50_p99("ttft", time_to_first),
    }


def _p50_p99(name: str, seconds: list[float]) -> dict[str, float]:
    if len(seconds) < 2:
        return {f"{name}_p50_ms": float("nan"), f"{name}_p99_ms": float("nan")}
    q = statistics.quantiles(seconds, n=100, method="inclusive")
    return {f"{name}_p50_ms": q[49] * 1000, f"{name}_p99_ms": q[98] * 1000}


async def _serve(tokenizer_file: Path, step_ms: float, args: argparse.Namespace) -> dict:
    # A paged engine's shard (tgis_native, the fast path) with room for every stream, or a padded one's.
    kv_cache = None if args.padded else pb.KVCacheLayout(num_blocks=args.streams * 64, block_size=16)
    cost = StepCost(step_ms / 1000, args.decode_row_ms / 1000, args.prompt_token_ms / 1000, args.knee_rows)
    shards = TimedShards(cost, kv_cache)
    router = RouterInProcess(
        tokenizer_file,
        shards,
        max_concurrent=4 * args.max_batch_size,
        max_batch_size=args.max_batch_size,
        max_sequence_length=4096,
        max_new_tokens=1024,
        eos_token_ids=frozenset({2}),  # SmolLM2's <|im_end|>; the fake shard never sends it
        step_tokens=args.step_tokens,
        prompt_tokens_while_decoding=args.prompt_tokens_while_decoding,
    )
    async with router:
        client = await asyncio.create_subprocess_exec(
            sys.executable,
            __file__,
            *("--client", router.address, "--streams", str(args.streams), "--seconds", str(args.seconds)),
            *("--max-new-tokens", str(args.max_new_tokens), "--prompt-tokens", str(args.prompt_tokens)),
            *("--rounds", str(args.rounds)),
            stdout=asyncio.subprocess.PIPE,
        )
        out, _ = await client.communicate()
    result = json.loads(out.decode().strip().splitlines()[-1])
    past_ramp_up = len(shards.idle_gaps) // 10
    gaps_ms = sorted(g * 1000 for g in shards.idle_gaps[past_ramp_up:])
    result.update(
        steps=shards.step_count,
        idle_p50_ms=statistics.median(gaps_ms) if gaps_ms else float("nan"),
        idle_p90_ms=gaps_ms[int(len(gaps_ms) * 0.9)] if gaps_ms else float("nan"),
        **_p50_p99("step", shards.step_times[past_ramp_up:]),
    )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--streams", type=int, default=128)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--step-ms", type=float, nargs="+", default=[0.0, 5.0], help="fake shard step times")
    parser.add_argument("--max-batch-size", type=int, default=256, help="the router's MAX_BATCH_SIZE")
    parser.add_argument("--padded", action="store_true", help="a padded engine's scheduler (dynamic batch sizing)")
    parser.add_argument("--prompt-tokens", type=int, default=0, help="prompt length (0: one sentence)")
    parser.add_argument("--prompt-token-ms", type=float, default=0.0, help="fake shard time per prompt token in a step")
    parser.add_argument("--decode-row-ms", type=float, default=0.0, help="fake shard time per decode in a step")
    parser.add_argument("--knee-rows", type=int, help="rows a step takes before prompt tokens cost time (see above)")
    parser.add_argument("--rounds", type=int, default=0, help="requests per stream, instead of --seconds")
    parser.add_argument(
        "--step-tokens",
        type=int,
        default=LauncherConfig.max_step_tokens,
        help="the router's MAX_STEP_TOKENS, a step's budget where nothing decodes (its default unless given)",
    )
    parser.add_argument(
        "--prompt-tokens-while-decoding",
        type=int,
        default=LauncherConfig.max_prompt_tokens_while_decoding,
        help="the router's MAX_PROMPT_TOKENS_WHILE_DECODING (its default unless given)",
    )
    parser.add_argument("--client", metavar="ADDRESS", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.client:
        result = asyncio.run(
            _clients(args.client, args.streams, args.seconds, args.max_new_tokens, args.prompt_tokens, args.rounds)
        )
        print(json.dumps(result))
        return
    from tgis_shard.embedded import DEFAULT_MODEL
    from tgis_shard.model_files import default_cache_dir, resolve_model_dir

    tokenizer_file = Path(resolve_model_dir(DEFAULT_MODEL, None, default_cache_dir())) / "tokenizer.json"
    scheduler = "padded (dynamic batch sizing)" if args.padded else "paged (router-owned KV blocks)"
    prompts = f"prompts of {args.prompt_tokens} tokens" if args.prompt_tokens else "one-sentence prompts"
    length = f"{args.rounds} requests each" if args.rounds else f"{args.seconds:.0f} s per row"
    if args.knee_rows is None:
        cost = f"the step time + {args.decode_row_ms:g} ms a decode + {args.prompt_token_ms:g} ms a prompt token"
    else:
        cost = (
            f"the step time + {args.decode_row_ms:g} ms a decode + {args.prompt_token_ms:g} ms a row past "
            f"{args.knee_rows} rows"
        )
    print(
        f"{args.streams} streaming clients, {prompts}, {args.max_new_tokens} tokens each, {length}, "
        f"{scheduler} scheduler of at most {args.max_batch_size} rows (at most "
        f"{args.prompt_tokens_while_decoding} prompt tokens a step beside decodes); a step takes {cost}"
    )
    print(
        "| shard step | tokens/s | calls | steps | steps/s | shard idle between steps p50 / p90 "
        "| shard step p50 / p99 | ITL at the clients p50 / p99 | TTFT p50 / p99 |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for step_ms in args.step_ms:
        r = asyncio.run(_serve(tokenizer_file, step_ms, args))
        print(
            f"| {step_ms:g} ms | {r['tokens'] / r['seconds']:,.0f} | {r['calls']} | {r['steps']} | "
            f"{r['steps'] / r['seconds']:,.0f} | {r['idle_p50_ms']:.2f} / {r['idle_p90_ms']:.2f} ms "
            f"| {r['step_p50_ms']:.1f} / {r['step_p99_ms']:.1f} ms | {r['itl_p50_ms']:.1f} / {r['itl_p99_ms']:.1f} ms "
            f"| {r['ttft_p50_ms']:.0f} / {r['ttft_p99_ms']:.0f} ms |"
        )


if __name__ == "__main__":
    main()
