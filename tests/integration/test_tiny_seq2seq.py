"""Encoder-decoder models (T5) on the hf_transformers engine, end to end."""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from transformers import AutoTokenizer

from tests.support.prefixes import reference_greedy_with_prefix, save_peft_prefix
from tests.support.server import launcher
from tests.support.tiny_models import build_tiny_seq2seq_lm, reference_texts
from tgis_proto import generation_pb2 as fmaas

PROMPTS = ["translate: Hello there", "A", "The quick brown fox jumps over the lazy dog"]
MAX_NEW_TOKENS = 10


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_tiny_seq2seq_lm(tmp_path_factory.mktemp("tiny-t5"), arch="t5", feed_forward_proj="gated-gelu")


@pytest.fixture(scope="module")
def prefix(model_dir, tmp_path_factory):
    store = tmp_path_factory.mktemp("prefixes")
    embeddings = save_peft_prefix(model_dir, store, "tuned", length=4, seed=5)
    # TGIS's own layout: a decoder prefix in front of the decoder start token.
    (store / "decoder-only").mkdir()
    torch.save(embeddings[:3].flip(0).clone(), store / "decoder-only" / "decoder.pt")
    return store, embeddings


@pytest.fixture(scope="module")
def server(model_dir, prefix):
    store, _ = prefix
    with launcher(model_dir, "--max-batch-size", "4", env={"PREFIX_STORE_PATH": str(store)}) as running:
        yield running


@pytest.fixture(scope="module")
def expected(model_dir):
    return reference_texts(model_dir, PROMPTS, MAX_NEW_TOKENS)


def _params(**response) -> fmaas.Parameters:
    return fmaas.Parameters(
        stopping=fmaas.StoppingCriteria(max_new_tokens=MAX_NEW_TOKENS), response=fmaas.ResponseOptions(**response)
    )


def _generate(server, prompts, params):
    request = fmaas.BatchedGenerationRequest(requests=[fmaas.GenerationRequest(text=p) for p in prompts], params=params)
    return list(server.stub.Generate(request).responses)


def test_greedy_batch_equals_transformers_generate(server, expected):
    assert [r.text for r in _generate(server, PROMPTS, _params())] == expected


def test_concurrent_requests_joining_a_running_batch_keep_their_outputs(server, expected):
    def call(i: int) -> tuple[int, str]:
        index = i % len(PROMPTS)
        return index, _generate(server, [PROMPTS[index]], _params())[0].text

    with ThreadPoolExecutor(9) as pool:
        for index, text in pool.map(call, range(9)):
            assert text == expected[index]


def test_model_info_says_encoder_decoder(server):
    assert server.stub.ModelInfo(fmaas.ModelInfoRequest()).model_kind == fmaas.ModelInfoResponse.ENCODER_DECODER


def test_input_text_echo_separates_input_and_output(server, expected):
    unary = _generate(server, PROMPTS[:1], _params(input_text=True))[0]
    assert unary.text == PROMPTS[0] + "\n\n" + expected[0]
    request = fmaas.SingleGenerationRequest(
        request=fmaas.GenerationRequest(text=PROMPTS[0]), params=_params(input_text=True)
    )
    messages = list(server.stub.GenerateStream(request))
    assert messages[0].text == PROMPTS[0]  # the bare input, no separator
    assert "".join(m.text for m in messages[1:]) == expected[0]


def test_every_input_token_of_a_seq2seq_model_has_nan_logprob(server):
    options = {"input_tokens": True, "token_logprobs": True, "token_ranks": True}
    response = _generate(server, PROMPTS[:1], _params(**options))[0]
    assert response.input_tokens
    assert all(math.isnan(t.logprob) and t.rank == 0 and not t.top_tokens for t in response.input_tokens)


def test_encoder_prompt_prefix_equals_transformers_on_the_prefixed_encoder_input(server, model_dir, prefix):
    _, embeddings = prefix
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    request = fmaas.BatchedGenerationRequest(
        requests=[fmaas.GenerationRequest(text=p) for p in PROMPTS], params=_params(), prefix_id="tuned"
    )
    texts = [r.text for r in server.stub.Generate(request).responses]
    for prompt, text in zip(PROMPTS, texts, strict=True):
        ids = reference_greedy_with_prefix(model_dir, embeddings, tokenizer(prompt).input_ids, MAX_NEW_TOKENS)
        assert text == tokenizer.decode(ids, skip_special_tokens=True).rstrip("\ufffd")


def test_a_tgis_decoder_prefix_goes_in_front_of_the_decoder_start_token(server, model_dir, prefix):
    _, embeddings = prefix
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    request = fmaas.BatchedGenerationRequest(
        requests=[fmaas.GenerationRequest(text=PROMPTS[0])], params=_params(), prefix_id="decoder-only"
    )
    (response,) = server.stub.Generate(request).responses
    decoder_prefix = embeddings[:3].flip(0)
    ids = reference_greedy_with_prefix(
        model_dir, None, tokenizer(PROMPTS[0]).input_ids, MAX_NEW_TOKENS, decoder_prefix=decoder_prefix
    )
    assert response.text == tokenizer.decode(ids, skip_special_tokens=True).rstrip("\ufffd")
