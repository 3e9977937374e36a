"""hf_optimum_ort: tiny causal LMs and encoder-decoders exported with ``convert-to-onnx`` and run on
ONNX Runtime give transformers' greedy tokens, and hf_transformers' logprobs and details within
float32 noise, while requests join and leave."""

from __future__ import annotations

import pytest
import torch

from tests.support.engines import (
    NEW_TOKENS,
    StepDriver,
    check_one_batch_equals_reference,
    cpu_context,
    cpu_engine,
    request,
    start_then_join,
)
from tests.support.tiny_models import build_tiny_causal_lm, build_tiny_seq2seq_lm
from tgis_proto.plugins import resolve
from tgis_shard.cli import main as server_cli
from tgis_shard.engines.base import UnsupportedModelError
from tgis_shard.engines.seq2seq import Seq2SeqLMEngine
from tgis_shard.onnx_export import OnnxExportMissingError, export_dir, find_export
from tgis_shard.prefixes import PrefixesUnsupportedError

pytest.importorskip("onnxruntime")

# float32 on both sides; ONNX Runtime fuses and reorders the same arithmetic.
LOGPROB_TOLERANCE = 1e-4


# Causal: rotary (llama), learned absolute (gpt2) and ALiBi (bloom) positions. Encoder-decoders:
# T5 and the gated T5 v1.1 layout of flan-t5 / mT0 (untied LM head).
MODELS = {
    "llama": lambda dest: build_tiny_causal_lm(dest, arch="llama"),
    "gpt2": lambda dest: build_tiny_causal_lm(dest, arch="gpt2"),
    "bloom": lambda dest: build_tiny_causal_lm(dest, arch="bloom"),
    "t5": lambda dest: build_tiny_seq2seq_lm(dest, arch="t5"),
    "t5-gated": lambda dest: build_tiny_seq2seq_lm(
        dest, arch="t5", feed_forward_proj="gated-gelu", tie_word_embeddings=False
    ),
}


@pytest.fixture(scope="module", params=list(MODELS))
def model_dir(request, tmp_path_factory):
    return MODELS[request.param](tmp_path_factory.mktemp(request.param))


@pytest.fixture(scope="module")
def cache_dir(model_dir, tmp_path_factory):
    """The export, made once per model through the CLI, as a user makes it."""
    cache = tmp_path_factory.mktemp("cache")
    assert server_cli(["convert-to-onnx", str(model_dir), "--cache-dir", str(cache)]) == 0
    return cache


def ort_engine(model_dir, cache_dir):
    ctx = cpu_context(model_dir, cache_dir=cache_dir)
    return resolve(ctx.registry.engine("hf_optimum_ort").target)(ctx)


@pytest.fixture(scope="module")
def engine(model_dir, cache_dir):
    return ort_engine(model_dir, cache_dir)


def test_the_export_lands_in_the_cache_with_what_the_engine_needs(engine, model_dir, cache_dir):
    folder, spec = find_export(model_dir, cache_dir)
    assert folder == export_dir(model_dir, cache_dir)
    graphs = {"encoder.onnx", "decoder_init.onnx", "decoder.onnx"} if spec.kind == "seq2seq" else {"model.onnx"}
    assert {p.name for p in folder.iterdir()} == {*graphs, "tgis_onnx.json"}
    assert isinstance(engine, Seq2SeqLMEngine) == (spec.kind == "seq2seq")


def test_a_batch_equals_transformers(engine, prompt_ids, expected):
    assert engine.info().engine == "hf_optimum_ort"
    check_one_batch_equals_reference(engine, prompt_ids, expected)


def test_joining_and_leaving_change_no_output_and_logprobs_equal_hf_transformers(
    engine, model_dir, prompt_ids, expected
):
    details = {"logprobs": True, "ranks": True, "top_n": 3}
    runs = {}
    for name, e in (("ort", engine), ("hf", cpu_engine(model_dir))):
        driver = start_then_join(e, prompt_ids, **details)
        driver.run(2)
        driver.leave(2)
        driver.run(NEW_TOKENS)
        driver.leave(0, 1)
        driver.step()
        runs[name] = driver
    ort, hf = runs["ort"], runs["hf"]
    for i in (0, 1):
        assert ort.outputs[i][: len(expected[i])] == expected[i]
    assert ort.outputs == hf.outputs
    for rid, token in hf.first.items():
        mine = ort.first[rid]
        assert mine.logprob == pytest.approx(token.logprob, abs=LOGPROB_TOLERANCE)
        assert (mine.rank, [t for t, _ in mine.top_tokens]) == (token.rank, [t for t, _ in token.top_tokens])


def test_input_token_details_equal_hf_transformers(engine, model_dir, prompt_ids):
    asked = request(0, prompt_ids[2], 2, logprobs=True, ranks=True, input_tokens=True)
    firsts = []
    for e in (engine, cpu_engine(model_dir)):
        driver = StepDriver(e)
        driver.join(asked)
        (token,) = driver.step()
        driver.leave(0)
        driver.step()
        firsts.append(token)
    ort, hf = firsts
    assert [t.id for t in ort.input_tokens] == [t.id for t in hf.input_tokens] == prompt_ids[2]
    assert [t.rank for t in ort.input_tokens] == [t.rank for t in hf.input_tokens]
    # An encoder-decoder's prompt feeds the encoder, which scores nothing: NaN on both sides.
    values = [t.logprob for t in ort.input_tokens[1:]]
    assert values == pytest.approx([t.logprob for t in hf.input_tokens[1:]], abs=LOGPROB_TOLERANCE, nan_ok=True)


def test_prompt_prefixes_are_refused_with_the_reason_and_health_checks_run(engine):
    with pytest.raises(PrefixesUnsupportedError, match="hf_optimum_ort engine does not support prompt prefixes"):
        engine.prompt_prefix("tuned")
    engine.health_check()


def test_a_model_without_an_export_names_the_command_that_makes_one(model_dir, tmp_path):
    with pytest.raises(UnsupportedModelError, match=r"text-generation-server convert-to-onnx .*"):
        ort_engine(model_dir, tmp_path)


def test_learned_decoder_positions_and_half_precision_are_refused(tmp_path, capsys):
    bart = build_tiny_seq2seq_lm(tmp_path / "bart", arch="bart")
    assert server_cli(["convert-to-onnx", str(bart), "--cache-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "hf_optimum_ort cannot give each row of a batch its own decoder positions" in err
    assert "DEPLOYMENT_FRAMEWORK=hf_transformers" in err
    assert not (export_dir(bart, tmp_path) / "tgis_onnx.json").exists()
    causal = build_tiny_causal_lm(tmp_path / "llama", arch="llama")
    ctx = cpu_context(causal, dtype=torch.bfloat16)
    with pytest.raises(UnsupportedModelError, match="float32"):
        resolve(ctx.registry.engine("hf_optimum_ort").target)(ctx)


def test_an_export_of_another_version_is_made_again(model_dir, cache_dir, tmp_path):
    stale = tmp_path / "stale"
    stale.mkdir()
    (stale / "model.onnx").write_bytes(b"")
    (stale / "tgis_onnx.json").write_text('{"num_layers": 2}')  # written before versions existed
    with pytest.raises(OnnxExportMissingError, match="of this version of tgis"):
        _find_in(stale)
    folder, spec = find_export(model_dir, cache_dir)
    assert folder == export_dir(model_dir, cache_dir)
    assert spec.num_layers > 0


def _find_in(folder):
    """find_export over a model folder whose own onnx/ is ``folder``."""
    model = folder.parent / "model"
    model.mkdir(exist_ok=True)
    (model / "onnx").symlink_to(folder)
    return find_export(model, None)
