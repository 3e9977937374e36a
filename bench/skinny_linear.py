"""A decode step's matrix products on one GPU: cuBLAS, cuBLASLt and the skinny Triton kernel
(``layers.skinny_linear``) at the rows a decode step has, as weight bytes over time.

Each product is timed as a decode graph runs it: many calls captured in one CUDA graph, cycling
through enough copies of the weight that none is served from L2 (50 MB on an H200), replayed;
µs per call and the weight's bytes over that time are printed. The skinny kernel is swept over
its tile sizes and the fastest is printed with its tiles.

    python3 bench/skinny_linear.py [--rows 1 8 16 32 128] [--shapes qkv o_proj gate_up down lm_head]
"""

from __future__ import annotations

import argparse
import itertools

import torch
import torch.nn.functional as F

from bench.gemm_shapes import L2_BYTES, shapes
from tgis_shard.layers import skinny_linear

# Llama-3-8B's products.
SHAPES = shapes(argparse.Namespace(hidden=4096, intermediate=14336, heads=32, kv_heads=8, head_dim=128, vocab=128256))
CALLS_PER_GRAPH = 40


def time_us(fn, weights: list[torch.Tensor], x: torch.Tensor, replays: int = 5) -> float:
    """µs per call of ``fn(x, w)`` replayed from one graph cycling through ``weights``."""
    for w in weights[:2]:
        fn(x, w)  # compiles / picks its kernel outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(CALLS_PER_GRAPH):
            fn(x, weights[i % len(weights)])
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1e3 / (replays * CALLS_PER_GRAPH)


def cublaslt(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    previous = torch.backends.cuda.preferred_blas_library()
    torch.backends.cuda.preferred_blas_library("cublaslt")
    try:
        return F.linear(x, w)
    finally:
        torch.backends.cuda.preferred_blas_library(previous)


def sweep() -> list[skinny_linear.Tiles]:
    tiles = []
    for block_n, block_k, stages, warps in itertools.product((16, 32, 64), (128, 256, 512), (3, 4, 5), (4, 8)):
        # Shared memory: a pipeline stage holds the rows' tile and the weight's.
        if stages * (16 + block_n) * block_k * 2 <= 200 << 10 and not (warps == 8 and block_n == 16):
            tiles.append(skinny_linear.Tiles(block_n, block_k, stages, warps))
    return tiles


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 8, 16, 32, 128])
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    args = parser.parse_args()
    torch.manual_seed(0)
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}; bf16; µs per call (TB/s of the weight)")
    print("| shape | rows | cuBLAS | cuBLASLt | skinny Triton (fastest tiles) | skinny error vs cuBLAS |")
    print("|---|---|---|---|---|---|")
    for name in args.shapes:
        n, k = SHAPES[name]
        nbytes = n * k * 2
        copies = max(2, -(-2 * L2_BYTES // nbytes))
        weights = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(copies)]
        for rows in args.rows:
            x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)

            def cell(us: float, nbytes: int = nbytes) -> str:
                return f"{us:.1f} ({nbytes / us / 1e6:.2f})"

            blas = time_us(F.linear, weights, x)
            lt = time_us(cublaslt, weights, x)
            skinny, error = "—", "—"
            if skinny_linear.serves(x, weights[0]):
                best: tuple[float, skinny_linear.Tiles] | None = None
                for tiles in sweep():
                    try:
                        us = time_us(lambda a, w, t=tiles: skinny_linear.linear(a, w, tiles=t), weights, x)
                    except Exception as exc:  # a tiling the device cannot hold: skip it
                        print(f"#   {name} rows {rows} {tiles}: {type(exc).__name__}")
                        continue
                    if best is None or us < best[0]:
                        best = (us, tiles)
                if best is not None:
                    us, tiles = best
                    t = tiles
                    skinny = f"{cell(us)} n{t.block_n} k{t.block_k} s{t.stages} w{t.warps}"
                    got = skinny_linear.linear(x, weights[0], tiles=tiles).float()
                    want = F.linear(x.float(), weights[0].float())
                    error = f"{((got - want).abs().max() / want.abs().max()).item():.1e}"
            print(f"| {name} | {rows} | {cell(blas)} | {cell(lt)} | {skinny} | {error} |", flush=True)
        del weights


if __name__ == "__main__":
    main()
