"""Tests for the tiny local model fixtures."""

from __future__ import annotations

import json
import pathlib

import pytest
import torch
import transformers

from tests.support.tiny_models import (
    BOS_ID,
    CAUSAL_ARCHS,
    CORPUS,
    EOS_ID,
    PAD_ID,
    SEQ2SEQ_ARCHS,
    UNK_ID,
    build_tiny_causal_lm,
    build_tiny_seq2seq_lm,
    reference_greedy,
    train_tiny_tokenizer,
)

SIX_TOKEN_PROMPTS = ["The quick brown f", "emoji 😀"]
PROMPTS = [
    "Once upon a time",
    "Le café était fermé, alors",
    "東京は日本の",
    "x^2 + y^2",
]


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, pathlib.Path]:
    root = tmp_path_factory.mktemp("tiny_models")
    dirs = {arch: build_tiny_causal_lm(root / arch, arch=arch) for arch in CAUSAL_ARCHS}
    for arch in SEQ2SEQ_ARCHS:
        dirs[arch] = build_tiny_seq2seq_lm(root / arch, arch=arch)
    return dirs


def test_special_token_ids() -> None:
    tok = train_tiny_tokenizer()
    assert len(tok) == 512
    assert tok.convert_ids_to_tokens([0, 1, 2, 3]) == ["<pad>", "</s>", "<s>", "<unk>"]
    assert (
        (tok.pad_token_id, tok.eos_token_id, tok.bos_token_id, tok.unk_token_id)
        == (
            PAD_ID,
            EOS_ID,
            BOS_ID,
            UNK_ID,
        )
        == (0, 1, 2, 3)
    )


def test_tokenizer_instances_are_independent() -> None:
    a, b = train_tiny_tokenizer(), train_tiny_tokenizer(512)
    assert a is not b
    assert a.get_vocab() == b.get_vocab()
    a.padding_side = "left"
    assert b.padding_side == "right"


def test_tokenizer_vocab_size_is_configurable() -> None:
    tok = train_tiny_tokenizer(300)
    assert len(tok) == 300
    assert tok.convert_ids_to_tokens([0, 1, 2, 3]) == ["<pad>", "</s>", "<s>", "<unk>"]
    assert tok.decode(tok.encode("ünïcødé ✓ 😀")) == "ünïcødé ✓ 😀"


@pytest.mark.parametrize(
    "text",
    [
        CORPUS,
        "naïve café, Ærøskøbing, Straße",
        "未知の漢字と한국어 텍스트",
        "emoji 🦄🫠 and ZWJ 👩‍👩‍👧",
        "  leading spaces, trailing tabs\t\n",
        "control \x00\x07 bytes",
    ],
)
def test_tokenizer_round_trip(text: str) -> None:
    tok = train_tiny_tokenizer()
    ids = tok.encode(text)
    assert UNK_ID not in ids
    assert tok.decode(ids) == text


def test_saved_tokenizer_round_trips(model_dirs: dict[str, pathlib.Path]) -> None:
    tok = transformers.AutoTokenizer.from_pretrained(model_dirs["llama"])
    text = "Héllo 世界 🚀 and the quick brown fox"
    assert tok.encode(text) == train_tiny_tokenizer().encode(text)
    assert tok.decode(tok.encode(text)) == text
    assert (tok.pad_token_id, tok.eos_token_id, tok.bos_token_id) == (0, 1, 2)


@pytest.mark.parametrize("arch", CAUSAL_ARCHS + SEQ2SEQ_ARCHS)
def test_model_dir_contents(model_dirs: dict[str, pathlib.Path], arch: str) -> None:
    model_dir = model_dirs[arch]
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert (model_dir / name).is_file(), name
    config = json.loads((model_dir / "config.json").read_text())
    assert config["vocab_size"] == 512
    assert (config["pad_token_id"], config["eos_token_id"]) == (0, 1)
    if arch in SEQ2SEQ_ARCHS:
        assert config["decoder_start_token_id"] == 0
    else:
        assert config["bos_token_id"] == 2


@pytest.mark.parametrize("arch", CAUSAL_ARCHS + SEQ2SEQ_ARCHS)
def test_reference_greedy_is_deterministic(model_dirs: dict[str, pathlib.Path], arch: str) -> None:
    first = reference_greedy(model_dirs[arch], PROMPTS, max_new_tokens=8)
    second = reference_greedy(model_dirs[arch], PROMPTS, max_new_tokens=8)
    assert first == second
    assert len(first) == len(PROMPTS)
    for tokens in first:
        assert 1 <= len(tokens) <= 8
        assert EOS_ID not in tokens[:-1]
        assert not {PAD_ID, BOS_ID, UNK_ID} & set(tokens)


def test_build_is_reproducible(tmp_path: pathlib.Path) -> None:
    a = build_tiny_causal_lm(tmp_path / "a", arch="gpt2", seed=3)
    b = build_tiny_causal_lm(tmp_path / "b", arch="gpt2", seed=3)
    c = build_tiny_causal_lm(tmp_path / "c", arch="gpt2", seed=4)
    data = [(d / "model.safetensors").read_bytes() for d in (a, b, c)]
    assert data[0] == data[1]
    assert data[0] != data[2]


def test_config_overrides(tmp_path: pathlib.Path) -> None:
    model_dir = build_tiny_causal_lm(tmp_path, arch="llama", num_hidden_layers=1)
    config = transformers.AutoConfig.from_pretrained(model_dir)
    assert config.num_hidden_layers == 1
    assert config.num_key_value_heads == 2


def test_unknown_arch(tmp_path: pathlib.Path) -> None:
    with pytest.raises(ValueError, match="unsupported arch"):
        build_tiny_causal_lm(tmp_path, arch="t5")
    with pytest.raises(ValueError, match="unsupported arch"):
        build_tiny_seq2seq_lm(tmp_path, arch="llama")


def test_llama_outputs_are_varied(model_dirs: dict[str, pathlib.Path]) -> None:
    tok = train_tiny_tokenizer()
    assert [len(tok.encode(p)) for p in SIX_TOKEN_PROMPTS] == [6, 6]
    outputs = reference_greedy(model_dirs["llama"], SIX_TOKEN_PROMPTS, max_new_tokens=10)
    assert outputs[0] != outputs[1]
    assert any(len(set(tokens)) > 2 for tokens in outputs)


@pytest.mark.parametrize("arch", CAUSAL_ARCHS + SEQ2SEQ_ARCHS)
def test_batched_padded_generate_matches_single(model_dirs: dict[str, pathlib.Path], arch: str) -> None:
    """Padding + attention mask must not change greedy tokens (no argmax ties)."""
    model_dir = model_dirs[arch]
    seq2seq = arch in SEQ2SEQ_ARCHS
    prompts = [PROMPTS[1], PROMPTS[0]]  # different lengths
    max_new_tokens = 12
    expected = reference_greedy(model_dir, prompts, max_new_tokens)

    auto_cls = transformers.AutoModelForSeq2SeqLM if seq2seq else transformers.AutoModelForCausalLM
    model = auto_cls.from_pretrained(model_dir).eval()
    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    # Decoder-only models need left padding; encoder inputs are padded on the
    # right (BART's learned positions are not padding-aware).
    tok.padding_side = "right" if seq2seq else "left"
    batch = tok(prompts, return_tensors="pt", padding=True)
    assert batch.attention_mask.sum(1).tolist()[0] != batch.attention_mask.sum(1).tolist()[1]
    with torch.no_grad():
        out = model.generate(**batch, do_sample=False, max_new_tokens=max_new_tokens)
    start = 1 if seq2seq else batch.input_ids.shape[1]
    for row, want in zip(out[:, start:].tolist(), expected, strict=True):
        assert row[: len(want)] == want
        assert all(t == PAD_ID for t in row[len(want) :])
