"""Paged attention backends on one GPU: time per layer call, and decode against the HBM roofline.

Decode reads every cached key and value once, so its floor is KV bytes / memory bandwidth; the
printed ratio is that floor over the measured time (1.0 = at the roofline). Prefill is printed
as TFLOP/s of the causal attention products. Blocks are handed out in shuffled order, as a
serving cache's free list would after a while.

    python3 bench/attention_backends.py [--batch 1 32 128 --context 2048 --heads 32 --kv-heads 8 --head-dim 128]
    python3 bench/attention_backends.py --batch 1 8 32 128 --graph-decode 192 2048   # decode graphs' plans

A mixed step (``--mixed``: decodes over ``--mixed-context`` tokens each, then prompts joining
them, as the engine lays out a step in which requests join running ones) is timed too; for
FlashInfer three ways: the decodes apart from the prompts through tgis's decode kernel (what the
engine does, DECODE_KERNEL) or FlashInfer's, and everything through its prefill kernel.

FlashInfer (where installed) plans each step on the host once, before its layers run; the plan is
made outside the timed call, as the engine makes it once per step for every layer, and its host
time is printed beside it. Eager calls are timed on the device alone (the host launches them while
the device sleeps), as in a step whose host runs ahead of the device.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from collections.abc import Callable

import torch

from tgis_shard.layers.flashinfer_paged import flashinfer_available
from tgis_shard.layers.paged_attention import (
    BLOCK_SIZES,
    AttentionMetadata,
    PagedKVCache,
    _flash_attn,
    _flex_available,
    blocks_for,
    paged_attention,
    plan_attention,
    prepare_attention,
)

# H200 HBM3e peak; KINDS.md records ~4.3 TB/s for a device-to-device copy through torch.
HBM_BYTES_PER_S = 4.8e12


def available_backends() -> list[str]:
    backends = ["torch"]
    if _flex_available():
        backends.append("flex")
    if _flash_attn() is not None:
        backends.append("flash")
    if flashinfer_available():
        backends.append("flashinfer")
    return backends


# ~3 ms of an H100's or H200's clock: longer than the host takes to launch one timed call.
SLEEP_CYCLES = 5_000_000


def median_ms(fn: Callable[[], object], repeats: int = 30) -> float:
    """Median milliseconds of the device's work for one eager ``fn`` call. The device sleeps while
    the host launches the call, so the events time the kernels and the gaps between them, not the
    host's launches (which a call of small kernels would otherwise mostly measure)."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda._sleep(SLEEP_CYCLES)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def replayed_ms(fn: Callable[[], object], calls: int = 20) -> float:
    """Milliseconds of one ``fn`` call replayed from a CUDA graph of ``calls`` of them, as a decode
    graph runs it: the device's time without the host's launches (which a single timed call of a
    ~10 µs kernel mostly measures)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()  # the first call outside the capture (lazy initialisation)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    return median_ms(graph.replay) / calls


def run(backend: str, args: argparse.Namespace, query_len: int, batch: int) -> tuple[float, float]:
    """Milliseconds of one layer's attention for ``batch`` sequences of ``args.context`` tokens,
    and of the step's host-side preparation (FlashInfer's plan; FlexAttention's block mask)."""
    return run_step(backend, args, [query_len] * batch, [args.context] * batch)


def run_step(
    backend: str,
    args: argparse.Namespace,
    query_lens: list[int],
    contexts: list[int],
    decodes_apart: bool = True,
    graph_rows: int | None = None,
    tensor_cores: bool = True,
    decode_kernel: bool = False,
) -> tuple[float, float]:
    """``run`` for a step of any layout: sequence b has ``query_lens[b]`` new tokens at the end
    of ``contexts[b]``. ``graph_rows``: FlashInfer's plan for the decode graph of that many rows,
    replayed from a CUDA graph, on CUDA cores instead of tensor cores without ``tensor_cores``;
    ``decode_kernel``: a step of decodes through tgis's Triton kernel (DECODE_KERNEL) instead."""
    block_size = BLOCK_SIZES[backend]
    per_seq = blocks_for(max(contexts), block_size)
    batch = len(query_lens)
    num_blocks = per_seq * batch
    cache = PagedKVCache(
        1,
        num_blocks,
        block_size,
        args.kv_heads,
        args.head_dim,
        args.dtype,
        "cuda",
        backend=backend,
        num_heads=args.heads,
        decode_kernel=decode_kernel,
    )
    cache.keys[0].normal_()
    cache.values[0].normal_()
    blocks = list(range(num_blocks))
    random.Random(0).shuffle(blocks)
    tables = [blocks[i * per_seq : (i + 1) * per_seq] for i in range(batch)]
    meta = AttentionMetadata.build(query_lens, contexts, tables, block_size, "cuda")
    torch.cuda.synchronize()
    started = time.perf_counter()
    if cache.planner is not None and not cache.decodes_on_kernel(meta):
        cache.planner.tensor_core_graph_rows = 0 if tensor_cores else batch + 1
        cache.planner.plan(meta, graph_rows, decodes_apart=decodes_apart)
    else:
        plan_attention(cache, meta)
    prepare_attention(cache, meta)
    torch.cuda.synchronize()
    prepared_ms = (time.perf_counter() - started) * 1e3
    query = torch.randn(sum(query_lens), args.heads, args.head_dim, dtype=args.dtype, device="cuda")
    timed = median_ms if graph_rows is None else replayed_ms
    return timed(lambda: paged_attention(query, cache, 0, meta, args.head_dim**-0.5)), prepared_ms


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 32, 128], help="decode batch sizes")
    parser.add_argument("--context", type=int, default=2048)
    parser.add_argument("--prefill-batch", type=int, default=4)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--dtype", type=lambda name: getattr(torch, name), default=torch.bfloat16)
    parser.add_argument(
        "--mixed", type=int, nargs=2, default=[128, 4], metavar=("DECODES", "PROMPTS"), help="a mixed step's make-up"
    )
    parser.add_argument("--mixed-context", type=int, default=200, help="tokens cached per decode of the mixed step")
    parser.add_argument("--mixed-prompt", type=int, default=128, help="tokens per prompt of the mixed step")
    parser.add_argument("--backends", nargs="+", help="installed backends to time (torch, flex, flash, flashinfer)")
    parser.add_argument(
        "--graph-decode",
        type=int,
        nargs="*",
        metavar="CONTEXT",
        help="only FlashInfer's decode-graph plans at these contexts (default: --context): tensor against CUDA cores",
    )
    args = parser.parse_args()
    if args.graph_decode is not None:
        graph_decodes(args, args.graph_decode or [args.context])
        return

    prefill_flops = 2 * 2 * args.prefill_batch * args.heads * args.head_dim * args.context**2 / 2
    print(
        f"{torch.cuda.get_device_name()} | {args.dtype} | heads {args.heads}/{args.kv_heads} × {args.head_dim}"
        f" | context {args.context} | prefill: {args.prefill_batch} × {args.context}"
    )
    backends = [b for b in available_backends() if args.backends is None or b in args.backends]
    for batch in args.batch:
        kv_bytes = 2 * batch * args.context * args.kv_heads * args.head_dim * args.dtype.itemsize
        roofline = kv_bytes / HBM_BYTES_PER_S * 1e3
        baseline = None
        for backend in backends:
            decode, plan = run(backend, args, 1, batch)
            baseline = baseline or decode
            print(
                f"decode {batch:4d} × {args.context} ({kv_bytes / 2**20:6.0f} MiB KV) {backend:10s}"
                f" {decode * 1e3:8.1f} µs ({roofline / decode:5.2f} of HBM roofline,"
                f" {baseline / decode:6.2f}× {backends[0]})"
                f" | host preparation {plan * 1e3:7.1f} µs"
            )
    baseline = None
    for backend in backends:
        prefill, plan = run(backend, args, args.context, args.prefill_batch)
        baseline = baseline or prefill
        print(
            f"prefill {args.prefill_batch} × {args.context} {backend:10s} {prefill:7.2f} ms"
            f" ({prefill_flops / prefill / 1e9:6.1f} TFLOP/s, {baseline / prefill:5.2f}× {backends[0]})"
            f" | host preparation {plan * 1e3:7.1f} µs"
        )
    mixed_step(args, backends)


def graph_decodes(args: argparse.Namespace, contexts: list[int]) -> None:
    """A CUDA graph's decode per batch size and context, replayed: FlashInfer's tensor-core kernel
    (the engine's with DECODE_KERNEL off) against its CUDA-core one and tgis's Triton kernel (the
    engine's default)."""
    print(f"{torch.cuda.get_device_name()} | {args.dtype} | heads {args.heads}/{args.kv_heads} × {args.head_dim}")
    for context in contexts:
        for batch in args.batch:
            kv_bytes = 2 * batch * context * args.kv_heads * args.head_dim * args.dtype.itemsize
            step = {"args": args, "query_lens": [1] * batch, "contexts": [context] * batch, "graph_rows": batch}
            tensor_cores, cuda_cores = (run_step("flashinfer", **step, tensor_cores=tc)[0] for tc in (True, False))
            triton_kernel = run_step("flashinfer", **step, decode_kernel=True)[0]
            print(
                f"graph decode {batch:4d} × {context:5d} ({kv_bytes / 2**20:7.1f} MiB KV):"
                f" tensor cores {tensor_cores * 1e3:7.1f} µs ({kv_bytes / tensor_cores / 1e9:5.2f} TB/s),"
                f" CUDA cores {cuda_cores * 1e3:7.1f} µs ({tensor_cores / cuda_cores:4.2f}×),"
                f" Triton {triton_kernel * 1e3:7.1f} µs ({tensor_cores / triton_kernel:4.2f}×,"
                f" {kv_bytes / triton_kernel / 1e9:5.2f} TB/s)",
                flush=True,
            )


def mixed_step(args: argparse.Namespace, backends: list[str]) -> None:
    """A step of decodes with prompts joining them, each backend (FlashInfer three ways: the decodes
    apart through its decode kernel or tgis's (DECODE_KERNEL, the default), or in one prefill call)."""
    decodes, prompts = args.mixed
    query_lens = [1] * decodes + [args.mixed_prompt] * prompts
    contexts = [args.mixed_context] * decodes + [args.mixed_prompt] * prompts
    title = f"mixed {decodes} decodes × {args.mixed_context} + {prompts} prompts × {args.mixed_prompt}"
    ways = [(backend, True, False, "") for backend in backends if backend != "flashinfer"]
    if "flashinfer" in backends:
        ways += [
            ("flashinfer", True, False, " (decodes apart)"),
            ("flashinfer", True, True, " (decodes on tgis's kernel)"),
            ("flashinfer", False, False, " (one prefill call)"),
        ]
    for backend, apart, kernel, how in ways:
        took, plan = run_step(backend, args, query_lens, contexts, decodes_apart=apart, decode_kernel=kernel)
        print(f"{title} {backend + how:40s} {took * 1e3:8.1f} µs | host preparation {plan * 1e3:7.1f} µs")


if __name__ == "__main__":
    main()
