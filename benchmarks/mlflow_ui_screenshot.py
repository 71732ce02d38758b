"""The MLflow UI at a study's runs, as a user opens them: a screenshot in headless Chromium.

    python -m benchmarks.mlflow_ui_screenshot [--png FILE]

starts ``mlflow server`` on 127.0.0.1 (a SQLite store in a temporary folder), runs the default study against it
(``l0sweep run studies/default.yaml --trials 4 --workers 2``), opens the link l0sweep prints for the study's
runs, expands the study's run (one click on its row's expander, as a user would) and writes the PNG (default
``mlflow-ui.png``). With ``--tracking-uri URL --experiment NAME`` it photographs that experiment on a server
already running instead. Not a timing: it shows by eye what tests/test_service.py checks in the page, that the
link opens on the runs table with the trials nested under the study's run, not on MLflow's GenAI overview.
"""
from __future__ import annotations

import argparse
import base64
import json
import os
import select
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from sweeps.ui import mlflow_server_env

ROOT = Path(__file__).resolve().parents[1]
# Nothing outside 127.0.0.1 is needed: no component updates, QUIC, sync or first-run pages.
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--hide-scrollbars"]
# The runs table's run-name links, and the expander of a parent run's row (MLflow 3.17's UI).
RUN_NAMES = "[...document.querySelectorAll('[col-id=\"attributes.`Run Name`\"] a')].map(a => a.textContent)"
EXPANDER = "button[data-component-id$='runnamecellrenderer.tsx_46']"


def chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        raise SystemExit("chromium is not installed (`make test` installs it: apt-get install -y chromium)")
    return found


class Browser:
    """Headless Chromium driven over its DevTools pipe (it reads commands on fd 3, answers on fd 4): a page
    that renders after its API calls can be waited for, and a row expanded, which its command line cannot."""

    def __init__(self, width: int = 1400, height: int = 900) -> None:
        self._profile = tempfile.TemporaryDirectory(prefix="l0sweep-chromium-")
        commands, self._to_browser = os.pipe()
        self._from_browser, answers = os.pipe()

        def onto_3_and_4() -> None:  # via fresh numbers, in case the pipes' own numbers are 3 or 4
            a, b = os.dup(commands), os.dup(answers)
            os.dup2(a, 3)
            os.dup2(b, 4)

        self.proc = subprocess.Popen(
            [chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={self._profile.name}", "--remote-debugging-pipe",
             f"--window-size={width},{height}", "about:blank"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            preexec_fn=onto_3_and_4, pass_fds=(3, 4))
        os.close(commands)
        os.close(answers)
        self._buffer, self._next_id = b"", 0
        target = self.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        self._session = self.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        self.send("Emulation.setDeviceMetricsOverride",
                  {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False}, page=True)

    def send(self, method: str, params: dict | None = None, page: bool = False, timeout: float = 60) -> dict:
        self._next_id += 1
        message = {"id": self._next_id, "method": method, "params": params or {}}
        if page:
            message["sessionId"] = self._session
        os.write(self._to_browser, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:  # answers and events, each ended by a NUL; events are not needed here
            while b"\0" in self._buffer:
                raw, self._buffer = self._buffer.split(b"\0", 1)
                answer = json.loads(raw)
                if answer.get("id") == self._next_id:
                    if "error" in answer:
                        raise RuntimeError(f"chromium: {method}: {answer['error']}")
                    return answer["result"]
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._from_browser], [], [], left)[0]:
                raise TimeoutError(f"chromium did not answer {method} in {timeout} s")
            chunk = os.read(self._from_browser, 1 << 20)
            if not chunk:
                raise RuntimeError(f"chromium exited ({self.proc.wait()}) before answering {method}")
            self._buffer += chunk

    def evaluate(self, expression: str) -> Any:
        return self.send("Runtime.evaluate", {"expression": expression, "returnByValue": True},
                         page=True)["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 90) -> Any:
        """The value of ``expression`` in the page once it is truthy (polled: the UI renders as its data come)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = self.evaluate(expression)
            if value:
                return value
            time.sleep(0.25)
        raise TimeoutError(f"the page never had {expression} (in {timeout} s)")

    def open(self, url: str) -> None:
        self.send("Page.navigate", {"url": url}, page=True)

    def screenshot(self, png: Path) -> Path:
        png.write_bytes(base64.b64decode(self.send("Page.captureScreenshot", {"format": "png"}, page=True)["data"]))
        return png

    def close(self) -> None:
        try:
            self.send("Browser.close", timeout=10)
        except (OSError, RuntimeError, TimeoutError):
            self.proc.kill()
        self.proc.wait(timeout=30)
        os.close(self._to_browser)
        os.close(self._from_browser)
        self._profile.cleanup()

    def __enter__(self) -> "Browser":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def runs_page(tracking_uri: str, name: str) -> str:
    """The link l0sweep prints for experiment ``name``'s runs."""
    from mlflow.tracking import MlflowClient

    from sweeps.tracking import experiment_page

    experiment = MlflowClient(tracking_uri).get_experiment_by_name(name)
    if experiment is None:
        raise SystemExit(f"{tracking_uri} has no experiment {name!r}")
    return experiment_page(tracking_uri, experiment.experiment_id)


def photograph(url: str, png: Path) -> dict[str, list[str]]:
    """Open ``url`` (an experiment's runs), wait for the table, expand the study's run, screenshot the page into
    ``png``; returns the run names the table listed before and after the click."""
    with Browser() as browser:
        browser.open(url)
        before = browser.wait_for(f"document.querySelector(\"{EXPANDER}\") && {RUN_NAMES}")
        browser.evaluate(f"document.querySelector(\"{EXPANDER}\").click()")
        after = browser.wait_for(f"(names => names.length > {len(before)} && names)({RUN_NAMES})")
        time.sleep(0.5)  # the expanded rows' own fade-in
        browser.screenshot(png)
    return {"before": before, "after": after}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve(folder: Path) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    with open(folder / "mlflow.log", "wb") as log:
        server = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
                                   "--backend-store-uri", f"sqlite:///{folder / 'mlflow.db'}",
                                   "--artifacts-destination", str(folder / "artifacts"), "--serve-artifacts",
                                   "--workers", "1"],
                                  stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                  start_new_session=True, env=mlflow_server_env())  # as `l0sweep ui` runs it
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"mlflow server exited {server.returncode}: see {folder / 'mlflow.log'}")
        try:
            urllib.request.urlopen(f"{url}/health", timeout=2).read()
            return server, url
        except OSError:
            time.sleep(0.5)
    server.terminate()
    raise SystemExit(f"mlflow server did not answer on {url} in 180 s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--png", type=Path, default=Path("mlflow-ui.png"), help="where to write the screenshot")
    parser.add_argument("--tracking-uri", help="an MLflow server already running (default: start one)")
    parser.add_argument("--experiment", default="digits-mlp", help="the study's experiment (default: digits-mlp)")
    args = parser.parse_args()
    png = args.png.resolve()
    if args.tracking_uri:
        url = runs_page(args.tracking_uri, args.experiment)
        print(json.dumps({"url": url, "png": str(png), **photograph(url, png)}))
        return
    with tempfile.TemporaryDirectory(prefix="l0sweep-mlflow-ui-") as tmp:
        folder = Path(tmp)
        server, tracking = _serve(folder)
        try:
            env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
            subprocess.run([sys.executable, "-m", "sweeps.cli", "run", str(ROOT / "studies" / "default.yaml"),
                            "--trials", "4", "--workers", "2", "--tracking-uri", tracking,
                            "--out", str(folder / "out")],
                           check=True, stdin=subprocess.DEVNULL, cwd=ROOT, env=env)
            url = runs_page(tracking, args.experiment)
            print(json.dumps({"url": url, "png": str(png), **photograph(url, png)}))
        finally:
            os.killpg(server.pid, 15)
            server.wait(timeout=30)


if __name__ == "__main__":
    main()
