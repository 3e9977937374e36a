"""A decode step's matrix products on one GPU: cuBLAS's default choice against cuBLASLt's
(PyTorch's TORCH_BLAS_PREFER_CUBLASLT) and what PyTorch's TunableOp finds by timing every
cuBLAS / cuBLASLt algorithm for the shape.

At these row counts each product is bound by reading its weight, so the printed rate is weight
bytes over time (compare with the device's copy bandwidth). Weights rotate over copies larger
together than the L2 cache, as a step's 32 layers would.

    python3 bench/gemm_shapes.py [--rows 1 8 32 128]   # the 8B shape; --hidden, --heads, ... for others
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

L2_BYTES = 64 * 2**20  # above an H100's 50 MiB and an H200's 60 MiB


def shapes(args: argparse.Namespace) -> dict[str, tuple[int, int]]:
    """(out_features, in_features) of each product of a LLaMA layer, and the LM head."""
    q, kv = args.heads * args.head_dim, args.kv_heads * args.head_dim
    return {
        "qkv": (q + 2 * kv, args.hidden),
        "o_proj": (args.hidden, q),
        "gate_up": (2 * args.intermediate, args.hidden),
        "down": (args.hidden, args.intermediate),
        "lm_head": (args.vocab, args.hidden),
    }


def time_us(x: torch.Tensor, weights: list[torch.Tensor], repeats: int = 50) -> float:
    """Median microseconds of one product, over ``repeats`` runs of all ``weights`` in turn."""
    for w in weights:
        F.linear(x, w)
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for w in weights:
            F.linear(x, w)
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / len(weights))
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 8, 32, 128])
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--intermediate", type=int, default=14336)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--vocab", type=int, default=128256)
    args = parser.parse_args()
    dtype = torch.bfloat16
    print(f"{torch.cuda.get_device_name()} | {dtype} | torch {torch.__version__}")
    measured: dict[tuple[str, int], float] = {}
    weight_sets = {}
    for name, (out_features, in_features) in shapes(args).items():
        nbytes = out_features * in_features * dtype.itemsize
        copies = max(2, -(-2 * L2_BYTES // nbytes))
        weight_sets[name] = [
            torch.randn(out_features, in_features, dtype=dtype, device="cuda") / in_features**0.5 for _ in range(copies)
        ]
    lt_measured: dict[tuple[str, int], float] = {}
    for library, times in (("cublas", measured), ("cublaslt", lt_measured)):
        torch.backends.cuda.preferred_blas_library(library)
        for name, weights in weight_sets.items():
            for rows in args.rows:
                x = torch.randn(rows, weights[0].shape[1], dtype=dtype, device="cuda")
                times[name, rows] = time_us(x, weights)
    torch.backends.cuda.preferred_blas_library("cublas")

    with tempfile.TemporaryDirectory() as folder:
        torch.cuda.tunable.set_filename(str(Path(folder) / "tunableop.csv"))
        torch.cuda.tunable.enable(True)
        torch.cuda.tunable.tuning_enable(True)
        for name, weights in weight_sets.items():
            nbytes = weights[0].numel() * dtype.itemsize
            for rows in args.rows:
                x = torch.randn(rows, weights[0].shape[1], dtype=dtype, device="cuda")
                F.linear(x, weights[0])  # tunes this shape
                tuned = time_us(x, weights)
                default, lt = measured[name, rows], lt_measured[name, rows]
                print(
                    f"{name:8s} {rows:4d} rows × {tuple(weights[0].shape)}: default {default:7.1f} µs"
                    f" ({nbytes / default / 1e6:5.2f} TB/s), cuBLASLt {lt:7.1f} µs ({default / lt:4.2f}×),"
                    f" TunableOp {tuned:7.1f} µs ({nbytes / tuned / 1e6:5.2f} TB/s): {default / tuned:4.2f}× default"
                )
        torch.cuda.tunable.tuning_enable(False)
        print("chosen (op, shape, solution, ms):", *torch.cuda.tunable.get_results(), sep="\n  ")


if __name__ == "__main__":
    main()
