"""Prompt prefixes for tests: real PEFT prompt-tuning adapters and the transformers reference."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, PreTrainedModel

from tests.support.engines import NEW_TOKENS, StepDriver, request
from tgis_shard.engines.base import Engine


def _load(model_dir: Path) -> tuple[PreTrainedModel, bool]:
    seq2seq = bool(getattr(AutoConfig.from_pretrained(model_dir), "is_encoder_decoder", False))
    auto = AutoModelForSeq2SeqLM if seq2seq else AutoModelForCausalLM
    return auto.from_pretrained(model_dir, dtype=torch.float32).eval(), seq2seq


def save_peft_prefix(model_dir: Path, store: Path, prefix_id: str, length: int, seed: int) -> torch.Tensor:
    """Saves a PEFT prompt-tuning adapter of ``length`` virtual tokens for the model as
    ``store/prefix_id`` (random embeddings, scaled like the model's own) and returns the ones
    generation uses (a seq2seq adapter's encoder block)."""
    from peft import PromptTuningConfig, TaskType, get_peft_model

    model, seq2seq = _load(model_dir)
    task = TaskType.SEQ_2_SEQ_LM if seq2seq else TaskType.CAUSAL_LM
    peft_model = get_peft_model(model, PromptTuningConfig(task_type=task, num_virtual_tokens=length))
    scale = model.get_input_embeddings().weight.std().item()
    embedding = peft_model.prompt_encoder["default"].embedding.weight
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        embedding.copy_(torch.randn(embedding.shape, generator=generator) * scale)
    peft_model.save_pretrained(store / prefix_id)
    return embedding[:length].detach().clone()


@torch.no_grad()
def reference_greedy_with_prefix(
    model_dir: Path,
    prefix: torch.Tensor | None,
    input_ids: list[int],
    max_new_tokens: int,
    decoder_prefix: torch.Tensor | None = None,
) -> list[int]:
    """Greedy tokens of plain transformers for the prompt's embeddings after the prefix's (the
    encoder's input, for seq2seq models; ``decoder_prefix`` goes before the decoder start token)."""
    model, seq2seq = _load(model_dir)
    embed = model.get_input_embeddings()
    embeds = embed(torch.tensor([input_ids]))
    if prefix is not None:
        embeds = torch.cat([prefix[None].to(embeds.dtype), embeds], dim=1)
    if decoder_prefix is not None:
        return _greedy_with_decoder_prefix(model, embeds, decoder_prefix, max_new_tokens)
    output = model.generate(
        inputs_embeds=embeds,
        attention_mask=torch.ones(embeds.shape[:2], dtype=torch.long),
        do_sample=False,
        max_new_tokens=max_new_tokens,
    )
    # Encoder-decoder output starts with the decoder start token.
    return output[0, 1 if seq2seq else 0 :].tolist()


def _greedy_with_decoder_prefix(
    model: PreTrainedModel, encoder_embeds: torch.Tensor, decoder_prefix: torch.Tensor, max_new_tokens: int
) -> list[int]:
    """generate() takes no decoder embeddings: full forward passes, one per new token."""
    tokens = [model.config.decoder_start_token_id]
    eos = model.config.eos_token_id
    for _ in range(max_new_tokens):
        decoder_embeds = torch.cat([decoder_prefix[None], model.get_input_embeddings()(torch.tensor([tokens]))], dim=1)
        logits = model(inputs_embeds=encoder_embeds, decoder_inputs_embeds=decoder_embeds).logits[0, -1]
        tokens.append(int(logits.argmax()))
        if tokens[-1] == eos:
            break
    return tokens[1:]


# The prefix scenario: request index -> (prefix id, length); request 1 has none. A request with
# JOINING_ID and the longer prefix joins the running batch after two steps.
PREFIXES = {0: ("short", 3), 2: ("team/long", 7)}
JOINING_ID = 9


def save_prefixes(model_dir: Path, store: Path) -> dict[str, torch.Tensor]:
    """The scenario's prefixes as PEFT adapters in ``store``; their embeddings by id."""
    return {name: save_peft_prefix(model_dir, store, name, n, seed=i) for i, (name, n) in PREFIXES.items()}


def run_prefix_scenario(engine: Engine, ids: list[list[int]], chunk: int | None = None) -> dict[int, list[int]]:
    """Two prefixes of different lengths and a plain prompt in one batch; after two steps a
    prefixed request joins. Every request's tokens."""
    chosen = {i: PREFIXES[i][0] if i in PREFIXES else "" for i in range(len(ids))}
    driver = StepDriver(engine, chunk)
    driver.join(*(request(i, ids[i], NEW_TOKENS, prefix_id=chosen[i]) for i in range(len(ids))))
    driver.run(3)
    driver.join(request(JOINING_ID, ids[0], NEW_TOKENS, prefix_id=PREFIXES[2][0]))
    driver.run_until(NEW_TOKENS)
    return driver.outputs


def check_prefix_outputs(
    model_dir: Path, ids: list[list[int]], prefixes: dict[str, torch.Tensor], outputs: dict[int, list[int]]
) -> None:
    """Each request's tokens equal transformers on its prefixed embeddings, and the prefix mattered."""
    cases = [(i, ids[i], prefixes[PREFIXES[i][0]] if i in PREFIXES else None) for i in range(len(ids))]
    cases.append((JOINING_ID, ids[0], prefixes[PREFIXES[2][0]]))
    for rid, prompt, prefix in cases:
        expected = reference_greedy_with_prefix(model_dir, prefix, prompt, NEW_TOKENS)
        assert outputs[rid][: len(expected)] == expected, rid
    unprefixed = reference_greedy_with_prefix(model_dir, None, ids[2], NEW_TOKENS)
    assert outputs[2][: len(unprefixed)] != unprefixed  # the comparison can tell a prefix from none
