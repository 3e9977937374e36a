"""Registers the Falcon family with tgis (entry point ``tgis: falcon``)."""

from __future__ import annotations

from tgis_proto.plugins import ModelFamilyRegistrar, hookimpl


@hookimpl
def tgis_register_models(register: ModelFamilyRegistrar) -> None:
    # RefinedWeb (40B) and RefinedWebModel (7B, RW) are the model_types of the checkpoints
    # published before Falcon joined transformers.
    register(
        "falcon",
        "tgis_models_falcon.model:build",
        aliases=("RefinedWeb", "RefinedWebModel"),
        engines=("tgis_native",),
    )
