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


def test_a_trial_short_of_the_accuracy_floor_stops_nothing():
    """On its way to removing everything, a collapsing trial is both sparse and still accurate at epoch 2."""
    healthy = [[1, 0.80, 0.05], [2, 0.85, 0.10], [3, 0.97, 0.40]]
    collapsing = [[1, 0.85, 0.30], [2, 0.90, 0.60], [3, 0.09, 0.99]]
    spec = EarlyStoppingSpec(enabled=True, warmup_epochs=2, min_completed=2)
    for floor, stopped in ((None, True), (0.13, False)):
        study = _study([healthy, healthy])
        trial = study.ask()
        trial.set_user_attr("history", collapsing)
        if floor is not None:
            trial.set_constraint("min_accuracy", floor - collapsing[-1][1])  # as the worker marks it
        study.tell(trial, collapsing[-1][1:])
        assert ParetoStopper(study, spec)(2, 0.85, 0.10) is stopped


def test_history_is_written_on_the_first_epoch_then_throttled_and_whole_at_the_end():
    from sweeps.early_stopping import TrialHistory

    study = optuna.create_study(directions=["maximize", "maximize"])
    trial = study.ask()
    history = TrialHistory(trial, seconds=3600)
    for epoch in (1, 2, 3):
        history.add(epoch, 0.5 + epoch / 10, epoch / 10)
    assert study.trials[0].user_attrs["history"] == [[1, 0.6, 0.1]]  # live enough for `status`, not every epoch
    history.flush()
    assert study.trials[0].user_attrs["history"] == [[1, 0.6, 0.1], [2, 0.7, 0.2], [3, 0.8, 0.3]]
    every_epoch = TrialHistory(study.ask(), seconds=0)
    every_epoch.add(1, 0.5, 0.1)
    every_epoch.add(2, 0.6, 0.2)
    assert study.trials[1].user_attrs["history"] == [[1, 0.5, 0.1], [2, 0.6, 0.2]]
