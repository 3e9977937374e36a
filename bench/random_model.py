"""Random-weight LLaMA models of real shapes, saved like a checkpoint, for the benches."""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import torch

SHAPES = {
    # Llama-3-8B: hidden 4096, 32 layers, 32 heads, 8 KV heads, MLP 14336, vocab 128256.
    "8b": {
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "vocab_size": 128256,
    },
    # A ~1B LLaMA (TinyLlama-like): quick GPU runs with a squeezed limit.
    "1b": {
        "hidden_size": 2048,
        "intermediate_size": 5632,
        "num_hidden_layers": 22,
        "num_attention_heads": 32,
        "num_key_value_heads": 4,
        "vocab_size": 32000,
    },
    "tiny": {
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": 512,
    },
}


def add_shape_arguments(parser: argparse.ArgumentParser, shape: str = "8b") -> None:
    """A bench's options for a layer's sizes, defaulting to ``SHAPES[shape]``: --hidden,
    --intermediate, --heads, --kv-heads, --head-dim, --vocab."""
    config = SHAPES[shape]
    heads = config["num_attention_heads"]
    parser.add_argument("--hidden", type=int, default=config["hidden_size"])
    parser.add_argument("--intermediate", type=int, default=config["intermediate_size"])
    parser.add_argument("--heads", type=int, default=heads)
    parser.add_argument("--kv-heads", type=int, default=config["num_key_value_heads"])
    parser.add_argument("--head-dim", type=int, default=config["hidden_size"] // heads)
    parser.add_argument("--vocab", type=int, default=config["vocab_size"])


def build_random_model(dest: Path, shape: dict, max_sequence_length: int, device: torch.device) -> Path:
    """Random bf16 (CPU: fp32) LLaMA weights of a real shape, saved as safetensors with a tokenizer."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from tests.support.tiny_models import train_tiny_tokenizer

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    config = LlamaConfig(**shape, max_position_embeddings=max_sequence_length, pad_token_id=0, eos_token_id=1)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0.0, 0.02)
    model.save_pretrained(dest)
    train_tiny_tokenizer().save_pretrained(dest)
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return dest


def random_model(folder: Path, shape_name: str, max_sequence_length: int, device: torch.device) -> Path:
    """The random model of that shape in ``folder``: the one an earlier run saved there, else built
    (the 8B shape takes a minute to write; the stages of one device call share it)."""
    dtype = "bf16" if device.type == "cuda" else "fp32"
    dest = folder / f"{shape_name}-{max_sequence_length}-{dtype}"
    if dest.is_dir():
        return dest
    # Saved under another name first: a run stopped mid-save leaves no model to reuse.
    partial = dest.with_name(dest.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    build_random_model(partial, SHAPES[shape_name], max_sequence_length, device)
    partial.rename(dest)
    return dest
