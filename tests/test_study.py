"""Which RUNNING trials belong to workers that are gone: decided only where the worker's pid means something."""
from __future__ import annotations

import os
import socket
import subprocess
import sys

import optuna
import pytest
from optuna.trial import TrialState

from sweeps.study import _worker_gone
from sweeps.tracking import pid_space

HOST = socket.gethostname()
SPACE = pid_space()
pytestmark = pytest.mark.skipif(not SPACE, reason="needs Linux /proc (pid namespaces and boot id)")


def _trial(pid: int, host: str = HOST, space: str | None = SPACE) -> optuna.trial.FrozenTrial:
    attrs = {"worker": f"{host}:{pid}"} | ({} if space is None else {"worker_pid_space": space})
    return optuna.trial.create_trial(state=TrialState.RUNNING, user_attrs=attrs)


def _process(*argv: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", *argv])


def test_worker_gone_only_where_its_pid_can_be_checked():
    boot, _, namespace = SPACE.partition("/")
    worker, other_program = _process("worker"), _process("not-a-sweep")
    finished = subprocess.Popen([sys.executable, "-c", "pass"])
    finished.wait()
    try:
        assert not _worker_gone(_trial(worker.pid), None)  # alive
        assert _worker_gone(_trial(finished.pid), None)  # exited
        assert _worker_gone(_trial(other_program.pid), None)  # its pid now runs another program
        assert _worker_gone(_trial(os.getpid()), None)  # an earlier life of the asking process's pid
        assert _worker_gone(_trial(worker.pid), worker.pid) and not _worker_gone(_trial(worker.pid), finished.pid)
        # Undecidable, so left to the heartbeats: another machine, another container's pid namespace, a trial
        # tagged by a version that did not record the namespace.
        assert not _worker_gone(_trial(finished.pid, host="elsewhere"), None)
        assert not _worker_gone(_trial(finished.pid, space=f"{boot}/pid:[1]"), None)
        assert not _worker_gone(_trial(finished.pid, space=None), None)
        # The host's namespace on an earlier boot: every process of it is gone, whatever the pid now is.
        assert _worker_gone(_trial(worker.pid, space=f"another-boot/{namespace}"), None)
    finally:
        for p in (worker, other_program):
            p.kill()
            p.wait()
