"""Prints the memory models shard engines report on a GPU (ESTIMATE_MEMORY=auto) for a
~1B-parameter LLaMA shape with random weights, and what they admit.

    python3 bench/memory_model_probe.py
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.support.tiny_models import build_tiny_causal_lm
from tgis_shard.engines.base import ShardContext
from tgis_shard.registry import shard_registry

SHAPE = {
    "hidden_size": 2048,
    "intermediate_size": 5632,
    "num_hidden_layers": 16,
    "num_attention_heads": 16,
    "num_key_value_heads": 8,
    "max_position_embeddings": 4096,
}
MAX_SEQUENCE_LENGTH = 4096


def probe(engine_name: str, model_dir: Path) -> None:
    from tgis_proto.plugins import resolve

    registry = shard_registry(None)
    ctx = ShardContext(
        model_dir=model_dir,
        model_type="llama",
        dtype=torch.bfloat16,
        device=torch.device("cuda:0"),
        rank=0,
        world_size=1,
        max_sequence_length=MAX_SEQUENCE_LENGTH,
        registry=registry,
        max_batch_size=64,
        master_addr="127.0.0.1",
        master_port=29533,
        hf_paged=False,  # hf_transformers' padded memory model
    )
    started = time.monotonic()
    engine = resolve(registry.engine(engine_name).target)(ctx)
    model = engine.memory_model()
    took = time.monotonic() - started
    tokens = model.limit_bytes / model.bytes_per_token
    print(
        f"{engine_name:16s} limit {model.limit_bytes / 2**30:.1f} GiB"
        f" | {model.bytes_per_token / 2**10:.1f} KiB/token"
        f" | prefill {model.prefill_bytes_per_token / 2**10:.1f} KiB/token"
        f" | max prefill tokens {model.max_prefill_tokens} | block {model.block_size}"
        f" | measured {model.measured} | {tokens / MAX_SEQUENCE_LENGTH:.1f} full-length requests fit"
        f" | {took:.1f}s"
    )
    del engine
    torch.cuda.empty_cache()


def main() -> None:
    with tempfile.TemporaryDirectory() as folder:
        model_dir = build_tiny_causal_lm(Path(folder) / "llama-1b", arch="llama", **SHAPE)
        for engine_name in ("hf_transformers", "tgis_native"):
            probe(engine_name, model_dir)


if __name__ == "__main__":
    main()
