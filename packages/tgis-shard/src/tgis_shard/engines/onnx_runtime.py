"""The ``hf_optimum_ort`` engine: a transformers LM exported to ONNX (``tgis_shard.onnx_export``)
and run by ONNX Runtime, with the padded batches of ``hf_transformers``.

The exported graphs take the past keys and values of every layer and return the presents, so the
engine keeps them in the same transformers caches (``DynamicCache``, and ``EncoderDecoderCache``
for encoder-decoders) the transformers engines batch: requests join and leave exactly as there,
and every TGIS parameter and token detail works the same way. The adapters below stand in for the
transformers model behind the part of its interface those engines call. Prompt prefixes are not
served: the graphs embed token ids themselves.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from transformers import AutoConfig, DynamicCache, EncoderDecoderCache, GenerationConfig, PretrainedConfig
from transformers.modeling_outputs import BaseModelOutput

from tgis_shard.engines.base import Engine, ShardContext, UnsupportedModelError
from tgis_shard.engines.hf_transformers import CausalLMEngine, eos_token_ids
from tgis_shard.engines.seq2seq import Seq2SeqLMEngine
from tgis_shard.onnx_export import (
    CAUSAL,
    CAUSAL_FILE,
    DECODER_FILE,
    DECODER_INIT_FILE,
    ENCODER_FILE,
    OnnxExportMissingError,
    OnnxSpec,
    find_export,
    pair_names,
)
from tgis_shard.prefixes import PrefixesUnsupportedError, PromptPrefix

ENGINE = "hf_optimum_ort"


@dataclass(frozen=True)
class _Output:
    logits: torch.Tensor


def _numpy(tensor: torch.Tensor) -> np.ndarray:
    return tensor.detach().cpu().contiguous().numpy()


def _cache_feeds(cache: DynamicCache, prefix: str, layers: int, empty: np.ndarray) -> dict[str, np.ndarray]:
    """A cache's layers as graph inputs; layers not filled yet are empty."""
    feeds = {}
    names = iter(pair_names(prefix, layers))
    for layer in range(layers):
        held = cache.layers[layer] if layer < len(cache.layers) else None
        filled = held is not None and held.keys is not None
        feeds[next(names)] = _numpy(held.keys) if filled else empty
        feeds[next(names)] = _numpy(held.values) if filled else empty
    return feeds


def _store(cache: DynamicCache, tensors: list[np.ndarray]) -> None:
    """Replaces the cache's layers by the graph's outputs (key then value per layer)."""
    for layer, (keys, values) in enumerate(zip(tensors[::2], tensors[1::2], strict=True)):
        keys_t, values_t = torch.from_numpy(keys), torch.from_numpy(values)
        if layer < len(cache.layers) and cache.layers[layer].keys is not None:
            cache.layers[layer].keys, cache.layers[layer].values = keys_t, values_t
        else:
            cache.update(keys_t, values_t, layer)


def _is_empty(cache: DynamicCache) -> bool:
    return not cache.layers or cache.layers[0].keys is None or cache.layers[0].keys.numel() == 0


class OrtCausalLM:
    """An exported causal LM as the padded causal engine uses a transformers one: ``forward``
    over a ``DynamicCache``, whose layers it replaces with the session's presents."""

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
        logits_to_keep: int | torch.Tensor = 0,
    ) -> _Output:
        """``logits_to_keep``: logits of the last this many positions (0: of every position), or
        of the positions a tensor lists, as transformers' models take it."""
        cache = past_key_values if past_key_values is not None else DynamicCache(config=self.config)
        batch, new = input_ids.shape
        empty = np.zeros((batch, self.spec.kv_heads, 0, self.spec.head_dim), dtype=np.float32)
        if isinstance(logits_to_keep, torch.Tensor):
            kept = _numpy(logits_to_keep).astype(np.int64)
        else:
            kept = np.arange(new - logits_to_keep if 0 < logits_to_keep <= new else 0, new, dtype=np.int64)
        feeds = {"input_ids": _numpy(input_ids), "attention_mask": _numpy(attention_mask), "logits_index": kept}
        if self.spec.position_ids:
            if position_ids is None:
                position_ids = (attention_mask.cumsum(dim=1) - 1).clamp(min=0)[:, -input_ids.shape[1] :]
            feeds["position_ids"] = _numpy(position_ids)
        feeds |= _cache_feeds(cache, "past", self.spec.num_layers, empty)
        logits, *presents = self.session.run(None, feeds)  # type: ignore[attr-defined]
        _store(cache, presents)
        return _Output(torch.from_numpy(logits))

    __call__ = forward

    def get_input_embeddings(self) -> None:
        return None  # inside the graph


class _OrtEncoder:
    def __init__(self, session: object):
        self.session = session

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> BaseModelOutput:
        feeds = {"input_ids": _numpy(input_ids), "attention_mask": _numpy(attention_mask)}
        (hidden,) = self.session.run(None, feeds)  # type: ignore[attr-defined]
        return BaseModelOutput(last_hidden_state=torch.from_numpy(hidden))

    __call__ = forward


@dataclass(frozen=True)
class _OrtDecoder:
    config: PretrainedConfig  # what the engine sizes the self-attention cache from


class OrtSeq2SeqLM:
    """An exported encoder-decoder as the padded seq2seq engine uses a transformers one. A step
    with an empty cross-attention cache runs the decoder's first-step graph, which fills it."""

    def __init__(self, sessions: dict[str, object], spec: OnnxSpec, config: PretrainedConfig, generation: object):
        self.spec = spec
        self.config = config
        self.generation_config = generation
        self._encoder = _OrtEncoder(sessions[ENCODER_FILE])
        self._first_step = sessions[DECODER_INIT_FILE]
        self._next_step = sessions[DECODER_FILE]
        decoder_config = copy.deepcopy(config)
        decoder_config.is_decoder = True
        decoder_config.num_hidden_layers = spec.num_layers  # T5's top-level count is the encoder's
        self._decoder = _OrtDecoder(decoder_config)

    def get_encoder(self) -> _OrtEncoder:
        return self._encoder

    def get_decoder(self) -> _OrtDecoder:
        return self._decoder

    def get_input_embeddings(self) -> None:
        return None  # inside the graphs

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        encoder_outputs: BaseModelOutput | None = None,
        decoder_input_ids: torch.Tensor | None = None,
        decoder_attention_mask: torch.Tensor | None = None,
        past_key_values: EncoderDecoderCache | None = None,
        use_cache: bool = True,
    ) -> _Output:
        if decoder_input_ids is None:
            raise ValueError(f"{ENGINE} decodes from decoder_input_ids (its graphs embed ids)")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if encoder_outputs is None:
            encoder_outputs = self._encoder(input_ids=input_ids, attention_mask=attention_mask)
        if decoder_attention_mask is None:
            decoder_attention_mask = torch.ones_like(decoder_input_ids)
        cache = past_key_values
        if cache is None:
            cache = EncoderDecoderCache(DynamicCache(config=self._decoder.config), DynamicCache())
        feeds = {
            "decoder_input_ids": _numpy(decoder_input_ids),
            "decoder_attention_mask": _numpy(decoder_attention_mask),
            "encoder_hidden": _numpy(encoder_outputs.last_hidden_state),
            "encoder_mask": _numpy(attention_mask),
        }
        layers = self.spec.num_layers
        if _is_empty(cache.cross_attention_cache):
            logits, *outputs = self._first_step.run(None, feeds)  # type: ignore[attr-defined]
            _store(cache.self_attention_cache, outputs[: 2 * layers])
            _store(cache.cross_attention_cache, outputs[2 * layers :])
        else:
            empty = np.zeros((len(decoder_input_ids), self.spec.kv_heads, 0, self.spec.head_dim), dtype=np.float32)
            feeds |= _cache_feeds(cache.self_attention_cache, "past", layers, empty)
            feeds |= _cache_feeds(cache.cross_attention_cache, "cross", layers, empty)
            logits, *outputs = self._next_step.run(None, feeds)  # type: ignore[attr-defined]
            _store(cache.self_attention_cache, outputs)
        return _Output(torch.from_numpy(logits))

    __call__ = forward


class _OrtEngine:
    """What the ONNX Runtime engines do differently from the transformers ones they build on."""

    # The session returns each step's whole cache as new arrays: there is nothing to append to.
    cache_room_tokens = 0
    # The graph is ONNX Runtime's to optimise; torch.compile has nothing to compile.
    pt2_compile = False

    def prompt_prefix(self, prefix_id: str) -> PromptPrefix:
        raise PrefixesUnsupportedError(f"the {ENGINE} engine does not support prompt prefixes (its graphs embed ids)")


class OrtCausalLMEngine(_OrtEngine, CausalLMEngine):
    pass


class OrtSeq2SeqLMEngine(_OrtEngine, Seq2SeqLMEngine):
    pass


def _session(path: Path, ctx: ShardContext) -> object:
    import onnxruntime as ort

    options = ort.SessionOptions()
    # The shard's thread budget (TGIS_TORCH_THREADS) holds for ONNX Runtime too.
    options.intra_op_num_threads = torch.get_num_threads()
    options.inter_op_num_threads = 1
    providers: list[object] = ["CPUExecutionProvider"]
    if ctx.device.type == "cuda":
        providers.insert(0, ("CUDAExecutionProvider", {"device_id": ctx.device.index or 0}))
    return ort.InferenceSession(str(path), options, providers=providers)


def create_engine(ctx: ShardContext) -> Engine:
    """Loads the model's ONNX export (``convert-to-onnx`` makes it) into ONNX Runtime sessions."""
    if ctx.world_size != 1:
        raise UnsupportedModelError(f"{ENGINE} runs on one device; use DEPLOYMENT_FRAMEWORK=tgis_native to shard")
    if ctx.dtype != torch.float32:
        raise UnsupportedModelError(f"{ENGINE} runs float32 exports; set DTYPE_STR=float32")
    config = AutoConfig.from_pretrained(ctx.model_dir, local_files_only=True)
    try:
        folder, spec = find_export(ctx.model_dir, ctx.cache_dir)
    except OnnxExportMissingError as e:
        raise UnsupportedModelError(str(e)) from None
    eos = eos_token_ids(ctx.model_dir, config)
    if spec.kind == CAUSAL:
        model = OrtCausalLM(_session(folder / CAUSAL_FILE, ctx), spec, config)
        return OrtCausalLMEngine(model, ctx, eos, engine=ENGINE)  # type: ignore[arg-type]
    try:
        generation = GenerationConfig.from_pretrained(ctx.model_dir, local_files_only=True)
    except OSError:
        generation = GenerationConfig.from_model_config(config)
    sessions = {name: _session(folder / name, ctx) for name in spec.files}
    seq2seq = OrtSeq2SeqLM(sessions, spec, config, generation)
    return OrtSeq2SeqLMEngine(seq2seq, ctx, eos, engine=ENGINE)  # type: ignore[arg-type]
