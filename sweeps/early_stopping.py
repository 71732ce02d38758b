"""Early stopping of multi-objective trials: Optuna cannot prune them (optuna#3450), so the sweep does.

Two methods, both reading every trial's per-epoch (validation metric, sparsity) from its ``history`` user
attr, so they decide alike on any worker of any machine. The metric (accuracy by default) is compared in the
direction the study's ``trial.task`` gives it: a minimised one enters every comparison negated.

- ``dominance`` (:class:`ParetoStopper`): a running trial's point after epoch e is compared with what every
  completed trial had after its own epoch e; if one was better on both by the study's margins, it stops.
- ``asha`` (:class:`AshaStopper`, MO-ASHA, Schmucker et al. 2021): at rungs ``min_epochs * eta**k``, the trials
  that reached the rung are ranked by non-dominated sorting (ties broken by crowding distance), and a trial goes
  on only if it ranks in the top ``max(1, n // eta)``.

A stopped trial is PRUNED. A trial that ended short of the accuracy floor (its gates all closing) is no
evidence: on its way down it passes through points that beat healthy trials early on.
"""
from __future__ import annotations

import time
from typing import Iterable, Sequence

import optuna
from optuna.trial import TrialState

from .records import TrialRecord, feasible
from .spec import EarlyStoppingSpec, StudySpec


class TrialHistory:
    """A running trial's per-epoch (epoch, validation metric, sparsity), kept in its ``history`` user attr.

    Written on the first epoch, then at most every ``seconds``, and by :meth:`flush` when the trial ends (before
    it is told COMPLETE: the stopper compares running trials with completed trials' whole histories). Each write
    stores the whole list: once per epoch it cost 2-3 ms on PostgreSQL, 5% of a short digits epoch, and grew
    a journal file quadratically. ``l0sweep status`` shows a running trial's last written epoch.
    """

    def __init__(self, trial: optuna.Trial, seconds: float = 5.0) -> None:
        self.trial, self.seconds = trial, seconds
        self.epochs: list[list[float]] = []
        self._written, self._at = 0, float("-inf")

    def add(self, epoch: int, val_metric: float, sparsity: float) -> None:
        self.epochs.append([epoch, round(val_metric, 6), round(sparsity, 6)])
        if time.monotonic() - self._at >= self.seconds:
            self.flush()

    def flush(self) -> None:
        if len(self.epochs) > self._written:
            TrialRecord.write(self.trial, history=list(self.epochs))  # a copy: an in-memory storage keeps the object
            self._written, self._at = len(self.epochs), time.monotonic()


def clearly_dominated(point: tuple[float, float], others: Iterable[Sequence[float]], margins: tuple[float, float],
                      ) -> bool:
    """Whether some ``other`` beats ``point`` on both axes by at least ``margins``.

    >>> clearly_dominated((0.80, 0.10), [(0.90, 0.20)], (0.02, 0.02))
    True
    >>> clearly_dominated((0.80, 0.10), [(0.81, 0.50), (0.95, 0.11)], (0.02, 0.02))
    False
    """
    acc, sparsity = point
    return any(a >= acc + margins[0] and s >= sparsity + margins[1] for a, s in others)


class ParetoStopper:
    """Decides, after each epoch of a trial, whether the completed trials clearly dominate it. ``sign`` is -1 for a
    minimised metric (it is compared negated), else 1."""

    def __init__(self, study: optuna.Study, spec: EarlyStoppingSpec, sign: float = 1.0) -> None:
        self.study = study
        self.spec = spec
        self.sign = sign

    def at_rung(self, epoch: int) -> bool:
        """Dominance decides at every epoch from completed trials only: nothing to write early for others."""
        return False

    def __call__(self, epoch: int, val_metric: float, sparsity: float) -> bool:
        if not self.spec.enabled or epoch < self.spec.warmup_epochs:
            return False
        completed = [t for t in self.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) if feasible(t)]
        if len(completed) < self.spec.min_completed:
            return False
        at_epoch = [(self.sign * h[1], h[2]) for t in completed for h in TrialRecord.read_history(t)
                    if h[0] == epoch]
        return clearly_dominated((self.sign * val_metric, sparsity), at_epoch,
                                 (self.spec.margin_accuracy, self.spec.margin_sparsity))


def rungs(min_epochs: int, eta: int, epochs: int) -> list[int]:
    """The epochs at which MO-ASHA decides: ``min_epochs * eta**k`` before the last epoch.

    >>> rungs(1, 3, 30)
    [1, 3, 9, 27]
    """
    found, r = [], min_epochs
    while r < epochs:
        found.append(r)
        r *= eta
    return found


def nondominated_ranks(points: Sequence[Sequence[float]]) -> list[int]:
    """Each point's Pareto rank, every objective maximised: 0 for the front, 1 for the front of the rest, ...

    >>> nondominated_ranks([(0.9, 0.1), (0.8, 0.5), (0.7, 0.05), (0.9, 0.1)])
    [0, 0, 1, 0]
    """
    left, ranks, rank = set(range(len(points))), [0] * len(points), 0
    while left:
        front = {i for i in left if not any(
            all(a >= b for a, b in zip(points[j], points[i])) and any(a > b for a, b in zip(points[j], points[i]))
            for j in left)}
        for i in front:
            ranks[i] = rank
        left -= front
        rank += 1
    return ranks


def crowding(points: Sequence[Sequence[float]]) -> list[float]:
    """NSGA-II's crowding distance of each point among ``points`` (one front): ends of an axis are infinite.

    >>> crowding([(0.0, 1.0), (0.5, 0.5), (1.0, 0.0)])
    [inf, 2.0, inf]
    """
    n = len(points)
    distance = [0.0] * n
    for axis in range(len(points[0]) if n else 0):
        order = sorted(range(n), key=lambda i: points[i][axis])
        span = points[order[-1]][axis] - points[order[0]][axis]
        distance[order[0]] = distance[order[-1]] = float("inf")
        for k in range(1, n - 1):
            if span > 0:
                distance[order[k]] += (points[order[k + 1]][axis] - points[order[k - 1]][axis]) / span
    return distance


def goes_on(point: Sequence[float], others: Sequence[Sequence[float]], eta: int) -> bool:
    """Whether ``point`` ranks in the top ``max(1, n // eta)`` of itself and ``others`` (Pareto rank, then
    crowding distance within its front; a tie with another point counts in its favour).

    >>> goes_on((0.9, 0.5), [(0.8, 0.4), (0.7, 0.9)], eta=3)   # on the front, at an end
    True
    >>> goes_on((0.6, 0.3), [(0.8, 0.4), (0.7, 0.9)], eta=3)   # dominated
    False
    """
    points = [tuple(point), *map(tuple, others)]
    ranks = nondominated_ranks(points)
    spread = [0.0] * len(points)
    for r in set(ranks):
        members = [i for i in range(len(points)) if ranks[i] == r]
        for i, d in zip(members, crowding([points[i] for i in members])):
            spread[i] = d
    ahead = sum(1 for i in range(1, len(points)) if (ranks[i], -spread[i]) < (ranks[0], -spread[0]))
    return ahead < max(1, len(points) // eta)


def _evidence(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    """Trials whose histories may count: all but complete ones short of the floor."""
    return [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED,
                                                                 TrialState.RUNNING))
            if t.state != TrialState.COMPLETE or feasible(t)]


class AshaStopper:
    """MO-ASHA: decides, at each rung, whether a trial ranks well enough among those that reached it. ``sign`` is
    -1 for a minimised metric (it is ranked negated), else 1."""

    def __init__(self, study: optuna.Study, spec: EarlyStoppingSpec, epochs: int, trial_number: int,
                 sign: float = 1.0) -> None:
        self.study, self.spec, self.trial_number, self.sign = study, spec, trial_number, sign
        # A rung inside the warm-up decides nothing: the study's warmup_epochs hold for every method (ignored, the
        # default study's trials were stopped at epoch 1, and most of those rerun would have reached the front).
        self.rungs = {r for r in rungs(spec.min_epochs, spec.eta, epochs) if r >= spec.warmup_epochs} \
            if spec.enabled else set()

    def at_rung(self, epoch: int) -> bool:
        """Whether ``epoch`` is a rung: the trial's history must be in the storage then, for the others."""
        return epoch in self.rungs

    def __call__(self, epoch: int, val_metric: float, sparsity: float) -> bool:
        if epoch not in self.rungs:
            return False
        others = [(self.sign * h[1], h[2]) for t in _evidence(self.study) if t.number != self.trial_number
                  for h in TrialRecord.read_history(t) if h[0] == epoch]
        return not goes_on((self.sign * val_metric, sparsity), others, self.spec.eta)


def stopper_for(study: optuna.Study, spec: StudySpec, epochs: int, trial_number: int):
    """The study's stopper for one trial of ``epochs`` epochs: called after each epoch, True stops the trial."""
    sign = 1.0 if spec.trial.task.direction == "maximize" else -1.0
    if spec.early_stopping.method == "asha":
        return AshaStopper(study, spec.early_stopping, epochs, trial_number, sign)
    return ParetoStopper(study, spec.early_stopping, sign)
