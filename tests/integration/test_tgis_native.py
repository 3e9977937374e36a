"""tgis_native end to end: the launcher with NUM_GPUS=2 starts two ranks (gloo on CPU) and the
router; the sharded LLaMA answers like transformers on the same weights."""

from __future__ import annotations

import re
from concurrent.futures import ThreadPoolExecutor

import pytest
from transformers import AutoTokenizer

from tests.support.ports import free_port
from tests.support.prefixes import reference_greedy_with_prefix, save_peft_prefix
from tests.support.server import launcher
from tests.support.tiny_models import build_tiny_causal_lm, reference_texts
from tgis_proto import generation_pb2 as fmaas

PROMPTS = ["Hello there", "The quick brown fox jumps over the lazy dog, and then it", "A"]
MAX_NEW_TOKENS = 10


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_tiny_causal_lm(tmp_path_factory.mktemp("tiny-llama"), arch="llama", seed=2)


@pytest.fixture(scope="module")
def prefix(model_dir, tmp_path_factory):
    store = tmp_path_factory.mktemp("prefixes")
    return store, save_peft_prefix(model_dir, store, "tuned", length=5, seed=4)


@pytest.fixture(scope="module")
def server(model_dir, prefix):
    args = ["--deployment-framework", "hf_custom_tp", "--num-gpus", "2", "--master-port", str(free_port())]
    store, _ = prefix
    with launcher(model_dir, *args, "--max-batch-size", "4", "--prefix-store-path", str(store)) as running:
        yield running


@pytest.fixture(scope="module")
def expected(model_dir):
    return reference_texts(model_dir, PROMPTS, MAX_NEW_TOKENS)


def _generate(server, prompts, prefix_id=None):
    params = fmaas.Parameters(stopping=fmaas.StoppingCriteria(max_new_tokens=MAX_NEW_TOKENS))
    request = fmaas.BatchedGenerationRequest(
        requests=[fmaas.GenerationRequest(text=p) for p in prompts], params=params, prefix_id=prefix_id
    )
    return list(server.stub.Generate(request).responses)


def test_two_ranks_serve_greedy_equal_to_transformers(server, expected):
    assert [r.text for r in _generate(server, PROMPTS)] == expected


def test_requests_joining_and_leaving_the_ragged_batch_keep_their_outputs(server, expected):
    def call(i: int) -> tuple[int, str]:
        index = i % len(PROMPTS)
        return index, _generate(server, [PROMPTS[index]])[0].text

    with ThreadPoolExecutor(10) as pool:
        for index, text in pool.map(call, range(10)):
            assert text == expected[index]


def test_prompt_prefix_on_two_ranks_equals_transformers_on_the_prefixed_embeddings(server, model_dir, prefix, expected):
    _, embeddings = prefix
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    texts = [r.text for r in _generate(server, PROMPTS, prefix_id="tuned")]
    for prompt, text in zip(PROMPTS, texts, strict=True):
        ids = reference_greedy_with_prefix(model_dir, embeddings, tokenizer(prompt).input_ids, MAX_NEW_TOKENS)
        assert text == tokenizer.decode(ids, skip_special_tokens=True).rstrip("\ufffd")
    assert texts != expected  # the prefix changed what the model says


def test_launcher_reports_two_shards(server):
    assert "2 shard(s) ready: tgis_native" in server.log()


def test_every_serving_process_freezes_its_start_up_heap(server):
    """A full garbage collection over the start-up objects would stall a step (tgis_proto.runtime)."""
    log = server.log()
    assert len(re.findall(r"shard: \d+ start-up objects frozen", log)) == 2  # both ranks
    assert re.search(r"router: \d+ start-up objects frozen", log)
