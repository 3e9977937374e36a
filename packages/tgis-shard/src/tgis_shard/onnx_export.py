"""Exporting a transformers causal LM to ONNX, once, for the ``hf_optimum_ort`` engine.

The route is ``torch.onnx.export`` with the dynamo exporter (``torch.export``), of the model
wrapped so that the KV cache crosses the graph's edge as plain tensors: past keys and values in,
one pair per layer, presents out; batch size, new tokens, past length and total length are
dynamic. It follows the exact modelling code of the transformers release we run, for every
architecture ``torch.export`` traces (LLaMA, GPT-2, BLOOM, ... in the tests). The alternatives
fell short: optimum's ONNX Runtime side (optimum-onnx) pins transformers < 4.58, and
onnxruntime-genai's model builder covers some decoder architectures only and drives generation
itself, where tgis must batch requests that join and leave.

The export goes to ``<cache>/onnx/<model>-<hash>/`` (``export_dir``) with a small JSON file that
tells the engine the graph's inputs and the cache's shape; a model folder may also carry its
own under ``onnx/``.
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

MODEL_FILE = "model.onnx"
SPEC_FILE = "tgis_onnx.json"
# The graph's interface; an export of another version is made again.
EXPORT_VERSION = 1


class OnnxExportMissingError(Exception):
    """No ONNX export of the model was found; the message says which command makes one."""


class ExportRefusedError(Exception):
    """The model cannot be exported for hf_optimum_ort; the message says why."""


@dataclass(frozen=True)
class OnnxSpec:
    """What the engine needs to know of an exported graph."""

    num_layers: int
    kv_heads: int  # per layer, as the cache holds them: [batch, kv_heads, positions, head_dim]
    head_dim: int
    dtype: str
    position_ids: bool  # the model takes position ids (BLOOM's ALiBi does not)
    version: int = EXPORT_VERSION

    @property
    def input_names(self) -> list[str]:
        names = ["input_ids", "attention_mask", "logits_index", *(["position_ids"] if self.position_ids else [])]
        return names + [f"past_{kind}_{layer}" for layer in range(self.num_layers) for kind in ("key", "value")]

    @property
    def output_names(self) -> list[str]:
        return ["logits"] + [f"present_{kind}_{layer}" for layer in range(self.num_layers) for kind in ("key", "value")]

    def save(self, folder: Path) -> None:
        (folder / SPEC_FILE).write_text(json.dumps(asdict(self), indent=2))

    @classmethod
    def load(cls, folder: Path) -> OnnxSpec | None:
        """The folder's spec; None when it is of another version (or none)."""
        try:
            data = json.loads((folder / SPEC_FILE).read_text())
            return cls(**data) if data.get("version") == EXPORT_VERSION else None
        except (OSError, TypeError, ValueError, AttributeError):
            return None


def export_dir(model_dir: Path, cache_dir: Path) -> Path:
    """Where the export of the model in ``model_dir`` goes in the cache."""
    digest = hashlib.sha256(str(model_dir.resolve()).encode()).hexdigest()[:12]
    return cache_dir / "onnx" / f"{model_dir.name}-{digest}"


def find_export(model_dir: Path, cache_dir: Path | None) -> tuple[Path, OnnxSpec]:
    """The folder of the model's export (its own ``onnx/``, else the cache's) and its spec."""
    candidates = [model_dir / "onnx", *([export_dir(model_dir, cache_dir)] if cache_dir is not None else [])]
    for folder in candidates:
        spec = OnnxSpec.load(folder)
        if spec is not None and (folder / MODEL_FILE).is_file():
            return folder, spec
    raise OnnxExportMissingError(
        f"no ONNX export of {model_dir} (of this version of tgis): make one with "
        f"`text-generation-server convert-to-onnx {model_dir}`"
    )


class _FlatCache(torch.nn.Module):
    """The model with its KV cache as tensors in and out: what the exported graph computes."""

    def __init__(self, model: torch.nn.Module, position_ids: bool):
        super().__init__()
        self.model = model
        self.position_ids = position_ids

    def forward(self, input_ids, attention_mask, logits_index, *rest):  # type: ignore[no-untyped-def]
        from transformers import DynamicCache

        position_ids, past = (rest[0], rest[1:]) if self.position_ids else (None, rest)
        cache = DynamicCache(config=self.model.config)
        for layer in range(len(past) // 2):
            cache.update(past[2 * layer], past[2 * layer + 1], layer)
        options = {"position_ids": position_ids} if self.position_ids else {}
        # Logits of the new positions in logits_index only: usually the last (a prompt's every
        # position only for input-token details), which spares the LM head over a whole prompt.
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            past_key_values=cache,
            logits_to_keep=logits_index,
            **options,
        )
        presents = [t for layer in out.past_key_values.layers for t in (layer.keys, layer.values)]
        return (out.logits, *presents)


def export_causal_lm(model_dir: Path, out_dir: Path, progress: Callable[[str], None] = log.info) -> Path:
    """Exports the causal LM in ``model_dir`` (float32) into ``out_dir``; returns ``out_dir``."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_dir, local_files_only=True)
    if getattr(config, "is_encoder_decoder", False):
        raise ExportRefusedError(
            "hf_optimum_ort exports decoder-only models; serve encoder-decoders on hf_transformers"
        )
    progress(f"loading {model_dir}")
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, local_files_only=True).eval()
    takes_positions = "position_ids" in inspect.signature(model.forward).parameters
    # The cache's layers and their shape, from a real forward pass rather than from config keys.
    with torch.no_grad():
        layers = model(input_ids=torch.tensor([[1, 2]]), use_cache=True).past_key_values.layers
    keys = layers[0].keys
    spec = OnnxSpec(len(layers), keys.shape[1], keys.shape[3], "float32", takes_positions)
    batch, seq, past, total, kept = (torch.export.Dim(n) for n in ("batch", "seq", "past", "total", "kept"))
    rest = [torch.zeros(2, spec.kv_heads, 4, spec.head_dim) for _ in range(2 * spec.num_layers)]
    rest_shapes: list[object] = [{0: batch, 2: past}] * len(rest)
    if takes_positions:
        rest.insert(0, torch.arange(4, 7).expand(2, -1).contiguous())
        rest_shapes.insert(0, {0: batch, 1: seq})
    inputs = (torch.ones(2, 3, dtype=torch.long), torch.ones(2, 7, dtype=torch.long), torch.tensor([1, 2]), *rest)
    shapes = ({0: batch, 1: seq}, {0: batch, 1: total}, {0: kept}, tuple(rest_shapes))
    progress(f"tracing {spec.num_layers} layers with torch.export (this takes a while)")
    program = torch.onnx.export(
        _FlatCache(model, takes_positions).eval(),
        inputs,
        dynamic_shapes=shapes,
        input_names=spec.input_names,
        output_names=spec.output_names,
        dynamo=True,
        verbose=False,
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    progress(f"saving {out_dir / MODEL_FILE}")
    program.save(str(out_dir / MODEL_FILE))
    spec.save(out_dir)
    progress("export done")
    return out_dir
