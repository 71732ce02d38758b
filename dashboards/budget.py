"""Two studies at an equal budget in epochs: the front a study bought, against the front another study (the same
search without early stopping, say) had bought by the time it had trained as many epochs.

Epochs count every trial's, stopped and failed ones included (``sweeps.records.epochs_trained``): what a sweep
spends. The other study's trials are counted in the order they were numbered (started) while their epochs, added
up, stay within this study's; its front is that of its complete trials among them.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import optuna
from optuna._hypervolume import compute_hypervolume  # as dashboards.table: Optuna's exact hypervolume
from optuna.trial import FrozenTrial, TrialState

from sweeps.records import TrialRecord, epochs_trained, feasible, metric_names, task_metric


@dataclass(frozen=True)
class EqualBudget:
    """This study and ``against`` within this study's ``epochs``: for each, the epochs its counted trials trained,
    its complete trials among them, the front's size and its hypervolume (both against one reference point: the
    origin for a maximised metric, the worst feasible value of either study for a minimised one)."""

    study: str
    against: str
    epochs: int
    against_epochs: int
    complete: int
    against_complete: int
    front: int
    against_front: int
    hypervolume: float
    against_hypervolume: float


def _within(study: optuna.Study, epochs: int) -> tuple[int, list[FrozenTrial]]:
    """(epochs trained, complete trials) of ``study``'s trials, in number order, while their epochs stay within
    ``epochs``."""
    spent, complete = 0, []
    for t in sorted(study.get_trials(deepcopy=False), key=lambda t: t.number):
        cost = len(TrialRecord.read_history(t))
        if spent + cost > epochs:
            break
        spent += cost
        if t.state == TrialState.COMPLETE:
            complete.append(t)
    return spent, complete


def _front(points: np.ndarray) -> np.ndarray:
    """The non-dominated rows of ``points`` (every column minimised)."""
    keep = [i for i, p in enumerate(points) if not any((q <= p).all() and (q < p).any() for q in points)]
    return points[keep]


def at_equal_epochs(study: optuna.Study, against: optuna.Study) -> EqualBudget:
    """``study``'s front against the front ``against`` had bought within as many epochs as ``study`` trained.

    Raises ValueError when the two studies do not share their objectives (names and directions).
    """
    names, directions = metric_names(study)[:2], [d.name for d in study.directions[:2]]
    theirs = (metric_names(against)[:2], [d.name for d in against.directions[:2]])
    if (names, directions) != theirs:
        raise ValueError(f"--against {against.study_name}: its objectives {theirs[0]} ({', '.join(theirs[1])}) are "
                         f"not those of {study.study_name} {names} ({', '.join(directions)})")
    sign = task_metric(study).sign
    epochs = epochs_trained(study)
    ours = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    their_epochs, their_complete = _within(against, epochs)
    # Optuna's hypervolume minimises: the metric negated where maximised, the second objective (>= 0) negated.
    points = {name: np.array([[-sign * t.values[0], -t.values[1]] for t in trials if feasible(t)]).reshape(-1, 2)
              for name, trials in (("ours", ours), ("theirs", their_complete))}
    worst = max([0.0, *points["ours"][:, 0], *points["theirs"][:, 0]])
    fronts = {name: _front(p) for name, p in points.items()}
    hv = {name: float(compute_hypervolume(f, np.array([worst, 0.0]))) if len(f) else 0.0
          for name, f in fronts.items()}
    return EqualBudget(study=study.study_name, against=against.study_name, epochs=epochs, against_epochs=their_epochs,
                       complete=len(ours), against_complete=len(their_complete), front=len(fronts["ours"]),
                       against_front=len(fronts["theirs"]), hypervolume=hv["ours"], against_hypervolume=hv["theirs"])


def describe(budget: EqualBudget) -> str:
    """The comparison in one sentence, as the report and ``l0sweep report --against`` give it."""
    return (f"At an equal budget: {budget.study} trained {budget.epochs} epochs for {budget.complete} complete "
            f"trials, front hypervolume {budget.hypervolume:.4f} ({budget.front} on the front); within as many epochs "
            f"{budget.against} trained {budget.against_epochs} for {budget.against_complete} complete trials, front "
            f"hypervolume {budget.against_hypervolume:.4f} ({budget.against_front} on the front).")
