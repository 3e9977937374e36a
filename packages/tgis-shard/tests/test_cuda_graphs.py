"""tgis_native's decode steps replayed from CUDA graphs, and its steps with prompt chunks replayed
in pieces around attention, give the eager engine's tokens and logprobs, and transformers' greedy
tokens, while requests join and leave (the batch moves between graph sizes, padded). The
replays skip without CUDA; bench/gpu_checks.sh runs them on the device."""

from __future__ import annotations

import itertools

import pytest
import torch

from tests.support.engines import NEEDS_FLASHINFER, native_engine, start_then_join
from tests.support.ports import free_port
from tests.support.tiny_models import build_tiny_causal_lm
from tgis_shard.engines.cuda_graphs import graph_buckets

# A padded graph batch multiplies other matrix shapes than the eager step, so sums may round
# differently: far below this in float32, at bfloat16's resolution in bfloat16.
LOGPROB_TOLERANCE = {torch.float32: 1e-3, torch.bfloat16: 5e-2}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    # Heads of 128: what FlashInfer is compiled for in the attention tests too.
    shape = {"hidden_size": 256, "num_hidden_layers": 3, "num_attention_heads": 2, "num_key_value_heads": 1}
    return build_tiny_causal_lm(tmp_path_factory.mktemp("llama-graphs"), arch="llama", seed=4, **shape)


def test_buckets_pad_by_at_most_seven_rows_up_to_256_and_a_sixteenth_past_it():
    assert graph_buckets(1) == [1]
    assert graph_buckets(12) == [1, 2, 4, 8, 12]
    buckets = graph_buckets(256)
    assert buckets[:5] == [1, 2, 4, 8, 16]
    assert buckets[-1] == 256
    assert all(b - a <= 8 for a, b in itertools.pairwise(buckets))
    buckets = graph_buckets(4096)
    assert buckets[-1] == 4096
    assert set(graph_buckets(256)) <= set(buckets)
    # The batch a bucket pads most has one row more than the bucket below it.
    assert all((b - a - 1) / (a + 1) < 1 / 16 for a, b in itertools.pairwise(buckets) if a >= 256)
    assert len(buckets) < 100  # multiples of 8: 515 graphs, 101 s of capture on an H100


def _decode_tokens(model_dir, prompt_ids, backend: str, dtype: torch.dtype, graphs: bool, decode_kernel: bool):
    """Every token of three rows (one row of padding in the 4-row graph), then two, then one;
    the outputs; the graph sizes replayed. ``decode_kernel``: decodes through ``paged_decode``."""
    device = torch.device("cuda", 0)
    engine = native_engine(
        0,
        1,
        free_port(),
        model_dir,
        dtype,
        device=device,
        attention_backend=backend,
        cuda_graphs=graphs,
        prompt_graphs=graphs,
        decode_kernel=decode_kernel,
    )
    assert engine.cache.decode_kernel == decode_kernel
    engine.warm_up()
    replayed: list[int] = []
    if graphs:
        assert engine._graphs is not None
        assert engine._graphs.buckets == [1, 2, 4, 8]
        replay = engine._graphs.replay
        logits_at: set[int] = set()  # where each replay's logits start: one buffer for every bucket

        def counted(bucket: int) -> torch.Tensor:
            replayed.append(bucket)
            logits = replay(bucket)
            logits_at.add(logits.data_ptr())
            return logits

        engine._graphs.replay = counted
        # Steps with prompt chunks replay their pieces (engines.prompt_graphs): counted as negative.
        assert engine._prompt_graphs is not None
        run_pieces = engine._prompt_graphs.run

        def counted_pieces(input_ids, meta, bucket: int, overrides=None) -> torch.Tensor:
            replayed.append(-bucket)
            return run_pieces(input_ids, meta, bucket, overrides)

        engine._prompt_graphs.run = counted_pieces
    else:
        assert engine._graphs is None
        assert engine._prompt_graphs is None
    driver = start_then_join(engine, prompt_ids, logprobs=True)
    tokens = []
    for leaving in (2, 0, None):
        for _ in range(3):
            tokens += [(t.request_id, t.token_id, t.logprob) for t in driver.step()]
        if leaving is not None:
            driver.leave(leaving)
    if graphs:
        assert len(logits_at) == 1
    return tokens, driver.outputs, replayed


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize(
    ("backend", "dtype", "decode_kernel"),
    [
        ("flex", torch.float32, False),
        ("torch", torch.float32, False),
        pytest.param("flashinfer", torch.bfloat16, False, marks=NEEDS_FLASHINFER),  # FlashInfer runs half precision
        # tgis's Triton decode kernel (half precision) beside either backend's prompt steps.
        pytest.param("flashinfer", torch.bfloat16, True, marks=NEEDS_FLASHINFER),
        ("flex", torch.bfloat16, True),
    ],
)
def test_graph_replays_equal_eager_steps_and_transformers(
    model_dir, prompt_ids, expected, backend, dtype, decode_kernel
):
    graph_tokens, outputs, replayed = _decode_tokens(model_dir, prompt_ids, backend, dtype, True, decode_kernel)
    eager_tokens, _, _ = _decode_tokens(model_dir, prompt_ids, backend, dtype, False, decode_kernel)
    assert {b for b in replayed if b > 0} == {1, 2, 4}
    # Request 0's prompt alone, then 1's and 2's beside its decode.
    assert len([b for b in replayed if b < 0]) == 2
    assert [t[:2] for t in graph_tokens] == [t[:2] for t in eager_tokens]
    tolerance = LOGPROB_TOLERANCE[dtype]
    assert [t[2] for t in graph_tokens] == pytest.approx([t[2] for t in eager_tokens], abs=tolerance)
    if dtype != torch.float32:
        return  # transformers' float32 tokens are compared where rounding cannot flip a near tie
    for rid in (0, 1, 2):
        overlap = min(len(outputs[rid]), len(expected[rid]))
        assert overlap >= 4
        assert outputs[rid][:overlap] == expected[rid][:overlap]
