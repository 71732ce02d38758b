"""The launcher's end of its zygote (sweeps.zygote, whose docstring has the protocol): :class:`Zygote` asks it
for workers and reads how they started and ended; each :class:`ForkedWorker` is one of them, with what the worker
pool uses of ``subprocess.Popen``'s interface. Light, as the pool is: no torch, no MLflow.
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

LOST = 255  # the exit status of a forked worker whose end nobody could see (its zygote was killed first)


class ForkedWorker:
    """A worker asked of the zygote. ``pid`` is None until the zygote has forked it (it may still be importing);
    ``unstarted`` says the zygote died before it could, so the pool starts it another way."""

    def __init__(self, zygote: Zygote) -> None:
        self.zygote = zygote
        self.forked_pid: int | None = None
        self.returncode: int | None = None

    @property
    def pid(self) -> int | None:
        self.zygote.read()
        return self.forked_pid

    @property
    def unstarted(self) -> bool:
        self.zygote.read()
        return self.zygote.gone and self.forked_pid is None and self.returncode is None

    def poll(self) -> int | None:
        self.zygote.read()
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None and not self.unstarted:
            if deadline is not None and time.monotonic() >= deadline:
                raise subprocess.TimeoutExpired("l0sweep worker", timeout)
            self.zygote.wait_readable(0.1)
        return LOST if self.returncode is None else self.returncode

    def send_signal(self, sig: int) -> None:
        while self.pid is None and self.returncode is None and not self.unstarted:  # let the zygote fork it first
            self.zygote.wait_readable(0.1)
        if self.poll() is None and self.forked_pid is not None:
            try:
                os.kill(self.forked_pid, sig)
            except (ProcessLookupError, PermissionError):
                pass  # it ended meanwhile (the pid may even be another's now): its end is read next

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


class Zygote:
    """The run's zygote, ``python -m sweeps.zygote WORKER_ARGV``, its own errors in ``log``."""

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
            except OSError:  # it died: what it said before is still to be read
                self.read()
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
        """Take in what the zygote has said (its workers' starts and ends); once it is gone, look for its forks'
        ends ourselves."""
        while not self.gone:
            try:
                chunk = os.read(self.proc.stdout.fileno(), 65536)
            except BlockingIOError:
                break
            if not chunk:
                self.gone = True
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
                elif (worker := self._running.pop(message["exited"], None)) is not None:
                    worker.returncode = message["status"]
        if self.gone:
            for pid, worker in list(self._running.items()):
                if (code := _end_of_orphan(pid)) is not None:
                    worker.returncode = code
                    del self._running[pid]

    def forget_unforked(self) -> None:
        """Make sure no worker asked for is forked from now on: when some are not forked yet (the zygote is still
        importing), end the zygote; they are then LOST (not unstarted), and its forks carry on without it."""
        self.read()
        if self._unforked:
            self.proc.kill()
            self.proc.wait()
            self.read()  # a fork it made just before: its pid, so that it can be stopped
            for worker in self._unforked:
                worker.returncode = LOST
            self._unforked.clear()

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


def _end_of_orphan(pid: int) -> int | None:
    """The exit status of a fork whose zygote is gone, once it has ended (LOST when it cannot be known), else None.
    Orphans go to the nearest reaper: that is this launcher when it runs as a container's PID 1."""
    try:
        reaped, status = os.waitpid(pid, os.WNOHANG)
        return None if reaped == 0 else os.waitstatus_to_exitcode(status)
    except ChildProcessError:
        pass
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, PermissionError):  # gone (its pid may be another user's now)
        return LOST
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None
    return LOST if state in ("Z", "X") else None  # ended, left unreaped by a reaper that does not reap
