"""``l0sweep status``: trials by state, the budget, and the current Pareto front."""
from __future__ import annotations

import optuna
import pandas as pd
from optuna.trial import TrialState

from .records import StudyRecord, TrialRecord, epochs_trained, feasible, final_point, task_metric
from .study import counts, worker_gone


# The states other than complete, in the words the report and `l0sweep run` use.
_OTHER_STATES = {"RUNNING": "running", "WAITING": "queued", "PRUNED": "stopped early", "FAIL": "failed"}


def front_rows(study: optuna.Study) -> pd.DataFrame:
    """The Pareto front as ``status`` shows it: trial, validation and test metric, sparsity, FLOPs ratio, lambda,
    droprate_init and mode, by sparsity (then metric)."""
    metric = task_metric(study)
    rows = []
    for t in study.best_trials:
        record = TrialRecord.read(t, metric)
        val, sparsity = final_point(study, t, metric)
        rows.append({"trial": t.number, metric.val: val, metric.test: record.test_metric, "sparsity": sparsity,
                     "flops_ratio": record.flops_ratio, "lam": record.trained_lambda,
                     "droprate_init": record.droprate_init, "mode": record.mode})
    columns = ["trial", metric.val, metric.test, "sparsity", "flops_ratio", "lam", "droprate_init", "mode"]
    table = pd.DataFrame(rows, columns=columns)
    return table.sort_values(["sparsity", metric.val]).reset_index(drop=True)


def print_status(study: optuna.Study) -> None:
    n = counts(study)
    record = StudyRecord.read(study)
    budget, epoch_budget = record.budget, record.epoch_budget
    others = ", ".join(f"{n[state]} {word}" for state, word in _OTHER_STATES.items() if n[state])
    # With an epoch budget, the epochs trained (stopped trials' included) are what ends the sweep.
    epochs = f", {epochs_trained(study)}/{epoch_budget} epochs trained" if epoch_budget else ""
    print(f"study {study.study_name}: {n['COMPLETE']}/{'?' if budget is None else budget} complete trials{epochs}"
          + (f"; {others}" if others else "" if sum(n.values()) else "; no trials yet"))
    gone = [t.number for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)) if worker_gone(t, None)]
    if gone:
        print(f"running trials {', '.join(map(str, gone))}: their workers on this machine are gone; the next "
              "'l0sweep run' or worker queues them again")
    short = [t.number for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) if not feasible(t)]
    if short:
        metric = task_metric(study)
        setting = "min_accuracy" if metric.is_accuracy else "min_metric"
        trials = ", ".join(map(str, short))
        print(f"short of the {metric.name} floor ({setting}), kept off the front: trial(s) {trials}")
    front = front_rows(study)
    if len(front):
        print(f"Pareto front ({len(front)} trials, by sparsity):")
        print(front.to_string(index=False, float_format=lambda x: f"{x:.4g}"))
