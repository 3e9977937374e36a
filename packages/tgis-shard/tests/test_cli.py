"""text-generation-server: prepare, plugins, convert-to-safetensors, clear errors."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tokenizers import Tokenizer
from transformers import AutoModelForCausalLM

from tests.support.tiny_models import build_tiny_causal_lm, build_tiny_seq2seq_lm
from tgis_shard import model_files
from tgis_shard.cli import default_dtype, main

# main() configures the root logger for its process; these tests share one.
pytestmark = pytest.mark.usefixtures("restored_logging")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_tiny_causal_lm(tmp_path_factory.mktemp("llama"), arch="llama")


@pytest.fixture(scope="module")
def seq2seq_dir(tmp_path_factory):
    return build_tiny_seq2seq_lm(tmp_path_factory.mktemp("t5"), arch="t5")


def test_prepare_describes_the_model(model_dir, capsys, tmp_path):
    assert main(["prepare", str(model_dir), "--cache-dir", str(tmp_path)]) == 0
    description = json.loads(capsys.readouterr().out)
    assert description["model_type"] == "llama"
    assert description["max_sequence_length"] == 256
    assert description["tokenizer_file"].endswith("tokenizer.json")
    assert not description["encoder_decoder"]


def test_prepare_names_a_missing_model(capsys, tmp_path):
    assert main(["prepare", "no-such-org/no-such-model", "--cache-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "model 'no-such-org/no-such-model' not found" in err
    assert len(err.strip().splitlines()) == 1


def test_prepare_names_installed_engines_for_an_unknown_one(model_dir, capsys, tmp_path):
    assert main(["prepare", str(model_dir), "--deployment-framework", "nope", "--cache-dir", str(tmp_path)]) == 2
    engines = "hf_optimum_bt, hf_optimum_ort, hf_transformers, tgis_native"
    assert f"unknown engine (DEPLOYMENT_FRAMEWORK) 'nope'; installed engines: {engines}" in capsys.readouterr().err


def test_plugins_lists_builtin_engine(capsys):
    assert main(["plugins"]) == 0
    out = capsys.readouterr().out
    assert "hf_transformers" in out
    assert "tgis-shard" in out


def test_convert_to_safetensors_keeps_tied_weights(model_dir, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    model.config.tie_word_embeddings = True
    model.tie_weights()
    state = model.state_dict()
    state["lm_head.weight"] = state["model.embed_tokens.weight"]  # shares storage
    torch.save(state, tmp_path / "pytorch_model.bin")
    assert main(["convert-to-safetensors", str(tmp_path)]) == 0
    converted = load_file(tmp_path / "model.safetensors")
    assert set(converted) == set(state)
    assert torch.equal(converted["lm_head.weight"], state["model.embed_tokens.weight"])


def test_logs_are_json_lines_when_the_launcher_asks(capsys, monkeypatch):
    monkeypatch.setenv("JSON_OUTPUT", "true")
    monkeypatch.setenv("LOG_LEVEL", "info")
    assert main(["plugins"]) == 0
    logging.getLogger("tgis_shard").info("rank %d ready", 1)
    (line,) = capsys.readouterr().err.splitlines()
    assert json.loads(line)["message"] == "rank 1 ready"


@pytest.fixture(scope="module")
def onnx_cache(model_dir, tmp_path_factory):
    """``model_dir`` exported for hf_optimum_ort, as a user exports it."""
    cache = tmp_path_factory.mktemp("cache")
    assert main(["convert-to-onnx", str(model_dir), "--cache-dir", str(cache)]) == 0
    return cache


@pytest.mark.parametrize(
    ("model", "engine", "compiles"),
    [
        ("model_dir", "tgis_native", True),
        ("model_dir", "hf_transformers", True),
        ("seq2seq_dir", "hf_transformers", True),
        ("model_dir", "hf_optimum_ort", False),  # ONNX Runtime runs its own graph
    ],
)
def test_serve_hands_pt2_compile_to_the_engine_and_says_when_it_runs_eagerly(
    request, monkeypatch, capsys, tmp_path, model, engine, compiles
):
    model_dir = request.getfixturevalue(model)
    cache_dir = request.getfixturevalue("onnx_cache") if engine == "hf_optimum_ort" else tmp_path
    capsys.readouterr()  # the export's output
    served = []
    monkeypatch.setattr("tgis_shard.server.serve", lambda engine, uds_path: served.append(engine))
    args = ["serve", str(model_dir), "--uds-path", str(tmp_path / "shard.sock"), "--deployment-framework", engine]
    assert main([*args, "--pt2-compile", "--estimate-memory", "off", "--cache-dir", str(cache_dir)]) == 0
    (shard,) = served
    assert shard.ctx.pt2_compile
    assert shard.pt2_compile is compiles
    refusal = f"PT2_COMPILE: the {engine} engine does not compile its model; it runs eagerly"
    assert (refusal in capsys.readouterr().err) is not compiles  # main() logs to stderr


@pytest.mark.parametrize(
    ("device_type", "config_dtype", "expected"),
    [
        ("cpu", "bfloat16", "float32"),
        ("cuda", "bfloat16", "bfloat16"),
        ("cuda", "float32", "float16"),
        ("cuda", None, "float16"),
    ],
)
def test_unset_dtype_str_follows_tgis_float16_on_gpu_unless_the_config_says_bfloat16(
    device_type, config_dtype, expected
):
    assert default_dtype(device_type, config_dtype) == expected


@pytest.mark.parametrize("key", ["max_seq_length", "seq_len", "max_position_embeddings"])
def test_max_sequence_length_comes_from_tgis_s_config_keys(key):
    assert model_files.max_sequence_length({key: 777}) == 777


def test_convert_to_fast_tokenizer_writes_one_that_encodes_as_the_slow_files_do(model_dir, tmp_path, capsys):
    slow = tmp_path / "slow"
    shutil.copytree(model_dir, slow)
    original = Tokenizer.from_file(str(slow / "tokenizer.json"))
    original.model.save(str(slow))  # a byte-level BPE's vocab.json and merges.txt: GPT-2's slow files
    config = json.loads((slow / "tokenizer_config.json").read_text())
    (slow / "tokenizer_config.json").write_text(json.dumps({**config, "tokenizer_class": "GPT2Tokenizer"}))
    (slow / "tokenizer.json").unlink()
    assert main(["convert-to-fast-tokenizer", str(slow), "--cache-dir", str(tmp_path / "cache")]) == 0
    written = Path(capsys.readouterr().out.strip())
    assert written.is_relative_to(tmp_path / "cache")
    text = "Hello there, general Kenobi"
    assert Tokenizer.from_file(str(written)).encode(text).ids == original.encode(text).ids
    # Served from now on: prepare names the converted file.
    assert main(["prepare", str(slow), "--cache-dir", str(tmp_path / "cache")]) == 0
    assert json.loads(capsys.readouterr().out)["tokenizer_file"] == str(written)


def test_tokenizer_config_special_token_settings_apply_as_autotokenizer_applies_them(model_dir, tmp_path, capsys):
    """TGIS loads tokenizers through AutoTokenizer: add_bos_token / add_eos_token in
    tokenizer_config.json decide what an encoding adds, which tokenizer.json alone does not say."""
    folder = tmp_path / "model"
    shutil.copytree(model_dir, folder)
    own = Tokenizer.from_file(str(folder / "tokenizer.json"))
    text = "Hello there"
    plain = own.encode(text, add_special_tokens=False).ids
    bos, eos = own.token_to_id("<s>"), own.token_to_id("</s>")
    cache = tmp_path / "cache"

    def served() -> tuple[Path, list[int]]:
        assert main(["prepare", str(folder), "--cache-dir", str(cache)]) == 0
        path = Path(json.loads(capsys.readouterr().out)["tokenizer_file"])
        return path, Tokenizer.from_file(str(path)).encode(text).ids

    assert served() == (folder / "tokenizer.json", own.encode(text).ids)  # no settings: the model's file
    config_file = folder / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    config_file.write_text(json.dumps({**config, "add_bos_token": True, "add_eos_token": True}))
    path, ids = served()
    assert path.is_relative_to(cache)
    assert ids == [bos, *plain, eos]
    config_file.write_text(json.dumps({**config, "add_bos_token": False, "add_eos_token": False}))
    path_after_edit, ids = served()
    assert path_after_edit != path  # prepared anew: the cache is keyed by the files' contents
    assert ids == plain
