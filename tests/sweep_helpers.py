"""A tiny study file, the l0sweep command (forked from a preloaded process, or a new one), and MLflow run reads,
for the sweep tests."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import yaml
from mlflow.tracking import MlflowClient

from tests.preloaded import ForkedCommand, popen, run_module

TINY = {
    "name": "tiny",
    "trial": {"data": {"name": "digits", "batch_size": 128}, "model": {"name": "mlp", "kwargs": {"hidden": [32, 16]}},
              "optim": {"name": "adam", "lr": 0.005, "gate_lr": 0.05, "epochs": 3}, "seed": 0, "threads": 1},
    "search": {"lam": {"scratch": {"low": 0.01, "high": 1.0, "log": True},
                       "finetune": {"low": 0.1, "high": 3.0, "log": True}},
               "droprate_init": {"scratch": {"low": 0.3, "high": 0.6}, "finetune": 0.05}},
    "trials": 4,
    "sampler": {"seed": 0, "n_startup_trials": 2},
    "enqueue": [{"mode": "finetune", "lam": 1.0}],
    "workers": {"heartbeat_interval": 1, "grace_period": 4, "max_retry": 2},
}


def write_study(path: Path, **overrides) -> Path:
    data = {**TINY, **overrides}
    path.write_text(yaml.safe_dump(data))
    return path


def l0sweep(*args: str, timeout: float = 300, cwd: Path | None = None, env: dict | None = None,
            log=None, start_new_session: bool = False
            ) -> subprocess.CompletedProcess | ForkedCommand | subprocess.Popen:
    """Run ``l0sweep ARGS`` to completion, forked from a process that imported torch and MLflow already
    (tests.preloaded); with ``log`` (a file), start it with its output there and return it instead, a Popen-like
    handle (``start_new_session``: in a process group of its own, as a terminal's foreground job is)."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore", **(env or {})}
    if log is not None:
        return popen([sys.executable, "-m", "sweeps.cli", *map(str, args)], cwd=cwd, env=env, stdout=log,
                     stderr=subprocess.STDOUT, start_new_session=start_new_session)
    return run_module("sweeps.cli", list(map(str, args)), cwd=cwd, env=env, timeout=timeout)


def l0sweep_in_terminal(*args: str, timeout: float = 600, env: dict | None = None,
                        new_interpreter: bool = False) -> tuple[int, str]:
    """Run ``l0sweep ARGS`` with its output on a pseudo-terminal, as a user's shell runs it (progress bars show
    only on a terminal); returns (exit status, everything it wrote to the terminal, ``\r\n`` as ``\n``).
    ``new_interpreter``: not a fork of the preloaded process, which printed what libraries print as they import."""
    import pty
    import select
    import time

    import fcntl
    import struct
    import termios

    controller, terminal = pty.openpty()
    # A terminal of 40 rows and 120 columns: tqdm sizes its bar by it (a new pty is 0 wide, and gets no bar).
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    cmd = [sys.executable, "-m", "sweeps.cli", *map(str, args)]
    # No PYTHONWARNINGS here: what a user would see is what is checked.
    env = {**os.environ, **(env or {})}
    proc = (subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=terminal, stderr=terminal, env=env)
            if new_interpreter else popen(cmd, stdout=terminal, stderr=terminal, env=env))
    os.close(terminal)
    chunks, deadline = [], time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if select.select([controller], [], [], 1.0)[0]:
                try:
                    data = os.read(controller, 65536)
                except OSError:  # EIO: every writer of the terminal has closed it
                    break
                if not data:
                    break
                chunks.append(data)
            elif proc.poll() is not None:
                break
        else:
            proc.kill()
            raise TimeoutError(f"l0sweep {' '.join(map(str, args))}: still running after {timeout}s")
        return proc.wait(timeout=60), b"".join(chunks).decode(errors="replace").replace("\r\n", "\n")
    finally:
        os.close(controller)


def runs_of(tracking_uri: str, experiment: str) -> list:
    client = MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    return [] if exp is None else client.search_runs([exp.experiment_id], max_results=1000)
