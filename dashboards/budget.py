"""Two studies at an equal budget in epochs: the front a study bought with early stopping, say, against the front
the same search without it had bought with as many epochs.

Epochs count every trial's, stopped and failed ones included (``sweeps.records.epochs_trained``): what a sweep
spends. The budget is the smaller of the two studies' epochs trained; each study's trials are counted in the order
they were numbered (the order they started, exactly so with one worker) while their epochs, added up, stay within
it, so the study that trained more is cut where its next trial would have passed the budget. Both fronts are of
the first two objectives (the validation metric, then sparsity, FLOPs reduction or speed-up), their hypervolumes
against one reference point: (0, 0) where both studies' feasible metric values are >= 0 and maximised (accuracy),
else the worst feasible metric value of either study. Trials short of the floor are on no front.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import optuna
from optuna.trial import FrozenTrial, TrialState

from sweeps.records import TrialRecord, epochs_trained, metric_names, task_metric

from .table import front_points, hypervolume


@dataclass(frozen=True)
class Within:
    """One study's trials within the budget: the epochs they trained, the complete ones, the size and hypervolume
    of their front."""

    name: str
    epochs_in_all: int  # the study's epochs trained, all its trials
    epochs: int
    complete: int
    front: int
    hypervolume: float


@dataclass(frozen=True)
class EqualBudget:
    """``study`` and ``against`` within ``budget`` epochs, with ``reference`` the hypervolumes' reference value of
    the metric (the second objective's is 0), and the epochs ``against`` needed to reach ``study``'s hypervolume
    (None: not within all it trained)."""

    study: Within
    against: Within
    budget: int
    reference: float
    against_epochs_to_match: int | None


def _counted(study: optuna.Study, budget: int) -> tuple[int, list[FrozenTrial]]:
    """(their epochs, ``study``'s trials in number order while their epochs, added up, stay within ``budget``)."""
    spent, counted = 0, []
    for t in sorted(study.get_trials(deepcopy=False), key=lambda t: t.number):
        cost = len(TrialRecord.read_history(t))
        if spent + cost > budget:
            break
        spent += cost
        counted.append(t)
    return spent, counted


def _front_size(points: np.ndarray) -> int:
    """How many rows of ``points`` (every column minimised) no other row dominates."""
    if not len(points):
        return 0
    no_worse = (points[None, :, :] <= points[:, None, :]).all(axis=2)
    better = (points[None, :, :] < points[:, None, :]).any(axis=2)
    return int((~(no_worse & better).any(axis=1)).sum())


def at_equal_epochs(study: optuna.Study, against: optuna.Study) -> EqualBudget:
    """``study`` and ``against``, each within the smaller of their epochs trained.

    Raises ValueError when ``against`` is ``study``, when the two do not share their objectives (names and
    directions), or when a complete trial of either has no epoch history (a study made before histories were
    kept): its epochs cannot be counted.
    """
    if against.study_name == study.study_name:
        raise ValueError(f"{against.study_name} is the study itself: give another study of the same storage")
    objectives = [(n, d.name.lower()) for n, d in zip(metric_names(study), study.directions)]
    theirs = [(n, d.name.lower()) for n, d in zip(metric_names(against), against.directions)]
    if objectives != theirs:
        def words(o): return ", ".join(f"{n} ({d})" for n, d in o)
        raise ValueError(f"{against.study_name} has the objectives {words(theirs)}; give a study of the objectives "
                         f"of {study.study_name}: {words(objectives)}")
    for s in (study, against):
        unknown = [t.number for t in s.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
                   if not TrialRecord.read_history(t)]
        if unknown:
            raise ValueError(f"{len(unknown)} complete trial(s) of {s.study_name} have no epoch history (made before "
                             f"histories were kept, or by hand): their epochs cannot be counted")
    sign = task_metric(study).sign
    totals = {s.study_name: epochs_trained(s) for s in (study, against)}
    budget = min(totals.values())
    counted = {s.study_name: _counted(s, budget) for s in (study, against)}
    points = {name: front_points(trials, sign) for name, (_, trials) in counted.items()}
    worst = max([0.0, *(p for pts in points.values() for p in pts[:, 0])])
    within = {name: Within(name=name, epochs_in_all=totals[name], epochs=spent,
                           complete=sum(t.state == TrialState.COMPLETE for t in trials),
                           front=_front_size(points[name]), hypervolume=hypervolume(points[name], worst))
              for name, (spent, trials) in counted.items()}
    goal = within[study.study_name].hypervolume
    # What stopping saved, read the other way: the epochs `against` spent until its front first matched this one.
    spent, points_so_far, matched = 0, [], None
    for t in sorted(against.get_trials(deepcopy=False), key=lambda t: t.number) if goal > 0 else []:
        spent += len(TrialRecord.read_history(t))
        point = front_points([t], sign)
        if len(point) and point[0, 0] <= worst:  # a metric worse than the reference adds nothing
            points_so_far.append(point[0])
            if hypervolume(np.array(points_so_far), worst) >= goal:
                matched = spent
                break
    return EqualBudget(study=within[study.study_name], against=within[against.study_name], budget=budget,
                       reference=-sign * worst, against_epochs_to_match=matched)


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def describe(budget: EqualBudget, study: optuna.Study) -> str:
    """The comparison in words, as the report's summary gives it (``study``: the first of the two, for the
    objectives' names)."""
    metric = task_metric(study)
    first, second = metric_names(study)[:2]
    ours, theirs = budget.study, budget.against
    cut = next((s for s in (ours, theirs) if s.epochs_in_all > budget.budget), None)
    reference = "" if budget.reference == 0 else f", reference {first} {metric.show(budget.reference)}"

    def part(s: Within) -> str:
        return (f"{s.name} trained {_plural(s.epochs, 'epoch')} for {_plural(s.complete, 'complete trial')}, "
                f"({first}, {second}) front hypervolume {s.hypervolume:.4g} ({s.front} on that front)")

    return (f"At an equal budget of {_plural(budget.budget, 'epoch')}"
            + (f" ({cut.name}'s trials counted in the order they started until the next would pass it; it trained "
               f"{cut.epochs_in_all} in all{reference})" if cut else f" (both trained as many{reference})")
            + f": {part(ours)}; {part(theirs)}. "
            + (f"{theirs.name} reached {ours.name}'s front hypervolume after "
               f"{_plural(budget.against_epochs_to_match, 'epoch')}."
               if budget.against_epochs_to_match is not None else
               f"{theirs.name} did not reach {ours.name}'s front hypervolume in the "
               f"{_plural(theirs.epochs_in_all, 'epoch')} it trained."))
