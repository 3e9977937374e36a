"""Host tensors onto the device without waiting for it.

A step is prepared while the device computes the one before it (``Engine.launch``). A copy from
ordinary (pageable) host memory to a GPU waits for the device's queue, so every small tensor a
step builds on the host would stall the host until the last step ended. Through pinned memory
the copy is queued like a kernel and the host goes on; PyTorch's pinned-memory allocator hands
the block out again only once the copy is done.
"""

from __future__ import annotations

import torch


def to_device(tensor: torch.Tensor, device: torch.device | str, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``tensor`` (on the host) on ``device``, as ``dtype``; to a GPU in a copy that does not block."""
    tensor = tensor if dtype is None else tensor.to(dtype)
    if torch.device(device).type == "cuda":
        tensor = tensor.pin_memory()
    return tensor.to(device, non_blocking=True)


def ids_to_device(values: list[int], device: torch.device | str) -> torch.Tensor:
    """A list of ids (token ids, rows, slots) as an int64 tensor on ``device``."""
    return to_device(torch.tensor(values, dtype=torch.long), device)
