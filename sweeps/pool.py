"""The local worker processes of one ``l0sweep run``: started (each on one of the GPUs, in turn), polled,
replaced, stopped. Light on purpose (no torch, no MLflow): the launcher starts them before importing anything slow.

Workers are forks of the run's zygote (sweeps.zygote), which imports torch, MLflow and the rest once while the
launcher creates the study; were the zygote gone, a worker is started as a new interpreter instead.
"""
from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time
from collections import deque
from pathlib import Path

from .settings import Settings


def visible_gpus() -> list[str]:
    """The GPUs this process may use, as ``CUDA_VISIBLE_DEVICES`` entries: that variable's list when set, else
    ``nvidia-smi``'s (no torch import: the launcher stays light). Empty without NVIDIA GPUs."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [g.strip() for g in visible.split(",") if g.strip()]
    try:
        found = subprocess.run(["nvidia-smi", "--query-gpu=index", "--format=csv,noheader"], capture_output=True,
                               text=True, timeout=20, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired):
        return []
    return found.stdout.split() if found.returncode == 0 else []


LOST = 255  # the exit status of a forked worker whose end nobody could see: the zygote died before it


class ForkedWorker:
    """A worker forked by the zygote, with what the pool uses of ``subprocess.Popen``'s interface. ``pid`` is None
    until the zygote has forked it (it may still be importing)."""

    def __init__(self, zygote: Zygote) -> None:
        self.zygote = zygote
        self.forked_pid: int | None = None
        self.returncode: int | None = None

    @property
    def pid(self) -> int | None:
        self.zygote.read()
        return self.forked_pid

    def poll(self) -> int | None:
        self.zygote.read()
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            if deadline is not None and time.monotonic() >= deadline:
                raise subprocess.TimeoutExpired("l0sweep worker", timeout)
            self.zygote.wait_readable(0.1)
        return self.returncode

    def send_signal(self, sig: int) -> None:
        while self.pid is None and self.returncode is None:  # to stop it, first let the zygote fork it
            self.zygote.wait_readable(0.1)
        if self.poll() is None:
            try:
                os.kill(self.forked_pid, sig)
            except ProcessLookupError:
                pass  # it ended meanwhile: the zygote says so next

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


class Zygote:
    """The launcher's end of the run's zygote (``python -m sweeps.zygote WORKER_ARGV``, protocol there), its own
    errors in ``log``."""

    def __init__(self, worker_argv: list[str], log: Path) -> None:
        with open(log, "wb") as err:
            self.proc = subprocess.Popen([sys.executable, "-m", "sweeps.zygote", *worker_argv], stdin=subprocess.PIPE,
                                         stdout=subprocess.PIPE, stderr=err)
        os.set_blocking(self.proc.stdout.fileno(), False)
        self.gone = False
        self._unread = b""
        self._unforked: deque[ForkedWorker] = deque()  # asked for, in order, not yet forked
        self._running: dict[int, ForkedWorker] = {}

    def fork(self, log: Path, env: dict[str, str]) -> ForkedWorker | None:
        """Ask for a worker with ``env`` added to its environment, its output in ``log``; None if the zygote is
        gone."""
        if not self.gone:
            try:
                self.proc.stdin.write((json.dumps({"log": str(log), "env": env}) + "\n").encode())
                self.proc.stdin.flush()
            except OSError:  # it died
                self._lost()
        if self.gone:
            return None
        worker = ForkedWorker(self)
        self._unforked.append(worker)
        return worker

    def wait_readable(self, timeout: float) -> None:
        if self.gone:
            time.sleep(timeout)
        else:
            select.select([self.proc.stdout.fileno()], [], [], timeout)

    def read(self) -> None:
        """Take in what the zygote has said (its workers' starts and ends)."""
        while not self.gone:
            try:
                chunk = os.read(self.proc.stdout.fileno(), 65536)
            except BlockingIOError:
                break
            if not chunk:
                self._lost()
                break
            *lines, self._unread = (self._unread + chunk).split(b"\n")
            for line in lines:
                message = json.loads(line)
                if "started" in message:
                    worker = self._unforked.popleft()
                    worker.forked_pid = message["started"]
                    if worker.forked_pid is None:  # the system refused the fork (said in the worker's log)
                        worker.returncode = 1
                    else:
                        self._running[worker.forked_pid] = worker
                else:
                    self._running.pop(message["exited"]).returncode = message["status"]
        if self.gone:  # its forks were left to the system, which keeps their exit statuses from us
            for pid, worker in list(self._running.items()):
                try:
                    os.kill(pid, 0)
                except ProcessLookupError:
                    worker.returncode = LOST
                    del self._running[pid]

    def _lost(self) -> None:
        self.gone = True
        for worker in self._unforked:
            worker.returncode = LOST
        self._unforked.clear()

    def forget_unforked(self) -> None:
        """Make sure no worker asked for is forked from now on (they are LOST): when some are not forked yet (the
        zygote is still importing), end the zygote. Its forks carry on without it."""
        self.read()
        if self._unforked:
            self.proc.kill()
            self.proc.wait()
            self._lost()

    def close(self) -> None:
        """Let the zygote go (its workers have ended, or carry on without it). Still importing, it is ended."""
        if not self.proc.stdin.closed:
            try:
                self.proc.stdin.close()
            except OSError:
                pass
        try:
            self.proc.wait(timeout=1)  # it sees its input close within 0.1 s once it has imported
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc.stdout.close()


class WorkerPool:
    """``workers`` worker processes (``l0sweep worker``) of ``study_file``, started at once. Each waits until the
    launcher creates ``ready`` and logs to ``log_dir/worker-N.log``; ``procs`` maps each slot to its live process.
    :meth:`close` lets the zygote go."""

    def __init__(self, study_file: Path, settings: Settings, workers: int, log_dir: Path, ready: Path,
                 gpus: list[str]) -> None:
        self.study_file, self.settings, self.workers = study_file, settings, workers
        self.log_dir, self.ready, self.gpus = log_dir, ready, gpus
        self.restarts = 0
        self.argv = ["worker", str(study_file), "--storage", settings.storage, "--tracking-uri", settings.tracking_uri,
                     "--out", str(settings.out), "--start-after", str(ready)]
        if settings.threads:
            self.argv += ["--threads", str(settings.threads)]
        if settings.verbose:
            self.argv.append("--verbose")
        self.zygote = Zygote(self.argv, log_dir / "zygote.log")
        self.procs: dict[int, ForkedWorker | subprocess.Popen] = {i: self._spawn(i) for i in range(workers)}

    def _spawn(self, index: int) -> ForkedWorker | subprocess.Popen:
        """Start worker ``index``; with GPUs, it sees one of them (worker i: GPU i mod N), not all on the first."""
        gpus = self.gpus
        env = {"CUDA_VISIBLE_DEVICES": gpus[index % len(gpus)]} if gpus else {}
        forked = self.zygote.fork(self.log(index), env)
        if forked is not None:
            return forked
        cmd = [sys.executable, "-m", "sweeps.cli", *self.argv, "--launcher-pid", str(os.getpid())]
        with open(self.log(index), "wb") as log:  # the child keeps its own copy
            return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    env={**os.environ, **env})

    def log(self, slot: int) -> Path:
        return self.log_dir / f"worker-{slot}.log"

    def exited(self) -> list[tuple[int, ForkedWorker | subprocess.Popen, int]]:
        """The (slot, process, exit status) of each worker that has exited since asked last; their slots are freed."""
        done = []
        for slot, proc in list(self.procs.items()):
            code = proc.poll()
            if code is not None:
                del self.procs[slot]
                done.append((slot, proc, code))
        return done

    def replace(self, slot: int) -> None:
        """Start a new worker in ``slot`` (counted in ``restarts``; it logs under a number of its own)."""
        self.restarts += 1
        self.procs[slot] = self._spawn(slot + self.workers * self.restarts)

    def stop(self) -> None:
        """Terminate every live worker and wait for it (kill one that does not stop within a minute); the workers
        the zygote has not forked yet never start."""
        self.zygote.forget_unforked()
        for proc in self.procs.values():
            proc.terminate()
        for proc in self.procs.values():
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:  # stuck closing its trial (an MLflow server gone?): its trial is
                proc.kill()                    # then failed and retried, as a crashed worker's is
                proc.wait()

    def close(self) -> None:
        """Let the zygote go: call once no worker is left to start."""
        self.zygote.close()

    def tail(self, slot: int, lines: int = 5) -> str:
        """The last ``lines`` of the log of ``slot``'s first worker ("" if unreadable)."""
        try:
            return "\n".join(self.log(slot).read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def last_error(self, slot: int, prefix: str) -> str:
        """The last line of ``slot``'s log that starts with ``prefix``, without it."""
        found = [line[len(prefix):] for line in self.tail(slot, 50).splitlines() if line.startswith(prefix)]
        return found[-1] if found else f"a worker could not start (see {self.log(slot)})"
