"""The tgis plugin hooks: this module is the plugin author's manual.

A plugin is a module with functions decorated by :data:`tgis_proto.plugins.hookimpl`, exposed
through the ``tgis`` entry-point group::

    [project.entry-points.tgis]
    foo = "tgis_models_foo.plugin"

Hooks receive a ``register`` callback and register names with ``"module:attr"`` targets. Targets
are imported only when used, so listing plugins never imports torch or model code.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    from tgis_proto.plugins import EngineRegistrar, ModelFamilyRegistrar

hookspec = pluggy.HookspecMarker("tgis")


@hookspec
def tgis_register_engines(register: EngineRegistrar) -> None:
    """Register inference engines (the code that runs a model inside a shard).

    Call ``register(name, "module:attr", aliases=(), needs_model_family=False, description="")``.
    The target is a callable ``(ShardContext) -> Engine`` (see ``tgis_shard.engines``).
    ``needs_model_family=True`` means the engine only runs model types registered through
    :func:`tgis_register_models`, and the launcher refuses other models before starting shards.
    """


@hookspec
def tgis_register_models(register: ModelFamilyRegistrar) -> None:
    """Register model families, keyed by the ``model_type`` of a model's ``config.json``.

    Call ``register(model_type, "module:attr", aliases=(), engines=("tgis_native",))``.
    ``aliases`` are further ``model_type`` values served by the same code (for example
    ``RefinedWeb`` for ``falcon``). The target is the family's entry point for the listed
    engines. For ``tgis_native`` it is ``build(config, weights, tp)`` returning this rank's model,
    which meets ``tgis_shard.families.NativeCausalLM``: ``num_layers``, ``num_heads``,
    ``num_kv_heads`` and ``head_dim`` (this rank's), ``uses_alibi``; ``forward(input_ids,
    positions, cache, meta)`` running one ragged step through every layer and returning the last
    hidden states; ``compute_logits(hidden)``
    (final norm and LM head) for the rows the engine chooses. A family that serves prompt prefixes
    mixes in ``tgis_shard.families.SupportsPromptPrefixes``: its ``forward`` also takes
    ``embedding_overrides`` (``tgis_shard.layers.embedding.embed`` applies them after the word
    embedding) and it says ``hidden_size``; other families' requests naming a prefix are refused
    and everything else is served.
    """
