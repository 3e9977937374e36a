"""The real SmolLM2-135M (GQA 9/3 heads, tied embeddings) on tgis_native: same greedy tokens
and close logprobs as transformers on the same weights."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.support.engines import StepDriver, native_engine, request
from tgis_shard.embedded import DEFAULT_MODEL
from tgis_shard.model_files import default_cache_dir, resolve_model_dir

PROMPTS = ["The capital of France is", "def fibonacci(n):"]
NEW_TOKENS = 6


@pytest.fixture(scope="module")
def model_dir():
    return resolve_model_dir(DEFAULT_MODEL, None, default_cache_dir())


def test_smollm2_on_tgis_native_equals_transformers(model_dir):
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    prompt_ids = [tokenizer(p).input_ids for p in PROMPTS]
    engine = native_engine(0, 1, 0, model_dir)
    driver = StepDriver(engine)
    driver.join(*(request(i, ids, NEW_TOKENS, logprobs=True) for i, ids in enumerate(prompt_ids)))
    driver.run_until(NEW_TOKENS)
    outputs = driver.outputs
    reference = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    for i, ids in enumerate(prompt_ids):
        with torch.no_grad():
            generated = reference.generate(torch.tensor([ids]), max_new_tokens=NEW_TOKENS, do_sample=False)
            first = torch.log_softmax(reference(torch.tensor([ids])).logits[0, -1], dim=-1)
        assert outputs[i] == generated[0, len(ids) :].tolist()
        assert driver.first[i].logprob == pytest.approx(float(first[outputs[i][0]]), abs=1e-3)
    assert tokenizer.decode(outputs[0]).startswith(" Paris")
