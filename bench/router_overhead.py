"""Router time per generated token: what the batching loop spends between two shard steps.

After every decode step the router hands each request its token (incremental detokenization,
stop-sequence search, token details, events for the client). The loop does this before it asks
the shards for the next step, so at batch size B the accelerator idles for about B times the
per-token cost. This bench measures that cost on the real tokenizer of the embedded model and
prints it against a given shard step time.

    python3 bench/router_overhead.py --batch-sizes 1 32 256 --step-ms 30
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tgis_proto import shard_pb2 as pb
from tgis_router.active import ActiveRequest
from tgis_router.requests import GenerationParams, ResponseOptions, ValidatedRequest
from tgis_router.tokenization import TokenizerPool
from tgis_shard.embedded import DEFAULT_MODEL
from tgis_shard.model_files import default_cache_dir, resolve_model_dir

TEXT = (
    "The quick brown fox jumps over the lazy dog. Inference servers batch requests of many lengths, "
    "stream tokens to clients as soon as they exist, and stop when a stop sequence appears. "
) * 40


def _requests(pool: TokenizerPool, count: int, stop_sequences: bool, details: bool) -> list[ActiveRequest]:
    params = GenerationParams(
        max_new_tokens=10**6,
        stop_sequences=("\n\nUser:",) if stop_sequences else (),
        response=ResponseOptions(generated_tokens=details, token_logprobs=details, top_n_tokens=3 if details else 0),
    )
    request = ValidatedRequest("x", (1, 2, 3), params, max_new_tokens=10**6, token_limited=False, seed=0)
    return [
        ActiveRequest(i, request, pool, frozenset(), True, "stream", time.monotonic(), continues_prompt=True)
        for i in range(count)
    ]


def _token(token_id: int, details: bool) -> pb.Token:
    if not details:
        return pb.Token(id=token_id)
    top = [pb.TopToken(id=token_id + k, logprob=-float(k)) for k in range(3)]
    return pb.Token(id=token_id, logprob=-0.5, rank=1, top_tokens=top)


async def _per_token_us(pool: TokenizerPool, ids: list[int], batch: int, steps: int, **options: bool) -> float:
    entries = _requests(pool, batch, **options)
    details = options["details"]
    tokens = [[_token(ids[(step * 7 + row) % len(ids)], details) for row in range(batch)] for step in range(steps)]
    elapsed = 0.0
    for step_tokens in tokens:
        started = time.perf_counter()
        for entry, token in zip(entries, step_tokens, strict=True):
            entry.add_token(token.id, token if details else None)
        elapsed += time.perf_counter() - started
        for entry in entries:  # what the clients' response coroutines take off the queue
            while not entry.events.empty():
                entry.events.get_nowait()
    return elapsed / (batch * steps) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32, 256])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--step-ms", type=float, default=30.0, help="a shard decode step to compare with")
    args = parser.parse_args()
    model_dir = resolve_model_dir(DEFAULT_MODEL, None, default_cache_dir())
    pool = TokenizerPool(Path(model_dir) / "tokenizer.json", workers=1)
    ids = pool.tokenizer.encode(TEXT).ids
    print(f"tokenizer of {DEFAULT_MODEL}; router time per request-token, and per step against {args.step_ms} ms")
    print(f"{'batch':>6s} {'options':28s} {'µs/token':>9s} {'ms/step':>8s} {'of step':>8s}")
    for batch in args.batch_sizes:
        for stop, details in ((False, False), (True, False), (True, True)):
            label = ("stop sequence" if stop else "plain") + (" + details" if details else "")
            steps = max(4, args.steps * 32 // max(batch, 32))
            per_token = asyncio.run(_per_token_us(pool, ids, batch, steps, stop_sequences=stop, details=details))
            per_step_ms = per_token * batch / 1000
            print(f"{batch:6d} {label:28s} {per_token:9.1f} {per_step_ms:8.2f} {per_step_ms / args.step_ms:8.1%}")
    pool.close()


if __name__ == "__main__":
    main()
