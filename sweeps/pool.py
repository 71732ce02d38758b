"""The local worker processes of one ``l0sweep run``: started (each on one of the GPUs, in turn), polled,
replaced, stopped. Light on purpose (no torch, no MLflow): the launcher starts them before importing anything slow.

On Linux, workers are forks of the run's zygote (sweeps.zygote, reached through sweeps.forked), which imports
torch, MLflow and the rest once while the launcher creates the study. Elsewhere (macOS frameworks do not survive a
fork without exec), or once the zygote is gone, a worker starts as a new interpreter.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from .forked import ForkedWorker, Zygote
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
        self.zygote = Zygote(self.argv, log_dir / "zygote.log") if sys.platform == "linux" else None
        self.log_index: dict[int, int] = {}  # slot -> the number its current worker logs under
        self.procs: dict[int, ForkedWorker | subprocess.Popen] = {i: self._spawn(i, i) for i in range(workers)}

    def _spawn(self, slot: int, index: int) -> ForkedWorker | subprocess.Popen:
        """Start worker ``index`` in ``slot``; with GPUs, it sees one of them (worker i: GPU i mod N), not all on the
        first."""
        gpus = self.gpus
        env = {"CUDA_VISIBLE_DEVICES": gpus[index % len(gpus)]} if gpus else {}
        self.log_index[slot] = index
        forked = self.zygote.fork(self.log(index), env) if self.zygote else None
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
            if isinstance(proc, ForkedWorker) and proc.unstarted:  # its zygote died first (see zygote.log)
                self.procs[slot] = self._spawn(slot, self.log_index[slot])
                continue
            code = proc.poll()
            if code is not None:
                del self.procs[slot]
                done.append((slot, proc, code))
        return done

    def replace(self, slot: int) -> None:
        """Start a new worker in ``slot`` (counted in ``restarts``; it logs under a number of its own)."""
        self.restarts += 1
        self.procs[slot] = self._spawn(slot, slot + self.workers * self.restarts)

    def stop(self) -> None:
        """Terminate every live worker and wait for it (kill one that does not stop within a minute); the workers
        the zygote has not forked yet never start."""
        if self.zygote:
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
        if self.zygote:
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
