"""Requests as the router's service makes them, over the fake shard's word tokenizer: for the
tests that drive the batcher and the scheduler without a service."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from tests.support.fake_shard import EOS_ID, FIRST_WORD_ID, WORDS, save_word_tokenizer
from tgis_proto import generation_pb2 as fmaas
from tgis_router.active import ActiveRequest
from tgis_router.tokenization import TokenizerPool
from tgis_router.validation import Limits, validate_input, validate_params

LIMITS = Limits(max_new_tokens=100, max_sequence_length=2048, default_include_stop_seqs=True)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> Iterator[TokenizerPool]:
    pool = TokenizerPool(save_word_tokenizer(tmp_path_factory.mktemp("tok") / "tokenizer.json"), workers=1)
    yield pool
    pool.close()


def word_request(request_id: int, tokenizer: TokenizerPool, words: int, params: fmaas.Parameters) -> ActiveRequest:
    """A request of ``words`` words (ids from FIRST_WORD_ID), validated and arrived now."""
    validated = validate_params(params, LIMITS)
    text = " ".join(WORDS[i % len(WORDS)] for i in range(words))
    input_ids = [FIRST_WORD_ID + i % len(WORDS) for i in range(words)]
    request = validate_input(0, text, input_ids, validated, LIMITS)
    return ActiveRequest(request_id, request, tokenizer, {EOS_ID}, True, "batch", time.monotonic(), True)
