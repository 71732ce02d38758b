"""Pareto-aware early stopping against completed trials' per-epoch history."""
from __future__ import annotations

import optuna

from sweeps.early_stopping import ParetoStopper
from sweeps.spec import EarlyStoppingSpec


def _study(histories):
    study = optuna.create_study(directions=["maximize", "maximize"])
    for h in histories:
        study.add_trial(optuna.trial.create_trial(values=h[-1][1:], user_attrs={"history": h}))
    return study


def test_stops_only_clearly_dominated_trials_after_warmup():
    good = [[1, 0.90, 0.10], [2, 0.95, 0.30], [3, 0.97, 0.40]]
    study = _study([good, good])
    spec = EarlyStoppingSpec(enabled=True, warmup_epochs=2, min_completed=2, margin_accuracy=0.02,
                             margin_sparsity=0.02)
    stop = ParetoStopper(study, spec)
    assert not stop(1, 0.10, 0.0)  # warm-up: never before epoch 2
    assert stop(2, 0.80, 0.10)  # worse on both by more than the margins at the same epoch
    assert not stop(2, 0.94, 0.10)  # within the accuracy margin
    assert not stop(2, 0.50, 0.90)  # sparser: another point of the trade-off
    assert not stop(4, 0.10, 0.0)  # no completed trial reached epoch 4
    assert not ParetoStopper(study, spec.model_copy(update={"enabled": False}))(2, 0.1, 0.0)
    assert not ParetoStopper(study, spec.model_copy(update={"min_completed": 3}))(2, 0.1, 0.0)
