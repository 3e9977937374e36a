"""A layer's elementwise chains as one kernel each on GPUs (FUSED_KERNELS).

Eagerly, an RMSNorm is eight kernels (upcast, square, mean, add, rsqrt, multiply, downcast,
scale), rotary five per tensor, a gated activation two more, each residual add one. At one
stream a decode step of an 8B LLaMA replays ~1,100 kernels of which 130 are the matrix
products; on an H200 the small ones cost as long as reading the weights (7.6 ms per step where
the weights take 4.0 ms). Here each chain is written once as plain PyTorch, and on CUDA tensors
it runs compiled by torch.compile (Inductor writes one Triton kernel per chain), so every family
that calls these gets the fusion without kernels of its own.

- Compiled on first use, which the engine's warm-up and the graph captures' warm runs make
  (capture itself must not compile); sizes become dynamic after the first size change, so a
  function compiles about three times (first size, any size, one token).
- Rounding as eager: bfloat16 intermediates are rounded where eager rounds them
  (``emulate_precision_casts``), so fused and eager steps give the same tokens.
- The cache write stays outside (``PagedKVCache.store``): compiled beside the rotation, on an
  H100, Inductor's scatter into the cache touched the whole layer's cache every step (2.4 ms a
  layer, a decode step 7.6 -> 84 ms), where the eager ``index_copy_`` writes only the new rows.
- Inside a PT2_COMPILE graph, or on CPUs (compiling would cost more than it saves there, and
  every test process would pay it), the plain definitions run.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Generic, ParamSpec, TypeVar

import torch
from transformers.activations import ACT2FN

P = ParamSpec("P")
R = TypeVar("R")

_enabled = True


def enable(enabled: bool) -> None:
    """Turns the compiled versions on or off for this process (the shard's --no-fused-kernels)."""
    global _enabled
    _enabled = enabled


def runs_fused(tensor: object) -> bool:
    """Whether a step on ``tensor`` runs the fused kernels: on, on CUDA, and not inside a
    PT2_COMPILE graph (which compiles the plain definitions itself)."""
    return _enabled and isinstance(tensor, torch.Tensor) and tensor.is_cuda and not torch.compiler.is_compiling()


class _FusedOnCuda(Generic[P, R]):
    """``fn``, compiled when called with CUDA tensors (see the module's docstring)."""

    def __init__(self, fn: Callable[P, R]):
        self.fn = fn
        functools.update_wrapper(self, fn)

    @functools.cached_property
    def compiled(self) -> Callable[P, R]:
        return torch.compile(self.fn, options={"emulate_precision_casts": True})

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R:
        if runs_fused(args[0]):
            return self.compiled(*args, **kwargs)
        return self.fn(*args, **kwargs)


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # In float32, as LLaMA's reference computes it.
    dtype = x.dtype
    x = x.float()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x.to(dtype)


@_FusedOnCuda
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``x`` [tokens, hidden] divided by its root mean square, scaled by ``weight``."""
    return _rms_norm(x, weight, eps)


@_FusedOnCuda
def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The residual stream's next value ``x + residual`` and its RMS norm: ``(normed, summed)``."""
    summed = x + residual
    return _rms_norm(summed, weight, eps), summed


def _rotate_half_layout(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos.unsqueeze(1) + rotated * sin.unsqueeze(1)


@_FusedOnCuda
def rotate(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Queries and keys ``[tokens, heads, head_dim]`` rotated by their tokens' angles (cos/sin
    ``[tokens, head_dim]``, the halves layout of LLaMA's reference)."""
    return _rotate_half_layout(q, cos, sin), _rotate_half_layout(k, cos, sin)


@functools.cache
def gated(activation: str) -> _FusedOnCuda[[torch.Tensor], torch.Tensor]:
    """A gated MLP's middle, ``act(gate) * up`` from ``[tokens, 2 × width]`` laid out [gate | up],
    for a transformers activation name (``silu``, ``gelu_new``, ...); ``gated_act.act_and_mul``
    picks between it and a hand-written kernel."""
    act = ACT2FN[activation]

    def act_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
        gate, up = gate_up.chunk(2, dim=-1)
        return act(gate) * up

    return _FusedOnCuda(act_and_mul)
