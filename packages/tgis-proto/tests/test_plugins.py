"""The plugin registry: lazy registration, aliases, clear errors, allow-list."""

from __future__ import annotations

import sys
import types

import pytest

from tgis_proto.plugins import PluginError, hookimpl, load_registry, plugin_manager, resolve

# An allow-list naming no installed plugin: these tests see only the plugins they register.
ISOLATED = "no-installed-plugin"


def _plugin_module(name: str, engines=(), models=()) -> str:
    """Registers an importable module acting as a plugin; returns its name."""
    module = types.ModuleType(name)
    if engines:

        @hookimpl
        def tgis_register_engines(register):
            for args, kwargs in engines:
                register(*args, **kwargs)

        module.tgis_register_engines = tgis_register_engines
    if models:

        @hookimpl
        def tgis_register_models(register):
            for args, kwargs in models:
                register(*args, **kwargs)

        module.tgis_register_models = tgis_register_models
    sys.modules[name] = module
    return name


def test_engines_and_model_families_are_found_by_name_and_alias():
    engine = _plugin_module(
        "fake_engine_plugin", engines=[(("native", "x.y:create"), {"aliases": ("custom",), "needs_model_family": True})]
    )
    family = _plugin_module(
        "fake_family_plugin", models=[(("falcon", "f.m:build"), {"aliases": ("RefinedWeb",), "engines": ("native",)})]
    )
    registry = load_registry(default_plugins=[("e", engine), ("f", family)], allow_list=ISOLATED)
    assert registry.engine("custom").name == "native"
    assert registry.model_family("RefinedWeb", "custom").model_type == "falcon"
    registry.check_servable("native", "falcon")


def test_unknown_engine_error_names_installed_engines():
    engine = _plugin_module("fake_engine_plugin2", engines=[(("alpha", "x.y:create"), {})])
    registry = load_registry(default_plugins=[("e", engine)], allow_list=ISOLATED)
    with pytest.raises(PluginError, match=r"unknown engine .*'beta'.*installed engines: alpha"):
        registry.engine("beta")


def test_model_type_without_plugin_is_refused_only_by_engines_that_need_one():
    engine = _plugin_module(
        "fake_engine_plugin3",
        engines=[(("native", "x:y"), {"needs_model_family": True}), (("generic", "x:z"), {})],
    )
    registry = load_registry(default_plugins=[("e", engine)], allow_list=ISOLATED)
    registry.check_servable("generic", "mamba")
    with pytest.raises(PluginError, match=r"no plugin serves model_type 'mamba'.*installed model plugins: none"):
        registry.check_servable("native", "mamba")


def test_duplicate_registration_names_both_plugins():
    a = _plugin_module("dup_a", engines=[(("same", "x:y"), {})])
    b = _plugin_module("dup_b", engines=[(("same", "x:z"), {})])
    with pytest.raises(PluginError, match="registered by both 'a' and 'b'"):
        load_registry(default_plugins=[("a", a), ("b", b)], allow_list=ISOLATED)


def test_registration_does_not_import_targets():
    engine = _plugin_module("lazy_plugin", engines=[(("lazy", "module_that_does_not_exist:create"), {})])
    registry = load_registry(default_plugins=[("e", engine)], allow_list=ISOLATED)
    assert registry.engine("lazy").target == "module_that_does_not_exist:create"
    with pytest.raises(ModuleNotFoundError):
        resolve(registry.engine("lazy").target)


def test_resolve_rejects_malformed_targets():
    with pytest.raises(PluginError, match="module:attr"):
        resolve("no_colon")
    with pytest.raises(PluginError, match="no attribute 'missing'"):
        resolve("os:missing")


def test_allow_list_skips_installed_plugins_not_listed():
    pm = plugin_manager(allow_list="only-this-one")
    assert all(name == "only-this-one" for name, _ in pm.list_name_plugin())


def test_installed_shard_plugin_registers_builtin_engine():
    pytest.importorskip("tgis_shard")
    registry = load_registry()
    assert "hf_transformers" in registry.engine_names()
