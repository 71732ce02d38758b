"""From a gated model to a plain one with the same outputs: each deterministic gate multiplied into the weights."""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils import parametrize

from .hooks import DrawGate, GateHook
from .kinds import COUNTER_ATTR, GATE_ATTR, UnitGate, gates


@dataclass(frozen=True)
class GateSite:
    """Where a structured gate sat, in a folded model: the layers its units belong to.

    ``owner`` is the layer whose units the gate governs (a conv's output channels, a dense layer's input
    features); ``target`` is the layer it was folded into (the BatchNorm after a conv, or the owner itself).
    """

    name: str  # qualified name of the owner, in the gated model and in the folded one alike
    owner: nn.Module
    target: nn.Module
    kind: str  # "channel" | "neuron"


def _scale_units_(module: nn.Module, z: torch.Tensor, dim: int) -> None:
    """Multiply ``module``'s parameters along unit dimension ``dim`` by ``z`` (exact folding of a gate)."""
    with torch.no_grad():
        shape = [1] * module.weight.dim()
        shape[dim] = -1
        module.weight.mul_(z.view(shape))
        if dim == 0 and getattr(module, "bias", None) is not None:
            module.bias.mul_(z)


def fold(model: nn.Module) -> tuple[nn.Module, list[GateSite]]:
    """A gate-free deep copy of ``model`` in eval mode with each deterministic gate multiplied into its weights,
    and where each structured gate sat.

    Outputs are unchanged: a channel gate applied after a BatchNorm scales its affine weight and bias (and a
    closed one zeroes the conv's filter too, which that BatchNorm then ignores), one applied after a conv scales
    its filters and bias, a neuron gate scales the dense layer's input columns, and a parameter gate writes
    ``weight * z`` (zeros included) into the weight.

    >>> from l0core import attach
    >>> net = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    >>> _ = attach(net, "neuron")
    >>> plain, sites = fold(net)
    >>> [(s.name, s.kind) for s in sites], len(list(plain.modules()))
    ([('0', 'neuron'), ('2', 'neuron')], 4)
    """
    plain = copy.deepcopy(model).eval()
    for module in plain.modules():
        vars(module).pop(COUNTER_ATTR, None)  # counts a gated model's parameters: nothing left to count
    folds_into: dict[int, nn.Module] = {}  # gate id -> the module it is folded into
    by_parameters: set[int] = set()  # gates applied through their target's parameters: unparametrizing bakes z in
    for module in plain.modules():
        for hooks in (module._forward_hooks, module._forward_pre_hooks):
            for key, hook in list(hooks.items()):
                if not isinstance(hook, GateHook):
                    continue
                if hook.folds_into(module) is not None:
                    folds_into[id(hook.gate)] = hook.folds_into(module)
                    if isinstance(hook, DrawGate):
                        by_parameters.add(id(hook.gate))
                del hooks[key]
                module._forward_hooks_always_called.pop(key, None)
    sites: list[GateSite] = []
    for name, module in list(plain.named_modules()):
        gate = module._modules.get(GATE_ATTR)
        if isinstance(gate, UnitGate):
            target = module if gate.kind == "neuron" else folds_into.get(id(gate), module)
            z = gate.deterministic().detach()
            if id(gate) not in by_parameters:
                _scale_units_(target, z, dim=1 if gate.kind == "neuron" else 0)
            if target is not module:
                # The BatchNorm now outputs zero on a closed channel whatever its input: the conv's filter there
                # is dead weight, so it is zeroed rather than kept and counted.
                _scale_units_(module, (z != 0).to(z.dtype), dim=0)
            del module._modules[GATE_ATTR]
            sites.append(GateSite(name, module, target, gate.kind))
        if parametrize.is_parametrized(module):
            _unparametrize(module)
    leftover = [n for n, _ in gates(plain)]
    if leftover:
        raise ValueError(f"cannot fold gates placed by hand ({', '.join(leftover)}): place them with "
                         "l0core.attach or l0core.gate_parameters so the layer each one scales is known")
    return plain, sites


def _unparametrize(module: nn.Module) -> None:
    """Replace each parametrized tensor by a plain parameter holding its current value.

    Not ``parametrize.remove_parametrizations``: a deep copy shares the injected ``Parametrized*`` class
    with the original, and removing deletes the property from that shared class, breaking the original.
    """
    with torch.no_grad():
        values = {name: getattr(module, name).detach().clone() for name in module.parametrizations}
    module.__class__ = module.__class__.__bases__[0]  # parametrize injected a subclass of the original
    del module._modules["parametrizations"]
    for name, value in values.items():
        module.register_parameter(name, nn.Parameter(value))
    if isinstance(module, nn.RNNBase):
        module._init_flat_weights()  # its forward reads this list, which still holds the gated tensors
