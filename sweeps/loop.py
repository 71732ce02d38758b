"""The epoch loop: a model (gated or dense) trained for some epochs on a trial's data, step by step, with the
validation metric and the sparsity report after each epoch; and the pieces it is made of (optimizer, loss, metric,
evaluation, loaders).

Trials (sweeps.training) and the dense baseline (sweeps.baseline) both train through :func:`run_epochs`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn
from torch.utils.data import DataLoader

import l0core

from .config import OptimConfig, TaskConfig, TrialConfig
from .data import Splits, data_loader, load_data
from .imports import import_object
from .runtime import compiled, keep_freed_memory


@dataclass
class EpochMetrics:
    epoch: int
    train_task_loss: float
    train_penalty: float
    val_metric: float  # the task's metric on the validation set (accuracy by default)
    expected_density: float  # E[kept parameters] / parameters
    sparsity: float
    flops_ratio: float
    target_sparsity: float | None = None  # the target this epoch ended at (ramped up during the warm-up)
    effective_lambda: float | None = None  # the lambda the target's Lagrangian acted as at the epoch's end


class StopTrial(Exception):
    """Raised by the trainer when the per-epoch hook asked to stop (e.g. Pareto-aware early stopping)."""

    def __init__(self, metrics: EpochMetrics) -> None:
        super().__init__(f"stopped after epoch {metrics.epoch}")
        self.metrics = metrics


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> tuple[torch.optim.Optimizer, object | None]:
    """The optimizer and learning-rate schedule (or None) a trial trains ``model`` with: the weights at
    ``cfg.lr`` with ``cfg.weight_decay``, the gates' log_alpha at ``cfg.gate_lr`` without decay (in a group
    of their own only when that differs from the weights' settings).

    >>> opt, schedule = build_optimizer(nn.Linear(4, 2), OptimConfig(name="sgd", lr=0.1))
    >>> type(opt).__name__, schedule
    ('SGD', None)
    """
    if l0core.gates(model) and (cfg.weight_decay or cfg.gate_lr not in (None, cfg.lr)):
        groups = l0core.param_groups(model, cfg.weight_decay)
        groups[1]["lr"] = cfg.gate_lr or cfg.lr
    else:  # no gates, or gates with the weights' settings: one group, so the fused step is one call, not two
        groups = [{"params": list(model.parameters()), "weight_decay": cfg.weight_decay}]
    # The fused step updates every parameter in one kernel. The default loops over the parameters in Python
    # on a CPU, which cost a quarter of a step of the default study's MLP; on CUDA it takes fewer launches.
    fused = all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in model.parameters()) or None
    if cfg.name == "sgd":
        opt: torch.optim.Optimizer = torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                                                     fused=fused)
    elif cfg.name == "adamw":
        opt = torch.optim.AdamW(groups, lr=cfg.lr, fused=fused)
    else:
        opt = torch.optim.Adam(groups, lr=cfg.lr, fused=fused)
    if cfg.schedule == "multistep":
        return opt, torch.optim.lr_scheduler.MultiStepLR(opt, cfg.milestones, cfg.gamma)
    if cfg.schedule == "cosine":
        return opt, torch.optim.lr_scheduler.CosineAnnealingLR(opt, cfg.epochs)
    return opt, None


LossFunction = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (outputs, targets) -> scalar tensor
MetricFunction = Callable[[torch.Tensor, torch.Tensor], float]  # (all outputs, all targets) of a split -> value


def accuracy(outputs: torch.Tensor, targets: torch.Tensor) -> float:
    """Classification accuracy: the share of examples whose highest output is their label (0 for no examples).

    >>> accuracy(torch.tensor([[0.1, 0.9], [0.8, 0.2], [0.3, 0.7]]), torch.tensor([1, 1, 1]))
    0.6666666666666666
    """
    return float((outputs.argmax(1) == targets).sum()) / max(len(targets), 1)


def mse(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean squared error against the targets as the data gives them, viewed in the outputs' shape where they hold
    as many values: a scalar target per example meets an ``(N, 1)`` output (plain ``mse_loss`` would broadcast the
    two to ``(N, N)``).

    >>> float(mse(torch.tensor([[1.0], [3.0]]), torch.tensor([0.0, 1.0])))
    2.5
    """
    if targets.numel() == outputs.numel():
        targets = targets.reshape(outputs.shape)
    return nn.functional.mse_loss(outputs, targets.to(outputs.dtype))


def loss_function(task: TaskConfig) -> LossFunction:
    """The training loss ``task.loss`` names: cross-entropy, :func:`mse`, or the user's ``package.module:fn``."""
    if task.loss == "cross_entropy":
        return nn.functional.cross_entropy
    if task.loss == "mse":
        return mse
    return import_object(task.loss, "loss")


def metric_function(task: TaskConfig) -> MetricFunction:
    """The metric ``task.metric`` names: :func:`accuracy` or the user's ``package.module:fn``."""
    return accuracy if task.metric == "accuracy" else import_object(task.metric, "metric")


def evaluate(model: nn.Module, loader: DataLoader, device: torch.device,
             metric: MetricFunction = accuracy) -> float:
    """``metric`` of ``model`` (in eval mode) on everything ``loader`` gives: called once on all the outputs and
    all the targets, concatenated, so a metric that is no mean over examples (F1, mean IoU) comes out right.

    >>> from sweeps.data import TensorBatches
    >>> net = nn.Linear(2, 2)
    >>> loader = data_loader(TensorBatches(torch.randn(5, 2), torch.zeros(5, dtype=torch.long)), 2)
    >>> evaluate(net, loader, torch.device("cpu"), lambda out, y: float(len(y)))  # one call, all five examples
    5.0
    """
    model.eval()
    outputs, targets = [], []
    with torch.no_grad():
        for x, y in loader:
            outputs.append(model(x.to(device, non_blocking=True)))
            targets.append(y.to(device, non_blocking=True))
    if not outputs:
        return float(metric(torch.empty(0), torch.empty(0)))
    return float(metric(torch.cat(outputs), torch.cat(targets)))


def loaders(splits: Splits, cfg: TrialConfig, device: torch.device) -> tuple[DataLoader, DataLoader, DataLoader]:
    """The trial's train (shuffled, seeded), validation and test loaders."""
    pin = device.type == "cuda"
    g = torch.Generator().manual_seed(cfg.seed)
    train = data_loader(splits.train, cfg.data.batch_size, shuffle=True, generator=g, pin_memory=pin)
    val = data_loader(splits.val, 512, pin_memory=pin)
    test = data_loader(splits.test, 512, pin_memory=pin)
    return train, val, test


def train_step(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
               lam: float | None = None, *, autocast: torch.dtype | None = None,
               scaler: torch.amp.GradScaler | None = None, target: l0core.SparsityTarget | None = None,
               multipliers: torch.optim.Optimizer | None = None, loss: LossFunction = nn.functional.cross_entropy,
               **penalty_kw) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimisation step on a batch: ``loss`` (the task's; cross-entropy by default), plus
    ``l0core.penalty(model, lam, **penalty_kw)`` when ``lam`` is given, or ``target(model)`` (a sparsity target,
    its multipliers stepped by ``multipliers``) when that is, under ``torch.autocast`` to ``autocast`` if set (with
    ``scaler`` for float16).
    Returns (task loss, penalty), detached and left on the device (no sync).

    >>> net = nn.Linear(4, 3)
    >>> task, pen = train_step(net, torch.optim.SGD(net.parameters(), 0.1), torch.ones(2, 4), torch.tensor([0, 1]))
    >>> float(pen)
    0.0
    """
    with torch.autocast(x.device.type, dtype=autocast, enabled=autocast is not None):
        task = loss(model(x), y)
        if target is not None:
            pen = target(model)
            total = task + pen
        elif lam is None:
            total, pen = task, torch.zeros((), device=task.device)
        else:
            pen = l0core.penalty(model, lam, **penalty_kw)
            total = task + pen
    if target is None or target.decided is not None:
        # Decided: nothing left for the multipliers to learn (and a GradScaler refuses to step an optimizer whose
        # parameters got no gradient).
        multipliers = None
    opt.zero_grad(set_to_none=True)
    if multipliers is not None:
        multipliers.zero_grad(set_to_none=True)
    if scaler is not None:
        scaler.scale(total).backward()
        scaler.step(opt)
        if multipliers is not None:
            scaler.step(multipliers)
        scaler.update()
    else:
        total.backward()
        opt.step()
        if multipliers is not None:
            multipliers.step()
    if target is not None:
        target.step()
    return task.detach(), pen.detach()


def _precision(cfg: TrialConfig, device: torch.device) -> tuple[torch.dtype | None, torch.amp.GradScaler | None]:
    if not cfg.amp:
        return None, None
    if device.type == "cuda":
        return torch.float16, torch.amp.GradScaler("cuda")
    return torch.bfloat16, None  # bfloat16 has float32's range: no loss scaling needed


def _to_device(x: torch.Tensor, device: torch.device, channels_last: bool) -> torch.Tensor:
    x = x.to(device, non_blocking=True)
    return x.contiguous(memory_format=torch.channels_last) if channels_last and x.dim() == 4 else x


def decide_after(optim: OptimConfig, epochs: int) -> int | None:
    """The epoch after which a target trial's gates are decided and frozen: ``optim.decide_gates_at`` of the
    epochs, rounded, but at least one epoch before it and one after it; None when ``decide_gates_at`` is 1 (never)
    or there are not two epochs.

    >>> decide_after(OptimConfig(), 10), decide_after(OptimConfig(), 4), decide_after(OptimConfig(), 2)
    (8, 3, 1)
    >>> decide_after(OptimConfig(decide_gates_at=0.95), 10), decide_after(OptimConfig(decide_gates_at=1), 10)
    (9, None)
    """
    if optim.decide_gates_at >= 1 or epochs < 2:
        return None
    return min(max(1, round(optim.decide_gates_at * epochs)), epochs - 1)


def run_epochs(model: nn.Module, cfg: TrialConfig, splits: Splits, device: torch.device, lam: float | None,
                example: torch.Tensor | None, on_epoch: Callable[[EpochMetrics], bool] | None, epochs: int,
                target: l0core.SparsityTarget | None = None,
                ) -> tuple[list[EpochMetrics], l0core.SparsityReport | None]:
    """Train for ``epochs``; returns the per-epoch metrics and the last epoch's sparsity report (gated models:
    ``lam`` or ``target`` given, and ``example``, one input on ``device``, to measure the report on). A
    ``target`` decides the gates after :func:`decide_after` epochs (``target.decided`` then says what changed)."""
    if device.type == "cpu":
        keep_freed_memory()
    train, val, _ = loaders(splits, cfg, device)
    opt, sched = build_optimizer(model, cfg.optim.model_copy(update={"epochs": epochs}))
    multipliers = None
    if target is not None:
        target.warmup_steps = round(cfg.optim.target_warmup * epochs * len(train))
        multipliers = target.optimizer(cfg.optim.multiplier_lr)
    penalty_kw = {"scale": cfg.penalty_scale, "n_train": len(splits.train),
                  "weight_decay": cfg.optim.weight_decay if cfg.penalty_scale == "paper" else 0.0}
    autocast, scaler = _precision(cfg, device)
    loss, metric = loss_function(cfg.task), metric_function(cfg.task)
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    # Compiled, the forward's many small operators (the gates' draw and products among them) run as a few fused
    # kernels. Only the training forward: evaluation, the sparsity report and export use the module itself,
    # so eval mode and the evaluation batch sizes cost no compilations of their own.
    forward = compiled(model) if cfg.compile else model
    history, report = [], None
    decide = decide_after(cfg.optim, epochs) if target is not None else None
    for epoch in range(1, epochs + 1):
        if decide is not None and epoch == decide + 1:
            target.decide(model)
        model.train()
        # Summed on the device and read once per epoch: a float() per step would sync the GPU every batch.
        task_sum = torch.zeros((), device=device)
        pen_sum = torch.zeros((), device=device)
        batches = 0
        for x, y in train:
            x, y = _to_device(x, device, cfg.channels_last), y.to(device, non_blocking=True)
            task, pen = train_step(forward, opt, x, y, lam, autocast=autocast, scaler=scaler, target=target,
                                   multipliers=multipliers, loss=loss, **penalty_kw)
            task_sum += task
            pen_sum += pen
            batches += 1
        task_mean, pen_mean = float(task_sum) / batches, float(pen_sum) / batches
        if not math.isfinite(task_mean + pen_mean):
            # Fail the trial: the epochs left would train nothing, and its figures (a collapsed metric, gates
            # read from NaN) would count as a complete trial of the budget.
            raise FloatingPointError(f"the training loss is {task_mean + pen_mean} in epoch {epoch}: the trial "
                                     "diverged (lower optim.lr or optim.gate_lr)")
        if sched is not None:
            sched.step()
        val_metric = evaluate(model, val, device, metric)
        if target is not None or lam is not None:
            report = l0core.sparsity(model, example)
            metrics = EpochMetrics(epoch, task_mean, pen_mean, val_metric, report.expected_density, report.sparsity,
                                   report.flops_ratio, *((target.current_target, target.effective_lambda)
                                                         if target is not None else ()))
        else:
            metrics = EpochMetrics(epoch, task_mean, 0.0, val_metric, 1.0, 0.0, 1.0)
        history.append(metrics)
        if on_epoch is not None and on_epoch(metrics):
            raise StopTrial(metrics)
    return history, report


def load_splits(cfg: TrialConfig) -> Splits:
    """The trial's data as its seeded train/validation/test splits."""
    d = cfg.data
    return load_data(d.name, d.data_dir, cfg.seed, d.val_fraction, d.download, **d.kwargs)
