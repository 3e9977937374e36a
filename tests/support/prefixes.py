"""Prompt prefixes for tests: real PEFT prompt-tuning adapters and the transformers reference."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM


def save_peft_prefix(model_dir: Path, store: Path, prefix_id: str, length: int, seed: int) -> torch.Tensor:
    """Saves a PEFT prompt-tuning adapter of ``length`` virtual tokens for the model as
    ``store/prefix_id`` (random embeddings, scaled like the model's own) and returns them."""
    from peft import PromptTuningConfig, TaskType, get_peft_model

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    peft_model = get_peft_model(model, PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=length))
    scale = model.get_input_embeddings().weight.std().item()
    embedding = peft_model.prompt_encoder["default"].embedding.weight
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        embedding.copy_(torch.randn(embedding.shape, generator=generator) * scale)
    peft_model.save_pretrained(store / prefix_id)
    return embedding.detach().clone()


@torch.no_grad()
def reference_greedy_with_prefix(
    model_dir: Path, prefix: torch.Tensor | None, input_ids: list[int], max_new_tokens: int
) -> list[int]:
    """Greedy tokens of plain transformers for the prompt's embeddings after the prefix's."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    embeds = model.get_input_embeddings()(torch.tensor([input_ids]))
    if prefix is not None:
        embeds = torch.cat([prefix[None].to(embeds.dtype), embeds], dim=1)
    output = model.generate(
        inputs_embeds=embeds,
        attention_mask=torch.ones(embeds.shape[:2], dtype=torch.long),
        do_sample=False,
        max_new_tokens=max_new_tokens,
    )
    return output[0].tolist()
