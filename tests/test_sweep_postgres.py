"""Two workers on a real PostgreSQL: one SIGKILLed mid-trial, the server restarted mid-sweep.

The study still reaches its budget of complete trials, the killed trial is retried, and no MLflow run is
left RUNNING. Bounded: a handful of short trials, every wait has a deadline.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import optuna
import pytest
from optuna.trial import TrialState

from sweeps.storage import open_storage
from tests.postgres import PostgresServer
from tests.sweep_helpers import TINY, l0sweep, runs_of, write_study

pytestmark = pytest.mark.slow


@pytest.fixture
def postgres():
    server = PostgresServer().start()
    yield server
    server.cleanup()


def _worker(study_file, url, tracking, out, log):
    return subprocess.Popen([sys.executable, "-m", "sweeps.cli", "worker", str(study_file), "--storage", url,
                             "--tracking-uri", tracking, "--out", str(out)], stdout=log, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, env={**os.environ, "PYTHONWARNINGS": "ignore"})


def _wait(predicate, timeout: float, what: str, step: float = 0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(step)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def test_killed_worker_and_database_restart(tmp_path, postgres):
    url = postgres.create_database("optuna")
    budget = 5
    study_file = write_study(tmp_path / "tiny.yaml", trials=budget,
                             trial={**TINY["trial"], "optim": {**TINY["trial"]["optim"], "epochs": 12}})
    out = tmp_path / "out"
    tracking = f"sqlite:///{out.resolve() / 'mlflow.db'}"
    created = l0sweep("create", study_file, "--storage", url, "--tracking-uri", tracking, "--out", out)
    assert created.returncode == 0, created.stderr

    logs = [open(tmp_path / f"w{i}.log", "wb") for i in range(2)]
    victim, survivor = (_worker(study_file, url, tracking, out, logs[i]) for i in range(2))
    study = optuna.load_study(study_name="tiny", storage=open_storage(url))
    tag = f"{os.uname().nodename}:{victim.pid}"

    def victim_mid_trial():  # running, with at least one epoch done
        return [t for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
                if t.user_attrs.get("worker") == tag and t.user_attrs.get("history")]

    killed = _wait(victim_mid_trial, 120, "the victim to be mid-trial")[0]
    victim.send_signal(signal.SIGKILL)
    victim.wait(timeout=30)

    # Restart PostgreSQL while the survivor trains: it must wait for the database, not die.
    _wait(lambda: len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))) >= 1, 120, "a complete trial")
    complete_before = {t.number for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))}
    postgres.restart(down_for=3.0)

    assert survivor.wait(timeout=300) == 0, (tmp_path / "w1.log").read_text()[-3000:]
    assert "storage unreachable" in (tmp_path / "w1.log").read_text()  # the restart was felt, and waited out
    study = optuna.load_study(study_name="tiny", storage=open_storage(url))
    trials = study.get_trials(deepcopy=False)
    complete = {t.number for t in trials if t.state == TrialState.COMPLETE}
    assert len(complete) >= budget and complete_before <= complete
    assert trials[killed.number].state == TrialState.FAIL
    retries = [t for t in trials if t.system_attrs.get("failed_trial") == killed.number]
    assert retries and retries[0].params == killed.params  # retried with the same values
    runs = runs_of(tracking, "tiny")
    by_id = {r.info.run_id: r for r in runs}
    assert by_id[killed.user_attrs["mlflow_run_id"]].info.status == "KILLED"
    assert not [r.info.run_name for r in runs if r.info.status == "RUNNING" and
                r.data.tags.get("l0sweep.role") != "study"]
    assert all(by_id[t.user_attrs["mlflow_run_id"]].info.status == "FINISHED"
               for t in trials if t.state == TrialState.COMPLETE)
