"""A decode step's matrix products on one GPU: cuBLAS's default choice against cuBLASLt's
(PyTorch's TORCH_BLAS_PREFER_CUBLASLT), what PyTorch's TunableOp finds by timing every
cuBLAS / cuBLASLt algorithm for the shape, and (``--autotune``) Inductor's max-autotune, which
times its Triton GEMM templates against cuBLAS and keeps the faster.

At these row counts each product is bound by reading its weight, so the printed rate is weight
bytes over time (compare with the device's copy bandwidth). Weights rotate over copies larger
together than the L2 cache, as a step's 32 layers would. Each way is replayed from a CUDA graph,
as a decode step runs it: the device's time, without the host's launches.

    python3 bench/gemm_shapes.py [--rows 1 8 32 128]   # the 8B shape; --hidden, --heads, ... for others
    python3 bench/gemm_shapes.py --rows 32 128 --autotune   # + Inductor's max-autotune (minutes)
"""

from __future__ import annotations

import argparse
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from bench.attention_backends import replayed_ms
from bench.random_model import add_shape_arguments

L2_BYTES = 64 * 2**20  # above an H100's 50 MiB and an H200's 60 MiB
Linear = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


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


def time_us(x: torch.Tensor, weights: list[torch.Tensor], linear: Linear = F.linear) -> float:
    """Microseconds of one product, replayed from a graph of one pass over all ``weights``."""

    def every_weight() -> None:
        for w in weights:
            linear(x, w)

    return replayed_ms(every_weight, calls=1) * 1e3 / len(weights)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 8, 32, 128])
    add_shape_arguments(parser)
    parser.add_argument("--autotune", action="store_true", help="also Inductor's max-autotune for each shape")
    args = parser.parse_args()
    dtype = torch.bfloat16
    print(f"{torch.cuda.get_device_name()} | {dtype} | torch {torch.__version__}")
    weight_sets = {}
    for name, (out_features, in_features) in shapes(args).items():
        nbytes = out_features * in_features * dtype.itemsize
        copies = max(2, -(-2 * L2_BYTES // nbytes))
        weight_sets[name] = [
            torch.randn(out_features, in_features, dtype=dtype, device="cuda") / in_features**0.5 for _ in range(copies)
        ]
    inputs = {
        (name, rows): torch.randn(rows, weights[0].shape[1], dtype=dtype, device="cuda")
        for name, weights in weight_sets.items()
        for rows in args.rows
    }
    ways: dict[str, dict[tuple[str, int], float]] = {"cuBLAS": {}, "cuBLASLt": {}, "TunableOp": {}}
    for library, way in (("cublas", "cuBLAS"), ("cublaslt", "cuBLASLt")):
        torch.backends.cuda.preferred_blas_library(library)
        for (name, rows), x in inputs.items():
            ways[way][name, rows] = time_us(x, weight_sets[name])
    torch.backends.cuda.preferred_blas_library("cublas")

    with tempfile.TemporaryDirectory() as folder:
        torch.cuda.tunable.set_filename(str(Path(folder) / "tunableop.csv"))
        torch.cuda.tunable.enable(True)
        torch.cuda.tunable.tuning_enable(True)
        for (name, _rows), x in inputs.items():
            F.linear(x, weight_sets[name][0])  # tunes this shape; the capture then uses its choice
        torch.cuda.tunable.tuning_enable(False)
        for (name, rows), x in inputs.items():
            ways["TunableOp"][name, rows] = time_us(x, weight_sets[name])
        chosen = torch.cuda.tunable.get_results()
        torch.cuda.tunable.enable(False)

    if args.autotune:
        # One compiled product per shape (sizes static, as in a decode graph of one bucket); past
        # dynamo's limit of recompilations a function would run eagerly, unannounced.
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 2 * len(inputs))
        autotuned = torch.compile(F.linear, mode="max-autotune-no-cudagraphs", dynamic=False)
        ways["Inductor max-autotune"] = {
            (name, rows): time_us(x, weight_sets[name], autotuned) for (name, rows), x in inputs.items()
        }

    for name, rows in inputs:
        nbytes = weight_sets[name][0].numel() * dtype.itemsize
        default = ways["cuBLAS"][name, rows]
        cells = [f"cuBLAS {default:7.1f} µs ({nbytes / default / 1e6:5.2f} TB/s)"]
        for way, times in ways.items():
            if way != "cuBLAS":
                cells.append(f"{way} {times[name, rows]:7.1f} µs ({default / times[name, rows]:4.2f}×)")
        print(f"{name:8s} {rows:4d} rows × {tuple(weight_sets[name][0].shape)}: " + ", ".join(cells))
    print("TunableOp's choices (op, shape, solution, ms):", *chosen, sep="\n  ")


if __name__ == "__main__":
    main()
