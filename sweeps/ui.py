"""The browsing side: ``l0sweep dashboard`` (optuna-dashboard that outlives a database restart) and
``l0sweep ui`` (that dashboard plus the MLflow UI on a sweep's stores, on 127.0.0.1 only).

A tracking URI that is already an MLflow server (http) is only printed; a second server is not started.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Mapping

from .settings import Settings, stop_on_signals


def mlflow_server_env(base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment ``mlflow server`` gets from l0sweep (``base``, else this process's): without MLflow 3's GenAI
    job runner (scorers, evaluations, prompt optimisation; l0sweep starts none), which is eight more Python
    processes and a folder left in /dev/shm at every start. ``MLFLOW_SERVER_ENABLE_JOB_EXECUTION=true`` keeps it."""
    env = dict(os.environ if base is None else base)
    env.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
    return env


def _wait_http(url: str, proc: subprocess.Popen, timeout: float = 90.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            urllib.request.urlopen(url, timeout=2).read()
            return True
        except OSError:
            time.sleep(0.5)
    return False


def serve_dashboard(storage_url: str, host: str = "127.0.0.1", port: int = 8080) -> int:
    """optuna-dashboard on the study storage, opened as the workers open it.

    The stock ``optuna-dashboard URL`` keeps dead connections after a PostgreSQL restart and answers 500;
    l0sweep's storage pings its connections and waits out a restart, so the dashboard does too.
    """
    import optuna_dashboard

    from .storage import open_storage

    stop_on_signals()
    storage = open_storage(storage_url)
    print(f"optuna-dashboard: http://{host}:{port}", flush=True)
    try:
        optuna_dashboard.run_server(storage, host=host, port=port)
    except KeyboardInterrupt:
        pass
    return 0


def _experiments(storage_url: str) -> list[tuple[str, str]]:
    """(study, its MLflow experiment id) for each l0sweep study in the storage."""
    import optuna

    from .records import StudyRecord
    from .storage import open_storage

    found = [(s.study_name, StudyRecord.read(s).mlflow_experiment_id)
             for s in optuna.get_all_study_summaries(open_storage(storage_url), include_best_trial=False)]
    return [(name, experiment) for name, experiment in found if experiment is not None]


def serve(settings: Settings, port: int, dashboard_port: int) -> int:
    """Start both servers, print their addresses, and stop both on Ctrl-C or SIGTERM (or when either exits)."""
    import signal
    from pathlib import Path

    from .storage import is_rdb
    from .tracking import experiment_page

    if not is_rdb(settings.storage) and not Path(settings.storage).exists():
        raise FileNotFoundError(f"no sweep in {settings.out}: run 'l0sweep run STUDY_FILE --out {settings.out}' first")
    stop_on_signals()
    procs = {}
    if settings.tracking_uri.startswith(("http://", "https://")):
        print(f"MLflow UI: {settings.tracking_uri} (already served)", flush=True)
    else:
        mlflow_cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", settings.tracking_uri,
                      "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
        procs["MLflow UI"] = (subprocess.Popen(mlflow_cmd, stdin=subprocess.DEVNULL, env=mlflow_server_env()),
                              f"http://127.0.0.1:{port}")
    procs["optuna-dashboard"] = (subprocess.Popen(
        [sys.executable, "-m", "sweeps.cli", "dashboard", "--storage", settings.storage,
         "--host", "127.0.0.1", "--port", str(dashboard_port)], stdin=subprocess.DEVNULL),
        f"http://127.0.0.1:{dashboard_port}")
    try:
        for name, (proc, url) in procs.items():
            if not _wait_http(url, proc):
                raise RuntimeError(f"{name} did not start on {url} (is the port free?)")
            print(f"{name}: {url}", flush=True)
        mlflow_ui = procs["MLflow UI"][1] if "MLflow UI" in procs else settings.tracking_uri
        for study, experiment_id in _experiments(settings.storage):
            print(f"  runs of {study}: {experiment_page(mlflow_ui, experiment_id)}", flush=True)
        print("Ctrl-C stops both.", flush=True)
        while all(p.poll() is None for p, _ in procs.values()):
            time.sleep(0.5)
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        for proc, _ in procs.values():
            proc.send_signal(signal.SIGINT)  # both servers shut down cleanly on SIGINT
        for proc, _ in procs.values():
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
