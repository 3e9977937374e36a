"""Reading a model's safetensors weights, each rank only its own tensor-parallel slice.

Files are memory-mapped and read tensor by tensor (slice by slice for sharded weights), so a rank
of a large model never holds another rank's part nor a whole file in memory.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

import torch
from safetensors import safe_open

from tgis_shard.layers.distributed import TensorParallel
from tgis_shard.progress import progress


class WeightsError(Exception):
    """A model's weights cannot be read as asked: missing files or tensors, or a shape that does not shard."""


class Weights:
    """Name → tensor access to the safetensors files of one model folder, sliced for ``tp``'s rank.

    ``aliases`` maps a wanted name to stand-ins tried in order, e.g. a tied ``lm_head.weight`` that
    is stored only as ``model.embed_tokens.weight``. Floating-point tensors come back as ``dtype``;
    every tensor comes back on ``device``.
    """

    def __init__(
        self,
        model_dir: Path,
        tp: TensorParallel,
        dtype: torch.dtype,
        device: torch.device,
        aliases: dict[str, list[str]] | None = None,
    ) -> None:
        self.model_dir = Path(model_dir)
        self.tp = tp
        self.dtype = dtype
        self.device = device
        self.aliases = {name: list(others) for name, others in (aliases or {}).items()}
        self._handles: dict[Path, safe_open] = {}
        self._files = self._weight_map()
        # Rank 0 speaks for all: every rank reads the same tensors (its slices of them).
        self._progress = progress(len(self._files), f"loading {self.model_dir.name}", "tensors", disable=tp.rank != 0)

    def __enter__(self) -> Weights:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        """Unmaps the open files; a later read opens them again."""
        handles, self._handles = self._handles, {}
        for handle in handles.values():
            handle.__exit__(None, None, None)
        self._progress.close()

    def has(self, name: str) -> bool:
        """Whether ``name`` or one of its aliases is stored (optional weights such as biases)."""
        return any(candidate in self._files for candidate in self._candidates(name))

    def get(self, name: str) -> torch.Tensor:
        """The whole tensor, for weights every rank keeps a copy of (norms, row-parallel biases)."""
        stored, path = self._locate(name)
        return self._finish(self._open(path).get_tensor(stored))

    def get_sharded(self, name: str, dim: int) -> torch.Tensor:
        """This rank's contiguous 1/world_size of the tensor along ``dim``."""
        tensor = _SlicedTensor(self, name, dim)
        block = tensor.split(tensor.size, self.tp.world_size)
        return self._finish(tensor.read(self.tp.rank * block, (self.tp.rank + 1) * block))

    def get_heads(self, name: str, dim: int, num_heads: int, head_dim: int) -> torch.Tensor:
        """This rank's attention heads along ``dim`` (``num_heads * head_dim`` long there).

        With fewer heads than ranks (multi-query or grouped-query KV heads), each head is
        replicated over ``world_size / num_heads`` consecutive ranks and a rank gets exactly one.
        """
        tensor = _SlicedTensor(self, name, dim)
        world_size, rank = self.tp.world_size, self.tp.rank
        if tensor.size != num_heads * head_dim:
            raise WeightsError(
                f"{tensor.where}: size {tensor.size} along dim {dim} is not {num_heads} heads × {head_dim}"
            )
        if num_heads >= world_size:
            per_rank = tensor.split(num_heads, world_size, what=f"{num_heads} heads")
            first = rank * per_rank
        else:
            if world_size % num_heads:
                raise WeightsError(
                    f"{tensor.where}: {num_heads} heads cannot be replicated evenly over {world_size} ranks"
                )
            per_rank, first = 1, rank * num_heads // world_size
        return self._finish(tensor.read(first * head_dim, (first + per_rank) * head_dim))

    def get_head_groups(self, name: str, dim: int, num_heads: int, num_kv_heads: int, head_dim: int) -> torch.Tensor:
        """This rank's query, key and value heads of a projection fused per KV group, as ``[q | k | v]``.

        Falcon stores ``num_kv_heads`` groups along ``dim``, each its ``num_heads / num_kv_heads``
        query heads, then one key head, then one value head (one group is multi-query; a group per
        head is BLOOM's per-head ``[q, k, v]``). A rank gets its contiguous 1/world_size of the query
        heads and the KV heads of their groups; with fewer KV heads than ranks, a group's key and
        value are replicated on every rank that holds some of its query heads, and each rank still
        reads only its own query heads.
        """
        tensor = _SlicedTensor(self, name, dim)
        world_size, rank = self.tp.world_size, self.tp.rank
        if num_heads % num_kv_heads:
            raise WeightsError(f"{tensor.where}: {num_heads} query heads do not form {num_kv_heads} equal groups")
        per_group = num_heads // num_kv_heads
        group_size = (per_group + 2) * head_dim
        if tensor.size != num_kv_heads * group_size:
            raise WeightsError(
                f"{tensor.where}: size {tensor.size} along dim {dim} is not {num_kv_heads} groups of "
                f"{per_group} query heads, a key and a value, × {head_dim}"
            )
        if num_kv_heads % world_size and world_size % num_kv_heads:
            # A rank's query heads would straddle groups: its KV heads would not map evenly onto them.
            raise WeightsError(
                f"{tensor.where}: {num_kv_heads} KV heads can neither be split nor replicated evenly "
                f"over {world_size} ranks"
            )
        per_rank = tensor.split(num_heads, world_size, what=f"{num_heads} query heads")
        first, stop = rank * per_rank, (rank + 1) * per_rank
        queries, keys, values = [], [], []
        for group in range(first // per_group, (stop - 1) // per_group + 1):
            start, group_first = group * group_size, group * per_group
            lo, hi = max(first, group_first) - group_first, min(stop, group_first + per_group) - group_first
            queries.append(tensor.read(start + lo * head_dim, start + hi * head_dim))
            key = start + per_group * head_dim
            keys.append(tensor.read(key, key + head_dim))
            values.append(tensor.read(key + head_dim, key + 2 * head_dim))
        return self._finish(torch.cat(queries + keys + values, dim=tensor.dim))

    def get_packed_sharded(self, name: str, dim: int, block_sizes: Sequence[int]) -> torch.Tensor:
        """This rank's slice of each block of a fused tensor (``[q | k | v]``, ``[gate | up]``), in order.

        Sharding the fused tensor as one would hand a rank all of q and none of v; a packed
        shard keeps every rank's part shaped like the fused layer expects.
        """
        tensor = _SlicedTensor(self, name, dim)
        if sum(block_sizes) != tensor.size:
            raise WeightsError(
                f"{tensor.where}: blocks {list(block_sizes)} add up to {sum(block_sizes)}, "
                f"not the size {tensor.size} along dim {dim}"
            )
        parts = []
        offset = 0
        for size in block_sizes:
            block = tensor.split(size, self.tp.world_size, what=f"block of {size}")
            start = offset + self.tp.rank * block
            parts.append(tensor.read(start, start + block))
            offset += size
        return self._finish(torch.cat(parts, dim=tensor.dim))

    def get_vocab_sharded(self, name: str, dim: int = 0) -> torch.Tensor:
        """This rank's block of ``ceil(vocab / world_size)`` rows, zero-padded at the end of the vocabulary.

        Vocabulary sizes rarely divide by the world size; padding gives every rank one shape, so
        gathered logits are ``world_size * block`` wide and the padding is cut off after the gather.
        """
        tensor = _SlicedTensor(self, name, dim)
        block = -(-tensor.size // self.tp.world_size)
        start = min(self.tp.rank * block, tensor.size)
        stop = min(start + block, tensor.size)
        part = tensor.read(start, stop)
        if stop - start < block:
            padding = list(part.shape)
            padding[tensor.dim] = block - (stop - start)
            part = torch.cat([part, part.new_zeros(padding)], dim=tensor.dim)
        return self._finish(part)

    def _weight_map(self) -> dict[str, Path]:
        """Which file holds each tensor: ``model.safetensors``, the index's files, or every file."""
        if not self.model_dir.is_dir():
            raise WeightsError(f"model folder {self.model_dir} does not exist")
        single = self.model_dir / "model.safetensors"
        if single.is_file():
            return dict.fromkeys(self._open(single).keys(), single)
        index = self.model_dir / "model.safetensors.index.json"
        if index.is_file():
            try:
                weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
            except (ValueError, KeyError) as e:
                raise WeightsError(f"{index} is not a safetensors index with a weight_map: {e}") from e
            files = {name: self.model_dir / file for name, file in weight_map.items()}
            for name, path in files.items():
                if not path.is_file():
                    raise WeightsError(f"{index} puts tensor {name!r} in {path.name}, which is not in {self.model_dir}")
            return files
        paths = sorted(self.model_dir.glob("*.safetensors"))
        if not paths:
            if any(self.model_dir.glob("*.bin")):
                raise WeightsError(
                    f"{self.model_dir} has only PyTorch .bin weights; "
                    f"run `text-generation-server convert-to-safetensors {self.model_dir}` first"
                )
            raise WeightsError(f"no .safetensors weights in {self.model_dir}")
        files: dict[str, Path] = {}
        for path in paths:
            for name in self._open(path).keys():  # noqa: SIM118 - safe_open is not a mapping
                if name in files:
                    # Without an index there is no telling which copy the model was saved with.
                    raise WeightsError(f"tensor {name!r} is in both {files[name].name} and {path.name}")
                files[name] = path
        return files

    def _candidates(self, name: str) -> list[str]:
        return [name, *self.aliases.get(name, [])]

    def _locate(self, name: str) -> tuple[str, Path]:
        """The stored name standing for ``name`` and the file holding it."""
        for candidate in self._candidates(name):
            if candidate in self._files:
                return candidate, self._files[candidate]
        tried = self._candidates(name)
        also = f" (nor its aliases {tried[1:]})" if len(tried) > 1 else ""
        raise WeightsError(f"tensor {name!r}{also} is not in the weights of {self.model_dir}")

    def _open(self, path: Path) -> safe_open:
        handle = self._handles.get(path)
        if handle is None:
            handle = self._handles[path] = safe_open(str(path), framework="pt", device="cpu")
        return handle

    def _finish(self, tensor: torch.Tensor) -> torch.Tensor:
        self._progress.update()
        if tensor.is_floating_point():
            return tensor.to(device=self.device, dtype=self.dtype)
        return tensor.to(device=self.device)


class _SlicedTensor:
    """One stored tensor opened for reading ranges along one dimension, without reading the rest."""

    def __init__(self, weights: Weights, name: str, dim: int) -> None:
        stored, path = weights._locate(name)
        self.where = f"tensor {name!r}" + (f" (stored as {stored!r})" if stored != name else "") + f" in {path}"
        self._slice = weights._open(path).get_slice(stored)
        self.shape: list[int] = list(self._slice.get_shape())
        if not -len(self.shape) <= dim < len(self.shape):
            raise WeightsError(f"{self.where}: shape {self.shape} has no dim {dim}")
        self.dim = dim % len(self.shape)
        self.size = self.shape[self.dim]

    def split(self, size: int, world_size: int, what: str | None = None) -> int:
        """``size / world_size``, or an error naming the tensor when it does not divide."""
        if size % world_size:
            what = what or f"size {size} along dim {self.dim}"
            raise WeightsError(f"{self.where}: {what} does not divide over {world_size} ranks (shape {self.shape})")
        return size // world_size

    def read(self, start: int, stop: int) -> torch.Tensor:
        return self._slice[(slice(None),) * self.dim + (slice(start, stop),)]
