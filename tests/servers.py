"""The service's parts as plain processes on loopback: an MLflow tracking server and optuna-dashboard.

The same topology as docker-compose.yml, without a container engine. Every start and stop has a deadline.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from sweeps.ui import mlflow_server_env
from tests.preloaded import popen


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_get(url: str, timeout: float = 5.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def get_json(url: str) -> object:
    status, body = http_get(url)
    assert status == 200, f"GET {url}: HTTP {status}"
    return json.loads(body)


class _Process:
    name = "server"

    def __init__(self, cmd: list[str], health: str, log: Path, env: dict | None = None) -> None:
        self.health = health
        self.log = log
        with open(log, "ab") as out:
            self.proc = popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env,
                              start_new_session=True)  # its own group: workers it forks stop with it

    def wait_ready(self, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n{self.log.read_text()[-3000:]}")
            try:
                if http_get(self.health, timeout=2)[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.3)
        raise RuntimeError(f"{self.name} not ready on {self.health} after {timeout}s:\n{self.log.read_text()[-3000:]}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)


class MlflowServer(_Process):
    """``mlflow server`` on a database, serving artifacts from a folder, answering only the given Host names."""

    name = "mlflow server"

    def __init__(self, backend_uri: str, artifacts: Path, log: Path, *extra: str, env: dict | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", backend_uri,
               "--artifacts-destination", str(artifacts), "--serve-artifacts", "--host", "127.0.0.1",
               "--port", str(self.port), "--workers", "1",  # one uvicorn process serves the tests' few clients
               "--allowed-hosts", f"127.0.0.1:{self.port},localhost:{self.port}", *extra]
        # Without the GenAI job runner, as docker-compose.yml and `l0sweep ui` run it.
        super().__init__(cmd, f"{self.url}/health", log, env=mlflow_server_env(env))


class OptunaDashboard(_Process):
    """``l0sweep dashboard``: optuna-dashboard on the study storage, as the compose service runs it."""

    name = "l0sweep dashboard"

    def __init__(self, storage_url: str, log: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "sweeps.cli", "dashboard", "--storage", storage_url, "--port", str(self.port)]
        super().__init__(cmd, f"{self.url}/api/studies", log)
