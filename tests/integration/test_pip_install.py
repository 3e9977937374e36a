"""A user without hatch: pip-installing the three packages gives working commands.

Proves the wheels carry the generated stubs, the console scripts and the entry points.
"""

from __future__ import annotations

import os
import subprocess
import venv
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from tests.support.server import launcher
from tests.support.tiny_models import build_tiny_causal_lm, reference_greedy
from tgis_proto import generation_pb2 as fmaas

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def user_venv(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("user-venv")
    venv.create(root, with_pip=True)
    packages = [str(REPO / "packages" / name) for name in ("tgis-proto", "tgis-shard", "tgis-router")]
    # torch pinned in the same command: the CPU wheel on disk, not a multi-GB CUDA build.
    subprocess.run(
        [root / "bin" / "python", "-m", "pip", "install", "--quiet", "torch==2.13.0", *packages],
        check=True,
        timeout=1200,
        env={**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"},
    )
    return root


def test_installed_wheels_contain_the_generated_stubs(user_venv):
    code = "import tgis_proto.generation_pb2 as g, tgis_proto.shard_pb2_grpc; print(g.DESCRIPTOR.package)"
    result = subprocess.run(
        [user_venv / "bin" / "python", "-c", code], capture_output=True, text=True, check=True, cwd="/"
    )
    assert result.stdout.strip() == "fmaas"
    location = subprocess.run(
        [user_venv / "bin" / "python", "-c", "import tgis_proto; print(tgis_proto.__file__)"],
        capture_output=True,
        text=True,
        check=True,
        cwd="/",
    ).stdout
    assert str(REPO) not in location  # a real install, not the source tree


def test_text_generation_server_lists_the_builtin_engine(user_venv):
    result = subprocess.run(
        [user_venv / "bin" / "text-generation-server", "plugins"], capture_output=True, text=True, check=True
    )
    assert "hf_transformers" in result.stdout


def test_text_generation_launcher_serves_a_model(user_venv, tmp_path):
    model_dir = build_tiny_causal_lm(tmp_path / "model", arch="llama")
    env = {"PATH": f"{user_venv / 'bin'}{os.pathsep}{os.environ['PATH']}"}
    # The installed launcher, with the venv's bin first on PATH so it starts the installed shard.
    with launcher(model_dir, env=env, executable=str(user_venv / "bin" / "text-generation-launcher")) as server:
        request = fmaas.BatchedGenerationRequest(requests=[fmaas.GenerationRequest(text="Hello")])
        response = server.stub.Generate(request).responses[0]
        assert response.generated_token_count > 0


def test_a_third_party_model_plugin_is_served_after_pip_install(user_venv, tmp_path):
    plugin = REPO / "tests" / "plugins" / "tgis-models-toygpt"
    subprocess.run(
        [user_venv / "bin" / "python", "-m", "pip", "install", "--quiet", "--no-deps", str(plugin)],
        check=True,
        timeout=600,
        env={**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"},
    )
    listing = subprocess.run(
        [user_venv / "bin" / "text-generation-server", "plugins"], capture_output=True, text=True, check=True
    ).stdout
    assert "gpt2 -> tgis_models_toygpt.model:build [toygpt] engines: tgis_native" in listing
    model_dir = build_tiny_causal_lm(tmp_path / "gpt2", arch="gpt2")
    expected = reference_greedy(model_dir, ["Hello there"], 8)[0]
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    env = {"PATH": f"{user_venv / 'bin'}{os.pathsep}{os.environ['PATH']}"}
    launcher_path = str(user_venv / "bin" / "text-generation-launcher")
    with launcher(model_dir, "--deployment-framework", "tgis_native", env=env, executable=launcher_path) as server:
        params = fmaas.Parameters(stopping=fmaas.StoppingCriteria(max_new_tokens=8))
        request = fmaas.BatchedGenerationRequest(requests=[fmaas.GenerationRequest(text="Hello there")], params=params)
        response = server.stub.Generate(request).responses[0]
    assert response.text == tokenizer.decode(expected, skip_special_tokens=True).rstrip("\ufffd")
