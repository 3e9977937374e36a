"""Fixtures of the engine tests, for every test package: each module supplies ``model_dir``;
these derive its prompts and the reference tokens from it."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from tests.support.engines import NEW_TOKENS, PROMPTS
from tests.support.tiny_models import reference_greedy


@pytest.fixture(scope="module")
def prompt_ids(model_dir):
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return [tokenizer(p).input_ids for p in PROMPTS]


@pytest.fixture(scope="module")
def expected(model_dir):
    return reference_greedy(model_dir, PROMPTS, NEW_TOKENS)
