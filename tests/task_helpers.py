"""A user's own task, as a study file names it (``tests.task_helpers:rmse``): a regression data factory, its metric,
and a binary F1 that is no mean over examples."""
from __future__ import annotations

import torch
from torch.utils.data import TensorDataset


def regression(n: int = 240) -> tuple[TensorDataset, TensorDataset]:
    """``(train, test)``: four features, one float target, a fixed linear function of them plus a little noise."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 4, generator=g)
    y = x @ torch.tensor([1.0, -2.0, 0.5, 0.0]) + 0.1 * torch.randn(n, generator=g)
    cut = n * 4 // 5
    return TensorDataset(x[:cut], y[:cut]), TensorDataset(x[cut:], y[cut:])


def rmse(outputs: torch.Tensor, targets: torch.Tensor) -> float:
    """Root mean squared error of ``(N, 1)`` outputs against ``(N,)`` targets (lower is better)."""
    return float(torch.sqrt(torch.mean((outputs.reshape(-1) - targets) ** 2)))


def binary_f1(outputs: torch.Tensor, targets: torch.Tensor) -> float:
    """F1 of class 1 from two-class scores: 2 tp / (2 tp + fp + fn), 0 with no positives either side."""
    predicted = outputs.argmax(1)
    tp = int(((predicted == 1) & (targets == 1)).sum())
    fp = int(((predicted == 1) & (targets != 1)).sum())
    fn = int(((predicted != 1) & (targets == 1)).sum())
    return 2 * tp / max(2 * tp + fp + fn, 1)
