"""A bounded soak of a running server: many concurrent clients, mixed call kinds, cancellations.

Every call is one of a fixed set of jobs (prompt, greedy or seeded sampling, length), each
answered once before the soak as its expected answer; during the soak every call that was not
cancelled must get exactly one complete answer equal to it.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from tgis_proto import generation_pb2 as fmaas
from tgis_proto import generation_pb2_grpc as fmaas_grpc

KINDS = ("unary", "batch", "stream", "cancelled_stream")
KIND_WEIGHTS = (0.3, 0.2, 0.4, 0.1)  # a tenth of the calls are streams cancelled midway
CALL_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class Job:
    prompt: str
    max_new_tokens: int
    seed: int | None  # None: greedy

    def params(self) -> fmaas.Parameters:
        params = fmaas.Parameters(stopping=fmaas.StoppingCriteria(max_new_tokens=self.max_new_tokens))
        if self.seed is not None:
            params.method = fmaas.SAMPLE
            params.sampling.CopyFrom(fmaas.SamplingParameters(seed=self.seed, temperature=0.8, top_k=20))
        return params


@dataclass(frozen=True)
class Answer:
    text: str
    generated_token_count: int
    stop_reason: int


@dataclass
class SoakResult:
    calls: Counter = field(default_factory=Counter)  # by kind
    mismatches: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    seconds: float = 0.0


def _answer(response: fmaas.GenerationResponse) -> Answer:
    return Answer(response.text, response.generated_token_count, response.stop_reason)


def _stream_answer(messages: list[fmaas.GenerationResponse]) -> Answer | str:
    """The stream's answer, or why it is not one complete answer."""
    finals = [i for i, m in enumerate(messages) if m.stop_reason != fmaas.NOT_FINISHED]
    if finals != [len(messages) - 1]:
        return f"stream with final messages at {finals} of {len(messages)}"
    text = "".join(m.text for m in messages[1:])
    return Answer(text, messages[-1].generated_token_count, messages[-1].stop_reason)


async def _call(stub: fmaas_grpc.GenerationServiceStub, kind: str, jobs: list[Job]) -> list[Answer] | str | None:
    """The answers of one call (None: cancelled as planned), or what went wrong."""
    job = jobs[0]
    if kind in ("unary", "batch"):
        request = fmaas.BatchedGenerationRequest(
            requests=[fmaas.GenerationRequest(text=j.prompt) for j in jobs], params=job.params()
        )
        response = await stub.Generate(request, timeout=CALL_TIMEOUT_S)
        if len(response.responses) != len(jobs):
            return f"{len(response.responses)} answers to {len(jobs)} inputs"
        return [_answer(r) for r in response.responses]
    call = stub.GenerateStream(
        fmaas.SingleGenerationRequest(request=fmaas.GenerationRequest(text=job.prompt), params=job.params()),
        timeout=CALL_TIMEOUT_S,
    )
    messages = []
    async for message in call:
        messages.append(message)
        if kind == "cancelled_stream" and len(messages) == 2:
            call.cancel()
            return None
    answer = _stream_answer(messages)
    return [answer] if isinstance(answer, Answer) else answer


async def expected_answers(address: str, jobs: list[Job]) -> dict[Job, Answer]:
    """Each job's answer when it runs alone."""
    async with grpc.aio.insecure_channel(address) as channel:
        stub = fmaas_grpc.GenerationServiceStub(channel)
        expected = {}
        for job in jobs:
            answers = await _call(stub, "unary", [job])
            assert isinstance(answers, list), answers
            expected[job] = answers[0]
        return expected


async def soak(address: str, expected: dict[Job, Answer], calls: int, clients: int, seed: int) -> SoakResult:
    """``calls`` calls from ``clients`` concurrent clients, checked against ``expected``."""
    rng = random.Random(seed)
    jobs = list(expected)
    plan = [rng.choices(KINDS, KIND_WEIGHTS)[0] for _ in range(calls)]
    result = SoakResult()
    next_call = iter(range(calls))

    async def client(stub: fmaas_grpc.GenerationServiceStub) -> None:
        for index in next_call:
            kind = plan[index]
            # A batch shares its parameters: its inputs are jobs that differ in the prompt only.
            first = rng.choice(jobs)
            same_params = [j for j in jobs if (j.max_new_tokens, j.seed) == (first.max_new_tokens, first.seed)]
            batch = [first, *rng.sample(same_params, min(2, len(same_params)))] if kind == "batch" else [first]
            try:
                answers = await _call(stub, kind, batch)
            except grpc.aio.AioRpcError as e:
                result.errors.append(f"{kind}: {e.code().name} {e.details()}")
                continue
            result.calls[kind] += 1
            if isinstance(answers, str):
                result.mismatches.append(f"{kind}: {answers}")
            elif answers is not None:
                for job, answer in zip(batch, answers, strict=True):
                    if answer != expected[job]:
                        result.mismatches.append(f"{kind} {job}: {answer} != {expected[job]}")

    started = time.monotonic()
    async with grpc.aio.insecure_channel(address) as channel:
        stub = fmaas_grpc.GenerationServiceStub(channel)
        await asyncio.gather(*(client(stub) for _ in range(clients)))
    result.seconds = time.monotonic() - started
    return result


def rss_bytes(pid: int) -> int:
    """Resident memory of a process."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for process {pid}")
