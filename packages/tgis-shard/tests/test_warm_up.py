"""The paged engines' warm-up runs every kind of step the router schedules before the shard
serves, so that no request waits for a compilation: among them steps in which prompts join
requests that are decoding (the decodes first, then the prompts), whose decodes the attention
runs apart from the prompt chunks."""

from __future__ import annotations

import dataclasses

import pytest

from tests.support.engines import native_engine
from tests.support.ports import free_port
from tests.support.tiny_models import build_tiny_causal_lm
from tgis_shard.engines.base import ScheduledWork


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_tiny_causal_lm(tmp_path_factory.mktemp("llama"), arch="llama")


class _StepKinds:
    """Records each step of an engine as the attention sees it: prompts only, decodes only, or
    decodes then prompts (a request decodes once a step has run its prompt, until it leaves)."""

    def __init__(self, engine, monkeypatch):
        self.kinds: set[str] = set()
        self._started: set[int] = set()
        step, leave = engine.step, engine.leave
        monkeypatch.setattr(engine, "step", lambda work: self._record(work) or step(work))
        monkeypatch.setattr(engine, "leave", lambda ids: self._started.difference_update(ids) or leave(ids))

    def _record(self, work: list[ScheduledWork]) -> None:
        decoding = [w.request_id in self._started for w in work]
        if all(decoding):
            self.kinds.add("decodes")
        elif not any(decoding):
            self.kinds.add("prompts")
        else:
            assert decoding == sorted(decoding, reverse=True), "a step's decodes come before its prompts"
            self.kinds.add("decodes then prompts")
        self._started.update(w.request_id for w in work)


def test_the_warm_up_runs_decodes_with_prompts_joining_them_and_leaves_nothing_behind(model_dir, monkeypatch):
    engine = native_engine(0, 1, free_port(), model_dir)
    # The warm-up runs on GPUs and with PT2_COMPILE; here its steps run eagerly on the CPU.
    engine.ctx = dataclasses.replace(engine.ctx, pt2_compile=True)
    recorded = _StepKinds(engine, monkeypatch)
    engine.warm_up()
    assert recorded.kinds == {"prompts", "decodes", "decodes then prompts"}
    assert engine.request_ids() == []


def test_prompts_join_a_synthetic_batch_in_its_first_decode_step_and_decode_along(model_dir, monkeypatch):
    engine = native_engine(0, 1, free_port(), model_dir)
    steps: list[list[tuple[int, int]]] = []
    step = engine.step
    record = steps.append
    monkeypatch.setattr(engine, "step", lambda work: record([(w.request_id, w.tokens) for w in work]) or step(work))
    engine.run_synthetic([3, 2], decode_steps=2, joining=[4])
    (a, b, c) = sorted({rid for s in steps for rid, _ in s})
    assert steps == [[(a, 3), (b, 2)], [(a, 1), (b, 1), (c, 4)], [(a, 1), (b, 1), (c, 1)]]
    assert engine.request_ids() == []
    with pytest.raises(ValueError, match="decode_steps must be at least 1"):
        engine.run_synthetic([3], decode_steps=0, joining=[2])
