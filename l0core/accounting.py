"""How much of a network the gates remove: parameters, FLOPs, per-layer kept units, log_alpha statistics.

Counts come from the deterministic gates through the same path as export: the sparsity of a gated model
is the sparsity of what :func:`l0core.compact` would give, so the report and the exported model agree.
"""
from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from .placement import GATE_ATTR, gates
from .export import _compact_folded, _Graph, _prunes_outputs, _run, fold
from .kinds import ParameterGate, UnitGate
from .regularizer import count_parameters, expected_kept


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
    """What the deterministic gates remove. ``sparsity = removed_params / total_params`` (the seeds' table).

    ``exact`` is False when no ``example_inputs`` were given and the model has structured gates: removed
    parameters are then each gate's closed units times their cost, ignoring interactions between layers.
    """

    total_params: int
    removed_params: int
    sparsity: float
    expected_l0: float  # E[parameters kept by the gates]
    expected_density: float  # expected_l0 / total_params
    dense_flops: int | None = None
    effective_flops: int | None = None
    flops_ratio: float | None = None  # effective / dense
    exact: bool = True
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
        _run(model, example_inputs)
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


def _parameter_gate_zeros(model: nn.Module) -> int:
    """Weights a parameter gate sets to exactly zero (the dense shape stays)."""
    total = 0
    for _, gate in gates(model):
        if isinstance(gate, ParameterGate):
            total += int((gate.deterministic() == 0).sum())
    return total


def sparsity(model: nn.Module, example_inputs: Any | None = None) -> SparsityReport:
    """Report what the deterministic gates of ``model`` remove.

    With ``example_inputs`` the count is exact (the parameters :func:`compact` removes, plus weights a
    parameter or neuron gate zeroes) and FLOPs are measured dense vs exported.

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
    report = SparsityReport(total, 0, 0.0, kept, kept / total, layers=_layer_reports(model))
    structured = any(isinstance(g, UnitGate) for _, g in gates(model))
    if example_inputs is None:
        removed = _parameter_gate_zeros(model)
        for _, gate in gates(model):
            if isinstance(gate, UnitGate):
                removed += int(float(((gate.deterministic() == 0).float() * gate.unit_cost).sum()))
        report.exact = not structured
    else:
        plain, sites = fold(model)
        report.dense_flops = count_flops(plain, example_inputs)  # before pruning: the dense network's cost
        small = _compact_folded(plain, sites, example_inputs)
        removed = total - sum(p.numel() for p in small.parameters())
        removed += _zeroed_in_place(small, model)
        report.effective_flops = count_flops(small, example_inputs)
        report.flops_ratio = report.effective_flops / max(report.dense_flops, 1)
    report.removed_params = min(removed, total)
    report.sparsity = report.removed_params / total
    return report


def _zeroed_in_place(small: nn.Module, gated: nn.Module) -> int:
    """Zeros the gates wrote into weights that keep their shape: parameter-gated weights and the input
    columns of neuron-gated layers that could not be removed (e.g. single features after a flatten)."""
    names = set()
    for name, module in gated.named_modules():
        if isinstance(module._modules.get(GATE_ATTR), UnitGate) and module._modules[GATE_ATTR].kind == "neuron":
            names.add(name)
        if hasattr(module, "parametrizations") and any(
                isinstance(g, ParameterGate) for plist in module.parametrizations.values() for g in plist):
            names.add(name)
    modules = dict(small.named_modules())
    return sum(int((modules[n].weight == 0).sum()) for n in names if n in modules)


def measure_unit_costs(model: nn.Module, example_inputs: Any) -> None:
    """Set each structured gate's ``unit_cost`` to the parameters one unit governs in ``model``'s dependency
    graph: its filter, bias and BatchNorm, and the input slices of every consumer. Units coupled across a
    residual addition share their group's cost. Neuron gates whose features do not map one-to-one onto a
    producer's units (after a flatten) keep their layer-local cost.
    """
    plain, sites = fold(_opened(model))
    graph = _Graph(plain, example_inputs)
    owners = {id(site.owner) for site in sites}
    named = dict(model.named_modules())
    for site in sites:
        group = graph.group(site, [0])
        cost, coupled, one_to_one = 0.0, 0, True
        for item in group.items:
            module, idxs = item.dep.target.module, list(item.idxs)
            if not isinstance(module, nn.Module):
                continue
            one_to_one &= len(idxs) == 1
            is_out = _prunes_outputs(item)
            if is_out and id(module) in owners and site.kind == "channel":
                coupled += 1
            cost += _params_on_units(module, len(idxs), is_out)
        gate = named[site.name]._modules[GATE_ATTR]
        if site.kind == "channel" or one_to_one:
            gate.unit_cost.fill_(cost / max(coupled, 1))


def _params_on_units(module: nn.Module, k: int, out: bool) -> float:
    total = 0.0
    for p in module.parameters(recurse=False):
        if out and p.dim() >= 1:
            total += p.numel() / p.shape[0] * k
        elif not out and p.dim() >= 2:  # one input channel of a grouped conv feeds only its group's filters
            total += p.numel() / (p.shape[1] * getattr(module, "groups", 1)) * k
    return total


def _opened(model: nn.Module) -> nn.Module:
    """A copy with every gate fully open, so folding keeps every unit (for measuring costs)."""
    opened = copy.deepcopy(model)
    with torch.no_grad():
        for _, gate in gates(opened):
            gate.log_alpha.fill_(10.0)
    return opened
