"""The server as users meet it: a random-weight LLaMA of a real shape served by the real launcher
(tgis_native; the ``hf-transformers*`` variants serve it on hf_transformers), closed-loop streaming
clients at several concurrencies, fixed prompt and output lengths (EOS masked). In the same run,
beside it: the device's copy bandwidth (the roofline a decode step can reach), the engine's own
decode step in process (what the server adds on top of it), and plain transformers generate().
Prints the table; with ``--record`` appends it, dated, with the command and the machine, to a
results file (bench/RESULTS.md).

    python3 bench/serving.py --shape 8b --concurrency 1 8 32 128 --record bench/RESULTS.md   # one GPU
    python3 bench/serving.py --shape 8b --concurrency 1 128 --variants default no-fused-kernels   # A/B, one run
    python3 bench/serving.py --shape 8b --variants hf-transformers hf-transformers-pt2   # × generate()
    python3 bench/serving.py --shape tiny --concurrency 1 2 --prompt-tokens 16 --new-tokens 8   # CPU smoke run
    python3 bench/serving.py --shape 8b --variants default tp2   # two GPUs: TP=2 against TP=1, one run
"""

from __future__ import annotations

import argparse
import datetime
import gc
import platform
import statistics
import sys
import tempfile
import time
import urllib.request
import weakref
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from prometheus_client.parser import text_string_to_metric_families
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.load import sweep  # noqa: E402
from bench.random_model import SHAPES, random_model  # noqa: E402
from tests.support.engines import StepDriver, request  # noqa: E402
from tests.support.server import READY_TIMEOUT_S, launcher  # noqa: E402
from tgis_proto.plugins import resolve  # noqa: E402
from tgis_router.config import LauncherConfig  # noqa: E402
from tgis_shard.engines.base import ShardContext  # noqa: E402
from tgis_shard.layers import fused, split_k_matmul  # noqa: E402
from tgis_shard.registry import shard_registry  # noqa: E402

IN_PROCESS_DECODE_STEPS = 20
IN_PROCESS_MIXED_STEPS = 5
# The router's budget of prompt tokens beside running decodes (its default), for the in-process mixed step.
PROMPT_TOKENS_WHILE_DECODING = LauncherConfig.max_prompt_tokens_while_decoding


@dataclass(frozen=True)
class Variant:
    """An engine configuration the bench serves (each field a launcher option of that name, but
    those set in the shards' environment: ``cublaslt``, ``split_k``)."""

    deployment_framework: str = "tgis_native"
    cuda_graphs: bool = True
    prompt_graphs: bool = True
    fused_kernels: bool = True
    decode_kernel: bool = True
    pt2_compile: bool = False
    hf_paged_cache: bool = True  # hf_transformers on the paged cache where the model allows
    # The router's budget of prompt tokens beside a step's decodes (None: its default); the engine alone ignores it.
    max_prompt_tokens_while_decoding: int | None = None
    # PyTorch's own choice of BLAS library (TORCH_BLAS_PREFER_CUBLASLT in the shards' environment):
    # cuBLASLt's heuristics instead of cuBLAS's for every product.
    cublaslt: bool = False
    # A decode step's products through tgis's split-K Triton kernel (SPLIT_K_MATMUL in the shards' environment).
    split_k: bool = False
    # Tensor-parallel ranks, one a device (given always: unset, the launcher takes every visible GPU).
    num_shard: int = 1

    def launcher_options(self) -> list[str]:
        return [
            arg
            for name, value in asdict(self).items()
            if value is not None and name not in ENVIRONMENT_ONLY
            for arg in (f"--{name.replace('_', '-')}", value if isinstance(value, str) else str(value).lower())
        ]


ENVIRONMENT_ONLY = ("cublaslt", "split_k")

VARIANTS = {
    "default": Variant(),
    "no-cuda-graphs": Variant(cuda_graphs=False),
    "no-prompt-graphs": Variant(prompt_graphs=False),
    "no-fused-kernels": Variant(fused_kernels=False),
    "pt2-compile": Variant(pt2_compile=True),
    # Steps of decodes through the attention backend's kernel (FlashInfer's) instead of tgis's Triton one.
    "no-decode-kernel": Variant(decode_kernel=False),
    # Every product through cuBLASLt's choice of kernel (bench/gemm_shapes.py on an H100: faster for down-proj at
    # 128 rows, slower for most other shapes; the A/B through the server is still to run).
    "cublaslt": Variant(cublaslt=True),
    # Products of up to 128 rows through layers/split_k_matmul.py (bench/split_k_matmul.py: per shape against cuBLAS).
    "split-k": Variant(split_k=True),
    # Prompt chunks beside the decodes smaller than the default 256 (128), larger (384: at 128 decodes
    # what the budget of 512 counting decodes left, the default before 2026-12-07 (7)) or as large as a
    # step's (2048): how long mixed steps are against ITL p99, TTFT and throughput.
    "decoding-prompt-tokens-128": Variant(max_prompt_tokens_while_decoding=128),
    "decoding-prompt-tokens-384": Variant(max_prompt_tokens_while_decoding=384),
    "decoding-prompt-tokens-2048": Variant(max_prompt_tokens_while_decoding=2048),
    # Tensor parallel on two devices (issue 15: TP=2 against TP=1 in one run); its in-process part is left out.
    "tp2": Variant(num_shard=2),
    # The engine for any transformers model (issue: ≥ 1.5× generate()), eager and compiled.
    "hf-transformers": Variant(deployment_framework="hf_transformers"),
    "hf-transformers-pt2": Variant(deployment_framework="hf_transformers", pt2_compile=True),
    # transformers' own padded batches and dynamic cache (HF_PAGED_CACHE=false), as before the paged path.
    "hf-transformers-padded": Variant(deployment_framework="hf_transformers", hf_paged_cache=False),
}


@dataclass(frozen=True)
class ModelCost:
    """What a decode step must read: the weights (the embedding table is gathered, not read whole)
    and every token's keys and values."""

    weight_bytes: int
    kv_bytes_per_token: int

    def roofline(self, bandwidth: float, streams: int, context: float) -> float:
        """Tokens per second at ``streams`` decoding together over ``context``-token caches."""
        step_bytes = self.weight_bytes + streams * context * self.kv_bytes_per_token
        return streams * bandwidth / step_bytes


def copy_bandwidth(device: torch.device) -> float:
    """Bytes per second a device-to-device copy moves (read plus write)."""
    size = 2**30 if device.type == "cuda" else 2**26
    source = torch.empty(size, dtype=torch.uint8, device=device)
    target = torch.empty_like(source)
    for _ in range(3):
        target.copy_(source)
    _sync(device)
    started, repeats = time.perf_counter(), 20
    for _ in range(repeats):
        target.copy_(source)
    _sync(device)
    return 2 * size * repeats / (time.perf_counter() - started)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def model_cost(model_dir: Path, dtype) -> ModelCost:
    """What the model's decode step reads, from its config (built on the meta device: no weights read)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_dir)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    element = torch.empty((), dtype=dtype).element_size()
    embedding = model.get_input_embeddings().weight
    tied = model.get_output_embeddings().weight is embedding
    weight_bytes = sum(p.numel() for p in model.parameters()) * element
    if not tied:
        weight_bytes -= embedding.numel() * element
    head_dim = config.hidden_size // config.num_attention_heads
    return ModelCost(weight_bytes, 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim * element)


def generate_baseline(
    model_dir: Path, device: torch.device, dtype, concurrency: list[int], prompt: int, new: int
) -> dict[int, float]:
    """Plain transformers generate() at each concurrency (a batch of that many): tokens per second."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device).eval()
    config = model.config
    rates = {}
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for streams in concurrency:
            ids = torch.randint(4, config.vocab_size, (streams, prompt), generator=generator).to(device)
            options = {"max_new_tokens": new, "min_new_tokens": new, "do_sample": False, "pad_token_id": 0}
            model.generate(ids, **{**options, "max_new_tokens": 2, "min_new_tokens": 2})  # warm-up
            _sync(device)
            started = time.perf_counter()
            model.generate(ids, **options)
            _sync(device)
            rates[streams] = streams * new / (time.perf_counter() - started)
            print(f"generate() of {streams}: {rates[streams]:.0f} tokens/s", flush=True)  # kept if cut off
    del model
    _free(device)
    return rates


@dataclass(frozen=True)
class InProcessStep:
    """A decode step of ``rows`` requests on the engine in process (no router, no gRPC)."""

    rows: int
    seconds: float  # median wall time, the token on the host at its end
    ahead_seconds: float  # mean period of steps each launched before the last one's tokens are awaited
    device_seconds: float | None  # the device busy inside one step (its kernels and copies); None on a CPU
    device_activities: int | None  # kernels, copies and fills the device runs for one step
    prefill_seconds: float  # wall time of one step prefilling every row's prompt, first token on the host
    prefill_device_seconds: float | None  # the device busy inside such a step
    # A step in which prompts join the ``rows`` decodes, as many as the router's budget beside
    # decodes takes (MAX_PROMPT_TOKENS_WHILE_DECODING): its wall time one by one and its device busy.
    mixed_prompts: int = 0
    mixed_seconds: float | None = None
    mixed_device_seconds: float | None = None


def in_process_decode_steps(
    model_dir: Path,
    device: torch.device,
    dtype,
    prompt: int,
    new: int,
    max_sequence_length: int,
    variant: Variant,
    batch_sizes: list[int],
) -> list[InProcessStep]:
    """The engine's own decode step at each batch size: what the server adds on top of it, and
    (wall against device time) how much of the step the device waits on the host."""
    steps = max(1, min(IN_PROCESS_DECODE_STEPS, new - 2))
    registry = shard_registry(None)
    fused.enable(variant.fused_kernels)  # what the shard's command line sets for its process
    torch.backends.cuda.preferred_blas_library("cublaslt" if variant.cublaslt else "cublas")  # its environment
    split_k_matmul.ENABLED = variant.split_k  # likewise
    joining = _prompts_beside(prompt)  # the most prompts a mixed step takes
    ctx = ShardContext(
        model_dir=model_dir,
        model_type="llama",
        dtype=dtype,
        device=device,
        rank=0,
        world_size=1,
        max_sequence_length=max_sequence_length,
        registry=registry,
        max_batch_size=max(batch_sizes) + joining,
        estimate_memory="off",
        cuda_graphs=variant.cuda_graphs,
        prompt_graphs=variant.prompt_graphs,
        decode_kernel=variant.decode_kernel,
        hf_paged=variant.hf_paged_cache,
        pt2_compile=variant.pt2_compile,
    )
    engine = resolve(registry.engine(variant.deployment_framework).target)(ctx)
    engine.warm_up()
    measured = []
    for rows in batch_sizes:
        first_id = 3 * len(measured) * max(batch_sizes) + 1
        step = _measure_decode(engine, rows, prompt, steps, _prompts_beside(prompt), first_id)
        measured.append(step)
        print(f"in process, {variant}: {measured[-1]}", flush=True)  # a run cut off later keeps it
    # The server's shard needs the device's memory: nothing may hold the engine on.
    collected = weakref.ref(engine)
    del engine
    _free(device)
    if collected() is not None:
        raise RuntimeError(f"the in-process engine is still referenced: {gc.get_referrers(collected())}")
    return measured


def _prompts_beside(prompt: int) -> int:
    """Prompts of ``prompt`` tokens the router's step takes beside its decodes, however many."""
    return max(1, PROMPT_TOKENS_WHILE_DECODING // prompt)


def _measure_decode(engine, rows: int, prompt: int, steps: int, joining: int, first_id: int) -> InProcessStep:
    """A batch of ``rows`` requests on ``engine``: the step prefilling their prompts (profiled on
    one batch, timed on another), then decode steps one by one, then each step launched before
    the last one's tokens are awaited (as the server runs them)."""
    device = engine.ctx.device
    driver = StepDriver(engine)
    profiled = range(first_id + rows, first_id + 2 * rows)
    driver.join(*(request(rid, [5] * prompt, 2) for rid in profiled))
    prefill_busy, _ = _device_activities(driver.step, device, host_table=f"prefill of {rows} × {prompt} tokens")
    driver.leave(*profiled)
    ids = range(first_id, first_id + rows)
    driver.join(*(request(rid, [5] * prompt, 2 * steps + 3) for rid in ids))
    _sync(device)
    started = time.perf_counter()
    driver.step()
    prefill = time.perf_counter() - started
    driver.step()  # a first decode
    times = []
    for _ in range(steps):
        _sync(device)
        started = time.perf_counter()
        driver.step()  # returns once the tokens are on the host
        times.append(time.perf_counter() - started)
    _sync(device)
    started = time.perf_counter()
    _launch_ahead(driver, steps)
    ahead = (time.perf_counter() - started) / steps
    if device.type == "cuda":
        _print_idle_gaps(driver, device, rows)
    busy, activities = _device_activities(driver.step, device, host_table=f"decode step of {rows} rows")
    mixed, mixed_busy = _measure_mixed(driver, range(first_id + 2 * rows, first_id + 2 * rows + joining), prompt)
    driver.leave(*ids)
    driver.step()  # lets them go
    if driver.failures:
        raise RuntimeError(f"the in-process steps failed: {driver.failures[:3]}")
    return InProcessStep(
        rows, statistics.median(times), ahead, busy, activities, prefill, prefill_busy, joining, mixed, mixed_busy
    )


def _launch_ahead(driver: StepDriver, steps: int) -> None:
    """``steps`` decode steps as the server runs them: each launched before the last one's tokens
    are awaited."""
    pending = driver.launch()
    for _ in range(steps - 1):
        launched = driver.launch()
        pending()
        pending = launched
    pending()


def _measure_mixed(driver: StepDriver, joiners: range, prompt: int) -> tuple[float, float | None]:
    """Steps in which the ``joiners``' prompts join the decodes running on ``driver`` (each
    leaves after its prompt's step): median wall time, and the device busy in one such step."""
    device = driver.engine.ctx.device
    times = []
    for repeat in range(IN_PROCESS_MIXED_STEPS + 1):
        ids = [rid + repeat * len(joiners) * 1000 for rid in joiners]
        driver.join(*(request(rid, [7] * prompt, 1) for rid in ids))
        if repeat == IN_PROCESS_MIXED_STEPS:
            busy, _ = _device_activities(driver.step, device, host_table=f"step of decodes + {len(ids)} prompts")
        else:
            _sync(device)
            started = time.perf_counter()
            driver.step()
            times.append(time.perf_counter() - started)
        driver.leave(*ids)
    return statistics.median(times), busy


def _device_activities(
    step: Callable[[], object], device: torch.device, host_table: str = ""
) -> tuple[float | None, int | None]:
    """Runs ``step``: seconds the device is busy and the kernels, copies and fills it runs for
    it (those inside a replayed CUDA graph included); None on a CPU. ``host_table``: also prints,
    under that title, the host's costliest operations in the step (a wait for the device, a
    compilation, an allocator retry show there)."""
    if device.type != "cuda":
        step()
        return None, None
    retries = torch.cuda.memory_stats(device).get("num_alloc_retries", 0)
    activities = [ProfilerActivity.CUDA, *([ProfilerActivity.CPU] if host_table else [])]
    with profile(activities=activities) as profiler:
        step()
        _sync(device)
    if host_table:
        retries = torch.cuda.memory_stats(device).get("num_alloc_retries", 0) - retries
        averages = profiler.key_averages()
        table = averages.table(sort_by="self_cpu_time_total", row_limit=12)
        print(f"host time in the {host_table} ({retries} allocator retries):\n{table}", flush=True)
        # And where the device's time goes (kernels inside a replayed graph count here too).
        table = averages.table(sort_by="self_device_time_total", row_limit=15)
        print(f"device time in the {host_table}:\n{table}", flush=True)
    events = [event for event in profiler.events() if event.device_type == DeviceType.CUDA]
    return sum(event.time_range.elapsed_us() for event in events) / 1e6, len(events)


IDLE_GAP_STEPS = 8


def idle_gaps(spans: list[tuple[str, float, float]]) -> dict[str, list[float]]:
    """The device's idle gaps among ``spans`` (name, start, end of each kernel or copy), keyed
    by the names of the span it last finished and the one that ends the gap."""
    gaps: dict[str, list[float]] = {}
    ordered = sorted(spans, key=lambda span: span[1])
    last, busy_until = ("", float("-inf"))
    for name, start, end in ordered:
        if last and start > busy_until:
            gaps.setdefault(f"{last[:40]} → {name[:40]}", []).append(start - busy_until)
        if end > busy_until:
            last, busy_until = name, end
    return gaps


def _print_idle_gaps(driver: StepDriver, device: torch.device, rows: int) -> None:
    """Where the device waits while steps run launched ahead (as the server runs them): its idle
    time between one kernel or copy and the next, summed by the pair around each gap."""
    with profile(activities=[ProfilerActivity.CUDA]) as profiler:
        _launch_ahead(driver, IDLE_GAP_STEPS)
        _sync(device)
    spans = [
        (e.name, e.time_range.start, e.time_range.end) for e in profiler.events() if e.device_type == DeviceType.CUDA
    ]
    gaps = idle_gaps(spans)
    total = sum(sum(g) for g in gaps.values())
    print(
        f"device idle between kernels, {rows} rows, {IDLE_GAP_STEPS} steps launched ahead: "
        f"{total / IDLE_GAP_STEPS:.0f} µs a step; the largest:",
        flush=True,
    )
    for pair, idle in sorted(gaps.items(), key=lambda item: -sum(item[1]))[:8]:
        print(
            f"  {sum(idle) / IDLE_GAP_STEPS:7.1f} µs a step ({len(idle)} × median {statistics.median(idle):.1f} µs,"
            f" longest {max(idle):.1f} µs): {pair}"
        )


def _quantile(values: list[float], q: int) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


def serve(model_dir: Path, args: argparse.Namespace, dtype_name: str, variant: Variant, name: str) -> dict[int, dict]:
    """Each concurrency through the launcher: closed-loop streaming clients, ``rounds`` requests
    each. With ``--server-logs``, the launcher's log (router and shards) is kept as ``<name>.log``."""
    max_sequence_length = args.prompt_tokens + args.new_tokens + 8
    options = [
        *("--dtype-str", dtype_name),
        *("--max-batch-size", str(max(args.concurrency)), "--max-sequence-length", str(max_sequence_length)),
        *("--max-new-tokens", str(args.new_tokens), "--max-concurrent-requests", str(4 * max(args.concurrency))),
        *variant.launcher_options(),
    ]
    env = {
        "SHARD_TORCH_THREADS": str(args.shard_threads),
        "TORCH_BLAS_PREFER_CUBLASLT": str(int(variant.cublaslt)),
        "SPLIT_K_MATMUL": str(int(variant.split_k)),
    }
    # An 8B model's PT2_COMPILE warm-up on hf_transformers compiles the whole model four times;
    # other starts keep the usual wait, so a hung one leaves the device call time for the rest.
    ready_timeout_s = 900.0 if variant.pt2_compile else READY_TIMEOUT_S
    log_file = None
    if args.server_logs is not None:
        args.server_logs.mkdir(parents=True, exist_ok=True)
        log_file = args.server_logs / f"{name}.log"
    with launcher(model_dir, *options, env=env, ready_timeout_s=ready_timeout_s, log_file=log_file) as server:
        metrics_url = f"http://localhost:{server.http_port}/metrics"
        return sweep(
            f"localhost:{server.grpc_port}",
            args.concurrency,
            args.rounds,
            args.prompt_tokens,
            args.new_tokens,
            lambda: step_sums(metrics_url),
        )


# The router's step series (tgis_router.metrics): per method, steps and seconds.
_STEP_SUMS = {
    "tgi_batch_inference_forward_duration_count": "steps",
    "tgi_batch_inference_forward_duration_sum": "shard",  # inside the shard's Step call
    "tgi_batch_inference_tokproc_duration_sum": "hand_out",  # the router handing the tokens out
    "tgi_request_inter_token_latency_count": "gaps",  # between two tokens of a request, at the router
    "tgi_request_inter_token_latency_sum": "gap_seconds",
    # A run at the KV cache's limit: requests preempted (the cache ran full) and any that failed.
    "tgi_request_preemptions_total": "preemptions",
    "tgi_request_failure_total": "failures",
}


# The router's ITL histogram bucket that splits the tail off (its buckets: 5, 10, 25, 50 ms, ...).
_ITL_TAIL_FROM_S = 0.025


def step_sums(metrics_url: str) -> dict[tuple[str, str], float]:
    """(method, what) -> running total, from the router's metrics."""
    with urllib.request.urlopen(metrics_url, timeout=10) as response:
        text = response.read().decode()
    sums: dict[tuple[str, str], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "tgi_request_inter_token_latency_bucket":
                if float(sample.labels["le"]) == _ITL_TAIL_FROM_S:
                    sums[("", "gaps_in_time")] = sample.value
                continue
            what = _STEP_SUMS.get(sample.name)
            if what is not None:
                key = (sample.labels.get("method", ""), what)
                sums[key] = sums.get(key, 0.0) + sample.value
    return sums


def step_breakdown(served: dict[int, dict]) -> list[str]:
    """Per concurrency: the steps the server ran, their mean period (the run's wall time over
    them), the mean time from a step's launch on the shard to its tokens (which overlaps the
    step before it) and the router's hand-out per step."""
    lines = []
    for streams, result in served.items():
        before, after = result["observed"]
        parts, total = [], 0.0
        for method in ("next_token", "prefill"):
            steps = after.get((method, "steps"), 0.0) - before.get((method, "steps"), 0.0)
            if not steps:
                continue
            total += steps
            shard = after[(method, "shard")] - before.get((method, "shard"), 0.0)
            hand_out = after[(method, "hand_out")] - before.get((method, "hand_out"), 0.0)
            parts.append(
                f"{steps:,.0f} {method} steps, {shard / steps * 1000:.2f} ms from launch to tokens and "
                f"{hand_out / steps * 1000:.2f} ms of hand-out each"
            )
        period = result["elapsed_s"] / total * 1000 if total else float("nan")
        gaps = after.get(("", "gaps"), 0.0) - before.get(("", "gaps"), 0.0)
        gap_seconds = after.get(("", "gap_seconds"), 0.0) - before.get(("", "gap_seconds"), 0.0)
        # The same gaps at the router and at the clients: what the clients' own threads add; and
        # the share of them past the tail bound at each, where the tail comes in.
        in_time = after.get(("", "gaps_in_time"), 0.0) - before.get(("", "gaps_in_time"), 0.0)
        tail = f"{_ITL_TAIL_FROM_S * 1000:.0f} ms"
        itl = (
            f"mean ITL {gap_seconds / gaps * 1000:.2f} ms at the router ({(gaps - in_time) / gaps:.2%} over {tail})"
            if gaps
            else "no ITL at the router"
        )
        if result["itl"]:
            late = sum(gap > _ITL_TAIL_FROM_S for gap in result["itl"]) / len(result["itl"])
            itl += f", {statistics.fmean(result['itl']) * 1000:.2f} ms at the clients ({late:.2%} over {tail})"
        for what in ("preemptions", "failures"):
            count = after.get(("", what), 0.0) - before.get(("", what), 0.0)
            itl += f", {count:,.0f} {what}" if count else ""
        lines.append(
            f"- {streams} streams, {result['elapsed_s']:.2f} s, {period:.2f} ms per step, {itl}: " + "; ".join(parts)
        )
    return lines


def _describe(variant: Variant, device: torch.device) -> str:
    on_gpu = device.type == "cuda"
    if variant.deployment_framework != "tgis_native":
        paged = "" if variant.hf_paged_cache else ", HF_PAGED_CACHE off"
        return f"{variant.deployment_framework}{paged}, PT2_COMPILE {'on' if variant.pt2_compile else 'off'}"
    return (
        f"CUDA graphs {'on' if variant.cuda_graphs and on_gpu else 'off'}"
        + (" (prompt steps too)" if variant.cuda_graphs and variant.prompt_graphs and on_gpu else "")
        + ", "
        f"fused kernels {'on' if variant.fused_kernels and on_gpu else 'off'}, "
        + ("" if variant.decode_kernel or not on_gpu else "decode kernel off, ")
        + ("cuBLASLt, " if variant.cublaslt and on_gpu else "")
        + ("split-K products, " if variant.split_k and on_gpu else "")
        + f"PT2_COMPILE {'on' if variant.pt2_compile else 'off'}"
        + (f", TP={variant.num_shard}" if variant.num_shard > 1 else "")
        + (
            f", MAX_PROMPT_TOKENS_WHILE_DECODING {variant.max_prompt_tokens_while_decoding}"
            if variant.max_prompt_tokens_while_decoding is not None
            else ""
        )
    )


def _table(
    served: dict[int, dict],
    steps: dict[int, InProcessStep],
    cost: ModelCost,
    bandwidth: float,
    context: float,
    generate_rates: dict,
) -> list[str]:
    lines = [
        "| concurrency | tok/s | TTFT p50 / p99 | ITL p50 / p99 | roofline tok/s | of roofline "
        "| generate() tok/s | × generate() | in-process step: one by one / launched ahead (device busy) "
        "| ITL p50 / step launched ahead | in-process prefill of every prompt (device busy) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for streams, result in served.items():
        roofline = cost.roofline(bandwidth, streams, context)
        ttft, itl = result["ttft"], result["itl"]
        step = steps.get(streams)
        lines.append(
            f"| {streams} | {result['tokens_per_s']:,.0f} "
            f"| {_quantile(ttft, 50) * 1000:.0f} / {_quantile(ttft, 99) * 1000:.0f} ms "
            f"| {_quantile(itl, 50) * 1000:.1f} / {_quantile(itl, 99) * 1000:.1f} ms "
            f"| {roofline:,.0f} | {result['tokens_per_s'] / roofline:.2f} "
            + (
                f"| {generate_rates[streams]:,.0f} | {result['tokens_per_s'] / generate_rates[streams]:.2f} "
                if streams in generate_rates
                else "| – | – "
            )
            + (_in_process_cells(step, _quantile(itl, 50)) if step is not None else "| – | – | – |")
        )
    return lines


def _against_one_device(
    name: str, variant: Variant, served: dict[int, dict], served_by: dict[Variant, dict[int, dict]]
) -> list[str]:
    """A tensor-parallel variant's tokens/s as a multiple of the same configuration on one device,
    where this run served that one before it."""
    one = served_by.get(replace(variant, num_shard=1))
    if variant.num_shard == 1 or one is None:
        return []
    ratios = [
        f"{streams} streams {result['tokens_per_s'] / one[streams]['tokens_per_s']:.2f}×"
        for streams, result in served.items()
        if streams in one
    ]
    return ["", f"{name}: TP={variant.num_shard} against TP=1 (tok/s): " + ", ".join(ratios)]


def _mixed_steps(steps: list[InProcessStep], prompt: int) -> list[str]:
    """The in-process steps in which prompts join the decodes: what the server's mixed steps cost."""
    lines = []
    for step in steps:
        if step.mixed_seconds is None:
            continue
        busy = "" if step.mixed_device_seconds is None else f" (device busy {step.mixed_device_seconds * 1000:.2f} ms)"
        lines.append(
            f"- in process, {step.rows} decodes + {step.mixed_prompts} prompts of {prompt} tokens: "
            f"{step.mixed_seconds * 1000:.2f} ms one by one{busy}"
        )
    return ["", "Steps with prompts joining the decodes, in process:", *lines] if lines else []


def _in_process_cells(step: InProcessStep, itl_p50: float) -> str:
    busy = "" if step.device_seconds is None else f" ({step.device_seconds * 1000:.2f} ms)"
    prefill_busy = "" if step.prefill_device_seconds is None else f" ({step.prefill_device_seconds * 1000:.1f} ms)"
    return (
        f"| {step.seconds * 1000:.2f} / {step.ahead_seconds * 1000:.2f} ms{busy} "
        f"| {itl_p50 / step.ahead_seconds:.2f} "
        f"| {step.prefill_seconds * 1000:.1f} ms{prefill_busy} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=SHAPES, default="tiny")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32, 128])
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=2, help="requests each client sends, one after the other")
    parser.add_argument("--shard-threads", type=int, default=4, help="torch threads of the shard process")
    parser.add_argument(
        "--variants",
        nargs="+",
        choices=VARIANTS,
        default=["default"],
        help="engine configurations to serve one after the other, beside the same baselines",
    )
    parser.add_argument(
        "--prompt-tokens-while-decoding",
        type=int,
        help="every variant's MAX_PROMPT_TOKENS_WHILE_DECODING (larger: prompts join a large batch faster)",
    )
    # A call that compares variants can leave out what they share, to fit the device's time.
    parser.add_argument("--no-generate", action="store_true", help="leave out the generate() baseline")
    parser.add_argument("--no-in-process", action="store_true", help="leave out the engine's steps in process")
    parser.add_argument(
        "--no-server", action="store_true", help="the engine's steps in process only: a quick check on the device"
    )
    parser.add_argument(
        "--model-folder", type=Path, help="keep the random model here, or reuse the one an earlier run kept"
    )
    parser.add_argument("--record", type=Path, help="append the table, dated, to this file (bench/RESULTS.md)")
    parser.add_argument("--server-logs", type=Path, help="keep each variant's launcher log (router, shards) here")
    args = parser.parse_args()
    device = torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    dtype_name = str(dtype).removeprefix("torch.")
    machine = (
        torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.processor() or 'x86-64'})"
    )
    max_sequence_length = args.prompt_tokens + args.new_tokens + 8
    with tempfile.TemporaryDirectory() as folder:
        model_dir = random_model(args.model_folder or Path(folder), args.shape, max_sequence_length, device)
        bandwidth = copy_bandwidth(device)
        cost = model_cost(model_dir, dtype)
        generate_rates = (
            {}
            if args.no_generate
            else generate_baseline(model_dir, device, dtype, args.concurrency, args.prompt_tokens, args.new_tokens)
        )
        lines = [
            f"{args.shape} shape, {dtype_name}, {args.prompt_tokens} prompt + {args.new_tokens} new tokens, "
            f"{args.rounds} requests per client; {machine}; copy bandwidth {bandwidth / 1e12:.2f} TB/s; "
            f"a decode step reads {cost.weight_bytes / 1e9:.2f} GB of weights",
        ]
        print(lines[0], flush=True)
        context = args.prompt_tokens + args.new_tokens / 2
        engine_steps: dict[Variant, list[InProcessStep]] = {}  # variants differing in router options share one
        served_by: dict[Variant, dict[int, dict]] = {}
        for name in args.variants:
            variant = VARIANTS[name]
            if args.prompt_tokens_while_decoding:
                variant = replace(variant, max_prompt_tokens_while_decoding=args.prompt_tokens_while_decoding)
            engine = replace(variant, max_prompt_tokens_while_decoding=None)
            if args.no_in_process or variant.num_shard > 1:  # the in-process engine is one rank
                engine_steps[engine] = []
            if engine not in engine_steps:
                engine_steps[engine] = in_process_decode_steps(
                    model_dir,
                    device,
                    dtype,
                    args.prompt_tokens,
                    args.new_tokens,
                    max_sequence_length,
                    engine,
                    args.concurrency,
                )
            steps = engine_steps[engine]
            if args.no_server:
                continue  # each in-process step was printed as measured
            served = serve(model_dir, args, dtype_name, variant, name)
            kernels = ", ".join(
                f"{s.device_activities:,} at {s.rows}" for s in steps if s.device_activities is not None
            )
            section = [
                "",
                f"**{name}** ({_describe(variant, device)})"
                + (f"; device kernels and copies per decode step: {kernels}" if kernels else ""),
                "",
            ]
            # Each rank reads its share of the weights and cache at its own device's bandwidth.
            section += _table(
                served, {s.rows: s for s in steps}, cost, variant.num_shard * bandwidth, context, generate_rates
            )
            section += _against_one_device(name, variant, served, served_by)
            served_by[variant] = served
            section += ["", "Steps the server ran (the router's metrics):", *step_breakdown(served)]
            section += _mixed_steps(steps, args.prompt_tokens)
            print("\n".join(section), flush=True)  # each variant as it ends: a cut-off run keeps the rest
            lines += section
    table = "\n".join(lines)
    if args.record and not args.no_server:  # a check in process only has no table to record
        command = "python3 bench/serving.py " + " ".join(sys.argv[1:])
        entry = f"\n## {datetime.date.today()} — serving bench ({machine})\n\n```shell\n{command}\n```\n\n{table}\n"
        with args.record.open("a") as record:
            record.write(entry)


if __name__ == "__main__":
    main()
