from tgis_proto.plugins import ModelFamilyRegistrar, hookimpl


@hookimpl
def tgis_register_models(register: ModelFamilyRegistrar) -> None:
    register("gpt2", "tgis_models_toygpt.model:build", engines=("tgis_native",))
