"""A study's trials as a pandas table, its Pareto front, and hypervolume: what the report and ``pick`` read.

Everything here reads the Optuna storage only, through sweeps.records (what the sweep wrote); nothing trains.
"""
from __future__ import annotations

import numpy as np
import optuna
import pandas as pd
from optuna._hypervolume import compute_hypervolume  # Optuna's exact hypervolume (no public name for it)
from optuna.trial import FrozenTrial, TrialState

from sweeps.records import (StudyRecord, TaskMetric, TrialRecord, feasible, final_point, retry_history,
                            task_metric)

COLUMNS = ["trial", "val_accuracy", "test_accuracy", "sparsity", "flops_ratio", "latency_ms", "speedup", "lam",
           "droprate_init", "mode", "removed_params", "total_params", "mlflow_run_id", "state", "feasible", "on_front",
           "target_sparsity", "effective_lambda"]


def table_columns(metric: TaskMetric) -> list[str]:
    """:data:`COLUMNS` with the metric's columns named for it (``val_accuracy`` and ``test_accuracy`` by default)."""
    return [{"val_accuracy": metric.val, "test_accuracy": metric.test}.get(c, c) for c in COLUMNS]


# A trial of a target study misses its target when its sparsity lies farther from it than this (2 points).
TARGET_TOLERANCE = 0.02


def missed_target(table: pd.DataFrame, tolerance: float = TARGET_TOLERANCE) -> pd.Series:
    """Which rows of :func:`trials_table` ended farther than ``tolerance`` from their target sparsity (False for
    trials without one).

    >>> missed_target(pd.DataFrame({"sparsity": [0.79, 0.75, 0.5], "target_sparsity": [0.8, 0.8, None]})).tolist()
    [False, True, False]
    """
    return (table.sparsity - table.target_sparsity.astype(float)).abs().gt(tolerance + 1e-12).fillna(False)


def latency_setting(spec: dict) -> tuple[str, int]:
    """(runtime, batch size) of the latency the table shows and the latency objective maximises: the study
    file's ``latency`` block, its batch size defaulting to the training batch (sweeps.worker.latency_batch)."""
    lat = spec.get("latency") or {}
    return lat.get("runtime", "torch"), int(lat.get("batch_size") or spec.get("trial", {}).get("data", {})
                                            .get("batch_size", 64))


def latency_of(trial: optuna.trial.FrozenTrial, runtime: str, batch: int) -> tuple[float, float]:
    """(compacted model's median ms, speed-up over dense) a trial measured, NaN where it measured none (trials
    off the front when they finished, unless latency is an objective)."""
    f = (TrialRecord.read(trial).latency or {}).get(runtime, {}).get(str(batch))
    return (f["compact_ms"], f["speedup"]) if f else (np.nan, np.nan)


def trials_table(study: optuna.Study) -> pd.DataFrame:
    """One row per finished trial (complete, or stopped early), front trials flagged ``on_front``; ``feasible``
    is False for a trial short of the study's accuracy floor, which keeps it off the front. In a target study
    ``target_sparsity`` is the trial's target and ``lam`` the lambda it cost (``effective_lambda``).

    Metrics are the final model's: the task's validation metric (accuracy by default; its columns are named
    ``val_<metric_name>`` and ``test_<metric_name>``) selects, the test metric is only reported.
    """
    front = {t.number for t in study.best_trials}
    runtime, batch = latency_setting(spec_of(study))
    metric = task_metric(study)
    rows = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)):
        record = TrialRecord.read(t, metric)
        val_value, sparsity = final_point(study, t, metric)
        latency_ms, speedup = latency_of(t, runtime, batch)
        nan_if_none = {name: np.nan if getattr(record, name) is None else getattr(record, name)
                       for name in ("test_metric", "flops_ratio", "target_sparsity", "effective_lambda")}
        rows.append({"trial": t.number, metric.val: val_value, metric.test: nan_if_none["test_metric"],
                     # A target trial's lambda is the one its target cost (its Lagrangian's effective lambda).
                     "sparsity": sparsity, "flops_ratio": nan_if_none["flops_ratio"], "latency_ms": latency_ms,
                     "speedup": speedup, "lam": record.trained_lambda, "droprate_init": record.droprate_init,
                     "mode": record.mode, "removed_params": record.removed_params,
                     "total_params": record.total_params, "mlflow_run_id": record.mlflow_run_id,
                     "state": t.state.name, "feasible": feasible(t), "on_front": t.number in front,
                     "target_sparsity": nan_if_none["target_sparsity"],
                     "effective_lambda": nan_if_none["effective_lambda"]})
    # bool even with no rows: an empty object column would select columns, not rows, in table[table.on_front]
    return pd.DataFrame(rows, columns=table_columns(metric)).astype({"on_front": bool, "feasible": bool})


def front_table(study: optuna.Study) -> pd.DataFrame:
    """The Pareto front as a table: one row per front trial, sorted by sparsity."""
    table = trials_table(study)
    return table[table.on_front].sort_values(["sparsity", task_metric(study).val]).reset_index(drop=True)


def hypervolume_history(study: optuna.Study) -> pd.DataFrame:
    """Hypervolume of the front of the first two objectives (the validation metric, then sparsity, FLOPs reduction
    or speed-up: each >= 0 and maximised) after each complete trial, reference point (0, 0).

    For accuracy both objectives lie in [0, 1], so the origin is the natural worst point and values are comparable
    between studies. A metric that can be worse than 0 (any minimised one, an error) has the worst value of the
    study's feasible trials as its reference instead. Trials short of the floor add nothing, as they are not on the
    front (a network with every unit removed would otherwise add a strip of its chance accuracy's height up to
    sparsity 1).
    """
    sign = task_metric(study).sign
    complete = sorted(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)), key=lambda t: t.number)
    worst = max([0.0, *(-sign * t.values[0] for t in complete if feasible(t))])  # optuna's hypervolume minimises
    points, rows = np.empty((0, 2)), []
    for t in complete:
        points = np.vstack([points, front_points([t], sign)])
        rows.append({"trial": t.number, "hypervolume": hypervolume(points, worst)})
    return pd.DataFrame(rows, columns=["trial", "hypervolume"])


def front_points(trials: list[FrozenTrial], sign: int) -> np.ndarray:
    """The complete trials' first two objectives as Optuna's hypervolume takes them (both minimised: the metric
    times ``-sign``, the second objective negated); trials short of the floor left out, as they are on no front."""
    return np.array([[-sign * t.values[0], -t.values[1]] for t in trials
                     if t.state == TrialState.COMPLETE and feasible(t)]).reshape(-1, 2)


def hypervolume(points: np.ndarray, worst: float) -> float:
    """The hypervolume of :func:`front_points` against the reference point (``worst``, 0); 0 without points."""
    return float(compute_hypervolume(points, np.array([worst, 0.0]))) if len(points) else 0.0


def failed_and_interrupted(study: optuna.Study) -> tuple[int, int]:
    """(trials that failed, failed trials that were queued again because their worker was stopped or died),
    the latter read from the ``retry_history`` Optuna's retry convention keeps on each retry."""
    trials = study.get_trials(deepcopy=False)
    retried = {n for t in trials for n in retry_history(t)}
    failed = [t.number for t in trials if t.state == TrialState.FAIL]
    interrupted = sum(1 for n in failed if n in retried)
    return len(failed) - interrupted, interrupted


def spec_of(study: optuna.Study) -> dict:
    """The study file the sweep stored on the study (as a dict)."""
    return StudyRecord.read(study).spec
