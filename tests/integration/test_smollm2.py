"""The embedded default model, SmolLM2-135M-Instruct (LLaMA, GQA, tied embeddings), end to end."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.support.prefixes import reference_greedy_with_prefix, save_peft_prefix
from tests.support.server import launcher
from tgis_proto import generation_pb2 as fmaas
from tgis_shard.embedded import DEFAULT_MODEL
from tgis_shard.model_files import default_cache_dir, resolve_model_dir

PROMPTS = ["The capital of France is", "Write a haiku about the sea:\n"]
MAX_NEW_TOKENS = 8


@pytest.fixture(scope="module")
def model_dir():
    # The same conversion the server does on first use; done here so the reference can load it.
    return resolve_model_dir(DEFAULT_MODEL, None, default_cache_dir())


@pytest.fixture(scope="module")
def prefix(model_dir, tmp_path_factory):
    store = tmp_path_factory.mktemp("prefixes")
    return store, save_peft_prefix(model_dir, store, "tuned", length=4, seed=11)


@pytest.fixture(scope="module")
def server(model_dir, prefix):
    store, _ = prefix
    with launcher(None, env={"PREFIX_STORE_PATH": str(store)}) as running:  # no MODEL_NAME: the embedded default
        yield running


@pytest.fixture(scope="module")
def reference(model_dir):
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    outputs = []
    for prompt in PROMPTS:
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        generated = model.generate(ids, max_new_tokens=MAX_NEW_TOKENS, do_sample=False)[0, ids.shape[1] :]
        outputs.append(generated.tolist())
    return tokenizer, outputs


def _params() -> fmaas.Parameters:
    return fmaas.Parameters(
        stopping=fmaas.StoppingCriteria(max_new_tokens=MAX_NEW_TOKENS),
        response=fmaas.ResponseOptions(generated_tokens=True),
    )


def test_capital_of_france_is_paris(server):
    request = fmaas.BatchedGenerationRequest(requests=[fmaas.GenerationRequest(text=PROMPTS[0])], params=_params())
    assert server.stub.Generate(request).responses[0].text.startswith(" Paris")


def test_greedy_batch_equals_transformers_generate(server, reference):
    tokenizer, expected = reference
    request = fmaas.BatchedGenerationRequest(
        requests=[fmaas.GenerationRequest(text=p) for p in PROMPTS], params=_params()
    )
    for response, ids in zip(server.stub.Generate(request).responses, expected, strict=True):
        assert [t.text for t in response.tokens] == tokenizer.convert_ids_to_tokens(ids)
        assert response.text == tokenizer.decode(ids, skip_special_tokens=True)


def test_stream_equals_unary(server):
    request = fmaas.SingleGenerationRequest(request=fmaas.GenerationRequest(text=PROMPTS[1]), params=_params())
    messages = list(server.stub.GenerateStream(request))
    unary = server.stub.Generate(
        fmaas.BatchedGenerationRequest(requests=[request.request], params=request.params)
    ).responses[0]
    assert "".join(m.text for m in messages) == unary.text
    assert [t.text for m in messages for t in m.tokens] == [t.text for t in unary.tokens]
    assert messages[-1].stop_reason == unary.stop_reason == fmaas.MAX_TOKENS


def test_model_info_reads_the_context_length_from_config(server):
    info = server.stub.ModelInfo(fmaas.ModelInfoRequest())
    assert info.max_sequence_length == 8192
    assert info.model_kind == fmaas.ModelInfoResponse.DECODER_ONLY


def test_seeded_sampling_is_reproducible_inside_a_batch(server):
    params = fmaas.Parameters(
        method=fmaas.SAMPLE,
        sampling=fmaas.SamplingParameters(seed=5, temperature=0.8, top_p=0.95),
        stopping=fmaas.StoppingCriteria(max_new_tokens=MAX_NEW_TOKENS),
    )
    alone = server.stub.Generate(
        fmaas.BatchedGenerationRequest(requests=[fmaas.GenerationRequest(text=PROMPTS[1])], params=params)
    ).responses[0]
    batched = server.stub.Generate(
        fmaas.BatchedGenerationRequest(requests=[fmaas.GenerationRequest(text=p) for p in PROMPTS], params=params)
    ).responses[1]
    assert alone.seed == batched.seed == 5
    assert alone.text == batched.text


def test_stop_sequence_and_logprobs_against_the_reference(server, reference):
    tokenizer, expected = reference
    text = tokenizer.decode(expected[0], skip_special_tokens=True)  # " Paris. ..." greedy text
    stop = "."
    params = fmaas.Parameters(
        stopping=fmaas.StoppingCriteria(max_new_tokens=MAX_NEW_TOKENS, stop_sequences=[stop]),
        response=fmaas.ResponseOptions(generated_tokens=True, token_logprobs=True),
    )
    request = fmaas.BatchedGenerationRequest(requests=[fmaas.GenerationRequest(text=PROMPTS[0])], params=params)
    response = server.stub.Generate(request).responses[0]
    assert response.stop_reason == fmaas.STOP_SEQUENCE
    assert response.text == text[: text.index(stop) + 1]
    assert all(t.logprob <= 0 for t in response.tokens)
    assert response.tokens[0].logprob > -1.0  # " Paris" is the model's confident first choice


def test_prompt_prefix_on_the_real_model_equals_transformers_on_the_prefixed_embeddings(server, model_dir, prefix):
    _, embeddings = prefix
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    request = fmaas.BatchedGenerationRequest(
        requests=[fmaas.GenerationRequest(text=PROMPTS[0])], params=_params(), prefix_id="tuned"
    )
    (response,) = server.stub.Generate(request).responses
    ids = reference_greedy_with_prefix(model_dir, embeddings, tokenizer(PROMPTS[0]).input_ids, MAX_NEW_TOKENS)
    assert [t.text for t in response.tokens] == tokenizer.convert_ids_to_tokens(ids)
    assert response.input_token_count == len(tokenizer(PROMPTS[0]).input_ids)  # the prefix is not input text
