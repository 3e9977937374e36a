"""A KV cache of a few blocks under concurrent load, end to end: tgis_native on two ranks (gloo),
prompts prefilled in chunks of a few tokens. Requests are preempted and resume by recomputing
their prompt and output; every answer equals transformers (greedy) or the same request run alone
(seeded sampling), and streams carry no duplicate, lost or changed token."""

from __future__ import annotations

import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest
from transformers import AutoTokenizer

from tests.support.ports import free_port
from tests.support.server import launcher
from tests.support.tiny_models import build_tiny_causal_lm, reference_texts
from tgis_proto import generation_pb2 as fmaas

PROMPTS = [
    "Hello there",
    "The quick brown fox jumps over the lazy dog, and then it",
    "A",
    "Once upon a time in a land far away there lived a",
]
MAX_NEW_TOKENS = 24
# 16-token blocks (the CPU's attention backend): 6 blocks hold 96 tokens, three or four requests.
KV_BLOCKS = 6
STEP_TOKENS = 8


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_tiny_causal_lm(tmp_path_factory.mktemp("tiny-llama"), arch="llama", seed=8)


@pytest.fixture(scope="module")
def server(model_dir):
    args = [
        *("--deployment-framework", "tgis_native", "--num-gpus", "2", "--master-port", str(free_port())),
        *("--max-batch-size", "6", "--max-sequence-length", "64"),
        *("--kv-cache-manager-num-gpu-blocks", str(KV_BLOCKS), "--max-step-tokens", str(STEP_TOKENS)),
    ]
    with launcher(model_dir, *args) as running:
        yield running


@pytest.fixture(scope="module")
def expected(model_dir):
    return reference_texts(model_dir, PROMPTS, MAX_NEW_TOKENS)


def _params(seed: int | None) -> fmaas.Parameters:
    stopping = fmaas.StoppingCriteria(max_new_tokens=MAX_NEW_TOKENS)
    response = fmaas.ResponseOptions(generated_tokens=True, token_logprobs=True)
    if seed is None:
        return fmaas.Parameters(stopping=stopping, response=response)
    sampling = fmaas.SamplingParameters(seed=seed, temperature=1.3, top_k=40)
    return fmaas.Parameters(method=fmaas.SAMPLE, sampling=sampling, stopping=stopping, response=response)


def _stream(server, prompt: str, seed: int | None) -> tuple[str, list[str]]:
    """The streamed text and token texts of one request."""
    request = fmaas.SingleGenerationRequest(request=fmaas.GenerationRequest(text=prompt), params=_params(seed))
    text, tokens = "", []
    for message in server.stub.GenerateStream(request, timeout=120):
        text += message.text
        tokens += [t.text for t in message.tokens]
    return text, tokens


def _metric(server, name: str) -> float:
    with urllib.request.urlopen(f"http://localhost:{server.http_port}/metrics", timeout=10) as response:
        for line in response.read().decode().splitlines():
            if line.startswith(f"{name} "):
                return float(line.split()[1])
    raise AssertionError(f"{name} is not exported")


def _preemptions(server) -> float:
    return _metric(server, "tgi_request_preemptions_total")


def test_preempted_requests_resume_with_the_tokens_they_would_have_had(server, expected):
    jobs = [(i % len(PROMPTS), None if i % 2 == 0 else 100 + i) for i in range(12)]
    alone = {job: _stream(server, PROMPTS[job[0]], job[1]) for job in set(jobs)}
    assert _preemptions(server) == 0  # one request at a time fits
    with ThreadPoolExecutor(len(jobs)) as pool:
        together = list(pool.map(lambda job: _stream(server, PROMPTS[job[0]], job[1]), jobs))
    assert _preemptions(server) > 0  # the cache ran full
    for job, (text, tokens) in zip(jobs, together, strict=True):
        assert (text, tokens) == alone[job]
        if job[1] is None:
            assert text == expected[job[0]]
    assert _metric(server, "tgi_kv_cache_blocks") == KV_BLOCKS
    assert _metric(server, "tgi_kv_cache_blocks_used") == 0  # every block came back


def test_prompts_longer_than_a_step_are_prefilled_in_chunks_and_equal_transformers(server, model_dir, expected):
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    for i, prompt in enumerate(PROMPTS):
        assert _stream(server, prompt, None)[0] == expected[i]
    assert max(len(tokenizer(p).input_ids) for p in PROMPTS) > 2 * STEP_TOKENS  # three chunks at least
