"""``l0sweep status``: trials by state, the budget, and the current Pareto front."""
from __future__ import annotations

import optuna
from optuna.trial import TrialState

from dashboards import feasible, front_table, task_metric

from .study import BUDGET_ATTR, counts, worker_gone


# The states other than complete, in the words the report and `l0sweep run` use.
_OTHER_STATES = {"RUNNING": "running", "WAITING": "queued", "PRUNED": "stopped early", "FAIL": "failed"}


def print_status(study: optuna.Study) -> None:
    n = counts(study)
    budget = study.user_attrs.get(BUDGET_ATTR, "?")
    others = ", ".join(f"{n[state]} {word}" for state, word in _OTHER_STATES.items() if n[state])
    print(f"study {study.study_name}: {n['COMPLETE']}/{budget} complete trials"
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
    front = front_table(study)
    if len(front):
        metric = task_metric(study)
        cols = ["trial", metric.val, metric.test, "sparsity", "flops_ratio", "lam", "droprate_init", "mode"]
        print(f"Pareto front ({len(front)} trials, by sparsity):")
        print(front[cols].to_string(index=False, float_format=lambda x: f"{x:.4g}"))
