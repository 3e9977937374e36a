"""A layer's elementwise kernels on one GPU, at the row counts of decode, mixed and prompt steps:
SiLU × up through Inductor's compiled chain (``fused.gated``) and through tgis's Triton kernel
(``gated_act``), beside the residual add + RMSNorm and the cache write with rotary, which the
same steps run.

Each call is replayed from a CUDA graph (the device's time, as a step's graph or a step launched
ahead of the device runs it). The rate is the bytes each kernel must read and write over its time:
compare it with the device's copy bandwidth.

    python3 bench/elementwise.py [--rows 1 8 32 128 512 2048 4096]   # the 8B shape; --hidden, ... for others
    python3 bench/elementwise.py --flashinfer   # + FlashInfer's norm, SiLU and rotary kernels beside ours

FlashInfer's kernels (its fused add + RMSNorm, ``silu_and_mul`` and rotary with a cos/sin cache)
are the library's candidates for the same chains; each JIT-compiles on its first call (~1 min).
They round differently from eager (the norm uses the sum before rounding it, the product is
rounded once), so they would replace ours only for a clear gain.
"""

from __future__ import annotations

import argparse

import torch

from bench.attention_backends import replayed_ms
from bench.random_model import add_shape_arguments
from tgis_shard.layers import fused, gated_act
from tgis_shard.layers.paged_attention import PagedKVCache

BLOCK_SIZE = 16


def silu_ways(rows: int, args: argparse.Namespace) -> str:
    gate_up = torch.randn(rows, 2 * args.intermediate, device="cuda", dtype=torch.bfloat16)
    moved = gate_up.numel() * 2 * 1.5  # read gate and up, write half as many
    chain = fused.gated("silu")
    inductor = replayed_ms(lambda: chain(gate_up)) * 1e3
    kernel = replayed_ms(lambda: gated_act.silu_and_mul(gate_up)) * 1e3
    gate, up = gate_up.chunk(2, dim=-1)
    unequal = (gated_act.silu_and_mul(gate_up) != torch.nn.functional.silu(gate) * up).sum().item()
    return (
        f"silu × up  {rows:5d} rows: Inductor {inductor:7.1f} µs ({moved / inductor / 1e6:5.2f} TB/s), "
        f"Triton {kernel:7.1f} µs ({moved / kernel / 1e6:5.2f} TB/s): {inductor / kernel:4.2f}×; "
        f"{unequal} of {gate.numel()} elements unequal to eager"
    )


def add_rms_norm(rows: int, args: argparse.Namespace) -> str:
    x, residual = (torch.randn(rows, args.hidden, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    weight = torch.randn(args.hidden, device="cuda", dtype=torch.bfloat16)
    took = replayed_ms(lambda: fused.add_rms_norm(x, residual, weight, 1e-5)) * 1e3
    moved = x.numel() * 2 * 4  # read x and the residual, write the sum and the norm
    return f"add + norm {rows:5d} rows: {took:7.1f} µs ({moved / took / 1e6:5.2f} TB/s)"


def cache_write(rows: int, args: argparse.Namespace) -> str:
    """The rotary cache write (``rotate_and_store``) of one layer's step of ``rows`` tokens."""
    head_dim = args.head_dim
    cache = PagedKVCache(1, -(-rows // BLOCK_SIZE) + 1, BLOCK_SIZE, args.kv_heads, head_dim, torch.bfloat16, "cuda")
    qkv = torch.randn(rows, (args.heads + 2 * args.kv_heads) * head_dim, device="cuda", dtype=torch.bfloat16)
    q, k, v = qkv.split([args.heads * head_dim, args.kv_heads * head_dim, args.kv_heads * head_dim], dim=-1)
    q, k, v = q.view(rows, args.heads, head_dim), k.view(rows, -1, head_dim), v.view(rows, -1, head_dim)
    angles = torch.rand(rows, head_dim, device="cuda") * 100
    rotary = (angles.cos().bfloat16(), angles.sin().bfloat16())
    slots = torch.randperm(rows, device="cuda")
    took = replayed_ms(lambda: cache.rotate_and_store(0, q, k, v, rotary, slots)) * 1e3
    moved = qkv.numel() * 2 * 2 + 2 * rotary[0].numel() * 2  # read q, k, v, cos, sin; write as much
    return f"cache write{rows:5d} rows: {took:7.1f} µs ({moved / took / 1e6:5.2f} TB/s)"


def flashinfer_ways(rows: int, args: argparse.Namespace) -> str:
    """FlashInfer's kernels for the same chains: in place, each timed beside ours."""
    from flashinfer.activation import silu_and_mul
    from flashinfer.norm import fused_add_rmsnorm
    from flashinfer.rope import apply_rope_with_cos_sin_cache_inplace

    def us(fn) -> str:
        # One kernel's failure (a JIT compile, an argument FlashInfer refuses) leaves the others.
        try:
            return f"{replayed_ms(fn) * 1e3:6.1f}"
        except Exception as e:
            return f"failed ({type(e).__name__}: {str(e)[:80]})"

    x, residual = (torch.randn(rows, args.hidden, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    weight = torch.randn(args.hidden, device="cuda", dtype=torch.bfloat16)
    norm = us(lambda: fused_add_rmsnorm(x, residual, weight, 1e-5))
    ours_norm = us(lambda: fused.add_rms_norm(x, residual, weight, 1e-5))
    gate_up = torch.randn(rows, 2 * args.intermediate, device="cuda", dtype=torch.bfloat16)
    silu = us(lambda: silu_and_mul(gate_up))
    ours_silu = us(lambda: gated_act.silu_and_mul(gate_up))
    head_dim = args.head_dim
    q = torch.randn(rows, args.heads, head_dim, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(rows, args.kv_heads, head_dim, device="cuda", dtype=torch.bfloat16)
    positions = torch.randint(0, 4096, (rows,), device="cuda", dtype=torch.int32)
    angles = torch.rand(4096, head_dim // 2, device="cuda") * 100
    cos_sin = torch.cat((angles.cos(), angles.sin()), dim=-1)
    flat_q, flat_k = q.view(rows, -1), k.view(rows, -1)
    rope = us(lambda: apply_rope_with_cos_sin_cache_inplace(positions, flat_q, flat_k, head_dim, cos_sin))
    table = torch.cat((angles, angles), dim=-1)[positions.long()]
    cos, sin = table.cos().bfloat16(), table.sin().bfloat16()
    ours_rope = us(lambda: fused.rotate(q, k, cos, sin))
    return (
        f"FlashInfer {rows:5d} rows: add + norm {norm} µs (ours {ours_norm}), silu × up {silu} µs "
        f"(ours {ours_silu}), rotary {rope} µs (Inductor's {ours_rope}; ours rotates in the cache write)"
    )


def compile_for_any_rows(args: argparse.Namespace) -> None:
    """Compiles the chains as a serving shard runs them: its warm-up's second size of step makes
    torch.compile recompile with the row count dynamic, and that kernel serves every later size.
    Each input its own tensor, as in a step: with one tensor passed as several inputs (aliased),
    torch 2.11's dynamo failed building the recompiled norm's guards (an IndexError for a size
    with no source, H100 run of 2026-12-07 (7)); the shards never pass aliased inputs."""
    head_dim = args.head_dim

    def new(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, device="cuda", dtype=torch.bfloat16)

    for rows in (2, 3):
        fused.gated("silu")(new(rows, 2 * args.intermediate))
        fused.add_rms_norm(new(rows, args.hidden), new(rows, args.hidden), new(args.hidden), 1e-5)
        rotary = (new(rows, head_dim), new(rows, head_dim))
        fused.rotate(new(rows, args.heads, head_dim), new(rows, args.kv_heads, head_dim), *rotary)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 8, 32, 128, 512, 2048, 4096])
    add_shape_arguments(parser)
    parser.add_argument("--flashinfer", action="store_true", help="also FlashInfer's kernels for the same chains")
    args = parser.parse_args()
    print(torch.cuda.get_device_name(), "| bfloat16 | hidden", args.hidden, "| intermediate", args.intermediate)
    compile_for_any_rows(args)
    benches = [silu_ways, add_rms_norm, cache_write] + ([flashinfer_ways] if args.flashinfer else [])
    for bench in benches:
        for rows in args.rows:
            print(bench(rows, args), flush=True)


if __name__ == "__main__":
    main()
