"""Without DEPLOYMENT_FRAMEWORK the launcher takes tgis_native where a family plugin serves the
model and a GPU (or tensor parallelism) runs it, hf_transformers elsewhere, and says why."""

from __future__ import annotations

import pytest

from tgis_proto.plugins import load_registry
from tgis_router.launcher import choose_engine


@pytest.fixture(scope="module")
def registry():
    return load_registry()


def test_an_explicit_deployment_framework_always_wins(registry):
    assert choose_engine("hf_transformers", registry, "llama", cuda_devices=8, shards=1) == (
        "hf_transformers",
        "DEPLOYMENT_FRAMEWORK=hf_transformers",
    )


def test_a_model_a_family_serves_runs_on_tgis_native_on_a_gpu(registry):
    engine, why = choose_engine(None, registry, "llama", cuda_devices=1, shards=1)
    assert engine == "tgis_native"
    assert why == "tgis_native: 1 GPU(s), and the llama plugin serves model_type 'llama'"


def test_without_a_gpu_it_runs_on_hf_transformers_unless_sharded(registry):
    engine, why = choose_engine(None, registry, "falcon", cuda_devices=0, shards=1)
    assert engine == "hf_transformers"
    assert why.startswith("hf_transformers: no GPU")
    engine, why = choose_engine(None, registry, "falcon", cuda_devices=0, shards=2)
    assert (engine, why.split(",")[0]) == ("tgis_native", "tgis_native: tensor parallelism over 2 shards")


def test_a_model_no_family_serves_runs_on_hf_transformers_even_on_a_gpu(registry):
    assert choose_engine(None, registry, "gpt2", cuda_devices=4, shards=1) == (
        "hf_transformers",
        "hf_transformers: no installed tgis_native plugin serves model_type 'gpt2'",
    )
