"""LLaMA on tgis_native over NCCL on 2 GPUs, fp16/bf16, against transformers on the same GPU.

Skips without 2 CUDA devices; run on the accelerator (see bench/RESULTS.md for the command).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.support.engines import decode_steps, native_engine, request
from tests.support.ranks import run_ranks
from tests.support.tiny_models import build_tiny_causal_lm
from tgis_proto import shard_pb2 as pb
from tgis_shard.layers.paged_attention import choose_backend

pytestmark = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices")

PROMPTS = ["Hello there, general", "A", "The quick brown fox jumps over the lazy dog and then"]
NEW_TOKENS = 12
# Half precision: the sharded sums round differently from the reference's single matmuls.
LOGPROB_TOLERANCE = {torch.float16: 0.05, torch.bfloat16: 0.15}
# Where the reference's best two tokens are closer than this, rounding may pick either.
NEAR_TIE = 0.5


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    shape = {"hidden_size": 256, "num_hidden_layers": 4, "num_attention_heads": 8, "num_key_value_heads": 2}
    return build_tiny_causal_lm(tmp_path_factory.mktemp("llama-gpu"), arch="llama", **shape)


def _scenario(rank: int, world_size: int, port: int, model_dir: str, prompt_ids, dtype: torch.dtype) -> dict:
    engine = native_engine(rank, world_size, port, model_dir, dtype, torch.device(f"cuda:{rank}"))
    device = torch.device(f"cuda:{rank}")
    requests = [request(i, ids, NEW_TOKENS, logprobs=True) for i, ids in enumerate(prompt_ids)]
    tokens, state = engine.prefill(pb.Batch(id=1, requests=requests))
    outputs = {t.request_id: [t.token_id] for t in tokens}
    decode_steps(engine, state, outputs, NEW_TOKENS - 1)
    return {
        "outputs": outputs,
        "first_logprobs": {t.request_id: t.logprob for t in tokens},
        "backend": choose_backend(device, dtype, engine.block_size),
    }


def _reference(model_dir: Path, prompt_ids, dtype: torch.dtype) -> list[tuple[list[int], list[torch.Tensor]]]:
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to("cuda:0").eval()
    results = []
    for ids in prompt_ids:
        out = model.generate(
            torch.tensor([ids], device="cuda:0"),
            max_new_tokens=NEW_TOKENS,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
        )
        results.append((out.sequences[0, len(ids) :].tolist(), [s[0].float().cpu() for s in out.logits]))
    return results


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_two_gpu_nccl_llama_matches_transformers(model_dir, dtype):
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    prompt_ids = [tokenizer(p).input_ids for p in PROMPTS]
    results = run_ranks(_scenario, 2, str(model_dir), prompt_ids, dtype)
    assert results[0]["outputs"] == results[1]["outputs"]
    print(f"{dtype}: attention backend {results[0]['backend']}")
    for i, (ref_tokens, ref_logits) in enumerate(_reference(model_dir, prompt_ids, dtype)):
        ours = results[0]["outputs"][i][: len(ref_tokens)]
        first = torch.log_softmax(ref_logits[0], dim=-1)
        assert results[0]["first_logprobs"][i] == pytest.approx(
            float(first[ref_tokens[0]]), abs=LOGPROB_TOLERANCE[dtype]
        )
        for step, (mine, theirs) in enumerate(zip(ours, ref_tokens, strict=True)):
            if mine != theirs:
                margin = float(ref_logits[step][theirs] - ref_logits[step][mine])
                assert margin < NEAR_TIE, f"prompt {i} step {step}: {mine} vs {theirs}, reference margin {margin}"
                break  # the continuations legitimately differ from here on
