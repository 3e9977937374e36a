"""Load generator speaking the client API (fmaas.GenerationService, streaming).

Sends ``--requests`` prompts from ``--concurrency`` concurrent clients and prints throughput and
time-to-first-token / inter-token latency percentiles, measured at the client.

    python bench/load.py --address localhost:8033 --concurrency 32 --requests 256 --max-new-tokens 128
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import grpc

from tgis_proto import generation_pb2 as fmaas
from tgis_proto import generation_pb2_grpc as fmaas_grpc

WORDS = [
    "the",
    "a",
    "of",
    "to",
    "and",
    "in",
    "is",
    "it",
    "you",
    "that",
    "he",
    "was",
    "for",
    "on",
    "are",
    "with",
    "as",
    "I",
    "his",
    "they",
    "be",
    "at",
    "one",
    "have",
    "this",
]


@dataclass
class Sample:
    """One streamed request, timed at the client."""

    ttft: float
    inter_token: list[float] = field(default_factory=list)
    tokens: int = 0
    error: str | None = None


def prompt(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(words))


async def one_request(
    stub: fmaas_grpc.GenerationServiceStub,
    text: str,
    max_new_tokens: int,
    prompt_tokens: int = 0,
    token_details: bool = True,
) -> Sample:
    """``prompt_tokens``: the prompt is cut to its last this many tokens (a text at least as long).
    ``token_details``: each message carries its token's details (then every token is a message)."""
    request = fmaas.SingleGenerationRequest(
        request=fmaas.GenerationRequest(text=text),
        params=fmaas.Parameters(
            stopping=fmaas.StoppingCriteria(max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens),
            # One message per token, even where a token adds no text yet: every gap is measured.
            response=fmaas.ResponseOptions(generated_tokens=token_details),
            truncate_input_tokens=prompt_tokens,
        ),
    )
    started = time.perf_counter()
    sample = Sample(ttft=float("nan"))
    last = None
    try:
        async for message in stub.GenerateStream(request):
            now = time.perf_counter()
            if message.generated_token_count == 0:
                continue  # the header carries no token
            if last is None:
                sample.ttft = now - started
            else:
                sample.inter_token.append(now - last)
            last = now
            sample.tokens = message.generated_token_count
    except grpc.aio.AioRpcError as e:
        sample.error = f"{e.code().name}: {e.details()}"
    return sample


def percentiles(values: list[float]) -> str:
    if not values:
        return "n/a"
    q = statistics.quantiles(values, n=100, method="inclusive") if len(values) > 1 else values * 99
    return f"p50 {q[49] * 1000:.1f} ms  p90 {q[89] * 1000:.1f} ms  p99 {q[98] * 1000:.1f} ms"


def run(
    address: str,
    concurrency: int,
    requests: int,
    prompt_words: int,
    max_new_tokens: int,
    seed: int,
    prompt_tokens: int = 0,
) -> dict:
    """``concurrency`` closed-loop clients send ``requests`` prompts between them. The clients are
    coroutines on one event loop (as a gRPC client of many streams is written): a thread per
    stream would spend the process's interpreter lock on switching threads, and at a hundred
    streams the clients, not the server, would set the pace."""
    rng = random.Random(seed)
    texts = [prompt(rng, prompt_words) for _ in range(requests)]
    return asyncio.run(_run(address, concurrency, texts, max_new_tokens, prompt_tokens))


async def _run(address: str, concurrency: int, texts: list[str], max_new_tokens: int, prompt_tokens: int) -> dict:
    waiting = iter(texts)
    samples: list[Sample] = []
    async with grpc.aio.insecure_channel(address) as channel:
        stub = fmaas_grpc.GenerationServiceStub(channel)
        await channel.channel_ready()

        async def client() -> None:
            for text in waiting:  # shared: each client takes the next prompt when it is free
                samples.append(await one_request(stub, text, max_new_tokens, prompt_tokens))

        started = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
    ok = [s for s in samples if s.error is None]
    tokens = sum(s.tokens for s in ok)
    return {
        "requests": len(samples),
        "errors": [s.error for s in samples if s.error is not None],
        "tokens": tokens,
        "elapsed_s": elapsed,
        "tokens_per_s": tokens / elapsed,
        "ttft": [s.ttft for s in ok],
        "itl": [t for s in ok for t in s.inter_token],
    }


def sweep(
    address: str,
    concurrency: Sequence[int],
    rounds: int,
    prompt_tokens: int,
    new_tokens: int,
    observe: Callable[[], dict] | None = None,
) -> dict[int, dict]:
    """Closed-loop streaming clients at each concurrency in turn, ``rounds`` requests per client,
    every prompt cut to exactly ``prompt_tokens`` tokens (twice as many words are sent), after one
    warm-up request; a failed request fails the sweep. ``observe()``, called before and after each
    concurrency, reads counters of the server's: each result's ``"observed"`` holds both readings."""
    words = 2 * prompt_tokens
    run(address, 1, 1, words, new_tokens, seed=0, prompt_tokens=prompt_tokens)  # warm-up
    results = {}
    for streams in concurrency:
        before = observe() if observe else None
        result = run(address, streams, streams * rounds, words, new_tokens, seed=streams, prompt_tokens=prompt_tokens)
        if result["errors"]:
            raise RuntimeError(f"{len(result['errors'])} requests failed at {streams} streams: {result['errors'][:3]}")
        if observe:
            result["observed"] = (before, observe())
        results[streams] = result
        # As each concurrency ends: a run cut off later (a device call's limit) keeps it.
        print(
            f"{streams} streams: {result['tokens_per_s']:.0f} tokens/s; time to first token "
            f"{percentiles(result['ttft'])}; inter-token latency {percentiles(result['itl'])}",
            flush=True,
        )
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--address", default="localhost:8033")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--requests", type=int, default=128)
    parser.add_argument("--prompt-words", type=int, default=64)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    result = run(args.address, args.concurrency, args.requests, args.prompt_words, args.max_new_tokens, args.seed)
    print(
        f"{result['requests']} requests, {len(result['errors'])} errors, {result['tokens']} tokens "
        f"in {result['elapsed_s']:.1f} s: {result['tokens_per_s']:.0f} tokens/s"
    )
    print(f"time to first token: {percentiles(result['ttft'])}")
    print(f"inter-token latency: {percentiles(result['itl'])}")


if __name__ == "__main__":
    main()
