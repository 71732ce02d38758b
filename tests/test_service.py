"""The service's topology as processes on loopback, with faults: what docker-compose.yml runs, minus containers.

PostgreSQL (one cluster, two databases: Optuna's and MLflow's), an MLflow tracking server on it serving
artifacts, the one-shot create step, optuna-dashboard, two workers that reach the stores only through
``L0SWEEP_STORAGE`` and ``MLFLOW_TRACKING_URI`` (as the compose workers do), then the report. One worker is
SIGKILLed mid-trial and PostgreSQL is restarted mid-sweep. Bounded: short trials, every wait has a deadline.
"""
from __future__ import annotations

import os
import re
import signal
import time
from pathlib import Path

import mlflow
import optuna
import pytest
import torch
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from sweeps.storage import open_storage
from tests.postgres import without_psycopg2
from tests.servers import MlflowServer, OptunaDashboard, get_json
from tests.sweep_helpers import TINY, l0sweep, write_study

pytestmark = pytest.mark.slow


@pytest.fixture
def service(postgres, mlflow_server):
    """The session's PostgreSQL and MLflow server, an Optuna database of this test's own, and the processes the
    test starts (stopped whatever the test does)."""
    started = []
    try:
        yield postgres, postgres.create_database("optuna_service"), mlflow_server, started
    finally:
        for part in reversed(started):
            part.stop()


def _wait(predicate, timeout: float, what: str, step: float = 0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(step)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def test_service_topology_with_a_killed_worker_and_a_database_restart(tmp_path, service):
    postgres, url, mlflow_server, started = service
    budget = 5
    study_file = write_study(tmp_path / "tiny.yaml", trials=budget,
                             trial={**TINY["trial"], "optim": {**TINY["trial"]["optim"], "epochs": 12}})
    # What compose gives every l0sweep container: the stores by environment, never the MLflow database.
    env = {"L0SWEEP_STORAGE": url,
           "MLFLOW_TRACKING_URI": mlflow_server.url, "L0SWEEP_OUT": str(tmp_path / "out")}

    created = l0sweep("create", study_file, "--verbose", env=env)
    assert created.returncode == 0, created.stderr
    assert "A new study created in RDB with name: tiny" in created.stderr  # Optuna's INFO line, with --verbose only
    assert f"; runs: {mlflow_server.url}/#/experiments/" in created.stdout
    dashboard = OptunaDashboard(url, tmp_path / "dashboard.log")
    started.append(dashboard)
    dashboard.wait_ready()
    study_id = next(s["study_id"] for s in get_json(f"{dashboard.url}/api/studies")["study_summaries"]
                    if s["study_name"] == "tiny")

    logs = [open(tmp_path / f"w{i}.log", "wb") for i in range(2)]
    victim, survivor = (l0sweep("worker", study_file, env=env, log=logs[i]) for i in range(2))
    study = optuna.load_study(study_name="tiny", storage=open_storage(url))

    def mid_trial(worker):  # running, with at least one epoch done
        tag = f"{os.uname().nodename}:{worker.pid}"
        return [t for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
                if t.user_attrs.get("worker") == tag and t.user_attrs.get("history")]

    killed = _wait(lambda: mid_trial(victim), 120, "the victim to be mid-trial")[0]
    victim.send_signal(signal.SIGKILL)
    victim.wait(timeout=30)

    # Restart PostgreSQL while the survivor is mid-trial (its heartbeat is writing): it and the MLflow
    # server must wait for the database, not die.
    _wait(lambda: study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) and mid_trial(survivor), 120,
          "a complete trial and the survivor mid-trial")
    complete_before = {t.number for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))}
    postgres.restart(down_for=3.0)

    assert survivor.wait(timeout=300) == 0, (tmp_path / "w1.log").read_text()[-3000:]
    assert "storage unreachable" in (tmp_path / "w1.log").read_text()  # the restart was felt, and waited out
    assert mlflow_server.proc.poll() is None, "the MLflow server died with the database restart"

    # Optuna: the budget reached, nothing complete lost, the killed trial failed and retried with its params.
    study = optuna.load_study(study_name="tiny", storage=open_storage(url))
    trials = study.get_trials(deepcopy=False)
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    assert len(complete) >= budget and complete_before <= {t.number for t in complete}
    assert trials[killed.number].state == TrialState.FAIL
    retries = [t for t in trials if t.system_attrs.get("failed_trial") == killed.number]
    assert retries and retries[0].params == killed.params

    # MLflow, read back through the server's API: one FINISHED child run per complete trial, under the
    # study's parent run; the killed trial's run KILLED; nothing left RUNNING, the parent run included.
    client = MlflowClient(mlflow_server.url)
    parent_id = study.user_attrs["mlflow_parent_run_id"]
    experiment = client.get_experiment_by_name("tiny")
    runs = {r.info.run_id: r for r in client.search_runs([experiment.experiment_id], max_results=1000)}
    children = {i: r for i, r in runs.items() if r.data.tags.get("mlflow.parentRunId") == parent_id}
    for t in complete:
        run = children[t.user_attrs["mlflow_run_id"]]
        assert run.info.status == "FINISHED" and run.data.metrics["val_accuracy"] == pytest.approx(t.values[0])
    finished = [r for r in children.values() if r.info.status == "FINISHED"]
    assert len(finished) == len(complete)
    assert runs[killed.user_attrs["mlflow_run_id"]].info.status == "KILLED"
    assert [r.info.status for r in runs.values() if r.info.status == "RUNNING"] == []
    assert runs[parent_id].info.status == "FINISHED"  # closed by the last worker, as no launcher is there

    # optuna-dashboard shows the study; the report job writes the report and logs it to the parent run.
    detail = get_json(f"{dashboard.url}/api/studies/{study_id}")
    assert sum(t["state"] == "Complete" for t in detail["trials"]) == len(complete)
    reported = l0sweep("report", "tiny", env=env)
    assert reported.returncode == 0, reported.stderr
    report = tmp_path / "out" / "reports" / "tiny" / "report.html"
    assert report.is_file() and report.stat().st_size > 10_000
    logged = {a.path for a in client.list_artifacts(parent_id, "report")}
    assert "report/report.html" in logged
    # A trial on the front logged its exported model, which comes back through the artifact proxy.
    front_runs = [t.user_attrs["mlflow_run_id"] for t in study.best_trials if t.user_attrs.get("model_logged")]
    assert front_runs
    mlflow.set_tracking_uri(mlflow_server.url)
    small = mlflow.pytorch.load_model(f"runs:/{front_runs[0]}/model")
    assert small(torch.zeros(3, 1, 8, 8)).shape == (3, 10)


@pytest.fixture(scope="module")
def pg_sweep(postgres, mlflow_server, tmp_path_factory):
    """`l0sweep run --storage postgresql://... --workers 2` on the session's server, once for the tests that read
    it: the URL as the README writes it, and psycopg2 not importable (as on a fresh install)."""
    folder = tmp_path_factory.mktemp("pg-sweep")
    url = postgres.create_database("optuna_run")
    study_file = write_study(folder / "pg-run.yaml", name="pg-run", trials=3)
    result = l0sweep("run", study_file, "--storage", url, "--tracking-uri", mlflow_server.url, "--workers", "2",
                     "--out", folder / "out", env=without_psycopg2(folder / "hide"))
    return result, url, mlflow_server


def test_run_on_a_plain_postgresql_url_with_two_workers(pg_sweep):
    result, url, mlflow_server = pg_sweep
    assert url.startswith("postgresql://")
    assert result.returncode == 0, result.stderr[-3000:]
    study = optuna.load_study(study_name="pg-run", storage=open_storage(url))
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    assert len(complete) >= 3 and not study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))

    client = MlflowClient(mlflow_server.url)
    experiment = client.get_experiment_by_name("pg-run")
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"  # the UI opens on the runs
    runs = {r.info.run_id: r for r in client.search_runs([experiment.experiment_id], max_results=1000)}
    parent_id = study.user_attrs["mlflow_parent_run_id"]
    assert runs[parent_id].info.status == "FINISHED" and runs[parent_id].data.tags["l0sweep.role"] == "study"
    for t in complete:
        run = runs[t.user_attrs["mlflow_run_id"]]
        assert run.info.status == "FINISHED" and run.data.tags["mlflow.parentRunId"] == parent_id
        assert run.data.metrics["val_accuracy"] == pytest.approx(t.values[0])
        # One point per epoch, and the final-only figures once, at the last epoch.
        for metric in ("val_accuracy", "sparsity", "train_penalty"):
            assert [m.step for m in client.get_metric_history(run.info.run_id, metric)] == [1, 2, 3], metric
        assert [m.step for m in client.get_metric_history(run.info.run_id, "test_accuracy")] == [3]
    assert [r.info.status for r in runs.values() if r.info.status == "RUNNING"] == []


def test_the_printed_link_opens_the_runs_table_with_the_trials_nested_under_the_study_run(pg_sweep, tmp_path):
    """In headless Chromium, as a user clicks it: MLflow 3.17's UI opened the study's experiment on its GenAI
    overview (traces, an assistant), the training runs one click away. The screenshot is left in tmp_path; to
    take one by hand: python -m benchmarks.mlflow_ui_screenshot."""
    from PIL import Image

    from benchmarks.mlflow_ui_screenshot import photograph

    result, url, mlflow_server = pg_sweep
    assert result.returncode == 0, result.stderr[-3000:]
    link = re.search(r"^l0sweep: \d+ complete, .*; runs: (\S+)$", result.stderr, re.M).group(1)  # the summary's
    assert link.startswith(f"{mlflow_server.url}/#/experiments/") and link.endswith("?workflowType=machine_learning")
    study = optuna.load_study(study_name="pg-run", storage=open_storage(url))
    trials = {f"trial-{t.number}" for t in study.get_trials(deepcopy=False) if "mlflow_run_id" in t.user_attrs}

    seen = photograph(link, tmp_path / "mlflow-ui.png")
    assert seen["before"] == ["pg-run"]  # the table's one row is the study's run: its trials are inside it
    assert seen["after"][0] == "pg-run" and set(seen["after"][1:]) == trials and len(seen["after"]) == len(trials) + 1
    image = Image.open(tmp_path / "mlflow-ui.png").convert("RGB")
    assert image.size == (1400, 900) and len(image.getcolors(maxcolors=1_000_000)) > 200, "the screenshot is blank"


def test_basic_auth_and_allowed_hosts_refusals_are_one_clear_line(tmp_path, postgres):
    """docker-compose.auth.yml's setup: MLflow's basic-auth app, configured by the shipped ini and env vars.

    Without a login the create step stops with one line and leaves no study behind; with the env file's
    login it creates the study; a Host name the server does not allow is named as the cause.
    """
    ini = (Path(__file__).resolve().parent.parent / "docker" / "mlflow-basic-auth.ini").read_text()
    (tmp_path / "auth.ini").write_text(ini.replace("sqlite:////mlartifacts/basic_auth.db",
                                                   f"sqlite:///{tmp_path / 'basic_auth.db'}"))
    server_env = {**os.environ, "MLFLOW_AUTH_CONFIG_PATH": str(tmp_path / "auth.ini"),
                  "MLFLOW_AUTH_ADMIN_USERNAME": "sweeper", "MLFLOW_AUTH_ADMIN_PASSWORD": "pw-from-env-file",
                  "MLFLOW_FLASK_SERVER_SECRET_KEY": "csrf-key"}
    # Its tracking store on the session's PostgreSQL, as in the compose stack (and MLflow's schema is made there in
    # a fraction of the time SQLite takes).
    server = MlflowServer(postgres.create_database("mlflow_auth"), tmp_path / "artifacts", tmp_path / "mlflow.log",
                          "--app-name", "basic-auth", env=server_env)
    try:
        server.wait_ready()  # /health needs no login: the compose health check works with auth on
        study_file = write_study(tmp_path / "tiny.yaml")
        journal = tmp_path / "optuna.journal"
        env = {"L0SWEEP_STORAGE": str(journal),
               "MLFLOW_TRACKING_URI": server.url, "L0SWEEP_OUT": str(tmp_path / "out")}

        refused = l0sweep("create", study_file, env=env)
        assert refused.returncode == 1
        assert refused.stderr.strip().splitlines() == [
            f"l0sweep create: error: --tracking-uri {server.url}: the MLflow server wants a login (HTTP 401); "
            "set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD"]
        assert not journal.exists() or not optuna.get_all_study_names(open_storage(str(journal)))

        wrong_host = l0sweep("create", study_file, env={**env, "MLFLOW_TRACKING_URI": f"http://0.0.0.0:{server.port}",
                                                          "MLFLOW_TRACKING_USERNAME": "sweeper",
                                                          "MLFLOW_TRACKING_PASSWORD": "pw-from-env-file"})
        assert wrong_host.returncode == 1 and "does not list '0.0.0.0:" in wrong_host.stderr, wrong_host.stderr

        login = {"MLFLOW_TRACKING_USERNAME": "sweeper", "MLFLOW_TRACKING_PASSWORD": "pw-from-env-file"}
        created = l0sweep("create", study_file, env={**env, **login})
        assert created.returncode == 0, created.stderr
        os.environ.update(login)
        try:
            runs = MlflowClient(server.url).search_runs(
                [MlflowClient(server.url).get_experiment_by_name("tiny").experiment_id])
        finally:
            for key in login:
                os.environ.pop(key)
        assert [r.data.tags["l0sweep.role"] for r in runs] == ["study"]
    finally:
        server.stop()
