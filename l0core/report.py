"""How much of a network the gates remove: parameters, FLOPs, per-layer kept units, log_alpha statistics.

One definition: ``sparsity = (parameters removed or exactly zero) / all parameters``, counted on the model the
deterministic gates leave (:func:`l0core.compact`'s, with example inputs; else :func:`l0core.fold`'s), so the
report, the trial metrics, :func:`l0core.expected_kept` with decided gates and the exported model agree.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from .costs import count_parameters, expected_kept
from .dependency import autograd_on
from .export import compact_folded, run
from .fold import fold
from .kinds import gates


@dataclass
class LayerReport:
    """One gate: how many units it has, how many its deterministic gate keeps, and its log_alpha."""

    gate: str
    kind: str
    units: int
    kept: int  # z_hat > 0
    open: int  # z_hat == 1
    fractional: int  # 0 < z_hat < 1: kept, scaled
    expected_kept: float  # sum of P(z != 0)
    log_alpha_mean: float
    log_alpha_std: float
    log_alpha_min: float
    log_alpha_max: float


@dataclass
class SparsityReport:
    """What the deterministic gates remove. ``sparsity = removed_params / total_params``, where
    ``removed_params`` = parameters removed or exactly zero = ``total_params`` minus the nonzero parameters of
    the model counted: ``compact(model, x)`` when ``compacted``, else ``fold(model)`` (no example inputs: dead
    units stay, only the zeros the gates write count).
    """

    total_params: int
    removed_params: int
    sparsity: float
    expected_l0: float  # E[parameters kept by the gates]
    expected_density: float  # expected_l0 / total_params
    dense_flops: int | None = None
    effective_flops: int | None = None
    flops_ratio: float | None = None  # effective / dense
    compacted: bool = True
    layers: list[LayerReport] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        text = f"sparsity {self.sparsity:.2%} ({self.removed_params:,} of {self.total_params:,} parameters removed)"
        if self.flops_ratio is not None:
            text += f", FLOPs {self.flops_ratio:.2%} of dense"
        return text


def count_flops(model: nn.Module, example_inputs: Any) -> int:
    """Forward FLOPs of ``model`` on ``example_inputs``, by ``torch.utils.flop_counter``."""
    was_training = model.training
    model.eval()
    with FlopCounterMode(display=False) as counter:
        run(model, example_inputs)
    model.train(was_training)
    return int(counter.get_total_flops())


def _layer_reports(model: nn.Module) -> list[LayerReport]:
    rows = []
    for name, gate in gates(model):
        with torch.no_grad():
            z = gate.deterministic()
            la = gate.log_alpha.detach().float()
            rows.append(LayerReport(
                gate=name, kind=gate.kind, units=gate.n, kept=int((z > 0).sum()), open=int((z == 1).sum()),
                fractional=int(((z > 0) & (z < 1)).sum()), expected_kept=float(gate.prob_nonzero().sum()),
                log_alpha_mean=float(la.mean()), log_alpha_std=float(la.std()) if gate.n > 1 else 0.0,
                log_alpha_min=float(la.min()), log_alpha_max=float(la.max())))
    return rows


def sparsity(model: nn.Module, example_inputs: Any | None = None) -> SparsityReport:
    """Report what the deterministic gates of ``model`` remove (see :class:`SparsityReport`).

    With ``example_inputs`` the count is of the exported model (:func:`l0core.compact`) and FLOPs are measured
    dense vs exported. Works under ``torch.no_grad()`` and ``torch.inference_mode()``.

    >>> from l0core import attach
    >>> net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))
    >>> _ = attach(net, "neuron")
    >>> report = sparsity(net, torch.randn(1, 8))
    >>> report.total_params, report.removed_params
    (178, 0)
    """
    total = count_parameters(model)
    with torch.no_grad():
        kept = float(expected_kept(model))
    report = SparsityReport(total, 0, 0.0, kept, kept / total, layers=_layer_reports(model),
                            compacted=example_inputs is not None)
    with autograd_on():
        counted, sites = fold(model)
        if example_inputs is not None:
            report.dense_flops = count_flops(counted, example_inputs)  # before pruning: the dense network's cost
            counted = compact_folded(counted, sites, example_inputs)
            report.effective_flops = count_flops(counted, example_inputs)
            report.flops_ratio = report.effective_flops / max(report.dense_flops, 1)
    report.removed_params = total - sum(int(p.count_nonzero()) for p in counted.parameters())
    report.sparsity = report.removed_params / total
    return report
