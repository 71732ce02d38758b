"""Pre-flight checks: what would fail every trial of a sweep, found once before the sweep starts, as one line."""
from __future__ import annotations

import torch

import l0core

from .baseline import load_checkpoint
from .config import TrialConfig
from .data import data_loader
from .loop import load_splits, loss_function, metric_function
from .models import build_model
from .runtime import check_compiler
from .spec import SpecError, one_line


def check_fits(cfg: TrialConfig) -> None:
    """Raise :class:`SpecError` (one line) unless ``cfg``'s data loads and its gated model can be costed (its
    dependency graph traced) and computes outputs for two of its examples that the task's loss and metric take:
    the mistakes that would otherwise fail every trial of a sweep. Runs on the CPU.

    >>> lenet5_on_digits = {"data": {"name": "digits"}, "model": {"name": "lenet5"}}
    >>> check_fits(TrialConfig.model_validate(lenet5_on_digits))  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    sweeps.spec.SpecError: trial.model 'lenet5' cannot train on trial.data 'digits' (inputs (1, 8, 8)): lenet5 needs...
    """
    if cfg.compile:
        check_compiler()
    try:
        splits = load_splits(cfg)
    except Exception as exc:
        raise SpecError(f"trial.data {cfg.data.name!r} cannot be loaded: {one_line(exc)}") from None
    try:
        model = build_model(cfg.model.name, splits.input_shape, splits.num_classes, gates=True,
                            droprate_init=cfg.droprate_init, per_sample=cfg.model.per_sample, **cfg.model.kwargs)
        x = next(iter(data_loader(splits.val, 2)))[0]
        l0core.measure_couplings(model, x[:1])  # what a trial does first: needs the model's dependency graph
        with torch.no_grad():
            out = model.eval()(x)
        if tuple(out.shape) != (len(x), splits.num_classes):
            raise ValueError(f"it outputs shape {tuple(out.shape)} for {len(x)} examples of {splits.num_classes} "
                             "classes")
    except Exception as exc:
        raise SpecError(f"trial.model {cfg.model.name!r} cannot train on trial.data {cfg.data.name!r} (inputs "
                        f"{tuple(splits.input_shape)}): {one_line(exc)}") from None
    y = next(iter(data_loader(splits.val, 2)))[1]
    for field, function in (("loss", loss_function), ("metric", metric_function)):
        try:
            function(cfg.task)(out, y)
        except Exception as exc:
            raise SpecError(f"trial.task.{field} {getattr(cfg.task, field)!r} cannot take trial.model's outputs "
                            f"{tuple(out.shape)} with trial.data's targets {tuple(y.shape)} ({y.dtype}): "
                            f"{one_line(exc)}") from None
    if cfg.model.checkpoint:
        try:
            load_checkpoint(cfg.model.checkpoint, build_model(cfg.model.name, splits.input_shape, splits.num_classes,
                                                              gates=False, **cfg.model.kwargs))
        except ValueError as exc:
            raise SpecError(str(exc)) from None
