"""The benches run end to end on the CPU (their GPU numbers are in bench/RESULTS.md)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from bench.serving import idle_gaps

ROOT = Path(__file__).resolve().parents[2]


def _bench(script: str, *args: str) -> str:
    command = [sys.executable, f"bench/{script}", *args]
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300, check=True).stdout


def test_batch_sizing_bench_runs_both_policies_on_the_same_load() -> None:
    out = _bench("batch_sizing.py", "--shape", "tiny", "--requests", "12", "--max-sequence-length=256")
    rows = [line.split() for line in out.splitlines() if line.startswith(("dynamic", "fixed-"))]
    assert [row[0].split("-")[0] for row in rows] == ["dynamic", "fixed"]
    assert all(row[1] == "no" for row in rows)  # no out-of-memory
    assert all(float(row[2]) >= 1 for row in rows)  # average batch
    assert all("prefill" in " ".join(row) and "decode" in " ".join(row) for row in rows)


def test_router_overhead_bench_measures_every_option_at_every_batch_size() -> None:
    out = _bench("router_overhead.py", "--batch-sizes", "1", "4", "--steps", "4")
    rows = [line.split() for line in out.splitlines() if line.strip() and line.split()[0].isdigit()]
    assert [int(row[0]) for row in rows] == [1, 1, 1, 4, 4, 4]
    assert all(float(row[-3]) > 0 for row in rows)  # microseconds per request-token


def test_detokenizers_bench_times_both_and_finds_the_router_s_exact() -> None:
    out = _bench("detokenizers.py", "--tokens", "200", "--rounds", "1")
    table = [line.split("|")[1:-1] for line in out.splitlines() if line.startswith("|")][2:]  # past the header
    rows = {cells[0].strip(): cells[1:] for cells in table}
    assert set(rows) == {"IncrementalDetokenizer (tgis_router)", "DecodeStream"}
    assert all(float(cells[0]) > 0 for cells in rows.values())  # microseconds per token
    ours = rows["IncrementalDetokenizer (tgis_router)"]
    assert [cell.split()[0] for cell in ours[1:]] == ["0", "0"]  # no text differs from the reference


def test_router_alone_bench_streams_through_the_real_router() -> None:
    out = _bench("router_alone.py", "--streams", "4", "--seconds", "1", "--max-new-tokens", "8", "--step-ms", "0", "2")
    rows = [line.split("|")[1:-1] for line in out.splitlines() if line.startswith("|")][2:]
    assert [row[0].strip() for row in rows] == ["0 ms", "2 ms"]
    assert all(float(row[1].replace(",", "")) > 0 for row in rows)  # tokens per second
    assert all(int(row[2]) > 0 for row in rows)  # calls completed


def test_router_alone_bench_runs_the_serving_bench_s_rounds_against_a_device_s_step_cost() -> None:
    out = _bench(
        "router_alone.py",
        *("--streams", "3", "--rounds", "2", "--max-new-tokens", "6", "--prompt-tokens", "16"),
        *("--step-ms", "2", "--decode-row-ms", "0.1", "--knee-rows", "8", "--prompt-token-ms", "0.05"),
    )
    rows = [line.split("|")[1:-1] for line in out.splitlines() if line.startswith("|")][2:]
    assert len(rows) == 1
    assert int(rows[0][2]) == 6  # 3 streams × 2 requests each, then the run ends
    step_p50 = float(rows[0][6].split()[0])
    assert step_p50 >= 2.0  # no fake step is shorter than its base
    ttft_p50 = float(rows[0][8].split()[0])
    assert ttft_p50 > 0


def test_a_fake_step_costs_rows_past_the_knee_only() -> None:
    from bench.router_alone import StepCost

    knee = StepCost(base=1.0, per_decode=0.01, per_prompt_token=0.1, knee_rows=100)
    assert knee.seconds(decodes=50, prompt_tokens=50) == 1.0 + 0.5  # at the knee: prompt rows ride along
    assert knee.seconds(decodes=50, prompt_tokens=60) == 1.0 + 0.5 + 0.1 * 10
    linear = StepCost(base=1.0, per_decode=0.01, per_prompt_token=0.1)
    assert linear.seconds(decodes=50, prompt_tokens=50) == 1.0 + 0.5 + 5.0


def test_serving_bench_measures_the_server_beside_its_baselines() -> None:
    out = _bench(
        "serving.py", "--shape", "tiny", "--concurrency", "1", "2", "--prompt-tokens", "16", "--new-tokens", "8"
    )
    rows = [line.split("|")[1:-1] for line in out.splitlines() if line.startswith("|")][2:]
    assert [int(row[0]) for row in rows] == [1, 2]
    for row in rows:
        served, roofline, generate = (float(row[i].replace(",", "")) for i in (1, 4, 6))
        assert served > 0
        assert roofline > 0
        assert generate > 0
    for row in rows:  # the engine's own step at that batch size, and the server's ITL over it
        assert float(row[8].split()[0]) > 0
        assert float(row[9]) > 0
    assert "CUDA graphs off" in out  # no GPU here


def test_the_serving_bench_sums_the_device_s_idle_gaps_by_what_surrounds_them() -> None:
    spans = [
        ("graph kernel", 0.0, 10.0),
        ("overlapping", 5.0, 12.0),  # ends after the first: the gap after it starts at 12
        ("copy", 15.0, 16.0),
        ("graph kernel", 16.0, 20.0),  # back to back: no gap
        ("copy", 22.5, 23.0),
    ]
    assert idle_gaps(spans) == {"overlapping → copy": [3.0], "graph kernel → copy": [2.5]}


def test_serving_bench_sets_tensor_parallel_against_one_device_in_one_run() -> None:
    out = _bench(
        "serving.py",
        *("--shape", "tiny", "--concurrency", "1", "--prompt-tokens", "16", "--new-tokens", "8"),
        *("--variants", "default", "tp2", "--no-generate", "--no-in-process"),
    )
    assert "**tp2** (" in out
    assert "TP=2" in out.split("**tp2** (")[1].splitlines()[0]
    ratio_lines = [line for line in out.splitlines() if line.startswith("tp2: TP=2 against TP=1 (tok/s): ")]
    assert len(ratio_lines) == 1
    ratio = float(ratio_lines[0].split("1 streams ")[1].rstrip("×"))
    assert ratio > 0
