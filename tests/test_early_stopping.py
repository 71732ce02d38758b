"""Pareto-aware early stopping against completed trials' per-epoch history."""
from __future__ import annotations

import re

import optuna
import pytest

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


def test_mo_asha_keeps_the_top_third_of_a_rung_by_pareto_rank_then_crowding():
    from sweeps.early_stopping import AshaStopper, goes_on, nondominated_ranks, rungs

    assert rungs(2, 3, 30) == [2, 6, 18] and rungs(1, 4, 16) == [1, 4]
    # Three objectives: ranks by non-dominated sorting on all of them.
    assert nondominated_ranks([(0.9, 0.5, 0.1), (0.9, 0.5, 0.2), (0.8, 0.6, 0.0), (0.7, 0.4, 0.0)]) == [1, 0, 0, 2]
    front = [(0.95, 0.1), (0.9, 0.5), (0.8, 0.8), (0.5, 0.95)]
    behind = [(0.7, 0.3), (0.6, 0.2)]
    # 7 points, eta 3: the top 2 go on. Front ends have infinite crowding distance; the dominated never go on.
    assert goes_on((0.97, 0.05), front + behind, eta=3)  # a new end of the front
    assert not goes_on((0.85, 0.6), front + behind, eta=3)  # on the front, but in its crowded middle
    assert not goes_on((0.65, 0.25), front + behind, eta=3)
    assert goes_on((0.1, 0.1), [], eta=3)  # alone at a rung: nothing to lose to (the first trials always go on)
    assert not goes_on((0.1, 0.1), [(0.9, 0.9), (0.8, 0.95)], eta=3)  # fewer than eta: only the best goes on

    spec = EarlyStoppingSpec(enabled=True, method="asha", min_epochs=1, eta=2, warmup_epochs=1)
    study = _study([[[1, 0.9, 0.5], [2, 0.95, 0.6]], [[1, 0.5, 0.1], [2, 0.6, 0.2]]])
    stop = AshaStopper(study, spec, epochs=4, trial_number=99)
    assert stop.rungs == {1, 2} and stop.at_rung(2) and not stop.at_rung(3)
    assert stop(1, 0.4, 0.05) and not stop(1, 0.96, 0.7) and not stop(3, 0.1, 0.0)  # epoch 3 is no rung
    # A rung inside the warm-up decides nothing: with warmup_epochs 2 the same trial goes on at epoch 1.
    warm = AshaStopper(study, spec.model_copy(update={"warmup_epochs": 2}), epochs=4, trial_number=99)
    assert warm.rungs == {2} and not warm(1, 0.4, 0.05) and warm(2, 0.4, 0.05)
    collapsed = _study([])
    trial = collapsed.ask()
    trial.set_user_attr("history", [[1, 0.9, 0.9]])
    trial.set_constraint("min_accuracy", 0.5)  # ended short of the floor: no evidence at any rung
    collapsed.tell(trial, [0.1, 0.99])
    assert not AshaStopper(collapsed, spec, epochs=4, trial_number=99)(1, 0.85, 0.45)


@pytest.mark.slow
def test_a_two_worker_sweep_stops_trials_at_rungs_within_an_epoch_budget(tmp_path):
    """MO-ASHA across two worker processes on one journal: trials are pruned at rungs (and only there), and no
    trial starts once the study has trained its epoch budget, however many complete trials the file asks for."""
    from sweeps.records import epochs_trained
    from sweeps.storage import open_storage
    from tests.sweep_helpers import TINY, l0sweep, l0sweep_in_terminal, write_study

    # TINY's trials train 3 epochs: with eta 2 the rungs are epochs 1 and 2, each keeping the top half.
    path = write_study(tmp_path / "study.yaml", trials=40, budget={"epochs": 30},
                       early_stopping={"enabled": True, "method": "asha", "min_epochs": 1, "eta": 2,
                                       "warmup_epochs": 1})
    code, shown = l0sweep_in_terminal("run", path, "--out", tmp_path / "out", "--workers", "2", timeout=300)
    assert code == 0, shown[-2000:]
    study = optuna.load_study(study_name="tiny", storage=open_storage(str(tmp_path / "out" / "optuna.journal")))
    pruned = [t for t in study.trials if t.state.name == "PRUNED"]
    complete = [t for t in study.trials if t.state.name == "COMPLETE"]
    assert pruned and {t.user_attrs["stopped_at_epoch"] for t in pruned} <= {1, 2}
    assert all(len(t.user_attrs["history"]) == 3 for t in complete)
    trained = epochs_trained(study)
    # The budget holds: reached, and overshot by at most what the two workers had in flight.
    assert 30 <= trained < 30 + 2 * 3 and len(complete) < 40
    # The sweep speaks in what ended it, the epochs trained, from its first line through its bar to its summary.
    shown = " ".join(shown.split())  # the terminal wraps long lines
    assert "40 complete trials wanted, or 30 epochs trained (stopped trials' too) if that comes first, 2 workers" in shown
    assert re.search(r"epochs trained: +100%\|.*\| *30/30 \[", shown), shown[-2000:]
    assert (f"{len(complete)} complete, {len(pruned)} stopped early, 0 failed or interrupted (budget 40 trials or 30 "
            f"epochs; {trained} epochs trained)") in shown
    page = (tmp_path / "out" / "reports" / "tiny" / "report.html").read_text()
    assert f"{len(complete)} complete trials, {len(pruned)} stopped early ({trained} epochs trained of a budget of 30)" in page
    status = l0sweep("status", "tiny", "--out", tmp_path / "out")
    assert status.returncode == 0, status.stderr
    assert status.stdout.startswith(f"study tiny: {len(complete)}/40 complete trials, {trained}/30 epochs trained; "
                                    f"{len(pruned)} stopped early")
