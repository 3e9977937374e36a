"""Dynamic batch sizing against a fixed MAX_BATCH_SIZE on a real engine (issue 5).

Runs the router's admission (tgis_router.admission) over the shard's real engine in one process:
a mixed load of short and long requests, every request running to its drawn output length.
Two policies on the same load:
  dynamic: the shard's measured memory model (ESTIMATE_MEMORY=auto) and a large MAX_BATCH_SIZE;
  fixed:   count-only batching at the largest MAX_BATCH_SIZE that can never run out of memory
           (enough room for that many worst-case requests under the same limit).
Prints peak memory against the limit, whether the device ran out of memory, average batch size,
tokens per step and tokens per second, and per kind of step (prefill, merge, filter, decode) the
highest memory it reached above the weights, to show which one an overshoot comes from.

    python3 bench/batch_sizing.py --shape 8b --engine hf_transformers      # on a GPU
    python3 bench/batch_sizing.py --shape tiny --requests 40                # CPU smoke run
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.random_model import SHAPES, random_model
from tgis_proto import shard_pb2 as pb
from tgis_proto.plugins import resolve
from tgis_router.admission import Admission, AdmissionConfig, Candidate, Running, memory_model, projected_peak
from tgis_shard.engines.base import ShardContext
from tgis_shard.memory import configure_cuda_allocator
from tgis_shard.registry import shard_registry


@dataclass
class Request:
    id: int
    input_length: int
    max_new_tokens: int
    output_length: int
    generated: int = 0


def mixed_load(count: int, max_sequence_length: int, seed: int, long_fraction: float = 0.2) -> list[Request]:
    """Short chat-like requests and a ``long_fraction`` of long-document ones; half run to their
    max_new_tokens."""
    rng = random.Random(seed)
    requests = []
    for i in range(count):
        if rng.random() < long_fraction:
            input_length = rng.randint(max_sequence_length // 4, max_sequence_length // 2)
            max_new = rng.randint(max_sequence_length // 16, max_sequence_length // 8)
        else:
            short = max(2, max_sequence_length // 32)
            input_length = rng.randint(1, short)
            max_new = rng.randint(1, short)
        output = max_new if rng.random() < 0.5 else rng.randint(1, max_new)
        requests.append(Request(i, input_length, max_new, output))
    return requests


class StepPeaks:
    """Highest memory above the starting point (the weights) seen in each kind of step, and
    where an out-of-memory error struck."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.cuda = device.type == "cuda"
        self.baseline = torch.cuda.memory_allocated(device) if self.cuda else 0
        self.peaks: dict[str, int] = {}
        self.oom: str = ""

    @contextmanager
    def step(self, kind: str) -> Iterator[None]:
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        try:
            yield
        except torch.OutOfMemoryError as error:
            reserved = torch.cuda.memory_reserved(self.device) / 2**30
            allocated = torch.cuda.memory_allocated(self.device) / 2**30
            first_line = str(error).splitlines()[0][:160]
            self.oom = f"in {kind}: reserved {reserved:.1f} GiB, allocated {allocated:.1f} GiB; {first_line}"
            raise
        finally:
            peak = torch.cuda.max_memory_allocated(self.device) - self.baseline if self.cuda else 0
            self.peaks[kind] = max(self.peaks.get(kind, 0), peak)


def run(engine, admission: Admission, load: list[Request], device: torch.device, progress: int = 0) -> dict:
    queue = list(load)
    running: dict[int, Request] = {}
    state, steps, tokens, sizes, waited = None, 0, 0, [], 0
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    peaks = StepPeaks(device)
    started = time.monotonic()
    oom = False
    try:
        while queue or running:
            states = [Running(r.input_length + r.generated, r.max_new_tokens - r.generated) for r in running.values()]
            decision = admission.select(
                states, [Candidate(r.input_length, r.max_new_tokens, 0.0) for r in queue], waited
            )
            joining = [queue[i] for i in decision.admit]
            waited = 0 if joining else waited + 1
            if joining:
                queue = [r for i, r in enumerate(queue) if i not in set(decision.admit)]
                requests = [
                    pb.Request(id=r.id, input_ids=[5] * r.input_length, max_new_tokens=r.max_new_tokens)
                    for r in joining
                ]
                for request in requests:
                    engine.sampler.add(request, request.input_ids)
                with peaks.step("prefill"):
                    _, new_state, choice = engine.prefill(requests)
                choice.commit()
                for r in joining:
                    r.generated = 1
                    running[r.id] = r
                if state is None:
                    state = new_state
                else:
                    with peaks.step("merge"):
                        state = engine.concatenate([state, new_state])
            finished = [rid for rid, r in running.items() if r.generated >= r.output_length]
            for rid in finished:
                del running[rid]
                engine.sampler.remove(rid)
            if state is not None:
                with peaks.step("filter"):
                    state = state.filter(list(running))
            if state is None:
                continue
            with peaks.step("decode"):
                engine.decode(state)
            for r in running.values():
                r.generated += 1
            steps += 1
            tokens += len(running)
            sizes.append(len(running))
            if progress and steps % progress == 0:
                top = max(peaks.peaks.values(), default=0) / 2**30
                print(
                    f"  step {steps}: batch {len(running)}, queue {len(queue)}, peak {top:.1f} GiB above weights,"
                    f" {time.monotonic() - started:.0f} s",
                    flush=True,
                )
    except torch.OutOfMemoryError:
        oom = True
    elapsed = time.monotonic() - started
    if state is not None:
        state.release()
    return {
        "oom": oom,
        "steps": steps,
        "tokens": tokens,
        "avg_batch": sum(sizes) / max(1, len(sizes)),
        "max_batch": max(sizes, default=0),
        "tokens_per_s": tokens / elapsed,
        "peak_gib": max(peaks.peaks.values(), default=0) / 2**30,
        "step_peaks_gib": {kind: peak / 2**30 for kind, peak in peaks.peaks.items()},
        "elapsed_s": elapsed,
        "oom_at": peaks.oom,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=SHAPES, default="tiny")
    parser.add_argument("--engine", default="hf_transformers")
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--max-sequence-length", type=int, default=4096)
    parser.add_argument("--max-batch-size", type=int, default=256)
    parser.add_argument("--safety-margin", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--long-fraction", type=float, default=0.2, help="share of long-document requests")
    parser.add_argument("--repeats", type=int, default=1, help="runs of each policy on the same load")
    parser.add_argument("--progress", type=int, default=0, help="print a progress line every this many steps")
    parser.add_argument("--fixed", type=int, default=0, help="fixed MAX_BATCH_SIZE (default: computed)")
    parser.add_argument(
        "--policy", choices=("both", "dynamic", "fixed"), default="both", help="run one policy (e.g. one per GPU)"
    )
    args = parser.parse_args()
    configure_cuda_allocator()
    device = torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    with tempfile.TemporaryDirectory() as folder:
        model_dir = random_model(Path(folder), args.shape, args.max_sequence_length, device)
        registry = shard_registry(None)
        ctx = ShardContext(
            model_dir=model_dir,
            model_type="llama",
            dtype=torch.bfloat16 if device.type == "cuda" else torch.float32,
            device=device,
            rank=0,
            world_size=1,
            max_sequence_length=args.max_sequence_length,
            registry=registry,
            max_batch_size=args.max_batch_size,
            batch_safety_margin=args.safety_margin,
            hf_paged=False,  # hf_transformers' padded batches, which this bench sizes
        )
        engine = resolve(registry.engine(args.engine).target)(ctx)
        info = engine.info()
        info.memory.CopyFrom(engine.memory_model())
        model = memory_model(info)
        worst = Running(args.max_sequence_length // 2, args.max_sequence_length // 8)
        safe = max(b for b in range(1, args.max_batch_size + 1) if projected_peak(model, [worst] * b) <= model.limit)
        fixed = args.fixed or safe
        print(
            f"{args.shape} on {device} ({args.engine}): limit {model.limit / 2**30:.1f} GiB, "
            f"{model.bytes_per_token / 2**10:.1f} KiB/token, "
            f"prefill {model.prefill_bytes_per_token / 2**10:.1f} KiB/token, measured={info.memory.measured}; "
            f"largest fixed batch whose worst-case requests fit the limit: {safe}"
        )
        unlimited = type(model)(float("inf"), 0.0, 0.0, model.padded)
        policies = {
            "dynamic": Admission(model, AdmissionConfig(args.max_batch_size, max_waiting_tokens=0)),
            f"fixed-{fixed}": Admission(
                unlimited, AdmissionConfig(fixed, max_prefill_padding=1.0, max_waiting_tokens=0)
            ),
        }
        print(
            f"{'policy':12s} {'OOM':>4s} {'avg batch':>9s} {'max':>4s} {'tok/step':>8s} {'tok/s':>8s}"
            f" {'peak/limit':>10s}  peak above weights per step kind (GiB)"
        )
        chosen = {name: policy for name, policy in policies.items() if args.policy in ("both", name.split("-")[0])}
        for _ in range(args.repeats):
            for name, admission in chosen.items():
                load = mixed_load(args.requests, args.max_sequence_length, args.seed, args.long_fraction)
                result = run(engine, admission, load, device, args.progress)
                per_step = result["tokens"] / max(1, result["steps"])
                steps = " ".join(f"{kind} {gib:.1f}" for kind, gib in result["step_peaks_gib"].items())
                print(
                    f"{name:12s} {'yes' if result['oom'] else 'no':>4s} {result['avg_batch']:9.1f} "
                    f"{result['max_batch']:4d} {per_step:8.1f} {result['tokens_per_s']:8.0f}"
                    f" {result['peak_gib'] * 2**30 / model.limit:10.2f}  {steps}",
                    flush=True,
                )
                if result["oom_at"]:
                    print(f"{'':12s} out of memory {result['oom_at']}", flush=True)


if __name__ == "__main__":
    main()
