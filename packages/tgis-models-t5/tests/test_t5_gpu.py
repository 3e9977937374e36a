"""T5 on tgis_native on one GPU and over NCCL on two, fp16/bf16, against transformers on one GPU.

Skips without CUDA devices; run on the accelerator (bench/gpu_checks.sh).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

from tests.support.engines import StepDriver, native_engine, request
from tests.support.native_checks import GPU_COUNTS, assert_close_to_reference
from tests.support.ranks import run_ranks
from tests.support.tiny_models import build_tiny_seq2seq_lm

PROMPTS = ["Hello there, general", "A", "The quick brown fox jumps over the lazy dog and then"]
NEW_TOKENS = 12
# Half precision: the sharded sums round differently from the reference's single matmuls, and
# transformers keeps T5's ``wo`` projections in float32 under float16.
LOGPROB_TOLERANCE = {torch.float16: 0.05, torch.bfloat16: 0.15}
# Where the reference's best two tokens are closer than this, rounding may pick either. bfloat16
# keeps 8 bits of mantissa: logits near 20 are 0.125 apart, and every layer adds such errors.
NEAR_TIE = {torch.float16: 0.5, torch.bfloat16: 1.0}
SHAPE = {"d_model": 256, "d_kv": 32, "d_ff": 1024, "num_layers": 4, "num_decoder_layers": 4, "num_heads": 8}
# T5 1.0 (ReLU, tied and scaled head) and the flan-t5 / mT0 layout (gated GELU).
VARIANTS = {"v1.0": {}, "v1.1": {"feed_forward_proj": "gated-gelu", "tie_word_embeddings": False}}


@pytest.fixture(scope="module", params=list(VARIANTS))
def model_dir(request, tmp_path_factory):
    model_dir = build_tiny_seq2seq_lm(
        tmp_path_factory.mktemp(f"t5-gpu-{request.param}"), **SHAPE, **VARIANTS[request.param]
    )
    _fold_query_scaling(model_dir)
    return model_dir


def _fold_query_scaling(model_dir: Path) -> None:
    """T5 attention has no 1/sqrt(d_kv): its initialisation folds it into the query weights. The
    generic tiny builder does not, which leaves scores so large that half precision changes tokens
    in transformers itself (against its own float32); fold it in as real checkpoints have it."""
    model = AutoModelForSeq2SeqLM.from_pretrained(model_dir)
    with torch.no_grad():
        for name, weight in model.named_parameters():
            if name.endswith(("SelfAttention.q.weight", "EncDecAttention.q.weight")):
                weight.mul_(model.config.d_kv**-0.5)
    model.save_pretrained(model_dir)


def _scenario(rank: int, world_size: int, port: int, model_dir: str, prompt_ids, dtype: torch.dtype) -> dict:
    engine = native_engine(rank, world_size, port, model_dir, dtype, torch.device(f"cuda:{rank}"))
    engine.warm_up()
    driver = StepDriver(engine)
    driver.join(*(request(i, ids, NEW_TOKENS, logprobs=True) for i, ids in enumerate(prompt_ids)))
    driver.run_until(NEW_TOKENS)
    return {"outputs": driver.outputs, "first_logprobs": {rid: t.logprob for rid, t in driver.first.items()}}


def _reference(model_dir: Path, prompt_ids, dtype: torch.dtype) -> list[tuple[list[int], list[torch.Tensor]]]:
    model = AutoModelForSeq2SeqLM.from_pretrained(model_dir, dtype=dtype).to("cuda:0").eval()
    results = []
    for ids in prompt_ids:
        out = model.generate(
            torch.tensor([ids], device="cuda:0"),
            max_new_tokens=NEW_TOKENS,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
        )
        # The first column is the decoder start token.
        results.append((out.sequences[0, 1:].tolist(), [s[0].float().cpu() for s in out.logits]))
    return results


@pytest.mark.parametrize("gpus", GPU_COUNTS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_t5_on_gpus_matches_transformers(model_dir, dtype, gpus):
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    prompt_ids = [tokenizer(p).input_ids for p in PROMPTS]
    results = run_ranks(_scenario, gpus, str(model_dir), prompt_ids, dtype)
    assert all(r["outputs"] == results[0]["outputs"] for r in results)
    for i, (ref_tokens, ref_logits) in enumerate(_reference(model_dir, prompt_ids, dtype)):
        assert_close_to_reference(
            results[0]["outputs"][i],
            results[0]["first_logprobs"][i],
            ref_tokens,
            ref_logits,
            LOGPROB_TOLERANCE[dtype],
            NEAR_TIE[dtype],
            f"prompt {i}",
        )
