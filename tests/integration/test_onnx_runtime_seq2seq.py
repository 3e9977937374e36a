"""hf_optimum_ort end to end on an encoder-decoder: a tiny flan-t5-layout model whose folder
carries its own export under ``onnx/``, served by the launcher, equal to transformers."""

from __future__ import annotations

import pytest

from tests.support.server import launcher
from tests.support.tiny_models import build_tiny_seq2seq_lm, reference_texts
from tgis_proto import generation_pb2 as fmaas
from tgis_shard.onnx_export import export

pytest.importorskip("onnxruntime")

PROMPTS = ["translate: Hello there", "A", "The quick brown fox jumps over the lazy dog"]
MAX_NEW_TOKENS = 10


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    model = build_tiny_seq2seq_lm(tmp_path_factory.mktemp("tiny-t5"), arch="t5", feed_forward_proj="gated-gelu")
    export(model, model / "onnx")
    return model


@pytest.fixture(scope="module")
def server(model_dir):
    with launcher(model_dir, "--deployment-framework", "hf_optimum_ort", "--max-batch-size", "4") as running:
        yield running


def test_a_t5_batch_and_a_stream_on_onnx_runtime_equal_transformers(server, model_dir):
    expected = reference_texts(model_dir, PROMPTS, MAX_NEW_TOKENS)
    params = fmaas.Parameters(stopping=fmaas.StoppingCriteria(max_new_tokens=MAX_NEW_TOKENS))
    request = fmaas.BatchedGenerationRequest(requests=[fmaas.GenerationRequest(text=p) for p in PROMPTS], params=params)
    assert [r.text for r in server.stub.Generate(request).responses] == expected
    stream = server.stub.GenerateStream(fmaas.SingleGenerationRequest(request=request.requests[2], params=params))
    assert "".join(r.text for r in stream) == expected[2]
    assert "1 shard(s) ready: hf_optimum_ort" in server.log()
