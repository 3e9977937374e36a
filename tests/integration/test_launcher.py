"""Launcher start-up errors (one clear line, non-zero exit) and supervision of its children."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import grpc
import pytest

from tests.support.ports import free_port
from tests.support.server import child_pids, launcher, launcher_command
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


def test_a_failed_start_writes_its_one_line_reason_to_the_termination_log(tmp_path):
    termination_log = tmp_path / "termination-log"
    result = _run(
        "--model-name",
        str(tmp_path / "nowhere"),
        "--shard-uds-path",
        str(tmp_path / "s"),
        env={"TERMINATION_LOG_PATH": str(termination_log)},
    )
    assert result.returncode == 2
    (line,) = _error_lines(result)
    assert termination_log.read_text() == line.removeprefix("text-generation-launcher: error: ") + "\n"


def test_unknown_engine_is_refused_before_any_shard_starts(model_dir, tmp_path):
    result = _run("--model-name", str(model_dir), "--deployment-framework", "warp_drive")
    assert result.returncode == 2
    engines = "hf_optimum_bt, hf_optimum_ort, hf_transformers, tgis_native"
    assert f"unknown engine (DEPLOYMENT_FRAMEWORK) 'warp_drive'; installed engines: {engines}" in result.stderr
    assert "shard serving" not in result.stderr


def test_hf_transformers_refuses_two_shards(model_dir):
    result = _run("--model-name", str(model_dir), "--num-gpus", "2")
    assert result.returncode == 2
    assert "hf_transformers runs on one device" in result.stderr


def _long_stream(server, max_new_tokens: int = 200):
    """A stream that runs for its whole length (EOS masked), and its first message."""
    request = fmaas.SingleGenerationRequest(
        request=fmaas.GenerationRequest(text="The lighthouse keeper"),
        params=fmaas.Parameters(
            stopping=fmaas.StoppingCriteria(max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens)
        ),
    )
    stream = server.stub.GenerateStream(request, timeout=120)
    next(stream)  # the header: the request is accepted and queued
    next(stream)  # its first token: the request runs
    return stream


def _health(server) -> tuple[int, bytes]:
    """(status, body) of /health."""
    try:
        with urllib.request.urlopen(f"http://localhost:{server.http_port}/health", timeout=30) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return build_tiny_causal_lm(tmp_path_factory.mktemp("tiny-llama"), arch="llama")


@pytest.mark.parametrize("ranks", [1, 2])
def test_shard_death_fails_streams_unavailable_and_the_launcher_stops_the_rest_and_exits_non_zero(
    model_dir, llama_dir, ranks
):
    engine = [] if ranks == 1 else ["--deployment-framework", "tgis_native", "--num-gpus", "2"]
    model = model_dir if ranks == 1 else llama_dir
    with launcher(model, *engine, "--master-port", str(free_port()), "--max-new-tokens", "200") as server:
        stream = _long_stream(server)
        shards = child_pids(server.process.pid)
        assert len(shards) == ranks
        os.kill(shards[-1], signal.SIGKILL)
        with pytest.raises(grpc.RpcError) as e:
            for _ in stream:
                pass
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE
        assert e.value.details()
        # The router refuses new calls while it shuts down, and /health says why it is unhealthy.
        with pytest.raises(grpc.RpcError) as e:
            server.stub.Generate(
                fmaas.BatchedGenerationRequest(requests=[fmaas.GenerationRequest(text="hi")]), timeout=30
            )
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE
        assert e.value.details()
        status, body = _health(server)
        assert status == 503
        assert json.loads(body)["error"].startswith("forward pass failed")
        assert server.process.wait(timeout=60) == 1
        assert "exited with code" in server.log()
        time.sleep(0.5)
        assert all(not Path(f"/proc/{pid}").exists() for pid in shards)


def test_sigterm_finishes_running_streams_refuses_new_calls_and_exits_zero(model_dir):
    with launcher(model_dir, "--max-new-tokens", "200") as server:
        streams = [_long_stream(server) for _ in range(3)]
        shards = child_pids(server.process.pid)
        server.process.send_signal(signal.SIGTERM)
        # Calls that arrive before the router saw the signal are still served; then it refuses.
        deadline = time.monotonic() + 5
        refused = None
        while refused is None:
            try:
                server.stub.Generate(fmaas.BatchedGenerationRequest(requests=[fmaas.GenerationRequest(text="hi")]))
            except grpc.RpcError as e:
                refused = e.code(), e.details()
            assert time.monotonic() < deadline, "new calls were still accepted 5 s after SIGTERM"
        assert refused == (grpc.StatusCode.UNAVAILABLE, "the server is shutting down")
        for stream in streams:
            *_, last = stream
            assert last.stop_reason == fmaas.MAX_TOKENS
            assert last.generated_token_count == 200
        assert server.process.wait(timeout=60) == 0
        time.sleep(0.5)
        assert all(not Path(f"/proc/{pid}").exists() for pid in shards)


def test_max_new_tokens_not_below_the_sequence_length_is_clamped_as_tgis_does(model_dir):
    with launcher(model_dir, "--max-new-tokens", "5000", "--max-sequence-length", "256") as server:
        assert server.stub.ModelInfo(fmaas.ModelInfoRequest()).max_new_tokens == 255
        request = fmaas.BatchedGenerationRequest(
            requests=[fmaas.GenerationRequest(text="hi")],
            params=fmaas.Parameters(stopping=fmaas.StoppingCriteria(max_new_tokens=256)),
        )
        with pytest.raises(grpc.RpcError) as e:
            server.stub.Generate(request, timeout=30)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert e.value.details() == "max_new_tokens must be <= 255"
        assert "MAX_NEW_TOKENS 5000 is not below MAX_SEQUENCE_LENGTH 256; using 255" in server.log()
