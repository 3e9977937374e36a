"""The split-K product (``layers.split_k_matmul``) on a GPU: ``x @ weight.T`` within the rounding of
a float32 sum of bf16/fp16 products to the float64 product, for uncut and cut K, rows that do not
fill a tile and features that do not fill one; the same bits from two runs and from a CUDA graph's
replays (the last program of each tile sums the parts in a fixed order, and resets its counter);
what it refuses on a CPU."""

from __future__ import annotations

import pytest
import torch

from tgis_shard.layers import split_k_matmul
from tgis_shard.layers.linear import ParallelLinear
from tgis_shard.layers.split_k_matmul import Tiles

needs_triton_gpu = pytest.mark.skipif(
    not torch.cuda.is_available() or split_k_matmul.triton is None, reason="needs CUDA and Triton"
)


def _operands(rows: int, features: int, depth: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator(device="cuda").manual_seed(rows * features + depth)
    x = torch.randn(rows, depth, generator=generator, device="cuda").to(dtype)
    weight = (torch.randn(features, depth, generator=generator, device="cuda") / depth**0.5).to(dtype)
    return x, weight


def _tolerance(dtype: torch.dtype) -> float:
    return {torch.bfloat16: 2**-7, torch.float16: 2**-10}[dtype] * 4  # the output's rounding, with room


@needs_triton_gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize(
    ("rows", "features", "depth", "tiles"),
    [
        (1, 6144, 4096, Tiles(64, 256, 4)),
        (7, 1000, 1024, Tiles(32, 128, 2)),  # features leave the last tile part-full
        (32, 4096, 4096, Tiles(128, 128, 1)),
        (100, 300, 2048, Tiles(64, 128, 8, stages=3)),
        (128, 512, 512, Tiles(128, 64, 2, stages=3, warps=8)),
    ],
)
def test_equals_the_float64_product_and_gives_the_same_bits_twice(rows, features, depth, tiles, dtype):
    x, weight = _operands(rows, features, depth, dtype)
    assert split_k_matmul.serves(x, weight, tiles)
    got = split_k_matmul.matmul(x, weight, tiles)
    assert (got.shape, got.dtype) == ((rows, features), dtype)
    want = x.double() @ weight.double().T
    torch.testing.assert_close(got.double(), want, rtol=_tolerance(dtype), atol=_tolerance(dtype))
    assert torch.equal(split_k_matmul.matmul(x, weight, tiles), got)
    assert not split_k_matmul._tickets_for(x.device).any(), "a launch left a tile's counter set"


@needs_triton_gpu
def test_replayed_from_a_graph_it_follows_new_inputs():
    x, weight = _operands(8, 2048, 4096, torch.bfloat16)
    tiles = Tiles(64, 256, 4)
    static_x = x.clone()
    split_k_matmul.matmul(static_x, weight, tiles)  # compiled and the counters allocated before the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = split_k_matmul.matmul(static_x, weight, tiles)
    for scale in (1.0, -3.0, 0.5):
        static_x.copy_(x * scale)
        graph.replay()
        assert torch.equal(static_out, split_k_matmul.matmul(static_x, weight, tiles))
    assert not split_k_matmul._tickets_for(x.device).any()


def test_refuses_what_it_does_not_compute():
    x, weight = torch.randn(4, 256, dtype=torch.bfloat16), torch.randn(64, 256, dtype=torch.bfloat16)
    assert not split_k_matmul.serves(x, weight, Tiles(64, 128, 2))  # on a CPU
    assert not Tiles(64, 128, 4).fits(64, 256)  # 256 is not 4 parts of whole 128-wide K steps
    assert Tiles(64, 128, 2).fits(64, 256)
    if torch.cuda.is_available() and split_k_matmul.triton is not None:
        gpu_x, gpu_weight = x.cuda(), weight.cuda()
        assert split_k_matmul.serves(gpu_x, gpu_weight, Tiles(64, 128, 2))
        assert not split_k_matmul.serves(gpu_x.float(), gpu_weight.float(), Tiles(64, 128, 2))
        assert not split_k_matmul.serves(gpu_x[:, ::2], gpu_weight[:, :128], Tiles(64, 128, 1))
        assert not split_k_matmul.serves(gpu_x.expand(300, 256).contiguous(), gpu_weight, Tiles(64, 128, 2))


@pytest.mark.parametrize("rows", [1, 16, 17, 64, 65, 128])
@pytest.mark.parametrize(("features", "depth"), [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336)])
def test_every_candidate_fits_and_a_cut_gives_every_multiprocessor_a_program(rows, features, depth):
    found = split_k_matmul.candidates(rows, features, depth, multiprocessors=132)
    assert any(t.splits == 1 for t in found)
    assert any(t.splits > 1 for t in found)
    for tiles in found:
        assert tiles.fits(features, depth)
        assert tiles.stages >= 2
        if tiles.splits > 1:
            assert -(-features // tiles.block_n) * tiles.splits >= 132


def test_row_classes_and_what_is_left_to_cublas():
    assert [split_k_matmul.row_class(n) for n in (1, 16, 17, 33, 128, 129)] == [16, 16, 32, 64, 128, None]
    assert split_k_matmul.candidates(split_k_matmul.MAX_ROWS + 1, 4096, 4096, 132) == []
    # Nothing tuned (SPLIT_K_MATMUL unset, or a CPU): every product runs F.linear.
    x, weight = torch.randn(4, 256), torch.randn(64, 256)
    split_k_matmul.tune([weight])
    assert split_k_matmul.tiles_for(x, weight) is None


@needs_triton_gpu
def test_tuning_keeps_the_fastest_per_row_class_and_products_follow_it(monkeypatch):
    monkeypatch.setattr(split_k_matmul, "ENABLED", True)
    monkeypatch.setattr(split_k_matmul, "_chosen", {})
    x, weight = _operands(1, 4096, 4096, torch.bfloat16)
    split_k_matmul.tune([weight, weight.clone()])  # one shape: timed once
    chosen = split_k_matmul.chosen()
    assert sorted(key[2] for key in chosen) == list(split_k_matmul.ROW_CLASSES)
    for rows in (1, 20, 128):
        x = x.new_empty(rows, 4096).normal_()
        tiles = chosen[x.device, torch.bfloat16, split_k_matmul.row_class(rows), 4096, 4096]
        assert split_k_matmul.tiles_for(x, weight) == tiles
        linear = ParallelLinear(weight, None)
        torch.testing.assert_close(linear(x).double(), x.double() @ weight.double().T, rtol=0.03, atol=0.03)
