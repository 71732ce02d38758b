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

from dataclasses import asdict, dataclass, field, replace
from typing import Callable

import torch
from torch import nn

import l0core

from .baseline import dense_baseline
from .config import TrialConfig
from .data import chance_accuracy, data_loader
from .loop import EpochMetrics, decide_after, evaluate, load_splits, loaders, metric_function, run_epochs
from .models import build_model
from .runtime import resolve_device


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
    # With a target, once optim.decide_gates_at came: what deciding the gates changed (l0core.ExactKeep's fields,
    # and the epoch after which it ran).
    gates_decided: dict | None = None
    # The trained gated model and one example input, for logging and export; not part of the figures.
    model: nn.Module | None = field(default=None, repr=False, compare=False)
    example_inputs: torch.Tensor | None = field(default=None, repr=False, compare=False)

    def as_dict(self) -> dict:
        figures = asdict(replace(self, model=None, example_inputs=None))  # asdict would deep-copy the model
        del figures["model"], figures["example_inputs"]
        return figures


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
    history, report = run_epochs(model, cfg, splits, device, cfg.lam, example, on_epoch, cfg.optim.epochs, target)
    _, val_loader, test_loader = loaders(splits, cfg, device)
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
        exact_target=exact, model=model, example_inputs=example,
        gates_decided={**asdict(target.decided), "after_epoch": decide_after(cfg.optim, cfg.optim.epochs)}
        if target is not None and target.decided is not None else None)
