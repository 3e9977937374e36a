"""Compiled attention after the tgis_native warm-up: how long it takes, and how many graphs a
random serving mix (1-6 prompts up to 240 tokens joining, decodes beside them, requests leaving)
still compiles afterwards. 0 means no request waits for a compilation.

    python3 bench/compile_warm_up.py
"""

from __future__ import annotations

import random
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch._dynamo.utils import counters

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.support.engines import StepDriver, native_engine, request
from tests.support.tiny_models import build_tiny_causal_lm

SHAPE = {
    "hidden_size": 256,
    "num_attention_heads": 8,
    "num_key_value_heads": 2,
    "intermediate_size": 512,
    "num_hidden_layers": 2,
}
STEPS = 60


def main() -> None:
    model_dir = build_tiny_causal_lm(Path(tempfile.mkdtemp()) / "llama", arch="llama", **SHAPE)
    engine = native_engine(0, 1, 29611, model_dir, torch.bfloat16, torch.device("cuda:0"))
    started = time.monotonic()
    engine.warm_up()
    torch.cuda.synchronize()
    warm_up_s = time.monotonic() - started
    graphs_after_warm_up = counters["stats"]["unique_graphs"]

    rng = random.Random(0)
    driver = StepDriver(engine)
    next_id = 0
    for _ in range(STEPS):
        room = 6 - len(driver.prompt_length)
        if room and (not driver.prompt_length or rng.random() < 0.3):
            for _ in range(rng.randint(1, room)):
                next_id += 1
                driver.join(request(next_id, [rng.randrange(100) for _ in range(rng.randint(1, 240))], 16))
        driver.step()
        ids = list(driver.prompt_length)
        if len(ids) > 1 and rng.random() < 0.3:
            driver.leave(*ids[len(ids) // 2 :])
    torch.cuda.synchronize()
    print(
        f"attention {engine.cache.backend} | warm-up {warm_up_s:.1f} s, {graphs_after_warm_up} graphs"
        f" | {STEPS} serving steps compiled {counters['stats']['unique_graphs'] - graphs_after_warm_up} more"
    )


if __name__ == "__main__":
    main()
