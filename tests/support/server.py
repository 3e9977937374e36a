"""Starting the real text-generation-launcher in a test and talking to it over gRPC."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.support.ports import free_ports
from tgis_proto import generation_pb2_grpc as fmaas_grpc

READY_TIMEOUT_S = 300.0


def launcher_command() -> list[str]:
    executable = shutil.which("text-generation-launcher")
    return [executable] if executable else [sys.executable, "-m", "tgis_router.launcher"]


@dataclass
class RunningServer:
    process: subprocess.Popen
    grpc_port: int
    http_port: int
    channel: grpc.Channel
    stub: fmaas_grpc.GenerationServiceStub
    log_file: Path

    def log(self) -> str:
        return self.log_file.read_text(errors="replace")


def _wait_ready(process: subprocess.Popen, channel: grpc.Channel, log_file: Path, timeout_s: float) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"launcher exited with {process.returncode}:\n{log_file.read_text()[-4000:]}")
        try:
            status = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=1).status
            if status == health_pb2.HealthCheckResponse.SERVING:
                return
        except grpc.RpcError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"launcher not ready after {timeout_s}s:\n{log_file.read_text()[-4000:]}")


def child_pids(pid: int) -> list[int]:
    """The direct children of a process (the launcher's shards)."""
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(p) for p in path.read_text().split()] if path.exists() else []


def stop(process: subprocess.Popen, timeout: float = 30.0) -> int:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    return process.returncode


@contextmanager
def launcher(
    model: str | Path | None,
    *args: str,
    env: Mapping[str, str] | None = None,
    executable: str | None = None,
    ready_timeout_s: float = READY_TIMEOUT_S,
    log_file: Path | None = None,
) -> Iterator[RunningServer]:
    """Runs the launcher on ``model`` (None: the embedded default) with free ports and one torch
    thread per shard, since the test machine's 2 cores are shared by every process. Its output
    goes to ``log_file`` when given (kept, and written as it comes, even if the caller is killed)."""
    grpc_port, http_port = free_ports(2)
    workdir = Path(tempfile.mkdtemp(prefix="tgis-test-"))
    log_file = log_file or workdir / "launcher.log"
    full_env = {
        **os.environ,
        "SHARD_TORCH_THREADS": "1",
        "LOG_LEVEL": "INFO",
        **(env or {}),
    }
    command = [
        *([executable] if executable else launcher_command()),
        *(["--model-name", str(model)] if model is not None else []),
        "--grpc-port",
        str(grpc_port),
        "--port",
        str(http_port),
        "--shard-uds-path",
        str(workdir / "shard"),
        *args,
    ]
    with open(log_file, "wb") as log:
        process = subprocess.Popen(command, env=full_env, stdout=log, stderr=subprocess.STDOUT)
    # Connects are refused until the router is up; gRPC's reconnect backoff (growing to 2 min)
    # would see it seconds late, so retry each half second as the polling does.
    channel = grpc.insecure_channel(f"localhost:{grpc_port}", options=[("grpc.max_reconnect_backoff_ms", 500)])
    try:
        _wait_ready(process, channel, log_file, ready_timeout_s)
        yield RunningServer(process, grpc_port, http_port, channel, fmaas_grpc.GenerationServiceStub(channel), log_file)
    finally:
        channel.close()
        stop(process)
        shutil.rmtree(workdir, ignore_errors=True)
