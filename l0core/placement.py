"""Add gates to an existing model without editing its source.

Structured gates live on the module whose units they govern (``conv.l0_gate``, ``linear.l0_gate``), so they
travel with its state dict. A channel gate acts where the unit leaves the layer (after the BatchNorm that
follows a conv). With one draw per batch it scales that layer's weight and bias instead of its output
(:class:`~l0core.hooks.ScaleUnits`): the same function, at the cost of a few hundred multiplications instead of
a pass over the activation and a second copy of it kept for backward. Per-example channel gates multiply the
activation through a forward hook; followed by a ReLU, they fuse with it (``relu(x) * z``). Neuron gates (where
features enter a dense layer) multiply the activation through a forward pre-hook. Parameter gates use
``torch.nn.utils.parametrize`` and keep the existing weights untouched.

In training, the model given to :func:`attach` draws all its once-per-batch gates together when its forward
starts (:class:`~l0core.hooks.DrawTogether`), and each gate reads its ``current`` draw. The draw stays on the gate
(``drawn_for_pass``) until the next pass, for activation checkpointing: a checkpointed block recomputed during
backward reads the z its forward read. Per-example gates draw where they apply.
"""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Iterable, Literal, Sequence, Union

import torch
from torch import nn
from torch.nn.utils import parametrize

from .costs import measure_couplings
from .dependency import check_traceable
from .hard_concrete import HardConcrete
from .hooks import (DrawGate, ForgetGate, GateAfterRelu, GateInput, GateOutput, RefreshFlatWeights,
                    RestoreFlatWeights, ScaleUnits, draw_gates_together)
from .kinds import GATE_ATTR, ChannelGate, NeuronGate, ParameterGate, UnitGate

Selector = Union[str, type, Sequence[Union[str, type]], None]
Kind = Literal["channel", "neuron", "parameter"]

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_NORM = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
# Normalisation layers' weights are scales of whole channels, not connections: parameter gates leave them.
_SCALES = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.RMSNorm)


@dataclass(frozen=True)
class Gated:
    """What :func:`attach` gated: the gate's name, what it governs and where it applies."""

    gate: str  # qualified name of the gate module, e.g. "layer1.0.conv1.l0_gate"
    kind: str  # "channel" | "neuron" | "parameter"
    module: str  # the module whose units (or parameter) the gate governs
    applied_at: str  # where z multiplies: a module output, a module input, or a parameter
    units: int


def _matches(name: str, module: nn.Module, selector: Selector) -> bool:
    items = [selector] if isinstance(selector, (str, type)) else list(selector or ())
    return any(isinstance(module, item) if isinstance(item, type) else fnmatch.fnmatchcase(name, item)
               for item in items)


def _within(name: str, named: dict[str, nn.Module], selector: Selector) -> bool:
    """Whether the module ``name`` or one of the modules holding it matches ``selector``."""
    parts = name.split(".") if name else []
    return any(_matches(prefix, named[prefix], selector)
               for prefix in ([".".join(parts[:k]) for k in range(len(parts), 0, -1)] + [""]))


def _own_weights(module: nn.Module) -> list[str]:
    """The floating-point weight tensors a parameter gate goes on by default: never a norm layer's scales,
    never a gate's log_alpha."""
    if isinstance(module, (HardConcrete, _SCALES)):
        return []
    return [n for n, p in module._parameters.items() if p is not None and p.is_floating_point() and "weight" in n]


def _gateable(module: nn.Module, kind: Kind) -> bool:
    if kind == "channel":
        return isinstance(module, _CONV)
    if kind == "neuron":
        return isinstance(module, nn.Linear)
    return bool(_own_weights(module))


def _network_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The model's modules, without the gates and parametrize's containers l0core added to it."""
    return [(n, m) for n, m in model.named_modules() if not isinstance(m, HardConcrete)
            and "parametrizations" not in n.split(".") and not isinstance(m, parametrize.ParametrizationList)]


def select(model: nn.Module, kind: Kind, include: Selector = None, exclude: Selector = None) -> list[tuple[str, nn.Module]]:
    """The modules ``kind`` can gate that ``include`` selects (itself or a module holding it; all when None)
    and ``exclude`` does not: convolutions for channel gates, dense layers for neuron gates, any module with
    weights for parameter gates. A selection of nothing is a one-line error naming some modules it could gate.

    >>> net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Sequential(nn.Conv2d(4, 4, 3), nn.ReLU()))
    >>> [name for name, _ in select(net, "channel", include="1*")]
    ['1.0']
    """
    modules = _network_modules(model)
    named = dict(modules)
    gateable = [(n, m) for n, m in modules if _gateable(m, kind)]
    chosen = [(n, m) for n, m in gateable if (include is None or _within(n, named, include))
              and (exclude is None or not _within(n, named, exclude))]
    if not chosen:
        some = ", ".join(repr(n) for n, _ in gateable[:4]) + (f" (of {len(gateable)})" if len(gateable) > 4 else "")
        raise ValueError(f"attach(kind={kind!r}) found nothing to gate with include={include!r}, exclude={exclude!r}: "
                         + (f"the modules it can gate are {some}" if gateable else
                            f"the model has no {'convolution' if kind == 'channel' else 'Linear layer' if kind == 'neuron' else 'weights'}"))
    return chosen


def _scale_parameters(gate: UnitGate, target: nn.Module) -> bool:
    """Apply a per-batch channel gate through ``target``'s parameters; False if it has none to scale."""
    if getattr(target, "weight", None) is None or parametrize.is_parametrized(target):
        return False
    for name in ("weight", "bias"):
        if getattr(target, name, None) is not None:
            parametrize.register_parametrization(target, name, ScaleUnits(gate))
    target.register_forward_pre_hook(DrawGate(gate))
    target.register_forward_hook(ForgetGate(gate), always_call=True)
    return True


def _following_norm(parent: nn.Module, child_name: str, conv: nn.Module) -> tuple[str, nn.Module] | None:
    """The BatchNorm registered right after ``conv`` in the same parent, if it normalises its channels.

    Gating after that norm (not between conv and norm) makes a closed gate zero the channel for the
    consumer: a BatchNorm would otherwise turn the zeroed channel back into its shift beta.
    """
    names = list(parent._modules)
    i = names.index(child_name)
    if i + 1 < len(names):
        nxt = parent._modules[names[i + 1]]
        if isinstance(nxt, _NORM) and nxt.num_features == conv.out_channels:
            return names[i + 1], nxt
    return None


def _fusable_relu(model: nn.Module, parent: nn.Module, child_name: str) -> nn.ReLU | None:
    """The ReLU that alone consumes ``parent.child_name``'s output, if that is certain without tracing.

    Certain only inside a stock ``nn.Sequential`` (each child feeds the next and nothing else), for a
    ReLU module used once in the model and not in place (an in-place ReLU has already overwritten its input).
    """
    if type(parent).forward is not nn.Sequential.forward:
        return None
    names = list(parent._modules)
    i = names.index(child_name)
    nxt = parent._modules[names[i + 1]] if i + 1 < len(names) else None
    if type(nxt) is not nn.ReLU or nxt.inplace or nxt._forward_hooks:
        return None
    uses = sum(1 for _, m in model.named_modules(remove_duplicate=False) if m is nxt)
    return nxt if uses == 1 else None


def attach(
    model: nn.Module,
    kind: Kind = "channel",
    include: Selector = None,
    exclude: Selector = None,
    droprate_init: float = 0.5,
    per_sample: bool = False,
    example_inputs: torch.Tensor | tuple | None = None,
) -> list[Gated]:
    """Gate an existing model in place and say what was gated.

    - ``kind="channel"``: output channels of every ``Conv*d`` (applied after its BatchNorm when one follows).
    - ``kind="neuron"``: input features of every ``Linear`` (the paper's L0Dense).
    - ``kind="parameter"``: every element of the weight tensors of any module (convolutions, dense layers,
      LSTM/GRU, MultiheadAttention, Embedding, a user's own; not normalisation scales, not biases).

    ``include`` / ``exclude`` take qualified-name patterns (``"layer4.*"``) or module types; a module selected
    selects the gateable modules inside it too. With ``example_inputs``, the model's dependency graph is traced
    (:func:`l0core.measure_couplings`) so that the expected L0 and the penalty count exactly what
    :func:`l0core.compact` removes.

    >>> net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 4 * 4, 10))
    >>> [g.gate for g in attach(net, "channel")]
    ['0.l0_gate']
    """
    if kind not in ("channel", "neuron", "parameter"):
        raise ValueError(f"kind must be 'channel', 'neuron' or 'parameter', got {kind!r}")
    chosen = select(model, kind, include, exclude)
    if example_inputs is not None and kind != "parameter":
        check_traceable(model, example_inputs)  # a model it cannot trace stays as it was
    if kind == "parameter":
        result = [g for name, module in chosen for g in _gate_weights(module, _own_weights(module), droprate_init, name)]
    else:
        result = _attach_units(model, kind, chosen, droprate_init, per_sample)
    draw_gates_together(model)
    if example_inputs is not None:
        measure_couplings(model, example_inputs)
    return result


def _attach_units(model: nn.Module, kind: Kind, chosen: list[tuple[str, nn.Module]], droprate_init: float,
                  per_sample: bool) -> list[Gated]:
    named = dict(model.named_modules())
    found: list[Gated] = []
    for name, child in chosen:
        if hasattr(child, GATE_ATTR):
            raise ValueError(f"module {name!r} is already gated")
        parent_name, _, child_name = name.rpartition(".")
        parent = named[parent_name]
        if kind == "channel":
            gate: UnitGate = ChannelGate(child.out_channels, droprate_init, per_sample)
            norm = _following_norm(parent, child_name, child)
            target_name, target = (f"{parent_name}.{norm[0]}".lstrip("."), norm[1]) if norm else (name, child)
            if not per_sample and _scale_parameters(gate, target):
                applied = f"output of {target_name} (scaling its weight and bias)"
            elif (relu := _fusable_relu(model, parent, norm[0] if norm else child_name)) is not None:
                relu.register_forward_hook(GateAfterRelu(gate, target))
                applied = f"output of {target_name} (fused with the ReLU after it)"
            else:
                target.register_forward_hook(GateOutput(gate))
                applied = f"output of {target_name}"
        else:
            gate = NeuronGate(child.in_features, droprate_init, per_sample)
            child.register_forward_pre_hook(GateInput(gate))
            applied = f"input of {name}"
        child.add_module(GATE_ATTR, gate.to(child.weight.device).train(child.training))
        found.append(Gated(f"{name}.{GATE_ATTR}".lstrip("."), kind, name, applied, gate.n))
    return found


def gate_parameters(module: nn.Module, names: Iterable[str] | None = None, droprate_init: float = 0.5) -> list[Gated]:
    """Put one hard-concrete gate on every element of the named parameters of ``module``.

    ``names`` may reach into submodules (``"out_proj.weight"``); by default, every floating-point weight tensor
    of ``module`` and the modules inside it (normalisation scales and biases left out). The weights are kept
    exactly as they are, so a trained network can be fine-tuned: with gates fully open (``droprate_init``
    small) its outputs start close to the original's.

    >>> lin = nn.Linear(4, 2)
    >>> [g.gate for g in gate_parameters(lin)]
    ['parametrizations.weight.0']
    >>> lin.weight.shape  # still a weight of the same shape, now gated
    torch.Size([2, 4])
    >>> [g.gate for g in gate_parameters(nn.MultiheadAttention(8, 2))]
    ['parametrizations.in_proj_weight.0', 'out_proj.parametrizations.weight.0']
    """
    if names is None:
        found = []
        for prefix, sub in _network_modules(module):
            found += _gate_weights(sub, _own_weights(sub), droprate_init, prefix)
        return found
    found = []
    for dotted in names:
        prefix, _, pname = dotted.rpartition(".")
        owner = module.get_submodule(prefix) if prefix else module
        found += _gate_weights(owner, [pname], droprate_init, prefix)
    return found


def _gate_weights(module: nn.Module, names: list[str], droprate_init: float, prefix: str = "") -> list[Gated]:
    """One :class:`ParameterGate` per named parameter of ``module`` (``prefix``: its name in the caller's model)."""
    found = []
    at = f"{prefix}." if prefix else ""
    for pname in names:
        param = getattr(module, pname, None)
        if not isinstance(param, torch.Tensor) or not param.is_floating_point():
            raise ValueError(f"{type(module).__name__} has no floating-point parameter {pname!r}")
        if parametrize.is_parametrized(module, pname):
            raise ValueError(f"parameter {at}{pname} of {type(module).__name__} is already gated or parametrized")
        gate = ParameterGate(param.shape, droprate_init).to(param.device).train(module.training)
        parametrize.register_parametrization(module, pname, gate)
        found.append(Gated(f"{at}parametrizations.{pname}.0", "parameter", prefix, f"{at}{pname}", gate.n))
    if found and isinstance(module, nn.RNNBase) and \
            not any(isinstance(h, RefreshFlatWeights) for h in module._forward_pre_hooks.values()):
        module.register_forward_pre_hook(RefreshFlatWeights())
        module.register_forward_hook(RestoreFlatWeights(), always_call=True)
    return found
