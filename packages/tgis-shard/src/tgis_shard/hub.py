"""Filling the HF cache ahead of time and converting PyTorch .bin weights to safetensors."""

from __future__ import annotations

import io
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

log = logging.getLogger(__name__)


# TGIS's download-weights: the weights in safetensors, and with a single weight extension asked
# for, the files a model folder needs beside them.
DEFAULT_EXTENSIONS = ".safetensors"
META_EXTENSIONS = (".json", ".py", ".model", ".md", ".txt")
# Progress of long work where no terminal shows a bar: one log line this often.
PROGRESS_LOG_INTERVAL_S = 10.0


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
            tqdm_class=None if sys.stderr.isatty() else LoggedProgress,
        )
    )
    if convert:
        convert_to_safetensors(path)
    if auto_convert:
        from tgis_shard import model_files

        model_files.tokenizer_file(path, cache_dir)
    return path


class LoggedProgress(tqdm):
    """A progress bar for logs: where no terminal redraws a bar, one log line every
    ``PROGRESS_LOG_INTERVAL_S`` and one at the end, instead of a stream of carriage returns."""

    def __init__(self, *args: Any, **kwargs: Any):
        kwargs.update(file=io.StringIO(), mininterval=PROGRESS_LOG_INTERVAL_S, ascii=True)
        self._logged_at = time.monotonic()  # before tqdm's __init__, which displays once
        super().__init__(*args, **kwargs)

    def display(self, msg: str | None = None, pos: int | None = None) -> bool:
        now = time.monotonic()
        finished = self.total is not None and self.total > 0 and self.n >= self.total
        if now - self._logged_at >= PROGRESS_LOG_INTERVAL_S or finished:
            self._logged_at = now
            log.info("%s", self.format_meter(**self.format_dict).strip())
        return True


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
