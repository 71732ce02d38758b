"""Trials that never finished: which belong to workers that are gone, and how they are queued again."""
from __future__ import annotations

import os
import socket
import subprocess
import sys

import optuna
import pytest
from optuna.trial import TrialState

from sweeps.study import worker_gone
from sweeps.tracking import pid_space

HOST = socket.gethostname()
SPACE = pid_space()


def _trial(pid: int, host: str = HOST, space: str | None = SPACE) -> optuna.trial.FrozenTrial:
    attrs = {"worker": f"{host}:{pid}"} | ({} if space is None else {"worker_pid_space": space})
    return optuna.trial.create_trial(state=TrialState.RUNNING, user_attrs=attrs)


def _process(*argv: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", *argv])


@pytest.mark.skipif(not SPACE, reason="needs Linux /proc (pid namespaces and boot id)")
def test_worker_gone_only_where_its_pid_can_be_checked():
    boot, _, namespace = SPACE.partition("/")
    worker, other_program = _process("worker"), _process("not-a-sweep")
    finished = subprocess.Popen([sys.executable, "-c", "pass"])
    finished.wait()
    try:
        assert not worker_gone(_trial(worker.pid), None)  # alive
        assert worker_gone(_trial(finished.pid), None)  # exited
        assert worker_gone(_trial(other_program.pid), None)  # its pid now runs another program
        assert worker_gone(_trial(os.getpid()), None)  # an earlier life of the asking process's pid
        assert worker_gone(_trial(worker.pid), worker.pid) and not worker_gone(_trial(worker.pid), finished.pid)
        # Undecidable, so left to the heartbeats: another machine, another container's pid namespace, a trial
        # tagged by a version that did not record the namespace.
        assert not worker_gone(_trial(finished.pid, host="elsewhere"), None)
        assert not worker_gone(_trial(finished.pid, space=f"{boot}/pid:[1]"), None)
        assert not worker_gone(_trial(finished.pid, space=None), None)
        # The host's namespace on an earlier boot: every process of it is gone, whatever the pid now is.
        assert worker_gone(_trial(worker.pid, space=f"another-boot/{namespace}"), None)
    finally:
        for p in (worker, other_program):
            p.kill()
            p.wait()


def test_retries_copy_the_values_not_the_attempt_and_interrupts_have_no_limit():
    from optuna.distributions import FloatDistribution

    from sweeps.study import retry_trial
    from sweeps.worker import retry_interrupted

    study = optuna.create_study(directions=["maximize", "maximize"])
    failed = optuna.trial.create_trial(
        state=TrialState.FAIL, params={"lam_scratch": 0.3}, distributions={"lam_scratch": FloatDistribution(0.01, 1)},
        user_attrs={"lam": 0.3, "mode": "scratch", "worker": "host:1", "mlflow_run_id": "r", "history": [[1, 0.5, 0.1]]},
        system_attrs={"failed_trial": 0, "retry_history": [0, 3]})
    study.add_trial(failed)
    trial = study.trials[0]
    assert not retry_trial(study, trial, max_retry=2)  # a third retry of trial 0: over the limit
    assert retry_trial(study, trial, max_retry=3)
    retry = study.trials[-1]
    assert retry.state == TrialState.WAITING and retry.params == {"lam_scratch": 0.3}
    assert retry.user_attrs == {"lam": 0.3, "mode": "scratch"}  # not the old attempt's worker, run or history
    assert (retry.system_attrs["failed_trial"], retry.system_attrs["retry_history"]) == (0, [0, 3, trial.number])
    retry_interrupted(study, trial._trial_id)  # a stop the user asked for: queued again whatever the count
    assert len(study.get_trials(states=(TrialState.WAITING,))) == 2
