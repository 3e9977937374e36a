"""The shard's view of the plugin registry: built-ins first, then installed plugins."""

from __future__ import annotations

from tgis_proto.plugins import Registry, load_registry
from tgis_shard.plugin import BUILTIN_PLUGIN


def shard_registry(allow_list: str | None) -> Registry:
    """Every process loads plugins itself; ``allow_list`` (TGIS_PLUGINS) restricts installed ones."""
    return load_registry(default_plugins=[BUILTIN_PLUGIN], allow_list=allow_list)
