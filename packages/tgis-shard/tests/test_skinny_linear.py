"""The skinny matmul kernel (``layers.skinny_linear``): on a GPU its product equals a float64 one
within the output's rounding, at every row count it takes, with and without a bias, for widths
that fill its tiles and widths that do not, in every tiling the bench sweeps."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tgis_shard.layers import skinny_linear

needs_triton_gpu = pytest.mark.skipif(
    not torch.cuda.is_available() or skinny_linear.triton is None, reason="needs CUDA and Triton"
)
# The output's rounding (2^-8 relative in bf16, 2^-11 in fp16) over sums of a few hundred products.
TOLERANCE = {torch.bfloat16: {"rtol": 1e-2, "atol": 1e-2}, torch.float16: {"rtol": 2e-3, "atol": 2e-3}}


def _operands(rows: int, features: int, depth: int, dtype: torch.dtype, bias: bool):
    g = torch.Generator(device="cuda").manual_seed(rows * features + depth)
    x = torch.randn(rows, depth, generator=g, device="cuda").to(dtype)
    weight = (torch.randn(features, depth, generator=g, device="cuda") * depth**-0.5).to(dtype)
    b = torch.randn(features, generator=g, device="cuda").to(dtype) if bias else None
    return x, weight, b


@needs_triton_gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("rows", [1, 3, 8, 16])
@pytest.mark.parametrize(
    ("features", "depth", "bias"),
    [(512, 1024, False), (200, 1000, True), (48, 4096, False), (1000, 96, True)],
    ids=["even", "ragged-bias", "deep", "shallow-bias"],
)
def test_the_kernel_equals_a_float64_product(rows, features, depth, bias, dtype):
    x, weight, b = _operands(rows, features, depth, dtype, bias)
    got = skinny_linear.linear(x, weight, b)
    want = F.linear(x.double(), weight.double(), None if b is None else b.double())
    assert got.dtype == dtype
    assert got.shape == (rows, features)
    torch.testing.assert_close(got.double(), want, **TOLERANCE[dtype])


@needs_triton_gpu
@pytest.mark.parametrize(
    "tiles",
    [skinny_linear.Tiles(16, 128, 3, 4), skinny_linear.Tiles(32, 512, 3, 8), skinny_linear.Tiles(64, 256, 2, 4)],
    ids=str,
)
def test_every_tiling_gives_the_same_product(tiles):
    x, weight, b = _operands(5, 300, 2000, torch.bfloat16, True)
    want = F.linear(x.double(), weight.double(), b.double())
    torch.testing.assert_close(skinny_linear.linear(x, weight, b, tiles).double(), want, **TOLERANCE[torch.bfloat16])


def test_the_kernel_serves_half_precision_on_a_gpu_only():
    cpu = torch.zeros(1, 8, dtype=torch.bfloat16)
    assert not skinny_linear.serves(cpu, torch.zeros(4, 8, dtype=torch.bfloat16))
    if torch.cuda.is_available() and skinny_linear.triton is not None:
        half = torch.zeros(1, 8, device="cuda", dtype=torch.bfloat16)
        assert skinny_linear.serves(half, torch.zeros(4, 8, device="cuda", dtype=torch.bfloat16))
        assert not skinny_linear.serves(half.float(), torch.zeros(4, 8, device="cuda"))
        assert not skinny_linear.serves(half.expand(17, 8), torch.zeros(4, 8, device="cuda", dtype=torch.bfloat16))
