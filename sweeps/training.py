"""Train one trial: a gated model at one (lambda or target sparsity, droprate_init, mode), with per-epoch metrics.

With ``target_sparsity`` the penalty is :class:`l0core.SparsityTarget`'s Lagrangian, its target ramped up over
``optim.target_warmup`` of the steps and its multipliers trained at ``optim.multiplier_lr``; the lambda it cost
(its effective lambda) is reported with the figures.

``mode="scratch"`` trains weights and gates together from initialisation; ``mode="finetune"`` starts from
a dense baseline (no gates) trained once per (data, model, optimisation, seed) and shared through a file
lock, with the gates almost open so the network starts from exactly the baseline's outputs.
Trials learn by ``cfg.task.loss`` and are judged by ``cfg.task.metric`` (cross-entropy and accuracy by default),
the metric computed once over all of a split's outputs and targets. Selection metrics are the validation metric and
sparsity; the test metric is only reported.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import json
import math
import os
import platform
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable

import torch
from torch import nn
from torch.utils.data import DataLoader

import l0core

from .config import OptimConfig, TaskConfig, TrialConfig
from .data import Splits, chance_accuracy, data_loader, load_data
from .imports import import_object
from .models import build_model
from .settings import file_lock
from .spec import SpecError, one_line


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


@dataclass
class TrialResult:
    val_metric: float  # the task's metric (trial.task: accuracy by default) on the validation set: it selects
    test_metric: float  # ... and on the test set: reported only
    sparsity: float
    flops_ratio: float
    total_params: int
    removed_params: int
    kept_units: dict[str, list[int]]  # gate -> [kept, units]
    # Validation accuracy of always answering the commonest class (a model cut through); None unless the task's
    # metric is classification accuracy.
    chance_accuracy: float | None
    val_examples: int
    epochs: list[EpochMetrics] = field(default_factory=list)
    stopped_early: bool = False
    target_sparsity: float | None = None
    effective_lambda: float | None = None  # with a target: the lambda it cost at the end of training
    # With export.exact_target: what the top-k changed against the deterministic gates (l0core.ExactKeep's
    # fields, and the validation metric before it).
    exact_target: dict | None = None
    # The trained gated model and one example input, for logging and export; not part of the figures.
    model: nn.Module | None = field(default=None, repr=False, compare=False)
    example_inputs: torch.Tensor | None = field(default=None, repr=False, compare=False)

    def as_dict(self) -> dict:
        figures = asdict(replace(self, model=None, example_inputs=None))  # asdict would deep-copy the model
        del figures["model"], figures["example_inputs"]
        return figures


class StopTrial(Exception):
    """Raised by the trainer when the per-epoch hook asked to stop (e.g. Pareto-aware early stopping)."""

    def __init__(self, metrics: EpochMetrics) -> None:
        super().__init__(f"stopped after epoch {metrics.epoch}")
        self.metrics = metrics


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


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


def _loaders(splits: Splits, cfg: TrialConfig, device: torch.device) -> tuple[DataLoader, DataLoader, DataLoader]:
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


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)


@functools.cache
def keep_freed_memory() -> bool:
    """Have glibc's malloc keep freed blocks for reuse instead of giving them back to the system; True if it took.

    By default every tensor bigger than glibc's mmap threshold (at most 32 MiB, and 128 KiB until it adapts)
    gets fresh pages from the kernel, and a heap with more free memory at its top than the trim threshold gives
    it back. A CPU training step frees and allocates the same tensors every step, so it paid for the same pages
    again each time: about 2,700 page faults a step of LeNet-5 at batch 128, 65,000 of GoogleNet's (9 and 700
    with this; ``python -m benchmarks.cpu_allocator``). With both thresholds raised, the memory a worker holds
    stays at the peak its steps reach anyway (peak resident memory unchanged). Once per process; without glibc
    it does nothing.

    >>> keep_freed_memory() in (True, False)  # True on Linux with glibc
    True
    """
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, 1 << 30) and mallopt(_M_TRIM_THRESHOLD, 1 << 30))


def _run_epochs(model: nn.Module, cfg: TrialConfig, splits: Splits, device: torch.device, lam: float | None,
                example: torch.Tensor | None, on_epoch: Callable[[EpochMetrics], bool] | None, epochs: int,
                target: l0core.SparsityTarget | None = None,
                ) -> tuple[list[EpochMetrics], l0core.SparsityReport | None]:
    """Train for ``epochs``; returns the per-epoch metrics and the last epoch's sparsity report (gated models:
    ``lam`` or ``target`` given, and ``example``, one input on ``device``, to measure the report on)."""
    if device.type == "cpu":
        keep_freed_memory()
    train, val, _ = _loaders(splits, cfg, device)
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
    for epoch in range(1, epochs + 1):
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


def compiled(model: nn.Module) -> nn.Module:
    """``model`` with its forward through ``torch.compile``, traced afresh for this model.

    Dynamo does not guard on module hooks (``torch._dynamo.config.skip_nnmodule_hook_guards``), and neuron gates
    and per-example channel gates act through hooks: such a model passes the guards of a graph compiled earlier
    in the process for its dense twin (a fine-tuning trial's baseline), which would then run with no gates.
    So dynamo's caches are reset first; that also keeps a worker's earlier trials from counting against its
    recompile limit. Inductor's disk cache still spares rebuilding kernels it has seen.

    >>> net = compiled(nn.Linear(2, 1))
    >>> net(torch.ones(3, 2)).shape
    torch.Size([3, 1])
    """
    torch._dynamo.reset()
    return torch.compile(model)


def load_splits(cfg: TrialConfig) -> Splits:
    """The trial's data as its seeded train/validation/test splits."""
    d = cfg.data
    return load_data(d.name, d.data_dir, cfg.seed, d.val_fraction, d.download, **d.kwargs)


def baseline_key(cfg: TrialConfig) -> str:
    """Content hash of what determines the dense baseline: data, model, optimisation and seed (and the
    checkpoint file, by size and modification time, where the baseline is the user's)."""
    # Settings that train no dense model (the target's) or came later (checkpoint) are left out when unset, so
    # baselines keep their keys.
    ident = {"data": cfg.data.model_dump(exclude={"data_dir", "download"}),
             "model": cfg.model.model_dump(exclude={"checkpoint"}),
             "optim": cfg.optim.model_dump(exclude={"target_warmup", "multiplier_lr"}), "seed": cfg.seed}
    if cfg.model.checkpoint:
        stat = Path(cfg.model.checkpoint).stat()
        ident["checkpoint"] = [str(cfg.model.checkpoint), stat.st_size, stat.st_mtime_ns]
    if cfg.amp or cfg.channels_last:  # only then, so existing baselines keep their keys
        ident["precision"] = {"amp": cfg.amp, "channels_last": cfg.channels_last}
    if cfg.task != TaskConfig():  # the loss trains the baseline, the metric measures it; default: keys kept
        ident["task"] = cfg.task.model_dump()
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]


def dense_baseline(cfg: TrialConfig, splits: Splits | None = None) -> Path:
    """Path of the dense baseline's state dict for ``cfg``, training it if no process has yet.

    Concurrent callers serialise on a file lock: exactly one trains, the others wait and load its file.
    """
    directory = Path(cfg.baseline_dir)
    directory.mkdir(parents=True, exist_ok=True)
    key = baseline_key(cfg)
    path = directory / f"{key}.pt"
    with file_lock(directory / f"{key}.lock"):
        if not path.exists():
            device = resolve_device(cfg.device)
            splits = splits or load_splits(cfg)
            torch.manual_seed(cfg.seed)
            dense = build_model(cfg.model.name, splits.input_shape, splits.num_classes, gates=False,
                                **cfg.model.kwargs).to(device)
            metric = metric_function(cfg.task)
            if cfg.model.checkpoint:  # the user's trained model is the baseline: measured, not trained
                load_checkpoint(cfg.model.checkpoint, dense)
                val_metric, source = evaluate(dense, _loaders(splits, cfg, device)[1], device, metric), "checkpoint"
            else:
                epochs = cfg.optim.baseline_epochs or cfg.optim.epochs
                history, _ = _run_epochs(dense, cfg, splits, device, None, None, None, epochs)
                val_metric, source = history[-1].val_metric, "trained"
            tmp = path.with_suffix(f".tmp{os.getpid()}")
            torch.save({"state_dict": dense.state_dict(), "val_metric": val_metric,
                        "test_metric": evaluate(dense, _loaders(splits, cfg, device)[2], device, metric),
                        "source": source, "config": json.loads(cfg.model_dump_json())}, tmp)
            os.replace(tmp, path)  # atomic: a reader never sees half a file
    return path


def load_checkpoint(path: str | Path, model: nn.Module) -> None:
    """Load a trained dense model's weights into ``model`` (built plain, without gates).

    ``path`` holds a state dict, a whole module, or a dict with a ``"state_dict"`` (Lightning's checkpoints);
    keys under a common prefix (Lightning's ``"model."``) are matched. Raises one-line ValueErrors: no such
    file, not a checkpoint, or keys that do not fit (the first missing and the first unexpected named).
    """
    where = f"trial.model.checkpoint {str(path)!r}"
    if not Path(path).is_file():
        raise ValueError(f"{where}: no such file")
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:
        try:  # a whole pickled module needs its classes: the user's own file, so unpickling it is theirs to allow
            saved = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as exc:
            raise ValueError(f"{where}: torch.load cannot read it ({type(exc).__name__})") from None
    state = saved.state_dict() if isinstance(saved, nn.Module) else saved.get("state_dict", saved) \
        if isinstance(saved, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{where} holds {type(saved).__name__}: give a state dict, a whole module, or a dict with "
                         "'state_dict'")
    wanted = list(model.state_dict())
    state = _without_prefix(state, wanted)
    missing, unexpected = [k for k in wanted if k not in state], [k for k in state if k not in set(wanted)]
    if missing or unexpected:
        raise ValueError(f"{where} does not fit trial.model {type(model).__name__}: "
                         + "; ".join(f"{what} key {keys[0]!r} ({len(keys)} in all)" for what, keys in
                                     (("missing", missing), ("unexpected", unexpected)) if keys))
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise ValueError(f"{where} does not fit trial.model: {one_line(exc)}") from None


def _without_prefix(state: dict[str, torch.Tensor], wanted: list[str]) -> dict[str, torch.Tensor]:
    """``state`` with the prefix its keys share before the model's own names removed (``model.conv1.weight`` ->
    ``conv1.weight``), where there is one; other entries under other prefixes (a loss's buffers) dropped."""
    if not wanted or wanted[0] in state:
        return state
    prefix = next((k[: -len(wanted[0])] for k in state if k.endswith("." + wanted[0])), None)
    if prefix is None:
        return state
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def _check_compiler() -> None:
    """Raise :class:`SpecError` (one line) unless this machine has the C++ compiler ``trial.compile`` needs.

    torch.compile's inductor builds its CPU kernels with it (and Triton its GPU launcher with the C compiler
    that comes with it); without one, every trial would fail at its first step with a long backend error.
    """
    from torch._inductor.cpp_builder import get_cpp_compiler

    try:
        get_cpp_compiler()
    except Exception:
        raise SpecError("trial.compile: true needs a C++ compiler on this machine (torch.compile builds its "
                        "kernels with it): install g++ or set CXX to one, or set trial.compile: false") from None


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
        _check_compiler()
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


def train_trial(cfg: TrialConfig, on_epoch: Callable[[EpochMetrics], bool] | None = None) -> TrialResult:
    """Train one gated model as ``cfg`` says and report the final model's numbers.

    ``on_epoch(metrics)`` is called after every epoch; returning True stops the trial (StopTrial is raised).
    """
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = resolve_device(cfg.device)
    splits = load_splits(cfg)
    baseline = dense_baseline(cfg, splits) if cfg.mode == "finetune" else None
    torch.manual_seed(cfg.seed)
    dense_state = torch.load(baseline, map_location="cpu")["state_dict"] if baseline is not None else None
    try:
        model = build_model(cfg.model.name, splits.input_shape, splits.num_classes, gates=True,
                            droprate_init=cfg.droprate_init, per_sample=cfg.model.per_sample, state_dict=dense_state,
                            **cfg.model.kwargs)
    except RuntimeError as exc:
        if dense_state is None:
            raise
        raise RuntimeError(f"baseline {baseline} does not fit the model: {str(exc).splitlines()[0]}") from None
    model.to(device)
    example = next(iter(data_loader(splits.val, 1)))[0].to(device)
    l0core.measure_couplings(model, example)
    if cfg.export.exact_target and cfg.target_sparsity is None:
        raise ValueError("export.exact_target needs a target_sparsity")
    target = l0core.SparsityTarget(cfg.target_sparsity).to(device) if cfg.target_sparsity is not None else None
    history, report = _run_epochs(model, cfg, splits, device, cfg.lam, example, on_epoch, cfg.optim.epochs, target)
    _, val_loader, test_loader = _loaders(splits, cfg, device)
    metric = metric_function(cfg.task)
    # The last epoch already evaluated the final model: its validation metric and report are the final ones,
    # unless the exact target changes the gates.
    val_metric, exact = history[-1].val_metric, None
    if cfg.export.exact_target:
        change = l0core.keep_exactly(model, cfg.target_sparsity)
        report = l0core.sparsity(model, example)
        exact = {**asdict(change), f"val_{cfg.task.metric_name}_before": val_metric}
        val_metric = evaluate(model, val_loader, device, metric)
    return TrialResult(
        val_metric=val_metric, test_metric=evaluate(model, test_loader, device, metric),
        sparsity=report.sparsity, flops_ratio=report.flops_ratio, total_params=report.total_params,
        removed_params=report.removed_params,
        kept_units={layer.gate: [layer.kept, layer.units] for layer in report.layers},
        chance_accuracy=chance_accuracy(splits.val) if cfg.task.is_accuracy else None, val_examples=len(splits.val),
        epochs=history,
        target_sparsity=cfg.target_sparsity, effective_lambda=target.effective_lambda if target is not None else None,
        exact_target=exact, model=model, example_inputs=example)
