"""Filling the HF cache ahead of time and converting PyTorch .bin weights to safetensors."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from tgis_shard.progress import progress, progress_class

log = logging.getLogger(__name__)


# TGIS's download-weights: the weights in safetensors, and with a single weight extension asked
# for, the files a model folder needs beside them.
DEFAULT_EXTENSIONS = ".safetensors"
META_EXTENSIONS = (".json", ".py", ".model", ".md", ".txt")


def download_weights(
    model_name: str, revision: str | None, extensions: str, cache_dir: Path, auto_convert: bool = True
) -> Path:
    """Fills the HF cache with the files of ``model_name`` ending in ``extensions``; with
    ``auto_convert``, a model without safetensors on the hub has its .bin weights fetched and
    converted, and one without a fast tokenizer gets one written (``model_files.tokenizer_file``)."""
    from huggingface_hub import HfApi, snapshot_download

    wanted = [e.strip() for e in extensions.split(",") if e.strip()]
    if len(wanted) == 1 and wanted[0] not in META_EXTENSIONS:
        wanted += META_EXTENSIONS
    on_hub = HfApi().list_repo_files(model_name, revision=revision)
    convert = (
        auto_convert
        and ".safetensors" in wanted
        and not any(f.endswith(".safetensors") for f in on_hub)
        and any(f.endswith(".bin") for f in on_hub)
    )
    if convert:
        log.info("%s has no .safetensors weights: downloading its .bin weights to convert them", model_name)
        wanted.append(".bin")
    log.info("downloading %s (%s)", model_name, ", ".join(wanted))
    path = Path(
        snapshot_download(
            repo_id=model_name,
            revision=revision,
            allow_patterns=[f"*{e}" for e in wanted],
            tqdm_class=progress_class(),
        )
    )
    if convert:
        convert_to_safetensors(path)
    if auto_convert:
        from tgis_shard import model_files

        model_files.tokenizer_file(path, cache_dir)
    return path


def convert_to_safetensors(model_dir: Path) -> list[Path]:
    """Writes a .safetensors file beside each .bin file (and an index when there are several).

    Tensors that share storage (tied embeddings) are cloned: safetensors refuses shared memory,
    and cloning keeps every name a loader may look for.
    """
    bins = sorted(p for p in model_dir.glob("*.bin") if not p.name.startswith("training_args"))
    if not bins:
        raise FileNotFoundError(f"no .bin weight files in {model_dir}")
    written: list[Path] = []
    weight_map: dict[str, str] = {}
    size = sum(p.stat().st_size for p in bins)
    with progress(size, f"converting {model_dir.name} to safetensors", unit="B") as bar:
        for index, bin_file in enumerate(bins, start=1):
            written.append(_convert_one(bin_file, index, len(bins), weight_map))
            bar.update(bin_file.stat().st_size)
    if len(bins) > 1:
        index_file = model_dir / "model.safetensors.index.json"
        index_file.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=2))
        written.append(index_file)
    return written


def _convert_one(bin_file: Path, index: int, count: int, weight_map: dict[str, str]) -> Path:
    """One .bin file's tensors as the ``index``-th of ``count`` safetensors files beside it."""
    import torch
    from safetensors.torch import save_file

    state = torch.load(bin_file, map_location="cpu", weights_only=True)
    seen: set[int] = set()
    tensors: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        storage = tensor.untyped_storage().data_ptr()
        tensors[name] = tensor.clone().contiguous() if storage in seen else tensor.contiguous()
        seen.add(storage)
    name = "model.safetensors" if count == 1 else f"model-{index:05d}-of-{count:05d}.safetensors"
    target = bin_file.parent / name
    save_file(tensors, target, metadata={"format": "pt"})
    weight_map.update(dict.fromkeys(tensors, name))
    log.info("wrote %s (%d tensors)", target, len(tensors))
    return target
