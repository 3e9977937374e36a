"""The built-in engines, registered like any third-party plugin (torch-free)."""

from __future__ import annotations

from tgis_proto.plugins import EngineRegistrar, hookimpl

BUILTIN_PLUGIN = ("tgis-shard", "tgis_shard.plugin")


@hookimpl
def tgis_register_engines(register: EngineRegistrar) -> None:
    register(
        "hf_transformers",
        "tgis_shard.engines.hf_transformers:create_engine",
        description="any transformers causal or encoder-decoder LM, on one GPU or the CPU",
    )
    register(
        "hf_optimum_bt",
        "tgis_shard.engines.hf_transformers:create_sdpa_engine",
        description="hf_transformers with fused SDPA attention required (what BetterTransformer became)",
    )
    register(
        "hf_optimum_ort",
        "tgis_shard.engines.onnx_runtime:create_engine",
        description="a transformers causal LM exported to ONNX (convert-to-onnx), on ONNX Runtime",
    )
    register(
        "tgis_native",
        "tgis_shard.engines.tgis_native:create_engine",
        aliases=("hf_custom_tp",),
        needs_model_family=True,
        description="model-family plugins, tensor parallel, paged KV cache (safetensors only)",
    )
