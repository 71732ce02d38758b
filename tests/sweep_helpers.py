"""A tiny study file, the l0sweep command as a subprocess, and MLflow run reads, for the sweep tests."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import yaml
from mlflow.tracking import MlflowClient

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
            log=None, start_new_session: bool = False) -> subprocess.CompletedProcess | subprocess.Popen:
    """Run ``l0sweep ARGS`` to completion; with ``log`` (a file), start it and return the process instead
    (``start_new_session``: in a process group of its own, as a terminal's foreground job is)."""
    cmd = [sys.executable, "-m", "sweeps.cli", *map(str, args)]
    env = {**os.environ, "PYTHONWARNINGS": "ignore", **(env or {})}
    if log is not None:
        return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=start_new_session)
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=cwd, env=env,
                          stdin=subprocess.DEVNULL)


def runs_of(tracking_uri: str, experiment: str) -> list:
    client = MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    return [] if exp is None else client.search_runs([exp.experiment_id], max_results=1000)
