"""PT2_COMPILE: torch.compile of a model's forward pass with a bounded number of compilations.

A serving step's sizes change all the time, so every size is dynamic from the first call. Two
of torch's shape rules would still compile anew for sizes a server meets by chance, and are
relaxed while the compiled function runs (on a tiny LLaMA, the warm-up's graphs 18 -> 10):

- sizes of 1 are specialised: with ``backed_size_oblivious`` most are not (a step of one token
  may still get its own graph; the warm-up runs one);
- sizes that happen to be equal are unified ("duck" shapes), and the next step where they differ
  compiles again: ``use_duck_shape`` off.

The settings apply per call, not to the process: other compiled code (FlexAttention) keeps
torch's defaults. Families keep the attention call itself out of the compiled graphs
(``AttentionHeads``): its kernels are compiled or hand-written already.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TypeVar

import torch
import torch.fx.experimental._config as shape_config

F = TypeVar("F", bound=Callable[..., object])


def compile_dynamic(fn: F) -> F:
    """``fn`` compiled with every size dynamic; see the module's docstring."""
    compiled = torch.compile(fn, dynamic=True)

    @functools.wraps(fn)
    def run(*args: object, **kwargs: object) -> object:
        with shape_config.patch(backed_size_oblivious=True, use_duck_shape=False):
            return compiled(*args, **kwargs)

    return run  # type: ignore[return-value]


def compile_model_forward(fn: F) -> F:
    """A transformers model's forward pass (hf_transformers), compiled with every size dynamic
    under torch's own shape rules: under the relaxed ones above, Inductor cannot lower the slices
    of a cache that grows in place (``engines.kv_cache.RoomyLayer``)."""
    return torch.compile(fn, dynamic=True)  # type: ignore[return-value]


def dense(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` with the strides a new tensor of its shape has (a copy only where it has others).
    A compiled pass guards on its inputs' strides, and ``contiguous()`` keeps a view whose size-1
    dimensions make it count as contiguous with other strides."""
    strides, step = [], 1
    for size in reversed(tensor.shape):
        strides.append(step)
        step *= size
    if tensor.stride() == tuple(reversed(strides)):
        return tensor
    return tensor.clone(memory_format=torch.contiguous_format)
