"""download-weights for real, against a local server speaking the Hub's API (HF_ENDPOINT), then
served offline from the HF cache it filled: TGIS's default extensions (safetensors and the
model's metadata, not its .bin copies), auto-conversion of a .bin-only model with slow tokenizer
files (safetensors, then a fast tokenizer), progress as log lines where no terminal shows a bar."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tokenizers import Tokenizer
from transformers import AutoModelForCausalLM

from tests.support.fake_hub import FakeHub
from tests.support.server import launcher
from tests.support.tiny_models import build_tiny_causal_lm, reference_texts
from tgis_proto import generation_pb2 as fmaas

PROMPT = "Hello there, general"
NEW_TOKENS = 6


@pytest.fixture(scope="module")
def repos(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hub")
    served = build_tiny_causal_lm(root / "served", arch="llama", seed=3)
    # A .bin copy beside the safetensors: TGIS's default extensions leave it on the hub.
    model = AutoModelForCausalLM.from_pretrained(served)
    torch.save(model.state_dict(), served / "pytorch_model.bin")
    # A model as old checkpoints ship: .bin weights, a byte-level BPE's slow files, no tokenizer.json.
    old = root / "old"
    shutil.copytree(served, old)
    (old / "model.safetensors").unlink()
    Tokenizer.from_file(str(old / "tokenizer.json")).model.save(str(old))  # vocab.json + merges.txt
    config = json.loads((old / "tokenizer_config.json").read_text())
    (old / "tokenizer_config.json").write_text(json.dumps({**config, "tokenizer_class": "GPT2Tokenizer"}))
    (old / "tokenizer.json").unlink()
    return {"org/tiny-llama": served, "org/old-llama": old}


@pytest.fixture(scope="module")
def hub(repos):
    with FakeHub(repos) as hub:
        yield hub


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict[str, str]:
    folder = tmp_path_factory.mktemp("hf")
    return {
        **os.environ,
        "HF_HUB_CACHE": str(folder / "hub"),
        "XDG_CACHE_HOME": str(folder / "xdg"),
        "HF_HUB_DISABLE_TELEMETRY": "1",
    }


def _download(model: str, env: dict[str, str], hub: FakeHub, *args: str) -> tuple[Path, str]:
    command = [sys.executable, "-m", "tgis_shard.cli", "download-weights", model, *args]
    out = subprocess.run(command, env={**env, "HF_ENDPOINT": hub.url}, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return Path(out.stdout.strip().splitlines()[-1]), out.stderr


def test_default_extensions_fetch_safetensors_and_metadata_with_progress_in_the_log(hub, env):
    folder, stderr = _download("org/tiny-llama", env, hub)
    assert folder.is_relative_to(env["HF_HUB_CACHE"])
    fetched = {d.removeprefix("org/tiny-llama/") for d in hub.downloads if d.startswith("org/tiny-llama/")}
    assert "model.safetensors" in fetched
    assert {"config.json", "tokenizer.json", "tokenizer_config.json"} <= fetched
    assert "pytorch_model.bin" not in fetched
    assert (folder / "model.safetensors").exists()
    # Not a terminal: a log line with the byte count when done, not a redrawn bar.
    assert "\r" not in stderr
    assert any("100%" in line and "B" in line for line in stderr.splitlines()), stderr[-2000:]


def test_a_bin_only_model_is_converted_and_gets_a_fast_tokenizer(hub, env, repos):
    folder, _ = _download("org/old-llama", env, hub)
    fetched = {d.removeprefix("org/old-llama/") for d in hub.downloads if d.startswith("org/old-llama/")}
    assert "pytorch_model.bin" in fetched
    converted = load_file(folder / "model.safetensors")
    original = torch.load(repos["org/old-llama"] / "pytorch_model.bin", weights_only=True)
    assert converted.keys() == original.keys()
    assert all(torch.equal(converted[k], original[k]) for k in original)
    fast = list((Path(env["XDG_CACHE_HOME"]) / "tgis" / "tokenizers").glob("*/tokenizer.json"))
    assert len(fast) == 1
    served = Tokenizer.from_file(str(repos["org/tiny-llama"] / "tokenizer.json"))
    assert Tokenizer.from_file(str(fast[0])).encode(PROMPT).ids == served.encode(PROMPT).ids


def test_what_was_downloaded_serves_offline_by_hub_id(hub, env, repos):
    _download("org/tiny-llama", env, hub)
    offline = {**env, "HF_HUB_OFFLINE": "1"}
    offline.pop("HF_ENDPOINT", None)
    expected = reference_texts(repos["org/tiny-llama"], [PROMPT], NEW_TOKENS)
    with launcher("org/tiny-llama", "--deployment-framework", "hf_transformers", env=offline) as server:
        response = server.stub.Generate(
            fmaas.BatchedGenerationRequest(
                requests=[fmaas.GenerationRequest(text=PROMPT)],
                params=fmaas.Parameters(stopping=fmaas.StoppingCriteria(max_new_tokens=NEW_TOKENS)),
            ),
            timeout=120,
        )
    assert [r.text for r in response.responses] == expected
