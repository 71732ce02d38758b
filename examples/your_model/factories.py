"""A user's own model, data and metric, as a study file names them (``examples.your_model.factories:wine_mlp``).

l0sweep calls the model factory with ``num_classes`` and ``input_shape`` taken from the data (the study file's
``model.kwargs`` set the rest), the data factory with ``data.kwargs``, and the metric with the outputs and targets
of a whole validation (or test) set.
"""
from __future__ import annotations

import torch
from sklearn.datasets import load_wine
from torch import nn
from torch.utils.data import TensorDataset


def wine_mlp(num_classes: int, input_shape: tuple[int, ...], hidden: int = 64) -> nn.Module:
    """A two-layer MLP for ``input_shape`` features; l0sweep gates its dense layers' inputs."""
    return nn.Sequential(nn.Flatten(), nn.Linear(input_shape[-1], hidden), nn.ReLU(), nn.Linear(hidden, num_classes))


def wine(seed: int = 0) -> tuple[TensorDataset, TensorDataset, TensorDataset]:
    """scikit-learn's bundled wine data (178 examples, 13 features, 3 classes), standardised and split
    120 / 29 / 29 into train, validation and test: a data factory may return its own validation split."""
    x, y = load_wine(return_X_y=True)
    x = torch.tensor(x, dtype=torch.float32)
    x = (x - x.mean(0)) / x.std(0)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    x, y = x[perm], torch.tensor(y)[perm]
    return (TensorDataset(x[:120], y[:120]), TensorDataset(x[120:149], y[120:149]),
            TensorDataset(x[149:], y[149:]))


def macro_f1(outputs: torch.Tensor, targets: torch.Tensor) -> float:
    """Macro-averaged F1 of the predicted classes over a whole evaluation set (a mean of per-batch F1s would not
    be the set's F1): the metric this example selects on (``trial.task.metric``).

    >>> round(macro_f1(torch.tensor([[2.0, 0.0], [0.0, 1.0], [0.0, 3.0]]), torch.tensor([0, 0, 1])), 3)
    0.667
    """
    predicted = outputs.argmax(1)
    scores = []
    for c in range(outputs.shape[1]):
        tp = int(((predicted == c) & (targets == c)).sum())
        claimed, actual = int((predicted == c).sum()), int((targets == c).sum())
        scores.append(2 * tp / (claimed + actual) if claimed + actual else 1.0)
    return sum(scores) / len(scores)
