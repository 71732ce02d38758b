"""From a gated model to a plain one: fold the deterministic gates into the weights, then physically
remove every unit that can no longer affect the output, with torch-pruning's dependency graph.

One rule decides what goes, for every architecture: after folding, a coupled group of channels (as
torch-pruning's DepGraph groups them: a conv's filters, its BatchNorm, the consumers' input slices, the
other branches of a residual addition or a concatenation) is removed when either
- every *terminal* producer of those channels (the last layer before they are consumed) outputs exactly
  zero on them, or
- every consumer ignores them (its input columns are zero, as neuron gates leave them),
and no channel of the group is a model input or output or belongs to a grouped (not depthwise) convolution. A
residual channel therefore goes only when every branch feeding the addition is closed; fractional gates are folded,
never dropped.
"""
from __future__ import annotations

import copy
import functools
import traceback
from dataclasses import dataclass
from typing import Any

import torch
import torch_pruning as tp
from torch import nn
from torch.nn.utils import parametrize

from .placement import (GATE_ATTR, _draw_gate, _draw_together, _forget_gate, _forget_together, _gate_after_relu,
                        _gate_input, _gate_output, gates)
from .kinds import UnitGate

_LINEAR_LIKE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
_NORM = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


@dataclass
class _Site:
    """A gated module after folding: where its units can be removed, and how to find its dead units."""

    name: str
    owner: nn.Module  # conv (channel gate) or linear (neuron gate)
    target: nn.Module  # the module the gate was folded into (the BatchNorm after a conv, or the owner)
    kind: str  # "channel" | "neuron"


_MODEL_HOOKS = (_draw_together, _forget_together)  # on the gated model itself: the draw of all its gates at once


def _is_gate_hook(hook: Any) -> bool:
    """A hook that applies one gate (a partial over it), as placement registers them."""
    return isinstance(hook, functools.partial) and hook.func in (_gate_output, _gate_input, _gate_after_relu, _draw_gate, _forget_gate)


def _scale_units_(module: nn.Module, z: torch.Tensor, dim: int) -> None:
    """Multiply ``module``'s parameters along unit dimension ``dim`` by ``z`` (exact folding of a gate)."""
    with torch.no_grad():
        shape = [1] * module.weight.dim()
        shape[dim] = -1
        module.weight.mul_(z.view(shape))
        if dim == 0 and getattr(module, "bias", None) is not None:
            module.bias.mul_(z)


def fold(model: nn.Module) -> tuple[nn.Module, list[_Site]]:
    """A gate-free deep copy of ``model`` in eval mode with each deterministic gate multiplied into its weights.

    Outputs are unchanged: a channel gate applied after a BatchNorm scales its affine weight and bias, one
    applied after a conv scales its filters and bias, a neuron gate scales the dense layer's input columns,
    and a parameter gate writes ``weight * z`` (zeros included) into the weight.
    """
    plain = copy.deepcopy(model).eval()
    sites: list[_Site] = []
    # Remove gate hooks first, remembering which module each gate's output hook sits on.
    hooked_at: dict[int, nn.Module] = {}
    # Gates applied through their target's parameters: unparametrizing it below (in eval mode) bakes z in.
    by_parameters: set[int] = set()
    for module in plain.modules():
        for hooks in (module._forward_hooks, module._forward_pre_hooks):
            for key, hook in list(hooks.items()):
                if _is_gate_hook(hook):
                    # A gate fused with a ReLU is folded into the layer before that ReLU.
                    hooked_at[id(hook.args[0])] = hook.args[1] if hook.func is _gate_after_relu else module
                    if hook.func is _draw_gate:
                        by_parameters.add(id(hook.args[0]))
                elif getattr(hook, "func", None) not in _MODEL_HOOKS:
                    continue
                del hooks[key]
                module._forward_hooks_always_called.pop(key, None)
    for name, module in list(plain.named_modules()):
        gate = module._modules.get(GATE_ATTR)
        if isinstance(gate, UnitGate):
            target = module if gate.kind == "neuron" else hooked_at.get(id(gate), module)
            if id(gate) not in by_parameters:
                _scale_units_(target, gate.deterministic().detach(), dim=1 if gate.kind == "neuron" else 0)
            del module._modules[GATE_ATTR]
            sites.append(_Site(name, module, target, gate.kind))
        if parametrize.is_parametrized(module):
            _unparametrize(module)
    leftover = [n for n, _ in gates(plain)]
    if leftover:
        raise ValueError(f"cannot fold gates placed by hand ({', '.join(leftover)}): place them with "
                         "l0core.attach so the layer each one scales is known")
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


def _grouped(module: Any) -> bool:
    """A grouped convolution other than a depthwise one (ResNeXt, RegNet): torch-pruning 1.6 removes single
    channels of it unevenly across its groups and breaks the weight."""
    return isinstance(module, nn.modules.conv._ConvNd) and module.groups > 1 and not (
        module.groups == module.in_channels == module.out_channels)


def _prunes_outputs(item: Any) -> bool:
    """Whether a pruning-group item removes output channels of its layer (else its input channels)."""
    return item.dep.handler.__name__ == "prune_out_channels"


def _has_params(module: Any) -> bool:
    return isinstance(module, nn.Module) and next(module.parameters(recurse=False), None) is not None


def _zero_output_mask(module: nn.Module) -> torch.Tensor | None:
    """Per output channel: does ``module`` output exactly zero there whatever its input? (None: never known)"""
    if isinstance(module, _NORM):
        return (module.weight == 0) & (module.bias == 0) if module.affine else None
    if isinstance(module, _LINEAR_LIKE):
        rows = (module.weight == 0).flatten(1).all(dim=1)
        return rows if module.bias is None else rows & (module.bias == 0)
    return None


def _outputs_zero(module: nn.Module, idxs: list[int]) -> bool:
    mask = _zero_output_mask(module)
    return mask is not None and bool(mask[torch.as_tensor(idxs, dtype=torch.long)].all())


def _ignores_inputs(module: nn.Module, idxs: list[int]) -> bool:
    """Does ``module`` give zero weight to its input channels ``idxs``?"""
    if isinstance(module, _LINEAR_LIKE) and getattr(module, "groups", 1) == 1:
        return bool((module.weight[:, torch.as_tensor(idxs, dtype=torch.long)] == 0).all())
    return False


class _Graph:
    """torch-pruning's dependency graph of a plain model, plus which producers are terminal."""

    def __init__(self, model: nn.Module, example_inputs: Any) -> None:
        try:
            self.dg = tp.DependencyGraph().build_dependency(model, example_inputs=example_inputs)
        except Exception as exc:
            where = traceback.extract_tb(exc.__traceback__)[-1]
            if "torch_pruning" not in where.filename:
                raise  # the model's own forward failed (e.g. inputs of the wrong shape): its error says why
            # e.g. ShuffleNetV2's channel shuffle: a ZeroDivisionError deep in torch-pruning's reshape mapping
            raise ValueError(f"torch-pruning {tp.__version__} cannot trace how the channels of "
                             f"{type(model).__name__} depend on each other ({type(exc).__name__} in {where.name}), "
                             "so its channel and neuron gates can be neither costed nor exported; parameter gates "
                             "(kind='parameter') need no such graph") from exc
        self._reach: dict[int, tuple[set[int], bool]] = {}

    def reach(self, module: nn.Module) -> tuple[set[int], bool]:
        """(ids of the parameterised modules the output of ``module`` flows into, whether it reaches the output)."""
        key = id(module)
        if key not in self._reach:
            found: set[int] = set()
            reaches_output = False
            stack, seen = [self.dg.module2node[module]], set()
            while stack:
                node = stack.pop()
                if not node.outputs:
                    reaches_output = True
                for nxt in node.outputs:
                    if id(nxt) in seen:
                        continue
                    seen.add(id(nxt))
                    if _has_params(nxt.module):
                        found.add(id(nxt.module))
                    else:
                        stack.append(nxt)
            self._reach[key] = (found, reaches_output)
        return self._reach[key]

    def group(self, site: _Site, idxs: list[int]):
        fn = tp.prune_linear_in_channels if site.kind == "neuron" else self.dg.get_pruner_of_module(site.owner).prune_out_channels
        return self.dg.get_pruning_group(site.owner, fn, idxs=idxs)

    @staticmethod
    def own_units(group, site: _Site) -> list[int]:
        """The units of ``site`` itself in ``group``: those coupled to the ones it was built for."""
        outputs = site.kind != "neuron"  # a neuron site's units are its layer's inputs
        return [int(i) for item in group.items if item.dep.target.module is site.owner
                and _prunes_outputs(item) == outputs for i in item.idxs]

    @staticmethod
    def has_producer(group) -> bool:
        """Whether a parameterised layer in ``group`` produces the channels (else they are a model input)."""
        return any(_has_params(item.dep.target.module) and _prunes_outputs(item) for item in group.items)

    def empties_a_layer(self, group) -> bool:
        """Whether pruning ``group`` would remove every output (or input) unit of one of its layers."""
        for item in group.items:
            module = item.dep.target.module
            if not _has_params(module):
                continue
            width = self.dg.get_out_channels(module) if _prunes_outputs(item) else self.dg.get_in_channels(module)
            if width is not None and len(set(item.idxs)) >= width:
                return True
        return False

    def removable(self, group) -> bool:
        producers, consumers = [], []
        for item in group.items:
            module = item.dep.target.module
            if not _has_params(module):
                continue
            (producers if _prunes_outputs(item) else consumers).append((module, list(item.idxs)))
        if not producers or any(self.reach(m)[1] for m, _ in producers):
            return False  # the model's inputs or outputs: never removed, the interface stays
        if any(_grouped(m) for m, _ in producers + consumers):
            return False  # a grouped conv's channels stay: its groups must keep equal widths
        in_group = {id(m) for m, _ in producers}
        terminal = [(m, i) for m, i in producers if not self.reach(m)[0] <= in_group]
        if terminal and all(_outputs_zero(m, i) for m, i in terminal):
            return True
        return bool(consumers) and all(_ignores_inputs(m, i) for m, i in consumers)


def _closed_units(site: _Site) -> list[int]:
    """Units whose own folded gate is zero; whether each can go is the group's decision."""
    if site.kind == "neuron":
        return torch.nonzero((site.owner.weight == 0).all(dim=0)).flatten().tolist()
    mask = _zero_output_mask(site.target)
    return [] if mask is None else torch.nonzero(mask).flatten().tolist()


def check_traceable(model: nn.Module, example_inputs: Any) -> None:
    """Raise ValueError if torch-pruning cannot build ``model``'s dependency graph, which structured gates
    need to cost and export their units. Traces a copy in eval mode: ``model`` is left untouched."""
    _Graph(copy.deepcopy(model).eval(), example_inputs)


def _dead_units(graph: _Graph, site: _Site, closed: list[int]) -> tuple[list[int], Any]:
    """Which of ``site``'s closed units can go, and their pruning group when it is already built: usually all
    of them, decided by one group check."""
    whole = graph.group(site, closed)
    if graph.removable(whole):
        return closed, whole
    if not graph.has_producer(whole):
        return [], None  # fed by the model's input, which stays whatever subset is asked
    # Unit by unit, but one verdict per coupled block: the units a group ties together (e.g. the features a
    # flatten makes of one channel) form the same group whichever of them asks, so each block is checked once.
    # A LeNet-5 with 150 closed features after its flatten took ~200 ms a report unit by unit.
    closed_set, decided, dead = set(closed), set(), []
    for i in closed:
        if i in decided:
            continue
        group = graph.group(site, [i])
        block = graph.own_units(group, site) or [i]
        decided.update(block)
        if graph.removable(group):
            dead += sorted(j for j in block if j in closed_set)
    return dead, None


def _prune_dead(plain: nn.Module, sites: list[_Site], example_inputs: Any) -> None:
    graph = _Graph(plain, example_inputs)
    changed = True
    while changed:
        changed = False
        for site in sites:
            closed = _closed_units(site)
            if not closed:
                continue
            dead, group = _dead_units(graph, site, closed)
            if dead and group is None:
                group = graph.group(site, dead)
            while group is not None and graph.empties_a_layer(group):
                # torch-pruning cannot leave a layer empty: keep the last dead block (its zeros stay). The
                # emptied layer need not be this site's own (the conv before a flatten, for a neuron site).
                keep = set(graph.own_units(graph.group(site, dead[-1:]), site)) | {dead[-1]}
                dead = [i for i in dead if i not in keep]
                group = graph.group(site, dead) if dead else None
            if group is not None:
                _prune(group)
                changed = True


def _prune(group) -> None:
    """``group.prune()`` with each layer's indices listed once. A flatten maps each of a channel's features
    to that channel, and torch-pruning (1.6) keeps the repeats: the weights come out right but the layer's
    ``out_channels`` drops once per repeat, so the exported conv misreports its width and the next pruning
    step reads channel indices off the wrong width (an IndexError for a mostly closed LeNet-5)."""
    for k, item in enumerate(group.items):
        group[k] = type(item)(item.dep, list(dict.fromkeys(item.idxs)))
    group.prune()


def _run(model: nn.Module, example_inputs: Any) -> Any:
    with torch.no_grad():
        if isinstance(example_inputs, (tuple, list)):
            return model(*example_inputs)
        return model(example_inputs)


def compact(model: nn.Module, example_inputs: Any, check: bool = True) -> nn.Module:
    """A plain, physically smaller copy of a gated ``model``: no gates, dead units removed.

    Channels and neurons whose deterministic gate is 0 go with everything coupled to them (BatchNorm,
    consumers' input slices, concatenated and added branches); fractional gates are folded into the
    weights; parameter gates leave zeros in weights of the original shape. ``check`` verifies that the
    result computes what the gated model computes in eval mode on ``example_inputs``.

    >>> net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))
    >>> from l0core import attach
    >>> _ = attach(net, "neuron")
    >>> with torch.no_grad(): net[2].l0_gate.log_alpha[:10] = -10.0  # close 10 of 16 hidden units
    >>> small = compact(net, torch.randn(4, 8))
    >>> small[0].out_features, small[2].in_features
    (6, 6)
    """
    return _compact_folded(*fold(model), example_inputs, check)


def _compact_folded(plain: nn.Module, sites: list[_Site], example_inputs: Any, check: bool = True) -> nn.Module:
    """:func:`compact` on the output of :func:`fold` (pruned in place)."""
    reference = _run(plain, example_inputs) if check else None
    if sites:
        _prune_dead(plain, sites, example_inputs)
    if check:
        _assert_same(reference, _run(plain, example_inputs))
    return plain


def _assert_same(expected: Any, actual: Any) -> None:
    if isinstance(expected, torch.Tensor):
        scale = float(expected.abs().max().clamp_min(1.0))
        diff = float((expected - actual).abs().max()) if expected.shape == actual.shape else float("inf")
        if diff > 1e-5 * scale:
            raise RuntimeError(f"compact() changed the model's outputs (max abs diff {diff:.3g}): please report this model")
    elif isinstance(expected, (tuple, list)):
        for e, a in zip(expected, actual):
            _assert_same(e, a)
