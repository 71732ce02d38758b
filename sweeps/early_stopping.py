"""Pareto-aware early stopping: Optuna cannot prune multi-objective trials (optuna#3450), so the sweep does.

A running trial's (validation accuracy, sparsity) after epoch e is compared with what every completed trial
had after its own epoch e (kept per epoch in the trial's ``history`` user attr). If one completed trial was
better on both by the study's margins, the running trial is clearly dominated and stops (state PRUNED).
"""
from __future__ import annotations

from typing import Iterable, Sequence

import optuna
from optuna.trial import TrialState

from .spec import EarlyStoppingSpec

HISTORY_ATTR = "history"  # [[epoch, val_accuracy, sparsity], ...]


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
        completed = self.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        if len(completed) < self.spec.min_completed:
            return False
        at_epoch = [h[1:] for t in completed for h in t.user_attrs.get(HISTORY_ATTR, []) if h[0] == epoch]
        return clearly_dominated((val_accuracy, sparsity), at_epoch,
                                 (self.spec.margin_accuracy, self.spec.margin_sparsity))
