"""The expected-L0 penalty and optimizer groups.

The scale, written down once (docs/lambda-and-sparsity.md, "What lambda means"):

    penalty(model, lam) = lam * expected_kept(model) / count_parameters(model)

with :func:`l0core.expected_kept` the exact E[number of the model's parameters kept] (:mod:`l0core.costs`), so
``lam`` is the loss a user is willing to pay to keep the whole network, whatever its size: with every gate
open the penalty is ``lam``, and lam = 0.1 trades 0.1 nats of cross-entropy for removing all of it.
``scale="paper"`` gives Louizos et al.'s per-weight term (1/N) * sum_g P(z_g != 0) * sum_{w in g}
(lam + 0.5 * weight_decay * w^2) for reproducing the paper's numbers.
"""
from __future__ import annotations

from typing import Literal

import torch
from torch import nn
from torch.nn.utils import parametrize

from .costs import expected_fraction_kept, require_gates
from .hard_concrete import HardConcrete
from .kinds import GATE_ATTR, ParameterGate, UnitGate, gate_modules, gates


def _governed_weights(model: nn.Module) -> dict[int, tuple[torch.Tensor, int | None]]:
    """For each gate placed by attach/gate_parameters: the weight it governs and the unit dim (None: per element)."""
    found: dict[int, tuple[torch.Tensor, int | None]] = {}
    for module in model.modules():
        gate = module._modules.get(GATE_ATTR)
        if isinstance(gate, UnitGate):
            # The stored weight, not ``module.weight``: a per-batch channel gate may scale that by z itself.
            weight = module.parametrizations["weight"].original if parametrize.is_parametrized(module, "weight") \
                else module.weight
            found[id(gate)] = (weight, 1 if gate.kind == "neuron" else 0)
        for plist in getattr(module, "parametrizations", {}).values():
            for g in plist:
                if isinstance(g, ParameterGate):
                    found[id(g)] = (plist.original, None)
    return found


def _paper_term(gate: HardConcrete, governed: tuple[torch.Tensor, int | None], lam: float, wd: float) -> torch.Tensor:
    """sum_i P(z_i != 0) * sum_{w in unit i} (lam + 0.5 * wd * w^2) for one gate vector."""
    p = gate.prob_nonzero()
    weight, dim = governed
    if dim is None:
        return (p * (lam + 0.5 * wd * weight.pow(2).reshape(-1))).sum()
    per_unit = weight.numel() / weight.shape[dim]
    w2 = weight.pow(2).transpose(0, dim).reshape(weight.shape[dim], -1).sum(1)
    return (p * (lam * per_unit + 0.5 * wd * w2)).sum()


def penalty(
    model: nn.Module,
    lam: float,
    scale: Literal["model", "paper"] = "model",
    n_train: int | None = None,
    weight_decay: float = 0.0,
) -> torch.Tensor:
    """The L0 regulariser to add to the task loss.

    >>> from l0core import attach
    >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    >>> _ = attach(net, "neuron", droprate_init=0.5)
    >>> 0.0 < penalty(net, lam=1.0).item() < 1.0
    True
    """
    if lam < 0:
        raise ValueError(f"lam must be >= 0, got {lam}")
    if scale == "model":
        if weight_decay:
            raise ValueError("weight_decay belongs to scale='paper'; with scale='model' use the optimizer's decay")
        return expected_fraction_kept(model) * lam
    if scale == "paper":
        if not n_train or n_train < 1:
            raise ValueError("scale='paper' needs n_train, the training-set size N")
        governed = _governed_weights(model)
        found = require_gates(gates(model))
        unplaced = [name for name, g in found if id(g) not in governed]
        if unplaced:
            raise ValueError(f"scale='paper' weighs each gate by the weights it governs, and {unplaced[0]} was "
                             "placed by hand: place gates with l0core.attach or l0core.gate_parameters")
        terms = [_paper_term(g, governed[id(g)], lam, weight_decay) for _, g in found]
        return torch.stack(terms).sum() / n_train
    raise ValueError(f"scale must be 'model' or 'paper', got {scale!r}")


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Optimizer groups: weights with ``weight_decay``, gates' log_alpha with none.

    Decay on log_alpha would push every gate towards half-open regardless of the data (a defect of the
    GoogleNet seed, which let AdamW shrink it).

    >>> opt = torch.optim.AdamW(param_groups(nn.Linear(2, 2), 1e-4), lr=1e-3)
    """
    skip = {id(g.log_alpha) for g in gate_modules(model)}
    weights = [p for p in model.parameters() if id(p) not in skip]
    log_alphas = [g.log_alpha for g in gate_modules(model)]
    groups = [{"params": weights, "weight_decay": weight_decay}]
    if log_alphas:
        groups.append({"params": log_alphas, "weight_decay": 0.0})
    return groups
