"""What the layers' kernels ask of the GPU they run on, read once per device."""

from __future__ import annotations

import functools

import torch


@functools.cache
def multiprocessors(device: torch.device) -> int:
    """Streaming multiprocessors of ``device``: how many programs a grid needs to fill it."""
    return torch.cuda.get_device_properties(device).multi_processor_count
