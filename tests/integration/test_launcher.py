"""Launcher start-up errors (one clear line, non-zero exit) and supervision of its children."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.support.server import launcher, launcher_command
from tests.support.tiny_models import build_tiny_causal_lm
from tgis_proto import generation_pb2 as fmaas


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_tiny_causal_lm(tmp_path_factory.mktemp("tiny"), arch="gpt2")


def _run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*launcher_command(), *args],
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=120,
    )


def _error_lines(result: subprocess.CompletedProcess) -> list[str]:
    return [line for line in result.stderr.splitlines() if "error" in line.lower()]


def test_missing_model_is_one_clear_line(tmp_path):
    result = _run("--model-name", str(tmp_path / "nowhere"), "--shard-uds-path", str(tmp_path / "s"))
    assert result.returncode == 2
    lines = _error_lines(result)
    assert len(lines) == 1
    assert "not found" in lines[0]
    assert "nowhere" in lines[0]


def test_bad_option_value_is_one_clear_line():
    result = _run(env={"MAX_BATCH_SIZE": "lots"})
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "text-generation-launcher: error: invalid value for MAX_BATCH_SIZE: "
        "invalid literal for int() with base 10: 'lots'"
    )


def test_unknown_engine_is_refused_before_any_shard_starts(model_dir, tmp_path):
    result = _run("--model-name", str(model_dir), "--deployment-framework", "warp_drive")
    assert result.returncode == 2
    engines = "hf_optimum_bt, hf_transformers, tgis_native"
    assert f"unknown engine (DEPLOYMENT_FRAMEWORK) 'warp_drive'; installed engines: {engines}" in result.stderr
    assert "shard serving" not in result.stderr


def test_hf_transformers_refuses_two_shards(model_dir):
    result = _run("--model-name", str(model_dir), "--num-gpus", "2")
    assert result.returncode == 2
    assert "hf_transformers runs on one device" in result.stderr


def _children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(p) for p in path.read_text().split()] if path.exists() else []


def test_launcher_exits_non_zero_when_a_shard_dies(model_dir):
    with launcher(model_dir) as server:
        request = fmaas.BatchedGenerationRequest(requests=[fmaas.GenerationRequest(text="hi")])
        assert server.stub.Generate(request).responses[0].generated_token_count > 0
        shards = _children(server.process.pid)
        assert shards, "the launcher has no child processes"
        os.kill(shards[0], signal.SIGKILL)
        assert server.process.wait(timeout=60) == 1
        assert "exited with code" in server.log()


def test_sigterm_stops_everything_with_exit_zero(model_dir):
    with launcher(model_dir) as server:
        shards = _children(server.process.pid)
        server.process.send_signal(signal.SIGTERM)
        assert server.process.wait(timeout=60) == 0
        time.sleep(0.5)
        assert all(not Path(f"/proc/{pid}").exists() for pid in shards)
