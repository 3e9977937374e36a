"""tgis's split-K Triton product (``layers/split_k_matmul.py``) against cuBLAS at a decode step's
shapes and row counts on one GPU: for each product and row count, cuBLAS's time and the fastest
of the tiles the engine's warm-up times (``split_k_matmul.candidates``), both replayed from CUDA
graphs over weights that rotate past the L2 cache (as ``gemm_shapes.py`` times them), and the
fastest tiles' largest difference from cuBLAS's output and whether two runs give the same bits.

    python3 bench/split_k_matmul.py [--rows 1 32 128] [--products qkv o_proj down gate_up]

Each cell prints as soon as it is timed, so a run cut short keeps what it measured.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from bench.gemm_shapes import L2_BYTES, shapes, time_us
from bench.random_model import add_shape_arguments
from tgis_shard.layers import gpu, split_k_matmul


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 32, 128])
    parser.add_argument("--products", nargs="+", default=["qkv", "o_proj", "down", "gate_up"])
    add_shape_arguments(parser)
    args = parser.parse_args()
    dtype = torch.bfloat16
    multiprocessors = gpu.multiprocessors(torch.device("cuda", torch.cuda.current_device()))
    print(f"{torch.cuda.get_device_name()} ({multiprocessors} SMs) | {dtype} | torch {torch.__version__}")
    for name in args.products:
        out_features, in_features = shapes(args)[name]
        nbytes = out_features * in_features * dtype.itemsize
        weights = [
            torch.randn(out_features, in_features, dtype=dtype, device="cuda") / in_features**0.5
            for _ in range(max(2, -(-2 * L2_BYTES // nbytes)))
        ]
        for rows in args.rows:
            started = time.monotonic()
            x = torch.randn(rows, in_features, dtype=dtype, device="cuda")
            cublas = time_us(x, weights)
            timed = []
            for tiles in split_k_matmul.candidates(rows, out_features, in_features, multiprocessors):
                try:
                    timed.append((time_us(x, weights, lambda a, w, t=tiles: split_k_matmul.matmul(a, w, t)), tiles))
                except Exception as error:  # a tile shape the compiler or device refuses: skip it
                    print(f"  {tiles}: {type(error).__name__}: {str(error)[:120]}")
            best_us, best = min(timed, key=lambda pair: pair[0])
            first = split_k_matmul.matmul(x, weights[0], best)
            again = split_k_matmul.matmul(x, weights[0], best)
            error = (first.float() - F.linear(x, weights[0]).float()).abs().max().item()
            runner_up = sorted(timed, key=lambda pair: pair[0])[1:3]
            print(
                f"{name:8s} {rows:4d} rows × {tuple(weights[0].shape)}: cuBLAS {cublas:6.1f} µs"
                f" ({nbytes / cublas / 1e6:4.2f} TB/s), split-K {best_us:6.1f} µs ({nbytes / best_us / 1e6:4.2f} TB/s,"
                f" {cublas / best_us:4.2f}×) with {best}; max |Δ| vs cuBLAS {error:.3g}, same bits twice:"
                f" {torch.equal(first, again)}; next: {', '.join(f'{us:.1f} {t}' for us, t in runner_up)}"
                f" [{len(timed)} tiles, {time.monotonic() - started:.0f} s]",
                flush=True,
            )


if __name__ == "__main__":
    main()
