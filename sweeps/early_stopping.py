"""Pareto-aware early stopping: Optuna cannot prune multi-objective trials (optuna#3450), so the sweep does.

A running trial's (validation accuracy, sparsity) after epoch e is compared with what every completed trial
above the study's accuracy floor had after its own epoch e (kept per epoch in the trial's ``history`` user attr).
If one was better on both by the study's margins, the running trial is clearly dominated and stops (state
PRUNED). A trial that ended short of the floor (its gates all closing) is no evidence: on its way down it passes
through points that beat healthy trials early on, and those trials would be stopped for a model that failed.
"""
from __future__ import annotations

import time
from typing import Iterable, Sequence

import optuna
from optuna.trial import TrialState

from .spec import EarlyStoppingSpec

HISTORY_ATTR = "history"  # [[epoch, val_accuracy, sparsity], ...]


class TrialHistory:
    """A running trial's per-epoch (epoch, validation accuracy, sparsity), kept in its ``history`` user attr.

    Written on the first epoch, then at most every ``seconds``, and by :meth:`flush` when the trial ends (before
    it is told COMPLETE: the stopper compares running trials with completed trials' whole histories). Each write
    stores the whole list: once per epoch it cost 2-3 ms on PostgreSQL, 5% of a short digits epoch, and grew
    a journal file quadratically. ``l0sweep status`` shows a running trial's last written epoch.
    """

    def __init__(self, trial: optuna.Trial, seconds: float = 5.0) -> None:
        self.trial, self.seconds = trial, seconds
        self.epochs: list[list[float]] = []
        self._written, self._at = 0, float("-inf")

    def add(self, epoch: int, val_accuracy: float, sparsity: float) -> None:
        self.epochs.append([epoch, round(val_accuracy, 6), round(sparsity, 6)])
        if time.monotonic() - self._at >= self.seconds:
            self.flush()

    def flush(self) -> None:
        if len(self.epochs) > self._written:
            self.trial.set_user_attr(HISTORY_ATTR, list(self.epochs))  # a copy: an in-memory storage keeps the object
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
    """Decides, after each epoch of a trial, whether the completed trials clearly dominate it."""

    def __init__(self, study: optuna.Study, spec: EarlyStoppingSpec) -> None:
        self.study = study
        self.spec = spec

    def __call__(self, epoch: int, val_accuracy: float, sparsity: float) -> bool:
        if not self.spec.enabled or epoch < self.spec.warmup_epochs:
            return False
        # Feasible as Optuna judges it (dashboards.feasible; importing dashboards would load plotly into workers).
        completed = [t for t in self.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
                     if all(v <= 0 for v in t.constraints.values())]
        if len(completed) < self.spec.min_completed:
            return False
        at_epoch = [h[1:] for t in completed for h in t.user_attrs.get(HISTORY_ATTR, []) if h[0] == epoch]
        return clearly_dominated((val_accuracy, sparsity), at_epoch,
                                 (self.spec.margin_accuracy, self.spec.margin_sparsity))
