"""A gated MLP's middle (``layers.gated_act``): the SiLU kernel on a GPU gives what eager
``F.silu(gate) * up`` gives for each dtype — the same rounding steps, so every element within one
unit in the last place and almost all equal (libdevice's exp and the compilers' contractions may
differ from PyTorch's build in a float32 bit, which rounding to the dtype nearly always absorbs) —
for the row counts on either side of its block choice and widths that do not fill a block,
reading rows of a wider tensor too; other activations and CPUs take ``fused``'s chain."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tgis_shard.layers import fused, gated_act

needs_triton_gpu = pytest.mark.skipif(
    not torch.cuda.is_available() or gated_act.triton is None, reason="needs CUDA and Triton"
)


# One unit in the last place, relative to a value's size.
ONE_UNIT = {torch.bfloat16: 2**-7, torch.float16: 2**-10, torch.float32: 2**-23}


def _eager(gate_up: torch.Tensor) -> torch.Tensor:
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


@needs_triton_gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("rows", [1, 5, 63, 64, 300])
@pytest.mark.parametrize("width", [1000, 2048])
def test_the_gpu_kernel_gives_the_bits_of_eager_silu_times_up(rows, width, dtype):
    generator = torch.Generator(device="cuda").manual_seed(rows * width)
    # Rows of a wider tensor: the kernel must follow the row stride, not assume 2 × width.
    wide = torch.randn(rows, 2 * width + 24, generator=generator, device="cuda").mul(4).to(dtype)
    gate_up = wide[:, : 2 * width]
    assert gated_act.kernel_serves("silu", gate_up)
    got = gated_act.act_and_mul("silu", gate_up)
    assert (got.shape, got.dtype) == ((rows, width), dtype)
    want = _eager(gate_up)
    torch.testing.assert_close(got, want, rtol=ONE_UNIT[dtype], atol=torch.finfo(dtype).tiny)
    assert (got != want).float().mean().item() <= 1e-3


@needs_triton_gpu
def test_the_gpu_kernel_is_left_for_other_activations_and_when_fusion_is_off():
    gate_up = torch.randn(3, 64, device="cuda", dtype=torch.bfloat16)
    assert not gated_act.kernel_serves("gelu_new", gate_up)
    fused.enable(False)
    try:
        assert not gated_act.kernel_serves("silu", gate_up)
    finally:
        fused.enable(True)
    assert gated_act.kernel_serves("silu", gate_up)


@pytest.mark.parametrize("activation", ["silu", "gelu_new"])
def test_on_a_cpu_the_plain_chain_runs(activation):
    gate_up = torch.randn(4, 32, dtype=torch.bfloat16)
    assert not gated_act.kernel_serves(activation, gate_up)
    gate, up = gate_up.chunk(2, dim=-1)
    want = F.silu(gate) * up if activation == "silu" else fused.gated(activation).fn(gate_up)
    assert torch.equal(gated_act.act_and_mul(activation, gate_up), want)
