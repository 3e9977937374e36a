"""The checks every tgis_native model family must pass, shared by the plugin packages' tests.

CPU: on 1 and 2 ranks (gloo) a family equals transformers on the same weights — greedy tokens,
first-token logprobs — while requests join and leave mid-generation, and each rank holds about
1/N of the weights. GPU: the same in fp16/bf16 with half-precision tolerances, on one GPU (after
the warm-up, as a server runs: CUDA graphs, fused kernels, the default attention backend) and on
two over NCCL.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.support.engines import NEEDS_FLASHINFER, NEW_TOKENS, PROMPTS, StepDriver, native_engine, request
from tests.support.prefixes import PREFIXES, check_prefix_outputs, run_prefix_scenario, save_prefixes
from tests.support.ranks import run_ranks
from tests.support.tiny_models import reference_greedy

LOGPROB_TOLERANCE = 1e-4  # float32 on CPU: the sharded sums only reorder additions
GPU_NEW_TOKENS = 12
# Half precision: the sharded sums round differently from the reference's single matmuls.
GPU_LOGPROB_TOLERANCE = {torch.float16: 0.05, torch.bfloat16: 0.15}
# Where the reference's best two tokens are closer than this, rounding may pick either.
NEAR_TIE = 0.5
# GPU counts a family's GPU checks run on, each skipped where the machine has fewer.
GPU_COUNTS = [
    pytest.param(
        n, id=f"{n}gpu", marks=pytest.mark.skipif(torch.cuda.device_count() < n, reason=f"needs {n} CUDA devices")
    )
    for n in (1, 2)
]
# Attention backends a rotary family's GPU checks run on: FlashInfer (the default where it is
# installed, for head sizes 64, 128 and 256) and FlexAttention (ALiBi, other head sizes).
GPU_BACKENDS = [
    pytest.param("flashinfer", marks=NEEDS_FLASHINFER),
    "flex",
]
# A LLaMA-layout model for the GPU checks: heads of 128, the 8B shape's, so that FlashInfer
# compiles one set of kernels per dtype for the tests and the serving bench in a device call.
GPU_LLAMA_SHAPE = {"hidden_size": 512, "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2}


def prompt_ids(model_dir: Path) -> list[list[int]]:
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return [tokenizer(p).input_ids for p in PROMPTS]


def _join_leave_scenario(
    rank: int,
    world_size: int,
    port: int,
    model_dir: str,
    ids: list[list[int]],
    attention_backend: str | None,
    chunk: int | None,
) -> dict:
    """Request 0 runs alone, 1 and 2 join after three tokens, 2 leaves two steps later (after the
    engine's warm-up, whose requests must leave no trace); ``chunk`` caps prompt tokens per step."""
    engine = native_engine(rank, world_size, port, model_dir, attention_backend=attention_backend)
    engine.warm_up()
    assert engine.request_ids() == []
    driver = StepDriver(engine, chunk)
    driver.join(request(0, ids[0], NEW_TOKENS, logprobs=True, ranks=True))
    driver.run_until(3)
    driver.join(*(request(i, ids[i], NEW_TOKENS, logprobs=True, ranks=True) for i in (1, 2)))
    driver.run_until(1)
    driver.run(2)
    driver.leave(2)
    driver.run_until(NEW_TOKENS)
    return {
        "outputs": driver.outputs,
        "first_logprobs": {rid: t.logprob for rid, t in driver.first.items()},
        "first_ranks": {rid: t.rank for rid, t in driver.first.items()},
    }


def check_sharded_equals_transformers(
    model_dir: Path,
    world_size: int,
    reference_dir: Path | None = None,
    attention_backend: str | None = None,
    chunk: int | None = None,
) -> None:
    """``reference_dir``: the same weights in a form transformers loads, when ``model_dir``'s isn't.
    ``attention_backend``: forced instead of the fastest available (torch, on a CPU). ``chunk``:
    prompts prefilled in chunks of at most this many tokens."""
    reference_dir = reference_dir or model_dir
    ids = prompt_ids(reference_dir)
    expected = reference_greedy(reference_dir, PROMPTS, NEW_TOKENS)
    reference = AutoModelForCausalLM.from_pretrained(reference_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        first_logprobs = [torch.log_softmax(reference(torch.tensor([i])).logits[0, -1], dim=-1) for i in ids]
    results = run_ranks(_join_leave_scenario, world_size, str(model_dir), ids, attention_backend, chunk)
    result = results[0]
    for i in (0, 1):
        assert result["outputs"][i][: len(expected[i])] == expected[i]
    assert result["outputs"][2] == expected[2][:3]  # left after its first token and two steps
    for i, logprobs in enumerate(first_logprobs):
        token = expected[i][0]
        assert result["first_logprobs"][i] == pytest.approx(float(logprobs[token]), abs=LOGPROB_TOLERANCE)
        assert result["first_ranks"][i] == 1
    assert all(r["outputs"] == result["outputs"] for r in results)  # every rank followed the same tokens


def _prefix_scenario(rank: int, world_size: int, port: int, model_dir: str, store: str, ids) -> dict:
    engine = native_engine(rank, world_size, port, model_dir, prefix_store_path=Path(store))
    return run_prefix_scenario(engine, ids)


def check_prefixes_equal_transformers(model_dir: Path, world_size: int, store: Path) -> None:
    """Prompt prefixes (real PEFT adapters) give transformers' tokens on the prefixed embeddings."""
    ids = prompt_ids(model_dir)
    prefixes = save_prefixes(model_dir, store)
    results = run_ranks(_prefix_scenario, world_size, str(model_dir), str(store), ids)
    check_prefix_outputs(model_dir, ids, prefixes, results[0])
    assert all(r == results[0] for r in results)


def _weight_bytes(rank: int, world_size: int, port: int, model_dir: str) -> int:
    engine = native_engine(rank, world_size, port, model_dir)
    return sum(p.numel() * p.element_size() for p in engine.model.parameters())


def _cache_blocks_on_rank(rank: int, world_size: int, port: int, model_dir: str) -> int:
    # Each rank sized for a different cache, as two GPUs with different free memory would size it.
    engine = native_engine(rank, world_size, port, model_dir, kv_cache_blocks=48 - 8 * rank)
    return engine.info().kv_cache.num_blocks


def check_ranks_agree_on_the_smallest_cache(model_dir: Path) -> None:
    """The router plans blocks with rank 0's size for every rank: all ranks take the smallest."""
    assert run_ranks(_cache_blocks_on_rank, 2, str(model_dir)) == [40, 40]


def check_each_rank_holds_about_half(model_dir: Path) -> None:
    """Replicated norms and row-parallel biases put each rank a little over half."""
    full = sum(p.numel() * p.element_size() for p in AutoModelForCausalLM.from_pretrained(model_dir).parameters())
    (single,) = run_ranks(_weight_bytes, 1, str(model_dir))
    assert single == pytest.approx(full, rel=0.01)
    for half in run_ranks(_weight_bytes, 2, str(model_dir)):
        assert 0.5 * full < half < 0.55 * full


def _gpu_scenario(
    rank: int,
    world_size: int,
    port: int,
    model_dir: str,
    ids,
    dtype: torch.dtype,
    store: str | None,
    backend: str | None,
    engine_name: str,
) -> dict:
    # One model per process, as in a shard: graphs compiled for another model's cache count
    # against FlexAttention's recompile limit.
    torch._dynamo.reset()
    device = torch.device(f"cuda:{rank}")
    engine = native_engine(
        rank, world_size, port, model_dir, dtype, device, backend, store and Path(store), engine=engine_name
    )
    engine.warm_up()
    prefix_ids = {i: PREFIXES[i][0] for i in PREFIXES} if store else {}
    driver = StepDriver(engine)
    driver.join(
        *(
            request(i, prompt, GPU_NEW_TOKENS, prefix_id=prefix_ids.get(i, ""), logprobs=True)
            for i, prompt in enumerate(ids)
        )
    )
    driver.run_until(GPU_NEW_TOKENS)
    return {
        "outputs": driver.outputs,
        "first_logprobs": {rid: t.logprob for rid, t in driver.first.items()},
        "backend": engine.cache.backend,
    }


def _gpu_reference(
    model_dir: Path, ids, dtype: torch.dtype, prefixes: dict[int, torch.Tensor]
) -> list[tuple[list[int], list[torch.Tensor]]]:
    """Greedy tokens and per-step logits of transformers on cuda:0; prompt i after prefixes[i]."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to("cuda:0").eval()
    results = []
    for i, prompt in enumerate(ids):
        ids_on_gpu = torch.tensor([prompt], device="cuda:0")
        if i in prefixes:
            embeds = model.get_input_embeddings()(ids_on_gpu)
            embeds = torch.cat([prefixes[i].to("cuda:0", dtype)[None], embeds], dim=1)
            inputs = {"inputs_embeds": embeds, "attention_mask": torch.ones(embeds.shape[:2], device="cuda:0")}
            start = 0  # with embeddings alone as input, generate returns only the new tokens
        else:
            inputs, start = {"input_ids": ids_on_gpu}, len(prompt)
        out = model.generate(
            **inputs,
            max_new_tokens=GPU_NEW_TOKENS,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
        )
        results.append((out.sequences[0, start:].tolist(), [s[0].float().cpu() for s in out.logits]))
    return results


def check_gpus_match_transformers(
    model_dir: Path,
    dtype: torch.dtype,
    gpus: int,
    prefix_store: Path | None = None,
    backend: str | None = None,
    engine: str = "tgis_native",
) -> None:
    """TP=``gpus`` (over NCCL from 2) against transformers on one GPU, with CUDA graphs for decode
    and prompt steps and the ``backend``'s attention (None: the engine's choice), on tgis_native
    or another paged ``engine``; a divergence is allowed only at a near-tie. With
    ``prefix_store``, requests 0 and 2 carry the prefix scenario's PEFT prompt prefixes."""
    ids = prompt_ids(model_dir)
    prefixes: dict[int, torch.Tensor] = {}
    if prefix_store is not None:
        saved = save_prefixes(model_dir, prefix_store)
        prefixes = {i: saved[name] for i, (name, _) in PREFIXES.items()}
    store = str(prefix_store) if prefix_store is not None else None
    results = run_ranks(_gpu_scenario, gpus, str(model_dir), ids, dtype, store, backend, engine)
    assert all(r["outputs"] == results[0]["outputs"] for r in results)
    assert backend is None or results[0]["backend"] == backend
    print(f"{model_dir.name} {dtype} on {gpus} GPUs: attention backend {results[0]['backend']}")
    for i, (ref_tokens, ref_logits) in enumerate(_gpu_reference(model_dir, ids, dtype, prefixes)):
        assert_close_to_reference(
            results[0]["outputs"][i],
            results[0]["first_logprobs"][i],
            ref_tokens,
            ref_logits,
            GPU_LOGPROB_TOLERANCE[dtype],
            NEAR_TIE,
            f"prompt {i}",
        )


def assert_close_to_reference(
    tokens: list[int],
    first_logprob: float,
    ref_tokens: list[int],
    ref_logits: list[torch.Tensor],
    logprob_tolerance: float,
    near_tie: float,
    label: str,
) -> None:
    """Half-precision comparison: the first token's logprob within tolerance, and greedy tokens
    equal until the first divergence, which is allowed only where the reference nearly tied."""
    first = torch.log_softmax(ref_logits[0], dim=-1)
    assert first_logprob == pytest.approx(float(first[ref_tokens[0]]), abs=logprob_tolerance)
    for step, (mine, theirs) in enumerate(zip(tokens[: len(ref_tokens)], ref_tokens, strict=True)):
        if mine != theirs:
            margin = float(ref_logits[step][theirs] - ref_logits[step][mine])
            assert margin < near_tie, f"{label} step {step}: {mine} vs {theirs}, reference margin {margin}"
            break  # the continuations legitimately differ from here on
