"""hf_optimum_ort end to end on the embedded SmolLM2: exported once with
``text-generation-server convert-to-onnx``, served by the launcher, equal to transformers; a model
without an export is refused at start with the command that makes one."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.support.ports import free_ports
from tests.support.server import launcher, launcher_command
from tests.support.tiny_models import build_tiny_causal_lm, reference_texts
from tgis_proto import generation_pb2 as fmaas
from tgis_shard.embedded import DEFAULT_MODEL
from tgis_shard.model_files import default_cache_dir, resolve_model_dir

pytest.importorskip("onnxruntime")

PROMPTS = ["The capital of France is", "def fibonacci(n):"]
MAX_NEW_TOKENS = 8


@pytest.fixture(scope="module")
def model_dir():
    return resolve_model_dir(DEFAULT_MODEL, None, default_cache_dir())


@pytest.fixture(scope="module")
def server(model_dir):
    # Into the default cache, where the shard looks: a second run finds the export there.
    command = [sys.executable, "-m", "tgis_shard.cli", "convert-to-onnx", DEFAULT_MODEL]
    subprocess.run(command, check=True, timeout=900, capture_output=True)
    with launcher(None, "--deployment-framework", "hf_optimum_ort", "--max-batch-size", "4") as running:
        yield running


@pytest.fixture(scope="module")
def expected(model_dir):
    return reference_texts(model_dir, PROMPTS, MAX_NEW_TOKENS)


def test_smollm2_on_onnx_runtime_equals_transformers(server, expected):
    params = fmaas.Parameters(stopping=fmaas.StoppingCriteria(max_new_tokens=MAX_NEW_TOKENS))
    request = fmaas.BatchedGenerationRequest(requests=[fmaas.GenerationRequest(text=p) for p in PROMPTS], params=params)
    assert [r.text for r in server.stub.Generate(request).responses] == expected
    assert expected[0].startswith(" Paris")
    assert "1 shard(s) ready: hf_optimum_ort" in server.log()


def test_a_model_without_an_export_is_refused_at_start_with_the_command_that_makes_one(tmp_path):
    model = build_tiny_causal_lm(tmp_path / "llama", arch="llama")
    command = [*launcher_command(), "--model-name", str(model), "--deployment-framework", "hf_optimum_ort"]
    grpc_port, http_port = free_ports(2)
    command += ["--shard-uds-path", str(tmp_path / "shard"), "--grpc-port", str(grpc_port), "--port", str(http_port)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert f"no ONNX export of {model} (of this version of tgis): make one with " in result.stderr
    assert f"`text-generation-server convert-to-onnx {model}`" in result.stderr
