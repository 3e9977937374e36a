"""The ``hf_optimum_ort`` engine: a transformers causal LM exported to ONNX (``tgis_shard.onnx_export``)
and run by ONNX Runtime, with the padded batches of ``hf_transformers``.

The exported graph takes the past keys and values of every layer and returns the presents, so the
engine keeps them in the same ``DynamicCache`` the transformers engine batches: requests join and
leave exactly as there, and every TGIS parameter and token detail works the same way. Prompt
prefixes are not served: the graph embeds token ids itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from transformers import AutoConfig, DynamicCache, PretrainedConfig

from tgis_shard.engines.base import Engine, ShardContext, UnsupportedModelError
from tgis_shard.engines.hf_transformers import CausalLMEngine, eos_token_ids
from tgis_shard.onnx_export import MODEL_FILE, OnnxExportMissingError, OnnxSpec, find_export
from tgis_shard.prefixes import PrefixesUnsupportedError, PromptPrefix

ENGINE = "hf_optimum_ort"


@dataclass(frozen=True)
class _Output:
    logits: torch.Tensor


class OrtCausalLM:
    """An exported causal LM behind the part of a transformers model's interface that the padded
    causal engine uses: ``forward`` over a ``DynamicCache``, whose layers it replaces with the
    session's presents."""

    def __init__(self, session: object, spec: OnnxSpec, config: PretrainedConfig):
        self.session = session
        self.spec = spec
        self.config = config

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        past_key_values: DynamicCache | None = None,
        use_cache: bool = True,
        logits_to_keep: int = 0,
    ) -> _Output:
        """``logits_to_keep``: logits of the last this many positions; 0, of every position."""
        cache = past_key_values if past_key_values is not None else DynamicCache(config=self.config)
        batch, new = input_ids.shape
        empty = np.zeros((batch, self.spec.kv_heads, 0, self.spec.head_dim), dtype=np.float32)
        kept = np.arange(new - logits_to_keep if 0 < logits_to_keep <= new else 0, new, dtype=np.int64)
        feeds = {"input_ids": _numpy(input_ids), "attention_mask": _numpy(attention_mask), "logits_index": kept}
        if self.spec.position_ids:
            if position_ids is None:
                position_ids = (attention_mask.cumsum(dim=1) - 1).clamp(min=0)[:, -input_ids.shape[1] :]
            feeds["position_ids"] = _numpy(position_ids)
        layers = cache.layers
        for layer in range(self.spec.num_layers):
            keys = layers[layer].keys if layer < len(layers) else None
            values = layers[layer].values if layer < len(layers) else None
            feeds[f"past_key_{layer}"] = empty if keys is None else _numpy(keys)
            feeds[f"past_value_{layer}"] = empty if values is None else _numpy(values)
        logits, *presents = self.session.run(None, feeds)  # type: ignore[attr-defined]
        for layer in range(self.spec.num_layers):
            keys, values = torch.from_numpy(presents[2 * layer]), torch.from_numpy(presents[2 * layer + 1])
            if layer < len(layers) and layers[layer].keys is not None:
                layers[layer].keys, layers[layer].values = keys, values
            else:
                cache.update(keys, values, layer)
        return _Output(torch.from_numpy(logits))

    __call__ = forward

    def get_input_embeddings(self) -> None:
        return None  # inside the graph


def _numpy(tensor: torch.Tensor) -> np.ndarray:
    return tensor.detach().cpu().contiguous().numpy()


class OrtCausalLMEngine(CausalLMEngine):
    def prompt_prefix(self, prefix_id: str) -> PromptPrefix:
        raise PrefixesUnsupportedError(f"the {ENGINE} engine does not support prompt prefixes (its graph embeds ids)")


def _session(folder: Path, ctx: ShardContext) -> object:
    import onnxruntime as ort

    options = ort.SessionOptions()
    # The shard's thread budget (TGIS_TORCH_THREADS) holds for ONNX Runtime too.
    options.intra_op_num_threads = torch.get_num_threads()
    options.inter_op_num_threads = 1
    providers = ["CPUExecutionProvider"]
    if ctx.device.type == "cuda":
        providers.insert(0, ("CUDAExecutionProvider", {"device_id": ctx.device.index or 0}))
    return ort.InferenceSession(str(folder / MODEL_FILE), options, providers=providers)


def create_engine(ctx: ShardContext) -> Engine:
    """Loads the model's ONNX export (``convert-to-onnx`` makes it) into an ONNX Runtime session."""
    if ctx.world_size != 1:
        raise UnsupportedModelError(f"{ENGINE} runs on one device; use DEPLOYMENT_FRAMEWORK=tgis_native to shard")
    config = AutoConfig.from_pretrained(ctx.model_dir, local_files_only=True)
    if getattr(config, "is_encoder_decoder", False):
        raise UnsupportedModelError(f"{ENGINE} serves decoder-only models; run encoder-decoders on hf_transformers")
    if ctx.dtype != torch.float32:
        raise UnsupportedModelError(f"{ENGINE} runs float32 exports; set DTYPE_STR=float32")
    try:
        folder, spec = find_export(ctx.model_dir, ctx.cache_dir)
    except OnnxExportMissingError as e:
        raise UnsupportedModelError(str(e)) from None
    model = OrtCausalLM(_session(folder, ctx), spec, config)
    return OrtCausalLMEngine(model, ctx, eos_token_ids(ctx.model_dir, config), engine=ENGINE)  # type: ignore[arg-type]
