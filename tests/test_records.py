"""sweeps.records is the one place that spells what a study and a trial record: its readers and writers round-trip,
and no other module of sweeps, dashboards or benchmarks touches Optuna's attrs or spells a key of its own."""
from __future__ import annotations

import ast
from pathlib import Path

import optuna
import pytest

from sweeps.records import (ALL_KEYS, STUDY_KEYS, TRIAL_KEYS, StudyRecord, TaskMetric, TrialRecord, feasible,
                            final_point, record_shortfall, retry_history, retry_system_attrs, task_metric)

ROOT = Path(__file__).resolve().parents[1]
RECORDS = ROOT / "sweeps" / "records.py"
SCANNED = ("sweeps", "dashboards", "benchmarks")

# Keys that are also the name of something else, which other modules rightly spell: the report's table columns
# and pick's rows are named after the fields they show, and these words are study-file fields, sampler names,
# objectives, MLflow params and metrics, export's metrics.json fields or a CLI command as well.
SHARED = {
    "lam": "a study-file search field, sampler name, MLflow param and table column",
    "target_sparsity": "a study-file search field, sampler name, MLflow metric and table column",
    "droprate_init": "a study-file search field, sampler name, MLflow param and table column",
    "mode": "a study-file search field, sampler name, MLflow tag and table column",
    "sparsity": "an objective, MLflow metric and table column",
    "flops_ratio": "an MLflow metric and table column",
    "total_params": "an MLflow metric and table column",
    "removed_params": "an MLflow metric and table column",
    "effective_lambda": "an MLflow metric and table column",
    "mlflow_run_id": "a table column and a field of export's metrics.json",
    "latency": "an objective, a study-file block and a field of export's metrics.json",
    "kept_units": "a field of export's metrics.json (and its MLflow artifact's name)",
    "dense_baseline": "a field of export's metrics.json",
    "worker": "the CLI command l0sweep worker",
}
# A key's word meaning something else in one file only: file -> {key: what it is there}.
ELSEWHERE = {
    "benchmarks/results.py": {"history": "the benchmarks' history folder, benchmarks/history"},
}
# Where Optuna keeps what a record holds: only records.py reads or writes these.
ATTR_ACCESS = {"user_attrs", "system_attrs", "set_user_attr", "set_system_attr"}


def _sources() -> list[Path]:
    return [p for d in SCANNED for p in sorted((ROOT / d).rglob("*.py")) if p != RECORDS]


def _docstrings(tree: ast.AST) -> set[int]:
    """The ids of the docstring nodes: prose may name a key."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                found.add(id(first.value))
    return found


def _violations(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), str(path))
    docs = _docstrings(tree)
    where = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
    meant_otherwise = ELSEWHERE.get(where.as_posix(), {})
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr in ATTR_ACCESS:
            found.append(f"{where}:{node.lineno}: .{node.attr} (read and write through sweeps.records)")
        elif isinstance(node, ast.keyword) and node.arg in ATTR_ACCESS and isinstance(node.value, ast.Dict):
            found.append(f"{where}:{node.value.lineno}: {node.arg}={{...}} spelt here (use TrialRecord.attrs)")
        elif (isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docs
              and node.value in ALL_KEYS and node.value not in SHARED and node.value not in meant_otherwise):
            found.append(f"{where}:{node.lineno}: the key {node.value!r} (use its sweeps.records field)")
    return found


def test_no_module_but_records_touches_attrs_or_spells_a_key():
    assert len(_sources()) > 20  # the scan sees the packages
    found = [v for path in _sources() for v in _violations(path)]
    assert not found, "\n".join(found)


def test_the_scan_finds_what_it_looks_for(tmp_path):
    """The scan is not vacuous: each kind of raw use is caught, and a docstring naming a key is not."""
    probe = tmp_path / "probe.py"
    probe.write_text('"""Reads ``history``."""\n'
                     'def f(trial, study):\n'
                     '    """The ``model_logged`` flag."""\n'
                     '    return trial.user_attrs, study.set_user_attr, "model_logged", g(user_attrs={"lam": 1})\n')
    found = "\n".join(_violations(probe))
    assert ".user_attrs" in found and ".set_user_attr" in found and "'model_logged'" in found
    assert "user_attrs={...}" in found and "history" not in found


def test_shared_keys_are_keys():
    assert set(SHARED) <= ALL_KEYS and all(set(keys) <= ALL_KEYS for keys in ELSEWHERE.values())


def test_keys_are_those_stored_studies_have():
    """Renaming a key would make every study swept before unreadable: these are the keys they have."""
    assert set(STUDY_KEYS.values()) == {"spec", "n_trials", "dense_baseline", "dense_latency", "mlflow_experiment_id",
                                        "mlflow_parent_run_id"}
    assert set(TRIAL_KEYS.values()) == {
        "lam", "target_sparsity", "droprate_init", "mode", "worker", "worker_pid_space", "mlflow_run_id", "history",
        "sparsity", "flops_ratio", "total_params", "removed_params", "kept_units", "effective_lambda",
        "exact_target", "gates_decided", "accuracy_floor", "log_alpha_hist", "latency", "latency_seconds", "model_logged",
        "train_seconds", "stopped_at_epoch"}


def test_trial_record_round_trips_and_names_the_test_metric_by_the_task():
    study = optuna.create_study(directions=["minimize", "maximize"])
    trial = study.ask()
    rmse = TaskMetric("rmse", "minimize", False)
    TrialRecord.write(trial, rmse, lam=0.1, mode="scratch", droprate_init=0.5, pid_space="b/p", test_metric=0.3,
                      metric_floor=None, history=[[1, 0.4, 0.2]])
    study.tell(trial, [0.4, 0.2])
    frozen = study.trials[0]
    assert frozen.user_attrs["test_rmse"] == 0.3 and frozen.user_attrs["worker_pid_space"] == "b/p"
    assert frozen.user_attrs["accuracy_floor"] is None
    record = TrialRecord.read(frozen, rmse)
    assert (record.test_metric, record.pid_space, record.values) == (0.3, "b/p", {"lam": 0.1, "droprate_init": 0.5,
                                                                                   "mode": "scratch"})
    assert TrialRecord.read(frozen).test_metric is None  # read as accuracy: there is no test_accuracy
    assert TrialRecord.read_history(frozen) == record.history == [[1, 0.4, 0.2]]
    assert record.trained_lambda == 0.1 and TrialRecord(effective_lambda=2.0).trained_lambda == 2.0
    with pytest.raises(TypeError, match="no field 'lambda'"):
        TrialRecord.write(trial, **{"lambda": 1.0})


def test_study_record_round_trips_and_reads_the_task_metric_from_the_spec():
    study = optuna.create_study()
    assert StudyRecord.read(study) == StudyRecord() and task_metric(study) == TaskMetric()
    spec = '{"trial": {"task": {"metric": "pkg.mod:f1", "direction": "maximize"}}}'
    StudyRecord.write(study, spec_json=spec, budget=6, dense_baseline={"val_f1": 0.8})
    assert study.user_attrs["n_trials"] == 6 and study.user_attrs["spec"] == spec
    record = StudyRecord.read(study)
    assert record.budget == 6 and record.metric == TaskMetric("f1", "maximize", False) == task_metric(study)
    with pytest.raises(TypeError):
        StudyRecord.write(study, trials=3)


def test_feasibility_final_point_and_retries():
    study = optuna.create_study(directions=["maximize", "maximize"])
    study.set_metric_names(["val_accuracy", "sparsity"])
    for values, shortfall in (([0.9, 0.5], 0.0), ([0.1, 0.9], 0.2)):
        trial = study.ask()
        record_shortfall(trial, shortfall)
        study.tell(trial, values)
    study.add_trial(optuna.trial.create_trial(state=optuna.trial.TrialState.PRUNED,
                                              user_attrs=TrialRecord.attrs(history=[[1, 0.5, 0.1], [2, 0.6, 0.3]])))
    ok, short, stopped = study.trials
    assert feasible(ok) and not feasible(short) and feasible(stopped)
    assert [t.number for t in study.best_trials] == [0]  # Optuna keeps the trial short of its floor off the front
    assert final_point(study, ok) == (0.9, 0.5) and final_point(study, stopped) == (0.6, 0.3)
    assert retry_history(ok) == [] and retry_system_attrs(ok)["retry_history"] == [0]
    study.add_trial(optuna.trial.create_trial(state=optuna.trial.TrialState.FAIL, system_attrs=retry_system_attrs(ok)))
    retried = study.trials[3]
    assert retry_history(retried) == [0]
    assert retry_system_attrs(retried)["failed_trial"] == 0 and retry_system_attrs(retried)["retry_history"] == [0, 3]
