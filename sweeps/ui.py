"""``l0sweep ui``: the MLflow UI and optuna-dashboard on a sweep's embedded stores, on 127.0.0.1 only."""
from __future__ import annotations

import shutil
import subprocess
import sys
import time
import urllib.request

from .worker import Settings, stop_on_sigterm


def _wait_http(url: str, proc: subprocess.Popen, timeout: float = 90.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            urllib.request.urlopen(url, timeout=2).read()
            return True
        except OSError:
            time.sleep(0.5)
    return False


def serve(settings: Settings, port: int, dashboard_port: int) -> int:
    """Start both servers, print their addresses, and stop both on Ctrl-C or SIGTERM (or when either exits)."""
    import signal
    from pathlib import Path

    from .storage import is_rdb

    if not is_rdb(settings.storage) and not Path(settings.storage).exists():
        raise FileNotFoundError(f"no sweep in {settings.out}: run 'l0sweep run STUDY_FILE --out {settings.out}' first")
    stop_on_sigterm()
    mlflow_cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", settings.tracking_uri,
                  "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    dashboard = shutil.which("optuna-dashboard")
    procs = {"MLflow UI": (subprocess.Popen(mlflow_cmd, stdin=subprocess.DEVNULL), f"http://127.0.0.1:{port}")}
    if dashboard:
        procs["optuna-dashboard"] = (subprocess.Popen(
            [dashboard, settings.storage, "--host", "127.0.0.1", "--port", str(dashboard_port)],
            stdin=subprocess.DEVNULL), f"http://127.0.0.1:{dashboard_port}")
    try:
        for name, (proc, url) in procs.items():
            if not _wait_http(url, proc):
                raise RuntimeError(f"{name} did not start on {url} (is the port free?)")
            print(f"{name}: {url}", flush=True)
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
