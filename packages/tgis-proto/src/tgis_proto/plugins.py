"""The plugin manager and the registry of engines and model families it fills.

Every process (launcher, each shard rank) builds its own registry from entry points: state
registered at runtime in one process is never seen by another.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import Any, Protocol

import pluggy

from tgis_proto import hookspecs

ENTRY_POINT_GROUP = "tgis"
hookimpl = pluggy.HookimplMarker("tgis")


class PluginError(Exception):
    """A plugin, engine or model family is missing, duplicated or broken."""


class EngineRegistrar(Protocol):
    def __call__(
        self,
        name: str,
        target: str,
        *,
        aliases: Sequence[str] = (),
        needs_model_family: bool = False,
        description: str = "",
    ) -> None: ...


class ModelFamilyRegistrar(Protocol):
    def __call__(
        self,
        model_type: str,
        target: str,
        *,
        aliases: Sequence[str] = (),
        engines: Sequence[str] = ("tgis_native",),
    ) -> None: ...


@dataclass(frozen=True)
class EngineEntry:
    name: str
    target: str
    plugin: str
    aliases: tuple[str, ...] = ()
    needs_model_family: bool = False
    description: str = ""


@dataclass(frozen=True)
class ModelFamilyEntry:
    model_type: str
    target: str
    plugin: str
    aliases: tuple[str, ...] = ()
    engines: tuple[str, ...] = ("tgis_native",)


def resolve(target: str) -> Any:
    """Imports ``"module:attr"`` and returns the attribute."""
    module_name, sep, attr = target.partition(":")
    if not sep or not module_name or not attr:
        raise PluginError(f"plugin target {target!r} is not of the form 'module:attr'")
    module = importlib.import_module(module_name)
    try:
        return getattr(module, attr)
    except AttributeError as e:
        raise PluginError(f"plugin target {target!r}: module has no attribute {attr!r}") from e


@dataclass
class Registry:
    """Engines and model families by name and alias, with the plugins they came from."""

    plugins: list[str] = field(default_factory=list)
    engines: dict[str, EngineEntry] = field(default_factory=dict)
    model_families: dict[str, ModelFamilyEntry] = field(default_factory=dict)

    def engine_names(self) -> list[str]:
        return sorted({e.name for e in self.engines.values()})

    def model_types(self) -> list[str]:
        return sorted(self.model_families)

    def engine(self, name: str) -> EngineEntry:
        """The engine registered under ``name`` or one of its aliases."""
        try:
            return self.engines[name]
        except KeyError:
            installed = ", ".join(self.engine_names()) or "none"
            raise PluginError(
                f"unknown engine (DEPLOYMENT_FRAMEWORK) {name!r}; installed engines: {installed}"
            ) from None

    def model_family(self, model_type: str, engine: str) -> ModelFamilyEntry:
        """The family serving ``model_type`` on ``engine``, with an error naming what exists."""
        entry = self.model_families.get(model_type)
        canonical = self.engine(engine).name
        if entry is None or canonical not in entry.engines:
            served = [f"{t} ({e.plugin})" for t, e in sorted(self.model_families.items()) if canonical in e.engines]
            raise PluginError(
                f"no plugin serves model_type {model_type!r} on engine {canonical!r}; "
                f"installed model plugins: {', '.join(served) or 'none'} "
                f"(pip install tgis-models-<family>)"
            )
        return entry

    def check_servable(self, engine: str, model_type: str) -> None:
        """Raises PluginError unless ``engine`` exists and can run ``model_type``."""
        if self.engine(engine).needs_model_family:
            self.model_family(model_type, engine)

    def _add_engine(self, plugin: str, entry: EngineEntry) -> None:
        for key in (entry.name, *entry.aliases):
            if key in self.engines:
                raise PluginError(f"engine {key!r} registered by both {self.engines[key].plugin!r} and {plugin!r}")
            self.engines[key] = entry

    def _add_model_family(self, plugin: str, entry: ModelFamilyEntry) -> None:
        for key in (entry.model_type, *entry.aliases):
            if key in self.model_families:
                other = self.model_families[key].plugin
                raise PluginError(f"model_type {key!r} registered by both {other!r} and {plugin!r}")
            self.model_families[key] = entry


def _allowed(allow_list: str | None) -> set[str] | None:
    if allow_list is None or not allow_list.strip():
        return None
    return {name.strip() for name in allow_list.split(",") if name.strip()}


def plugin_manager(
    default_plugins: Iterable[tuple[str, str]] = (), allow_list: str | None = None
) -> pluggy.PluginManager:
    """A manager with the built-in ``(name, module)`` plugins, then the installed ones.

    ``allow_list`` (env TGIS_PLUGINS) is a comma-separated list of entry-point names; when set,
    other installed plugins are not loaded. Built-in plugins always load.
    """
    pm = pluggy.PluginManager("tgis")
    pm.add_hookspecs(hookspecs)
    for name, module in default_plugins:
        pm.register(importlib.import_module(module), name=name)
    allowed = _allowed(allow_list)
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if pm.get_plugin(ep.name) is not None or (allowed is not None and ep.name not in allowed):
            continue
        try:
            pm.register(ep.load(), name=ep.name)
        except Exception as e:  # a broken third-party plugin must be named, not a traceback
            raise PluginError(f"cannot load tgis plugin {ep.name!r} ({ep.value}): {e}") from e
    return pm


def _register_engine(
    registry: Registry,
    plugin: str,
    name: str,
    target: str,
    *,
    aliases: Sequence[str] = (),
    needs_model_family: bool = False,
    description: str = "",
) -> None:
    registry._add_engine(plugin, EngineEntry(name, target, plugin, tuple(aliases), needs_model_family, description))


def _register_model_family(
    registry: Registry,
    plugin: str,
    model_type: str,
    target: str,
    *,
    aliases: Sequence[str] = (),
    engines: Sequence[str] = ("tgis_native",),
) -> None:
    registry._add_model_family(plugin, ModelFamilyEntry(model_type, target, plugin, tuple(aliases), tuple(engines)))


def load_registry(default_plugins: Iterable[tuple[str, str]] = (), allow_list: str | None = None) -> Registry:
    """Builds the registry by calling every plugin's registration hooks."""
    pm = plugin_manager(default_plugins, allow_list)
    registry = Registry(plugins=[name for name, _ in pm.list_name_plugin()])
    # Each hook implementation gets a register callback that knows which plugin is calling.
    for impl in pm.hook.tgis_register_engines.get_hookimpls():
        impl.function(register=functools.partial(_register_engine, registry, impl.plugin_name))
    for impl in pm.hook.tgis_register_models.get_hookimpls():
        impl.function(register=functools.partial(_register_model_family, registry, impl.plugin_name))
    return registry
