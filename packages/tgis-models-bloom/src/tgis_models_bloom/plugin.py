"""Registers the BLOOM family with tgis (entry point ``tgis: bloom``)."""

from __future__ import annotations

from tgis_proto.plugins import ModelFamilyRegistrar, hookimpl


@hookimpl
def tgis_register_models(register: ModelFamilyRegistrar) -> None:
    register("bloom", "tgis_models_bloom.model:build", engines=("tgis_native",))
