"""Exporting a transformers LM to ONNX, once, for the ``hf_optimum_ort`` engine.

The route is ``torch.onnx.export`` with the dynamo exporter (``torch.export``), of the model
wrapped so that the KV cache crosses the graph's edge as plain tensors: past keys and values in,
one pair per layer, presents out; batch size, new tokens, past length and total length are
dynamic. It follows the exact modelling code of the transformers release we run, for every
architecture ``torch.export`` traces (LLaMA, GPT-2, BLOOM, T5 in the tests). The alternatives fell
short: optimum's ONNX Runtime side (optimum-onnx) pins transformers < 4.58, and onnxruntime-genai's
model builder covers some decoder architectures only and drives generation itself, where tgis
must batch requests that join and leave.

A causal LM is one graph. An encoder-decoder is three: the encoder; the decoder's first step,
which also returns the cross-attention keys and values of the encoder output; and the decoder's
later steps, which take them back (the choice between computing and reusing them is made in
Python inside transformers, so each side is traced on its own).

The export goes to ``<cache>/onnx/<model>-<hash>/`` (``export_dir``) with a small JSON file that
tells the engine the graphs' inputs and the caches' shapes; a model folder may also carry its own
under ``onnx/``.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

log = logging.getLogger(__name__)

# The graphs' interface; an export of another version is made again.
EXPORT_VERSION = 2
SPEC_FILE = "tgis_onnx.json"
CAUSAL_FILE = "model.onnx"
ENCODER_FILE = "encoder.onnx"
DECODER_INIT_FILE = "decoder_init.onnx"
DECODER_FILE = "decoder.onnx"
CAUSAL, SEQ2SEQ = "causal", "seq2seq"


class OnnxExportMissingError(Exception):
    """No ONNX export of the model was found; the message says which command makes one."""


class ExportRefusedError(Exception):
    """The model cannot be exported for hf_optimum_ort; the message says why."""


def pair_names(prefix: str, layers: int) -> list[str]:
    """A cache's tensors as graph inputs or outputs: key then value of each layer."""
    return [f"{prefix}_{kind}_{layer}" for layer in range(layers) for kind in ("key", "value")]


@dataclass(frozen=True)
class OnnxSpec:
    """What the engine needs to know of an export. Caches are [batch, heads, positions, head_dim]."""

    kind: str  # CAUSAL or SEQ2SEQ
    num_layers: int  # of the decoder
    kv_heads: int  # of the (decoder's) self-attention cache
    head_dim: int
    dtype: str
    position_ids: bool = False  # a causal LM that takes position ids (BLOOM's ALiBi does not)
    version: int = EXPORT_VERSION

    @property
    def files(self) -> tuple[str, ...]:
        return (CAUSAL_FILE,) if self.kind == CAUSAL else (ENCODER_FILE, DECODER_INIT_FILE, DECODER_FILE)

    def save(self, folder: Path) -> None:
        (folder / SPEC_FILE).write_text(json.dumps(asdict(self), indent=2))

    @classmethod
    def load(cls, folder: Path) -> OnnxSpec | None:
        """The folder's spec when its export is complete and of this version; None otherwise."""
        try:
            data = json.loads((folder / SPEC_FILE).read_text())
            spec = cls(**data) if data.get("version") == EXPORT_VERSION else None
        except (OSError, TypeError, ValueError, AttributeError):
            return None
        return spec if spec is not None and all((folder / f).is_file() for f in spec.files) else None


def export_dir(model_dir: Path, cache_dir: Path) -> Path:
    """Where the export of the model in ``model_dir`` goes in the cache."""
    digest = hashlib.sha256(str(model_dir.resolve()).encode()).hexdigest()[:12]
    return cache_dir / "onnx" / f"{model_dir.name}-{digest}"


def find_export(model_dir: Path, cache_dir: Path | None) -> tuple[Path, OnnxSpec]:
    """The folder of the model's export (its own ``onnx/``, else the cache's) and its spec."""
    candidates = [model_dir / "onnx", *([export_dir(model_dir, cache_dir)] if cache_dir is not None else [])]
    for folder in candidates:
        spec = OnnxSpec.load(folder)
        if spec is not None:
            return folder, spec
    raise OnnxExportMissingError(
        f"no ONNX export of {model_dir} (of this version of tgis): make one with "
        f"`text-generation-server convert-to-onnx {model_dir}`"
    )


def _cache(layers, config):  # type: ignore[no-untyped-def]
    """A DynamicCache holding the given (key, value) pairs."""
    from transformers import DynamicCache

    cache = DynamicCache(config=config)
    for layer, (keys, values) in enumerate(zip(layers[::2], layers[1::2], strict=True)):
        cache.update(keys, values, layer)
    return cache


def _flat(cache) -> list[torch.Tensor]:  # type: ignore[no-untyped-def]
    return [t for layer in cache.layers for t in (layer.keys, layer.values)]


class _CausalStep(torch.nn.Module):
    """A causal LM with its KV cache as tensors in and out."""

    def __init__(self, model: torch.nn.Module, position_ids: bool):
        super().__init__()
        self.model = model
        self.position_ids = position_ids

    def forward(self, input_ids, attention_mask, logits_index, *rest):  # type: ignore[no-untyped-def]
        position_ids, past = (rest[0], rest[1:]) if self.position_ids else (None, rest)
        options = {"position_ids": position_ids} if self.position_ids else {}
        # Logits of the new positions in logits_index only: usually the last (a prompt's every
        # position only for input-token details), which spares the LM head over a whole prompt.
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            past_key_values=_cache(past, self.model.config),
            logits_to_keep=logits_index,
            **options,
        )
        return (out.logits, *_flat(out.past_key_values))


class _Encoder(torch.nn.Module):
    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):  # type: ignore[no-untyped-def]
        return self.model.get_encoder()(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


class _DecoderStep(torch.nn.Module):
    """A decoder step; ``first``: no cache yet, the cross-attention keys and values are computed
    and returned; otherwise both caches come in and the self-attention one goes out."""

    def __init__(self, model: torch.nn.Module, first: bool):
        super().__init__()
        self.model = model
        self.first = first

    def forward(self, decoder_input_ids, decoder_attention_mask, encoder_hidden, encoder_mask, *caches):  # type: ignore[no-untyped-def]
        from transformers import DynamicCache, EncoderDecoderCache
        from transformers.modeling_outputs import BaseModelOutput

        config = self.model.get_decoder().config
        if self.first:
            cache = EncoderDecoderCache(DynamicCache(config=config), DynamicCache())
        else:
            half = len(caches) // 2
            cache = EncoderDecoderCache(_cache(caches[:half], config), _cache(caches[half:], None))
            for layer in range(half // 2):
                cache.is_updated[layer] = True  # the cross-attention cache is there: reuse it
        out = self.model(
            encoder_outputs=BaseModelOutput(last_hidden_state=encoder_hidden),
            attention_mask=encoder_mask,
            decoder_input_ids=decoder_input_ids,
            decoder_attention_mask=decoder_attention_mask,
            past_key_values=cache,
            use_cache=True,
        )
        presents = _flat(out.past_key_values.self_attention_cache)
        if self.first:
            presents += _flat(out.past_key_values.cross_attention_cache)
        return (out.logits, *presents)


# The exporter's optimisation passes log every rewrite at INFO: thousands of lines per graph.
_CHATTY_LOGGERS = ("onnx_ir", "onnxscript")


def _save(module: torch.nn.Module, inputs, shapes, names: tuple[list[str], list[str]], path: Path) -> None:  # type: ignore[no-untyped-def]
    for name in _CHATTY_LOGGERS:
        logging.getLogger(name).setLevel(max(logging.WARNING, logging.getLogger(name).getEffectiveLevel()))
    program = torch.onnx.export(
        module.eval(),
        tuple(inputs),
        dynamic_shapes=tuple(shapes),
        input_names=names[0],
        output_names=names[1],
        dynamo=True,
        verbose=False,
    )
    program.save(str(path))


def export(model_dir: Path, out_dir: Path, progress: Callable[[str], None] = log.info) -> Path:
    """Exports the LM in ``model_dir`` (float32) into ``out_dir``; returns ``out_dir``."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_dir, local_files_only=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    seq2seq = bool(getattr(config, "is_encoder_decoder", False))
    spec = _export_seq2seq(model_dir, out_dir, progress) if seq2seq else _export_causal(model_dir, out_dir, progress)
    spec.save(out_dir)
    progress(f"export done: {out_dir}")
    return out_dir


def _dims() -> dict[str, torch.export.Dim]:
    return {name: torch.export.Dim(name) for name in ("batch", "seq", "past", "total", "kept", "encoder")}


def _export_causal(model_dir: Path, out_dir: Path, progress: Callable[[str], None]) -> OnnxSpec:
    from transformers import AutoModelForCausalLM

    progress(f"loading {model_dir}")
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, local_files_only=True).eval()
    takes_positions = "position_ids" in inspect.signature(model.forward).parameters
    # The cache's layers and their shape, from a real forward pass rather than from config keys.
    with torch.no_grad():
        layers = model(input_ids=torch.tensor([[1, 2]]), use_cache=True).past_key_values.layers
    keys = layers[0].keys
    spec = OnnxSpec(CAUSAL, len(layers), keys.shape[1], keys.shape[3], "float32", takes_positions)
    d = _dims()
    past = [torch.zeros(2, spec.kv_heads, 4, spec.head_dim) for _ in range(2 * spec.num_layers)]
    past_shapes: list[object] = [{0: d["batch"], 2: d["past"]}] * len(past)
    input_names = ["input_ids", "attention_mask", "logits_index"]
    if takes_positions:
        past.insert(0, torch.arange(4, 7).expand(2, -1).contiguous())
        past_shapes.insert(0, {0: d["batch"], 1: d["seq"]})
        input_names.append("position_ids")
    inputs = (torch.ones(2, 3, dtype=torch.long), torch.ones(2, 7, dtype=torch.long), torch.tensor([1, 2]), *past)
    shapes = ({0: d["batch"], 1: d["seq"]}, {0: d["batch"], 1: d["total"]}, {0: d["kept"]}, tuple(past_shapes))
    names = (input_names + pair_names("past", spec.num_layers), ["logits", *pair_names("present", spec.num_layers)])
    progress(f"tracing {spec.num_layers} layers with torch.export (this takes a while)")
    _save(_CausalStep(model, takes_positions), inputs, shapes, names, out_dir / CAUSAL_FILE)
    return spec


def _export_seq2seq(model_dir: Path, out_dir: Path, progress: Callable[[str], None]) -> OnnxSpec:
    from transformers import AutoModelForSeq2SeqLM
    from transformers.modeling_outputs import BaseModelOutput

    progress(f"loading {model_dir}")
    # Eager attention: torch's ONNX decomposition of T5's SDPA path fails on symbolic shapes.
    model = AutoModelForSeq2SeqLM.from_pretrained(
        model_dir, dtype=torch.float32, local_files_only=True, attn_implementation="eager"
    ).eval()
    if getattr(model.get_decoder(), "embed_positions", None) is not None:
        # Learned absolute positions count the cache's columns: a row that joined a running batch
        # would be embedded at another row's position. hf_transformers serves these.
        raise ExportRefusedError(
            f"{type(model).__name__}: hf_optimum_ort cannot give each row of a batch its own decoder "
            "positions (learned absolute positions); serve it with DEPLOYMENT_FRAMEWORK=hf_transformers"
        )
    ids, mask = torch.ones(2, 5, dtype=torch.long), torch.ones(2, 5, dtype=torch.long)
    start = torch.zeros(2, 2, dtype=torch.long)
    with torch.no_grad():
        hidden = model.get_encoder()(input_ids=ids, attention_mask=mask).last_hidden_state
        cache = model(
            encoder_outputs=BaseModelOutput(last_hidden_state=hidden), attention_mask=mask, decoder_input_ids=start
        ).past_key_values
    self_layers, cross_layers = cache.self_attention_cache.layers, cache.cross_attention_cache.layers
    keys, cross = self_layers[0].keys, cross_layers[0].keys
    spec = OnnxSpec(SEQ2SEQ, len(self_layers), keys.shape[1], keys.shape[3], "float32")
    layers = spec.num_layers
    d = _dims()
    batch, encoder = d["batch"], d["encoder"]
    encoder_shape = {0: batch, 1: encoder}
    progress("tracing the encoder with torch.export")
    _save(
        _Encoder(model),
        (ids, mask),
        (encoder_shape, encoder_shape),
        (["input_ids", "attention_mask"], ["encoder_hidden"]),
        out_dir / ENCODER_FILE,
    )
    step_inputs = [start, torch.ones(2, 2, dtype=torch.long), hidden, mask]
    step_shapes = [{0: batch, 1: d["seq"]}, {0: batch, 1: d["total"]}, encoder_shape, encoder_shape]
    step_names = ["decoder_input_ids", "decoder_attention_mask", "encoder_hidden", "encoder_mask"]
    cross_names = pair_names("cross", layers)
    progress(f"tracing the decoder's first step ({layers} layers)")
    _save(
        _DecoderStep(model, first=True),
        step_inputs,
        step_shapes,
        (step_names, ["logits", *pair_names("present", layers), *cross_names]),
        out_dir / DECODER_INIT_FILE,
    )
    past = [torch.zeros(2, spec.kv_heads, 3, spec.head_dim) for _ in range(2 * layers)]
    cross_past = [torch.zeros(2, cross.shape[1], 5, cross.shape[3]) for _ in range(2 * layers)]
    past_shapes = [{0: batch, 2: d["past"]}] * len(past) + [{0: batch, 2: encoder}] * len(cross_past)
    progress(f"tracing the decoder's later steps ({layers} layers)")
    _save(
        _DecoderStep(model, first=False),
        [*step_inputs, *past, *cross_past],
        [*step_shapes, tuple(past_shapes)],
        (step_names + pair_names("past", layers) + cross_names, ["logits", *pair_names("present", layers)]),
        out_dir / DECODER_FILE,
    )
    return spec
