"""The prompt-prefix store: formats, checks, path safety and the bounded cache."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from tgis_shard.prefixes import InvalidPrefixError, PrefixNotFoundError, PrefixStore

WIDTH = 8


def store_at(root, cache_bytes: int = 2**20, max_length: int = 64) -> PrefixStore:
    cpu = torch.device("cpu")
    return PrefixStore(root, WIDTH, max_length, torch.float16, cpu, cache_bytes)


def save_decoder_pt(root, prefix_id: str, tensor: object) -> None:
    (root / prefix_id).mkdir(parents=True)
    torch.save(tensor, root / prefix_id / "decoder.pt")


@pytest.mark.parametrize("file_name", ["adapter_model.safetensors", "adapter_model.bin", "decoder.pt"])
def test_each_stored_format_loads_in_the_model_dtype(tmp_path, file_name):
    prefix = torch.randn(5, WIDTH)
    (tmp_path / "p").mkdir()
    if file_name == "adapter_model.safetensors":
        save_file({"prompt_embeddings": prefix}, tmp_path / "p" / file_name)
    elif file_name == "adapter_model.bin":
        torch.save({"prompt_embeddings": prefix}, tmp_path / "p" / file_name)
    else:
        torch.save(prefix, tmp_path / "p" / file_name)
    loaded = store_at(tmp_path).get("p").input
    assert loaded.dtype == torch.float16
    assert torch.equal(loaded, prefix.to(torch.float16))


def test_unknown_prefix_and_missing_store_are_not_found(tmp_path):
    with pytest.raises(PrefixNotFoundError, match='prefix id "nope" not found'):
        store_at(tmp_path).get("nope")
    with pytest.raises(PrefixNotFoundError, match="no PREFIX_STORE_PATH"):
        store_at(None).get("nope")


@pytest.mark.parametrize("prefix_id", ["../outside", "/etc", "a/../b", "a b", "", "a//b", "a/", "x.pt"])
def test_ids_that_could_leave_the_store_are_refused(tmp_path, prefix_id):
    with pytest.raises(InvalidPrefixError, match="invalid prefix id"):
        store_at(tmp_path / "store").get(prefix_id)


def test_a_link_out_of_the_store_is_refused(tmp_path):
    outside = tmp_path / "outside"
    save_decoder_pt(tmp_path, "outside", torch.randn(2, WIDTH))
    (tmp_path / "store").mkdir()
    (tmp_path / "store" / "linked").symlink_to(outside)
    with pytest.raises(InvalidPrefixError, match="leaves the prefix store"):
        store_at(tmp_path / "store").get("linked")


@pytest.mark.parametrize(
    ("tensor", "message"),
    [
        (torch.randn(2, 3, WIDTH), "must be 2-D"),
        (torch.randn(4, WIDTH + 1), "has width 9"),
        (torch.randn(64, WIDTH), "has length 64"),
        (torch.randn(0, WIDTH), "is empty"),
        (torch.full((2, WIDTH), float("nan")), "finite floating-point"),
        (torch.ones(2, WIDTH, dtype=torch.long), "finite floating-point"),
        ({"weights": torch.randn(2, WIDTH)}, "must hold one tensor"),
    ],
)
def test_unusable_tensors_are_refused_with_the_reason(tmp_path, tensor, message):
    save_decoder_pt(tmp_path, "bad", tensor)
    with pytest.raises(InvalidPrefixError, match=message):
        store_at(tmp_path).get("bad")


def test_unreadable_files_and_non_prompt_adapters_are_refused(tmp_path):
    (tmp_path / "garbage").mkdir()
    (tmp_path / "garbage" / "adapter_model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(InvalidPrefixError, match="could not be read"):
        store_at(tmp_path).get("garbage")
    (tmp_path / "lora").mkdir()
    save_file({"base_model.lora_A.weight": torch.randn(2, WIDTH)}, tmp_path / "lora" / "adapter_model.safetensors")
    with pytest.raises(InvalidPrefixError, match="holds no prompt_embeddings"):
        store_at(tmp_path).get("lora")


def test_cache_keeps_the_most_recently_used_prefixes_within_its_bytes(tmp_path):
    for name in ("a", "b", "c"):
        save_decoder_pt(tmp_path, name, torch.randn(4, WIDTH))
    one = 4 * WIDTH * 2  # float16 bytes of one prefix
    store = store_at(tmp_path, cache_bytes=2 * one)
    store.get("a")
    store.get("b")
    store.get("a")  # "b" is now the least recently used
    store.get("c")
    # What is cached is served without reading the disk again; "b" was let go and is read anew.
    for name in ("a", "b", "c"):
        torch.save(torch.zeros(4, WIDTH), tmp_path / name / "decoder.pt")
    assert store.get("a").input.any()
    assert store.get("c").input.any()
    assert not store.get("b").input.any()


def test_a_prefix_larger_than_the_cache_is_served_uncached(tmp_path):
    save_decoder_pt(tmp_path, "big", torch.randn(4, WIDTH))
    store = store_at(tmp_path, cache_bytes=10)
    assert store.get("big").input.shape == (4, WIDTH)
    torch.save(torch.zeros(4, WIDTH), tmp_path / "big" / "decoder.pt")
    assert not store.get("big").input.any()


def test_encoder_decoder_models_take_encoder_pt_and_decoder_pt_alone_or_together(tmp_path):
    encoder, decoder = torch.randn(3, WIDTH), torch.randn(2, WIDTH)
    for name, files in {"enc": {"encoder.pt": encoder}, "dec": {"decoder.pt": decoder}}.items():
        (tmp_path / name).mkdir()
        for file_name, tensor in files.items():
            torch.save(tensor, tmp_path / name / file_name)
    (tmp_path / "both").mkdir()
    torch.save(encoder, tmp_path / "both" / "encoder.pt")
    torch.save(decoder, tmp_path / "both" / "decoder.pt")
    seq2seq = PrefixStore(tmp_path, WIDTH, 64, torch.float32, torch.device("cpu"), 2**20, encoder_decoder=True)
    both = seq2seq.get("both")
    assert torch.equal(both.input, encoder)
    assert torch.equal(both.decoder, decoder)
    assert both.length == 5
    assert seq2seq.get("enc").decoder is None
    assert seq2seq.get("dec").input is None
    # A decoder-only model has no encoder to put encoder.pt in front of.
    with pytest.raises(InvalidPrefixError, match=r"has only encoder\.pt; this model takes decoder\.pt"):
        store_at(tmp_path).get("enc")


def test_encoder_and_decoder_prefixes_together_must_stay_below_the_sequence_limit(tmp_path):
    (tmp_path / "p").mkdir()
    torch.save(torch.randn(40, WIDTH), tmp_path / "p" / "encoder.pt")
    torch.save(torch.randn(24, WIDTH), tmp_path / "p" / "decoder.pt")
    store = PrefixStore(tmp_path, WIDTH, 64, torch.float32, torch.device("cpu"), 2**20, encoder_decoder=True)
    with pytest.raises(InvalidPrefixError, match="has length 64, which must be below 64"):
        store.get("p")


def test_values_that_overflow_the_model_dtype_are_refused(tmp_path):
    save_decoder_pt(tmp_path, "big-values", torch.full((2, WIDTH), 1e6))
    with pytest.raises(InvalidPrefixError, match=r"finite floating-point values \(in torch.float16\)"):
        store_at(tmp_path).get("big-values")


@pytest.mark.parametrize(("submodules", "rows"), [(2, 3), (1, 6)])
def test_a_peft_adapter_of_two_submodules_gives_its_first_block(tmp_path, submodules, rows):
    # PEFT's seq2seq adapters stack the encoder's virtual tokens, then the decoder's.
    stacked = torch.randn(6, WIDTH)
    (tmp_path / "p").mkdir()
    save_file({"prompt_embeddings": stacked}, tmp_path / "p" / "adapter_model.safetensors")
    config = {"num_virtual_tokens": 6 // submodules, "num_transformer_submodules": submodules}
    (tmp_path / "p" / "adapter_config.json").write_text(json.dumps(config))
    assert torch.equal(store_at(tmp_path).get("p").input, stacked[:rows].to(torch.float16))
