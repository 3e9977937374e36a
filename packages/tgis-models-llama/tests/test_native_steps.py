"""tgis_native's step semantics on LLaMA, one rank: a prompt prefilled in chunks gives what a whole
prefill gives (tokens, logprobs, input-token details, prompt prefixes), and a request resumed
after a preemption (its output recomputed with its prompt) goes on as if it never stopped,
greedy and seeded alike."""

from __future__ import annotations

import math

import pytest

from tests.support.engines import NEW_TOKENS, StepDriver, native_engine, request
from tests.support.native_checks import prompt_ids
from tests.support.prefixes import PREFIXES, check_prefix_outputs, run_prefix_scenario, save_prefixes
from tests.support.tiny_models import build_tiny_causal_lm
from tgis_proto import shard_pb2 as pb

CHUNK = 3


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_tiny_causal_lm(tmp_path_factory.mktemp("llama"), arch="llama", seed=9)


@pytest.fixture(scope="module")
def engine(model_dir):
    return native_engine(0, 1, 0, model_dir)


def _run(engine, requests: list[pb.Request], chunk: int | None) -> StepDriver:
    driver = StepDriver(engine, chunk)
    driver.join(*requests)
    driver.run_until(NEW_TOKENS)
    driver.leave(*(r.id for r in requests))
    driver.step()
    return driver


def _detailed(ids: list[list[int]]) -> list[pb.Request]:
    return [
        request(i, prompt, NEW_TOKENS, logprobs=True, ranks=True, top_n=2, input_tokens=True)
        for i, prompt in enumerate(ids)
    ]


def _assert_same_details(tokens, expected) -> None:
    assert [(t.id, t.rank, [p.id for p in t.top_tokens]) for t in tokens] == [
        (t.id, t.rank, [p.id for p in t.top_tokens]) for t in expected
    ]
    assert math.isnan(tokens[0].logprob)
    assert math.isnan(expected[0].logprob)
    assert [t.logprob for t in tokens[1:]] == pytest.approx([t.logprob for t in expected[1:]], abs=1e-3)


def test_chunked_prompts_give_the_tokens_and_every_detail_of_a_whole_prefill(engine, model_dir):
    ids = prompt_ids(model_dir)
    assert max(len(p) for p in ids) > 3 * CHUNK  # the longest prompt takes four chunks or more
    whole, chunked = _run(engine, _detailed(ids), None), _run(engine, _detailed(ids), CHUNK)
    # The chunked run takes more steps, and the early finishers go on meanwhile: compare the first tokens.
    assert {r: out[:NEW_TOKENS] for r, out in chunked.outputs.items()} == whole.outputs
    for rid, first in whole.first.items():
        other = chunked.first[rid]
        assert other.logprob == pytest.approx(first.logprob, abs=1e-4)
        assert (other.rank, [t for t, _ in other.top_tokens]) == (first.rank, [t for t, _ in first.top_tokens])
        # Input-token details come from the chunk that holds each token's scoring position.
        assert len(other.input_tokens) == len(ids[rid])
        _assert_same_details(other.input_tokens, first.input_tokens)


def test_chunked_prompts_with_prompt_prefixes_equal_transformers(model_dir, tmp_path):
    prefixes = save_prefixes(model_dir, tmp_path)
    engine = native_engine(0, 1, 0, model_dir, prefix_store_path=tmp_path)
    ids = prompt_ids(model_dir)
    check_prefix_outputs(model_dir, ids, prefixes, run_prefix_scenario(engine, ids, chunk=CHUNK))


@pytest.mark.parametrize("sampling", [{}, {"sample": True, "seed": 42, "temperature": 1.5, "top_k": 20}])
@pytest.mark.parametrize("prefixed", [False, True], ids=["plain", "prefixed"])
def test_a_resumed_request_goes_on_as_if_it_never_stopped(model_dir, tmp_path, sampling, prefixed):
    prefix_id = ""
    if prefixed:
        save_prefixes(model_dir, tmp_path)
        prefix_id = PREFIXES[0][0]
    engine = native_engine(0, 1, 0, model_dir, prefix_store_path=tmp_path if prefixed else None)
    prompt = prompt_ids(model_dir)[2]
    chooser = pb.NextTokenChooser(**sampling)
    whole = StepDriver(engine)
    whole.join(pb.Request(id=1, input_ids=prompt, max_new_tokens=NEW_TOKENS, chooser=chooser, prefix_id=prefix_id))
    whole.run_until(NEW_TOKENS)
    done = 3  # preempted after three tokens: it rejoins with them as the end of its prompt
    resumed = StepDriver(engine, chunk=CHUNK)
    resumed.join(
        pb.Request(
            id=2,
            input_ids=[*prompt, *whole.outputs[1][:done]],
            max_new_tokens=NEW_TOKENS,
            chooser=chooser,
            prefix_id=prefix_id,
            resumed_tokens=done,
        )
    )
    resumed.run_until(NEW_TOKENS - done)
    assert resumed.outputs[2] == whole.outputs[1][done:NEW_TOKENS]
