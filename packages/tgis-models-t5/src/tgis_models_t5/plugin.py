"""Registers the T5 family with tgis (entry point ``tgis: t5``)."""

from __future__ import annotations

from tgis_proto.plugins import ModelFamilyRegistrar, hookimpl


@hookimpl
def tgis_register_models(register: ModelFamilyRegistrar) -> None:
    # mT5 and mT0 differ from T5 1.1 only in vocabulary and config class.
    register("t5", "tgis_models_t5.model:build", aliases=("mt5",), engines=("tgis_native",))
