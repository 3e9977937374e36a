"""Registers the LLaMA family with tgis (entry point ``tgis: llama``)."""

from __future__ import annotations

from tgis_proto.plugins import ModelFamilyRegistrar, hookimpl


@hookimpl
def tgis_register_models(register: ModelFamilyRegistrar) -> None:
    register("llama", "tgis_models_llama.model:build", engines=("tgis_native",))
