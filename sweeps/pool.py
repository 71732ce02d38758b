"""The local worker processes of one ``l0sweep run``: started (each on one of the GPUs, in turn), polled,
replaced, stopped. Light on purpose (no torch, no MLflow): the launcher starts them before importing anything slow.
"""
from __future__ import annotations

import os
import subprocess
import sys
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


class WorkerPool:
    """``workers`` worker processes (``l0sweep worker``) of ``study_file``, started at once. Each waits until the
    launcher creates ``ready`` and logs to ``log_dir/worker-N.log``; ``procs`` maps each slot to its live process."""

    def __init__(self, study_file: Path, settings: Settings, workers: int, log_dir: Path, ready: Path,
                 gpus: list[str]) -> None:
        self.study_file, self.settings, self.workers = study_file, settings, workers
        self.log_dir, self.ready, self.gpus = log_dir, ready, gpus
        self.restarts = 0
        self.procs: dict[int, subprocess.Popen] = {i: self._spawn(i) for i in range(workers)}

    def _spawn(self, index: int) -> subprocess.Popen:
        """Start worker ``index``; with GPUs, it sees one of them (worker i: GPU i mod N), not all on the first."""
        gpus, settings = self.gpus, self.settings
        env = {**os.environ, "CUDA_VISIBLE_DEVICES": gpus[index % len(gpus)]} if gpus else None
        cmd = [sys.executable, "-m", "sweeps.cli", "worker", str(self.study_file), "--storage", settings.storage,
               "--tracking-uri", settings.tracking_uri, "--out", str(settings.out),
               "--start-after", str(self.ready), "--launcher-pid", str(os.getpid())]
        if settings.threads:
            cmd += ["--threads", str(settings.threads)]
        if settings.verbose:
            cmd.append("--verbose")
        with open(self.log(index), "wb") as log:  # the child keeps its own copy
            return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)

    def log(self, slot: int) -> Path:
        return self.log_dir / f"worker-{slot}.log"

    def exited(self) -> list[tuple[int, subprocess.Popen, int]]:
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
        """Terminate every live worker and wait for it (kill one that does not stop within a minute)."""
        for proc in self.procs.values():
            proc.terminate()
        for proc in self.procs.values():
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:  # stuck closing its trial (an MLflow server gone?): its trial is
                proc.kill()                    # then failed and retried, as a crashed worker's is
                proc.wait()

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
