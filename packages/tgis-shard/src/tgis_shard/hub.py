"""Filling the HF cache ahead of time and converting PyTorch .bin weights to safetensors."""

from __future__ import annotations

import json
import logging
from pathlib import Path

log = logging.getLogger(__name__)


def download_weights(model_name: str, revision: str | None, extensions: str) -> Path:
    """Downloads the files of ``model_name`` whose names end with one of ``extensions``."""
    from huggingface_hub import snapshot_download

    patterns = [f"*{ext.strip()}" for ext in extensions.split(",") if ext.strip()]
    path = snapshot_download(repo_id=model_name, revision=revision, allow_patterns=patterns or None)
    return Path(path)


def convert_to_safetensors(model_dir: Path) -> list[Path]:
    """Writes a .safetensors file beside each .bin file (and an index when there are several).

    Tensors that share storage (tied embeddings) are cloned: safetensors refuses shared memory,
    and cloning keeps every name a loader may look for.
    """
    import torch
    from safetensors.torch import save_file

    bins = sorted(p for p in model_dir.glob("*.bin") if not p.name.startswith("training_args"))
    if not bins:
        raise FileNotFoundError(f"no .bin weight files in {model_dir}")
    written: list[Path] = []
    weight_map: dict[str, str] = {}
    for index, bin_file in enumerate(bins, start=1):
        state = torch.load(bin_file, map_location="cpu", weights_only=True)
        seen: set[int] = set()
        tensors: dict[str, torch.Tensor] = {}
        for name, tensor in state.items():
            storage = tensor.untyped_storage().data_ptr()
            tensors[name] = tensor.clone().contiguous() if storage in seen else tensor.contiguous()
            seen.add(storage)
        name = "model.safetensors" if len(bins) == 1 else f"model-{index:05d}-of-{len(bins):05d}.safetensors"
        target = model_dir / name
        save_file(tensors, target, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, name))
        written.append(target)
        log.info("wrote %s (%d tensors)", target, len(tensors))
    if len(bins) > 1:
        index_file = model_dir / "model.safetensors.index.json"
        index_file.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=2))
        written.append(index_file)
    return written
