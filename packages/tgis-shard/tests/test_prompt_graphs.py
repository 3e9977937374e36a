"""Steps with prompt chunks through the prompt graphs' fixed buffers and padding
(``engines.prompt_graphs``) give the hidden states of the plain forward pass and write the cache
only at their own slots and the scratch block: here op by op, the path every capture's warm runs
take. On CUDA the captured pieces replay it (test_cuda_graphs compares their tokens)."""

from __future__ import annotations

import itertools

import pytest
import torch

from tests.support.engines import native_engine
from tests.support.ports import free_port
from tests.support.tiny_models import build_tiny_causal_lm
from tgis_shard.engines.prompt_graphs import PromptGraphs, token_buckets
from tgis_shard.layers import attention_heads
from tgis_shard.layers.embedding import EmbeddingOverrides
from tgis_shard.layers.paged_attention import AttentionMetadata, plan_attention, prepare_attention


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    model_dir = build_tiny_causal_lm(tmp_path_factory.mktemp("llama-pieces"), arch="llama", seed=3)
    return native_engine(0, 1, free_port(), model_dir)


def test_buckets_hold_every_token_count_up_to_the_largest():
    buckets = token_buckets(2048)
    assert buckets[:4] == [16, 32, 64, 128]
    assert buckets[-1] == 2048
    assert all(b - a <= 128 for a, b in itertools.pairwise(buckets))
    assert token_buckets(100) == [16, 32, 64, 100]


def test_a_step_through_the_buffers_equals_the_forward_pass(engine):
    model, cache = engine.model, engine.cache
    # A decode of a sequence with 6 tokens cached, and a 5-token prompt chunk after 3 cached ones.
    meta = AttentionMetadata.build([1, 5], [7, 8], [[1], [2]], cache.block_size, "cpu")
    plan_attention(cache, meta)
    prepare_attention(cache, meta)
    ids = torch.tensor([4, 9, 14, 3, 8, 21])
    with torch.inference_mode():
        expected = model.forward(ids, meta.positions, cache, meta)
        keys = [k.clone() for k in cache.keys]
        graphs = PromptGraphs(model.forward, cache, torch.device("cpu"), scratch_slot=0)
        hidden = graphs.run_uncaptured(ids, meta, bucket=16)
    torch.testing.assert_close(hidden, expected, rtol=1e-5, atol=1e-5)
    assert hidden.shape == expected.shape
    # The padding rows' keys went to the scratch block (0), the real ones where they were.
    for before, after in zip(keys, cache.keys, strict=True):
        torch.testing.assert_close(after[1:], before[1:], rtol=1e-5, atol=1e-5)
    assert attention_heads._split is None  # attention is itself again after the step


def test_prompt_prefix_embeddings_go_through_the_buffers_and_leave_no_trace(engine):
    model, cache = engine.model, engine.cache
    # A 6-token prompt whose first 3 positions are a prompt prefix's, beside a decode.
    meta = AttentionMetadata.build([1, 6], [4, 6], [[3], [4]], cache.block_size, "cpu")
    plan_attention(cache, meta)
    prepare_attention(cache, meta)
    ids = torch.tensor([4, 0, 0, 0, 8, 21, 5])
    prefix = EmbeddingOverrides(torch.tensor([1, 2, 3]), torch.randn(3, model.hidden_size) * 0.1)
    with torch.inference_mode():
        width = (model.hidden_size, torch.float32)
        graphs = PromptGraphs(model.forward, cache, torch.device("cpu"), scratch_slot=0, prefix_embeddings=width)
        expected = model.forward(ids, meta.positions, cache, meta, embedding_overrides=prefix)
        hidden = graphs.run_uncaptured(ids, meta, bucket=16, overrides=prefix)
        torch.testing.assert_close(hidden, expected, rtol=1e-5, atol=1e-5)
        # The next step without a prefix looks every embedding up again.
        plain = model.forward(ids, meta.positions, cache, meta)
        assert not torch.allclose(plain, expected, rtol=1e-3, atol=1e-3)  # the prefix changed the pass
        torch.testing.assert_close(graphs.run_uncaptured(ids, meta, bucket=16), plain, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_bucket_whose_warm_runs_run_out_of_memory_is_left_to_eager_steps(tmp_path, monkeypatch):
    model_dir = build_tiny_causal_lm(tmp_path / "llama", arch="llama", seed=3)
    device = torch.device("cuda", 0)
    engine = native_engine(0, 1, free_port(), model_dir, device=device, attention_backend="torch")
    model, cache = engine.model, engine.cache
    graphs = PromptGraphs(model.forward, cache, device, scratch_slot=0)
    run_uncaptured = graphs.run_uncaptured

    def short_of_memory(input_ids, meta, bucket, overrides=None):
        if bucket == 32:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return run_uncaptured(input_ids, meta, bucket, overrides)

    monkeypatch.setattr(graphs, "run_uncaptured", short_of_memory)
    with torch.inference_mode():
        graphs.capture([16, 32], engine._capture_meta)
        assert graphs.buckets == [16]
        assert graphs.bucket_for(20) is None  # such a step runs eagerly
        meta = AttentionMetadata.build([1, 5], [7, 8], [[1], [2]], cache.block_size, device)
        plan_attention(cache, meta)
        prepare_attention(cache, meta)
        ids = torch.tensor([4, 9, 14, 3, 8, 21], device=device)
        expected = model.forward(ids, meta.positions, cache, meta)
        hidden = graphs.run(ids, meta, bucket=16)
    torch.testing.assert_close(hidden, expected, rtol=1e-4, atol=1e-4)
