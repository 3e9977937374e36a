"""Checkpoints published before transformers knew Falcon: model_type RefinedWebModel (7B, old
decoder) and RefinedWeb (40B, new decoder) with their old key names, which AutoConfig refuses."""

from __future__ import annotations

import json

import pytest
from transformers import AutoConfig

from tests.support.native_checks import check_sharded_equals_transformers
from tests.support.tiny_models import build_tiny_causal_lm

# Old names of the config keys, as the RefinedWeb checkpoints wrote them.
OLD_KEYS = {"num_attention_heads": "n_head", "num_hidden_layers": "n_layer", "hidden_size": "n_embed"}


def _as_refinedweb(model_dir, model_type: str, extra: dict) -> None:
    path = model_dir / "config.json"
    config = json.loads(path.read_text())
    for new, old in OLD_KEYS.items():
        config[old] = config.pop(new)
    for key in ("new_decoder_architecture", "multi_query", "num_kv_heads", "num_ln_in_parallel_attn"):
        config.pop(key, None)
    config.update(model_type=model_type, **extra)
    path.write_text(json.dumps(config))


@pytest.mark.parametrize(
    ("model_type", "overrides", "old_extra"),
    [
        ("RefinedWebModel", {"multi_query": True, "parallel_attn": True}, {"multi_query": True}),
        (
            "RefinedWeb",
            {"new_decoder_architecture": True, "num_kv_heads": 2, "num_attention_heads": 4},
            {"n_head_kv": 2},
        ),
    ],
)
def test_refinedweb_checkpoints_serve_like_their_falcon_equivalent(tmp_path, model_type, overrides, old_extra):
    model_dir = build_tiny_causal_lm(tmp_path / model_type, arch="falcon", **overrides)
    reference_config = (model_dir / "config.json").read_text()
    _as_refinedweb(model_dir, model_type, old_extra)
    with pytest.raises((ValueError, KeyError)):
        AutoConfig.from_pretrained(model_dir)  # what made these checkpoints unservable before
    # The reference (transformers) reads the Falcon config; tgis_native reads the RefinedWeb one.
    falcon_dir = tmp_path / "falcon"
    falcon_dir.mkdir()
    for item in model_dir.iterdir():
        (falcon_dir / item.name).symlink_to(item)
    (falcon_dir / "config.json").unlink()
    (falcon_dir / "config.json").write_text(reference_config)
    check_sharded_equals_transformers(model_dir, 1, reference_dir=falcon_dir)
