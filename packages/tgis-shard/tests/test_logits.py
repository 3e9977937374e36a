"""Each logits processor against the transformers processor of the same name, row by row, and
the sampler's draws, state and details."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers.generation.logits_process import (
    ExponentialDecayLengthPenalty,
    MinNewTokensLengthLogitsProcessor,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
    TypicalLogitsWarper,
)

from tgis_proto import shard_pb2 as pb
from tgis_shard import logits as lp
from tgis_shard import sampler as sampler_module
from tgis_shard.sampler import Sampler, every_path, sampling_peak_bytes, uniform

VOCAB = 64
EOS = 1


@pytest.fixture
def scores() -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return torch.randn(5, VOCAB, generator=generator) * 3


def _rowwise(reference, scores: torch.Tensor, params: list, input_ids: torch.Tensor | None = None) -> torch.Tensor:
    rows = []
    for row, param in enumerate(params):
        ids = input_ids[row : row + 1] if input_ids is not None else torch.zeros((1, 1), dtype=torch.long)
        rows.append(
            reference(param)(ids, scores[row : row + 1].clone()) if param is not None else scores[row : row + 1]
        )
    return torch.cat(rows)


def test_temperature_matches_transformers(scores):
    values = [0.5, 1.0, 2.0, 0.05, 1.3]
    ours = lp.temperature(scores.clone(), torch.tensor(values))
    assert torch.allclose(ours, _rowwise(TemperatureLogitsWarper, scores, values))


def test_top_k_matches_transformers(scores):
    values = [1, 5, 0, 64, 100]
    ours = lp.top_k(scores.clone(), torch.tensor(values), max(values))
    expected = _rowwise(TopKLogitsWarper, scores, [v if v else None for v in values])
    assert torch.equal(ours, expected)


def test_top_p_matches_transformers(scores):
    values = [0.1, 0.5, 0.9, 1.0, 0.999]
    ours = lp.top_p(scores.clone(), torch.tensor(values))
    expected = _rowwise(TopPLogitsWarper, scores, [v if v < 1 else None for v in values])
    assert torch.equal(ours, expected)


def test_typical_p_matches_transformers(scores):
    values = [0.2, 0.5, 0.95, 1.0, 0.7]
    ours = lp.typical_p(scores.clone(), torch.tensor(values))
    expected = _rowwise(TypicalLogitsWarper, scores, [v if v < 1 else None for v in values])
    assert torch.equal(ours, expected)


def test_repetition_penalty_matches_transformers(scores):
    history = torch.randint(0, VOCAB, (5, 12), generator=torch.Generator().manual_seed(1))
    seen = torch.zeros((5, VOCAB), dtype=torch.bool)
    seen.scatter_(1, history, True)
    values = [1.0, 1.2, 2.0, 0.8, 1.05]
    ours = lp.repetition_penalty(scores.clone(), seen, torch.tensor(values))
    expected = _rowwise(RepetitionPenaltyLogitsProcessor, scores, values, history)
    assert torch.allclose(ours, expected)


def test_min_new_tokens_matches_transformers(scores):
    generated = [0, 2, 5, 7, 1]
    minimum = 5
    ours = lp.mask_eos(scores.clone(), torch.tensor([EOS]), torch.tensor(generated) < minimum)
    prompt = torch.zeros((1, 3), dtype=torch.long)
    for row, n in enumerate(generated):
        processor = MinNewTokensLengthLogitsProcessor(3, minimum, EOS)
        ids = torch.cat([prompt, torch.ones((1, n), dtype=torch.long) * 5], dim=1)
        assert torch.equal(ours[row], processor(ids, scores[row : row + 1].clone())[0])
    # Every row below its minimum: the same as each row's test passed.
    everywhere = torch.ones(len(generated), dtype=torch.bool)
    assert torch.equal(
        lp.mask_eos(scores.clone(), torch.tensor([EOS]), None),
        lp.mask_eos(scores.clone(), torch.tensor([EOS]), everywhere),
    )


def test_length_penalty_matches_transformers_exponential_decay(scores):
    generated = torch.tensor([0, 3, 4, 9, 9])
    start = torch.tensor([3, 3, 3, 3, 1])
    decay = torch.tensor([1.5, 1.5, 2.0, 1.1, 3.0])
    ours = lp.length_penalty(
        scores.clone(), torch.tensor([EOS]), generated, start, decay, torch.ones(5, dtype=torch.bool)
    )
    prompt_length = 4
    for row in range(5):
        processor = ExponentialDecayLengthPenalty((int(start[row]), float(decay[row])), EOS, prompt_length)
        ids = torch.zeros((1, prompt_length + int(generated[row])), dtype=torch.long)
        assert torch.allclose(ours[row], processor(ids, scores[row : row + 1].clone())[0])


def test_length_penalty_keeps_a_masked_eos_masked(scores):
    masked = lp.mask_eos(scores.clone(), torch.tensor([EOS]), torch.ones(5, dtype=torch.bool))
    ten = torch.full((5,), 10)
    out = lp.length_penalty(masked, torch.tensor([EOS]), ten, torch.zeros(5, dtype=torch.long), ten.float(), ten > 0)
    assert torch.isneginf(out[:, EOS]).all()


@pytest.mark.parametrize(
    "device",
    ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"))],
)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("vocab", [128256, 32000, 50257, 96], ids=lambda v: f"vocab{v}")
def test_row_argmax_is_the_first_maximum_of_each_row(vocab: int, dtype: torch.dtype, device: str) -> None:
    g = torch.Generator().manual_seed(vocab)
    # Few distinct values: every row ties many times, in different parts of the row.
    scores = torch.randint(0, 4, (6, vocab), generator=g).to(device, dtype)
    scores[1] = lp.NEG_INF
    scores[2, -1] = 9  # the maximum in the last part
    scores[3, vocab // 3] = float("nan")  # argmax takes NaN as the maximum
    scores[4, 0] = 9
    assert torch.equal(lp.row_argmax(scores), scores.argmax(dim=-1))
    # Rows of a wider buffer (a step's last positions) and no rows at all.
    wide = torch.randint(0, 4, (3, 2 * vocab), generator=g).to(device, dtype)[:, :vocab]
    assert torch.equal(lp.row_argmax(wide), wide.argmax(dim=-1))
    assert lp.row_argmax(scores[:0]).shape == (0,)


def _request(rid: int, resumed_tokens: int = 0, **chooser) -> pb.Request:
    details = pb.TokenDetailOptions(logprobs=True, ranks=True, top_n=3)
    return pb.Request(
        id=rid,
        input_ids=[5, 6, 7],
        chooser=pb.NextTokenChooser(**chooser),
        details=details,
        resumed_tokens=resumed_tokens,
    )


def _sampler(*requests: pb.Request, capacity: int = 4) -> Sampler:
    sampler = Sampler(capacity, VOCAB, [EOS], torch.device("cpu"))
    for request in requests:
        sampler.add(request, request.input_ids)
    return sampler


def _sample_sequence(sampler: Sampler, ids: list[int], row: int, logits: list[torch.Tensor]) -> list[int]:
    tokens = []
    for step in logits:
        choice = sampler.choose(step, ids)
        choice.commit()
        tokens.append(int(choice.token_ids[row]))
    return tokens


def _splitmix64(seed: int, n: int) -> list[float]:
    """The reference: splitmix64's first n outputs for a seed, as (0, 1] doubles."""
    mask, state, out = 2**64 - 1, seed, []
    for _ in range(n):
        state = (state + 0x9E3779B97F4A7C15) & mask
        z = state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
        z ^= z >> 31
        out.append(((z >> 11) + 1) * 2.0**-53)
    return out


@pytest.mark.parametrize("seed", [0, 1, 2**32 - 1, 2**63 + 12345, 2**64 - 1])
def test_draws_are_splitmix64_of_the_seed_at_each_count(seed):
    signed = seed - 2**64 if seed >= 2**63 else seed
    counters = torch.arange(6)
    draws = uniform(torch.full((6,), signed, dtype=torch.long), counters)
    assert draws.tolist() == _splitmix64(seed, 6)


def test_seeded_sampling_is_independent_of_the_batch_around_it():
    steps = [torch.randn(1, VOCAB, generator=torch.Generator().manual_seed(i)) for i in range(10)]
    other = [torch.randn(1, VOCAB) for _ in range(10)]
    sampled = {"sample": True, "seed": 1234, "temperature": 1.5, "top_k": 20}
    alone = _sampler(_request(1, **sampled))
    with_others = _sampler(_request(2, sample=True, seed=9), _request(1, **sampled), _request(3))
    expected = _sample_sequence(alone, [1], 0, steps)
    mixed = [torch.cat([o, s, o]) for o, s in zip(other, steps, strict=True)]
    assert _sample_sequence(with_others, [2, 1, 3], 1, mixed) == expected
    assert len(set(expected)) > 1  # it really samples


def test_a_resumed_request_draws_what_it_would_have_drawn_next():
    steps = [torch.randn(1, VOCAB, generator=torch.Generator().manual_seed(i)) for i in range(8)]
    params = {"sample": True, "seed": 77, "top_p": 0.9}
    whole = _sample_sequence(_sampler(_request(1, **params)), [1], 0, steps)
    resumed = _sample_sequence(_sampler(_request(1, resumed_tokens=5, **params)), [1], 0, steps[5:])
    assert resumed == whole[5:]


def test_a_choice_changes_nothing_until_committed():
    steps = [torch.randn(2, VOCAB, generator=torch.Generator().manual_seed(i)) for i in range(4)]
    sampler = _sampler(_request(1, sample=True, seed=3), _request(2, repetition_penalty=1.5))
    first = sampler.choose(steps[0], [1, 2])
    again = sampler.choose(steps[0], [1, 2])
    assert torch.equal(first.token_ids, again.token_ids)
    again.commit()
    assert _sample_sequence(sampler, [1, 2], 0, steps[1:]) == _sample_sequence(
        _committed_once(steps[0]), [1, 2], 0, steps[1:]
    )


def _committed_once(logits: torch.Tensor) -> Sampler:
    sampler = _sampler(_request(1, sample=True, seed=3), _request(2, repetition_penalty=1.5))
    sampler.choose(logits, [1, 2]).commit()
    return sampler


def test_different_seeds_give_different_samples():
    steps = [torch.zeros(1, VOCAB) for _ in range(20)]  # uniform: every draw is free
    a = _sampler(_request(1, sample=True, seed=1))
    b = _sampler(_request(1, sample=True, seed=2))
    assert _sample_sequence(a, [1], 0, steps) != _sample_sequence(b, [1], 0, steps)


def test_greedy_rows_ignore_sampling_parameters(scores):
    greedy = pb.Request(id=1, chooser=pb.NextTokenChooser(sample=False, temperature=0.1, top_k=1, top_p=0.1))
    greedy.details.logprobs = True
    choice = _sampler(greedy).choose(scores[:1], [1])
    assert int(choice.token_ids[0]) == int(scores[0].argmax())
    assert float(choice.details.logprobs[0]) == pytest.approx(float(scores[0].log_softmax(-1).max()))


def test_details_come_from_log_softmax_of_the_final_scores(scores):
    request = _request(1, sample=True, seed=3, top_k=5, repetition_penalty=1.3)
    seen = torch.zeros(1, VOCAB, dtype=torch.bool)
    seen[0, request.input_ids] = True
    final = lp.repetition_penalty(scores[:1].clone(), seen, torch.tensor([1.3]))
    final = lp.top_k(final, torch.tensor([5]), 5)
    choice = _sampler(request).choose(scores[:1], [1])
    logprobs = final.log_softmax(dim=-1)[0]
    (token,) = choice.generated_tokens()
    assert torch.isfinite(final[0, token.token_id])
    assert token.logprob == pytest.approx(float(logprobs[token.token_id]))
    assert token.rank == 1 + int((logprobs > logprobs[token.token_id]).sum())
    assert [t for t, _ in token.top_tokens] == logprobs.topk(3).indices.tolist()


def test_top_tokens_never_include_removed_tokens_and_keep_ties():
    ids = [4, 5, 6, 7, 8, 9]
    assert lp.top_tokens(ids, [-0.1, -1.0, -1.0, -1.0, float("-inf"), float("-inf")], 2) == (
        (4, -0.1),
        (5, -1.0),
        (6, -1.0),
        (7, -1.0),
    )
    assert lp.top_tokens(ids, [-0.1, float("-inf"), float("-inf"), -9, -9, -9], 3) == ((4, -0.1),)


def test_min_new_tokens_masks_eos_until_reached():
    logits = torch.zeros(1, VOCAB)
    logits[0, EOS] = 100.0
    tokens = _sample_sequence(_sampler(_request(1, min_new_tokens=2)), [1], 0, [logits] * 3)
    assert EOS not in tokens[:2]
    assert tokens[2] == EOS


def test_repetition_penalty_covers_prompt_and_generated_tokens():
    logits = torch.zeros(1, VOCAB)
    logits[0, 6] = 1.0  # a prompt token
    logits[0, 10] = 0.9
    sampler = _sampler(_request(1, repetition_penalty=2.0))
    # 6 was in the prompt: 1.0 / 2 < 0.9; then 10 was just generated: 0.9 / 2 loses to 1.0 / 2.
    assert _sample_sequence(sampler, [1], 0, [logits, logits]) == [10, 6]


def test_a_slot_reused_by_a_penalised_request_forgets_the_last_ones_history():
    logits = torch.zeros(1, VOCAB)
    logits[0, 6] = 1.0
    sampler = _sampler(_request(1, repetition_penalty=2.0), capacity=1)
    sampler.remove(1)
    fresh = pb.Request(id=2, input_ids=[9], chooser=pb.NextTokenChooser(repetition_penalty=2.0))
    sampler.add(fresh, fresh.input_ids)
    assert _sample_sequence(sampler, [2], 0, [logits]) == [6]


def test_plain_greedy_rows_take_the_argmax_of_half_precision_logits_as_float32_would():
    """No row samples, adjusts or asks for details: the choice is made on the model's own logits
    (no float32 copy), and equals the float32 argmax, ties to the lowest id included."""
    plain = [pb.Request(id=i, input_ids=[5], chooser=pb.NextTokenChooser()) for i in (1, 2, 3)]
    sampler = _sampler(*plain)
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(3, VOCAB, generator=g) * 4).bfloat16()
    logits[2, 7] = logits[2, 11] = logits[2].max() + 1  # a tie: the lower id wins, as in float32
    choice = sampler.choose(logits, [1, 2, 3])
    assert choice.token_ids.tolist() == logits.float().argmax(dim=-1).tolist()
    assert int(choice.token_ids[2]) == 7
    assert choice.details is None
    # One row that wants details sends the whole step through the float32 path, with the same tokens.
    detailed = _sampler(*plain[:2], _request(3))
    assert detailed.choose(logits, [1, 2, 3]).token_ids.tolist() == choice.token_ids.tolist()


class _DeviceOps(TorchDispatchMode):
    """Records the name of each op that runs."""

    def __init__(self):
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        blocking_copy = func is torch.ops.aten._to_copy.default and not kwargs.get("non_blocking", False)
        self.ops.append(f"{func} (blocking)" if blocking_copy else str(func))
        return func(*args, **kwargs)


# What a GPU runs without waiting for its queue: views, fills of a scalar, non-blocking copies.
_NON_WAITING_OPS = {
    "aten.select.int",
    "aten.fill_.Scalar",
    "aten.index_fill_.int_Scalar",
    "aten._to_copy.default",
    "aten.zeros.default",
    "aten.lift_fresh.default",
}


def test_a_request_joins_without_a_copy_that_waits_for_the_device():
    """A join comes while the step before it runs (launched ahead): its parameters reach the
    device as fills and non-blocking copies, so the host never waits for that step. On a GPU,
    ``tensor[slot] = value`` copies the value from pageable host memory, which waits; the meta
    device stands in for the GPU, where the same assignment shows as a scalar tensor copied in."""
    sampler = Sampler(4, VOCAB, [EOS], torch.device("meta"))
    chooser = pb.NextTokenChooser(
        sample=True,
        temperature=0.7,
        top_k=5,
        top_p=0.9,
        typical_p=0.8,
        seed=11,
        repetition_penalty=1.3,
        length_penalty=True,
        length_penalty_start=3,
        length_penalty_decay=1.1,
        min_new_tokens=2,
    )
    penalised = pb.Request(id=1, input_ids=[5, 6, 7], chooser=chooser, resumed_tokens=1)
    with _DeviceOps() as device_ops:
        sampler.add(penalised, penalised.input_ids)
    assert device_ops.ops, "the meta device's ops are seen"
    assert set(device_ops.ops) <= _NON_WAITING_OPS, device_ops.ops


def test_the_requests_that_size_sampling_take_every_path_of_a_step():
    requests = every_path(3)
    sampler = _sampler(*requests)
    # What choose decides its paths from: every flag on for every row.
    for name, values in sampler._host.items():
        if name != "generated":
            assert values[: len(requests)].all(), name
    # Nearly flat logits: every warper keeps more than the 10 top tokens asked for (on peaked
    # random ones, top_p and typical_p at 0.9 sometimes kept fewer).
    logits = torch.randn(3, VOCAB, generator=torch.Generator().manual_seed(0)) * 0.1
    tokens = sampler.choose(logits, [r.id for r in requests]).to_host().result()
    assert [len(t.top_tokens) for t in tokens] == [10, 10, 10]
    assert all(t.logprob < 0 and t.rank >= 1 for t in tokens)
    # The CPU's cache is not sized from free memory.
    assert sampling_peak_bytes(3, VOCAB, torch.float32, torch.device("cpu")) == 0


class _LargestPerLogitResult(TorchDispatchMode):
    """Records the most rows of any tensor with a value per logit (scores, sorts, masks) an op makes."""

    def __init__(self):
        super().__init__()
        self.rows = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, tuple | list) else [out]:
            if isinstance(t, torch.Tensor) and t.dim() == 2 and t.shape[-1] == VOCAB:
                self.rows = max(self.rows, t.shape[0])
        return out


def test_rows_in_chunks_choose_what_the_whole_step_would(monkeypatch):
    """Past CHUNK_LOGITS the chain runs over chunks of rows: the same tokens and details, and
    its work per logit never spans more rows than a chunk."""
    requests = [*every_path(4), _request(4), _request(5, sample=True, seed=11, top_k=3), _request(6, top_p=0.5)]
    ids = [r.id for r in requests]
    logits = torch.randn(len(requests), VOCAB, generator=torch.Generator().manual_seed(5)) * 3
    whole = _sampler(*requests, capacity=8).choose(logits, ids).to_host().result()
    monkeypatch.setattr(sampler_module, "CHUNK_LOGITS", 2 * VOCAB)
    chunked_sampler = _sampler(*requests, capacity=8)
    with _LargestPerLogitResult() as work:
        choice = chunked_sampler.choose(logits, ids)
    assert choice.to_host().result() == whole
    assert work.rows == 2
    assert len({t.token_id for t in whole}) > 1
    assert all(t.top_tokens and t.rank >= 1 for t in whole[:4])  # details, chunk by chunk


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_sampling_on_a_gpu_needs_at_least_its_logits_and_a_sort_of_them():
    rows, vocab = 64, 32000
    peak = sampling_peak_bytes(rows, vocab, torch.bfloat16, torch.device("cuda", 0))
    # bf16 logits, the bool penalty table, float32 values and int64 indices of top-p's sort.
    assert peak >= rows * vocab * (2 + 1 + 12)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_sampling_thousands_of_rows_on_a_gpu_needs_one_chunk_of_work():
    rows, vocab = 2048, 128256  # 16 chunks of a LLaMA-3 vocabulary
    peak = sampling_peak_bytes(rows, vocab, torch.bfloat16, torch.device("cuda", 0))
    # Logits and the penalty table for every row, float32 work for one chunk (~25 bytes a logit):
    # ~1.6 GB, where the whole batch at once held ~7 GB.
    assert peak <= rows * vocab * (2 + 1) + 64 * sampler_module.CHUNK_LOGITS


def test_greedy_rows_that_only_mask_eos_choose_on_the_logits_own_precision():
    """min_new_tokens with nothing else to adjust and no details (every request of the serving
    bench): EOS is masked on a copy in the logits' dtype, not a float32 one, with float32's tokens."""
    requests = [_request(1, min_new_tokens=2), _request(2, min_new_tokens=2), _request(3)]
    for request in requests:
        request.ClearField("details")
    sampler = _sampler(*requests)
    g = torch.Generator().manual_seed(1)
    logits = (torch.randn(3, VOCAB, generator=g) * 4).bfloat16()
    logits[:, EOS] = logits.max() + 1  # EOS leads every row
    expected = logits.float()
    expected[:2, EOS] = float("-inf")  # below min_new_tokens
    with _DeviceOps() as ops:
        choice = sampler.choose(logits, [1, 2, 3])
    assert choice.token_ids.tolist() == expected.argmax(dim=-1).tolist()
    assert int(choice.token_ids[2]) == EOS
    assert not [op for op in ops.ops if "_to_copy" in op]  # no float32 copy of the logits
    assert torch.equal(logits[:, EOS], torch.full((3,), logits.max(), dtype=torch.bfloat16))  # untouched
