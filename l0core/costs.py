"""The expected L0 norm, exactly: E[number of the model's parameters kept].

Gates are independent, so a parameter is kept with the probability that every gate governing it is nonzero
and that the coupled group of units it belongs to survives export. Per layer that is an outer product, not a
loop over weights: a weight ``W[o, i, *k]`` keeps, in expectation,

    prod(k) * sum_o f_o * sum_i g_i

where ``f_o`` is the probability that output unit ``o``'s slice is kept and ``g_i`` that input unit ``i``'s is
(1 for a unit no gate governs); a bias or BatchNorm affine parameter keeps ``sum_o f_o``; a parameter-gated
weight multiplies in each element's own ``P(z != 0)``. For a slice whose own gate is ``s`` (the gate that zeroes
it when folded; none: ``P(s) = 1``) in a coupled group with terminal-producer gates ``T`` and consumer gates ``C``
(see :mod:`l0core.dependency`; an ungated member makes its side's product 0):

    f = P(s != 0) * (1 - prod_{t in T} P(z_t = 0))  [unless s is in T]
                  * (1 - prod_{c in C} P(z_c = 0))  [unless s is in C]

since the group goes when every terminal producer is closed or every consumer is. A group that can never go
(a model input or output, a grouped convolution) contributes only the slices' own gates. With every gate
decided (0 or 1), this is the number of nonzero parameters of ``l0core.compact(model, x)``; without a
dependency graph (no example inputs), of ``l0core.fold(model)``.

The structure (which gate and group govern each slice) is worked out once, from a folded copy of the model;
each training step then costs a handful of gathers and products over the gates' concatenated probabilities.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from .dependency import COUNTED, DependencyGraph, autograd_on
from .fold import GateSite, fold
from .hard_concrete import HardConcrete, prob_nonzero_together
from .kinds import COUNTER_ATTR, GATE_ATTR, ParameterGate, gate_modules


@dataclass
class _Segments:
    """Per-unit factors of the counted tensors, laid end to end (built once, then made tensors)."""

    own: list[int] = field(default_factory=list)  # gate entry zeroing the slice (ONE: none)
    group_a: list[int] = field(default_factory=list)  # group whose terminal producers can remove it (NONE: none)
    group_b: list[int] = field(default_factory=list)  # group whose consumers can remove it
    segment: list[int] = field(default_factory=list)  # which segment (tensor dimension) each entry belongs to
    count: int = 0

    def add(self, entries: list[tuple[int, int, int]]) -> int:
        for own, a, b in entries:
            self.own.append(own)
            self.group_a.append(a)
            self.group_b.append(b)
            self.segment.append(self.count)
        self.count += 1
        return self.count - 1


class KeptCounter:
    """Computes E[parameters kept] of one model from its gates' probabilities (see the module's docstring).

    Kept on the model it counts (an attribute, not a submodule: ``nn.Sequential`` runs every submodule), so
    copies of the model carry their own. ``example_inputs`` is kept to count again when gates are added.
    """

    def __init__(self, model: nn.Module, example_inputs: Any = None) -> None:
        self.gates: list[HardConcrete] = gate_modules(model)
        self.example_inputs = _detached(example_inputs)
        self._tensors: dict[str, torch.Tensor] = {}
        self._device: tuple[torch.device, torch.dtype] | None = None
        self._build(model)

    def counts(self, model_gates: list[HardConcrete]) -> bool:
        """Whether this counter was built for exactly these gates."""
        return len(model_gates) == len(self.gates) and all(a is b for a, b in zip(model_gates, self.gates))

    def _build(self, model: nn.Module) -> None:
        offsets, start = {}, 0
        for gate in self.gates:
            offsets[id(gate)] = start
            start += gate.n
        one = start  # the entry of the extended probability vector that is always 1: no gate
        with autograd_on():
            opened = copy.deepcopy(model)
            with torch.no_grad():
                for gate in gate_modules(opened):
                    gate.log_alpha.fill_(10.0)  # nothing folded to zero: tracing needs the whole network
            plain, sites = fold(opened)
            graph = DependencyGraph(plain, self.example_inputs) if self.example_inputs is not None and sites else None
        own = _own_entries(model, sites, offsets)
        terminal_sets, consumer_sets, group_of = _removable_groups(graph, sites, own, one)
        no_group = len(terminal_sets)
        # A side with no member, or an ungated one, is never 'all closed': its slices need no factor for it.
        never_a = [not t or one in t for t in terminal_sets]
        never_b = [not c or one in c for c in consumer_sets]

        def entries(module: nn.Module, out: bool, width: int) -> list[tuple[int, int, int]] | None:
            found, any_factor = [], False
            for u in range(width):
                key = (id(module), out, u)
                e, g = own.get(key, one), group_of.get(key, no_group)
                a = no_group if g == no_group or never_a[g] or e in terminal_sets[g] else g
                b = no_group if g == no_group or never_b[g] or e in consumer_sets[g] else g
                any_factor |= e != one or a != no_group or b != no_group
                found.append((e, a, b))
            return found if any_factor else None

        elementwise = _parameter_gates(model, offsets)
        segments = _Segments()
        constants: list[float] = []  # values of constant segments, after the computed ones
        out_seg, in_seg, per_pair = [], [], []
        mixed: list[tuple[int, int, int, int, tuple[int, int] | None, tuple[int, int] | None]] = []
        param_only: list[int] = []
        self.constant = 0.0
        seen: set[int] = set()
        for mname, module in plain.named_modules():
            for pname, p in module._parameters.items():
                if p is None or id(p) in seen:
                    continue
                seen.add(id(p))
                out_f = entries(module, True, p.shape[0]) if isinstance(module, COUNTED) and p.dim() >= 1 else None
                in_f = entries(module, False, p.shape[1]) if isinstance(module, COUNTED) and p.dim() >= 2 and \
                    getattr(module, "groups", 1) == 1 else None
                gate_range = elementwise.get((mname, pname))
                if out_f is None and in_f is None:
                    if gate_range is None:
                        self.constant += p.numel()
                    else:
                        param_only.extend(range(gate_range[0], gate_range[0] + gate_range[1]))
                    continue
                rows = p.shape[0]
                cols = p.shape[1] if in_f is not None else 1
                ranges = []
                for factor, width, seg_list in ((out_f, rows, out_seg), (in_f, cols, in_seg)):
                    if factor is None:
                        constants.append(float(width))
                        seg_list.append(-len(constants))  # resolved to the constant's place below
                        ranges.append(None)
                    else:
                        first = len(segments.own)
                        seg_list.append(segments.add(factor))
                        ranges.append((first, width))
                per_pair.append(p.numel() / (rows * cols))
                if gate_range is not None:
                    mixed.append((gate_range[0], gate_range[1], rows, cols, ranges[0], ranges[1]))
                    per_pair[-1] = 0.0  # counted elementwise instead
        n_seg = segments.count
        resolve = lambda s: s if s >= 0 else n_seg + (-s - 1)  # noqa: E731
        self._mixed = mixed
        # A side with one member survives exactly when that gate is nonzero: its factor is that gate's own
        # probability. Only sides of several members need P(all closed), placed after the gates and the 1.
        survives_at = one + 1
        side_a = _side_entries(segments.group_a, terminal_sets, no_group, one, survives_at)
        side_b = _side_entries(segments.group_b, consumer_sets, no_group, one, survives_at + no_group + 1)
        never_a = [skip or len(s) == 1 for skip, s in zip(never_a, terminal_sets)]
        never_b = [skip or len(s) == 1 for skip, s in zip(never_b, consumer_sets)]
        (terminal_entry, terminal_group), (consumer_entry, consumer_group) = \
            _pairs(terminal_sets, never_a, 0), _pairs(consumer_sets, never_b, no_group + 1)
        gathers = [segments.own] + [side for side in (side_a, side_b) if any(e != one for e in side)]
        self._n_gathers = len(gathers)
        self._multi = bool(terminal_entry or consumer_entry)
        long = lambda values: torch.tensor(values, dtype=torch.long)  # noqa: E731
        # Each side's log P(every gate closed) starts at 0, and the place of 'no group' at -inf (it survives).
        no_side = [0.0] * no_group + [-math.inf]
        self._tensors = {
            "one": torch.ones(1, dtype=torch.float64),
            "side_entry": long(terminal_entry + consumer_entry),
            "side_group": long(terminal_group + consumer_group),
            "side_start": torch.tensor(no_side * 2, dtype=torch.float64),
            "gather": long([e for rows in gathers for e in rows]),
            "segment": long(segments.segment),
            # The segments' sums are formed in place of zeros; the constant segments' values follow them.
            "segment_start": torch.tensor([0.0] * n_seg + constants, dtype=torch.float64),
            "out_seg": long([resolve(s) for s in out_seg]),
            "in_seg": long([resolve(s) for s in in_seg]),
            "per_pair": torch.tensor(per_pair, dtype=torch.float64),
            "param_only": long(param_only),
        }

    def _on(self, device: torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        if self._device != (device, dtype):
            self._tensors = {k: v.to(device=device, dtype=dtype if v.is_floating_point() else v.dtype)
                             for k, v in self._tensors.items()}
            self._device = (device, dtype)
        return self._tensors

    def __call__(self, prob: torch.Tensor) -> torch.Tensor:
        """E[parameters kept], given ``prob``: every gate's P(z != 0), end to end in :attr:`gates`' order."""
        t = self._on(prob.device, prob.dtype)
        # index_select, not prob[idx]: advanced indexing and its backward cost 5-10x more on a CPU. Few operators
        # matter more than few flops here: a step's cost on small models is per operator.
        total: torch.Tensor | float = self.constant
        if len(t["param_only"]):
            total = prob.index_select(0, t["param_only"]).sum() + total
        if len(t["per_pair"]):
            parts = [prob, t["one"]]
            if self._multi:
                # Per group side of several gates: P(it survives) = 1 - P(every gate closed), the latter as
                # exp(sum log P(z = 0)), clamped where P(z = 0) rounds to 0.
                log_closed = (1 - prob).clamp_min(1e-30).log().index_select(0, t["side_entry"])
                parts.append(1 - t["side_start"].index_add(0, t["side_group"], log_closed).exp())
            rows = torch.cat(parts).index_select(0, t["gather"])
            factor = rows
            if self._n_gathers > 1:  # the slice's own gate times its group's sides
                rows = rows.view(self._n_gathers, -1)
                factor = rows[0]
                for row in rows[1:]:
                    factor = factor * row
            sums = t["segment_start"].index_add(0, t["segment"], factor)
            total = torch.dot(t["per_pair"] * sums.index_select(0, t["out_seg"]),
                              sums.index_select(0, t["in_seg"])) + total
            for start, numel, rows_, cols, out_range, in_range in self._mixed:
                elements = prob[start:start + numel].view(rows_, cols, -1)
                f_out = factor[out_range[0]:out_range[0] + rows_] if out_range else prob.new_ones(rows_)
                f_in = factor[in_range[0]:in_range[0] + cols] if in_range else prob.new_ones(cols)
                total = total + (elements * f_out.view(-1, 1, 1) * f_in.view(1, -1, 1)).sum()
        return total if isinstance(total, torch.Tensor) else prob.new_tensor(total)


SliceKey = tuple[int, bool, int]  # (id of the layer, its outputs (else inputs), unit index)


def _own_entries(model: nn.Module, sites: list[GateSite], offsets: dict[int, int]) -> dict[SliceKey, int]:
    """Each slice a structured gate zeroes when folded (its owner's and target's units), with the gate's entry."""
    named = dict(model.named_modules())
    own: dict[SliceKey, int] = {}
    for site in sites:
        first, out = offsets[id(named[site.name]._modules[GATE_ATTR])], site.kind == "channel"
        for module in (site.owner, site.target):
            for u in range(_units(site)):
                own[(id(module), out, u)] = first + u
    return own


def _removable_groups(graph: DependencyGraph | None, sites: list[GateSite], own: dict[SliceKey, int], one: int
                      ) -> tuple[list[list[int]], list[list[int]], dict[SliceKey, int]]:
    """The coupled groups export can remove: per group, its terminal producers' and its consumers' gate entries
    (``one`` for an ungated member), and which group each slice belongs to."""
    terminal_sets: list[list[int]] = []
    consumer_sets: list[list[int]] = []
    group_of: dict[SliceKey, int] = {}
    if graph is None:
        return terminal_sets, consumer_sets, group_of
    owners = [(site.owner, site.kind == "neuron", _units(site)) for site in sites]
    for coupled in graph.coupled_units(owners):
        if coupled.terminal is None:
            continue  # never removed: its slices keep only their own gates
        g = len(terminal_sets)
        terminal_sets.append([own.get((id(m), out, idx), one) for m, out, idx in coupled.slices
                              if out and id(m) in coupled.terminal])
        consumer_sets.append([own.get((id(m), out, idx), one) for m, out, idx in coupled.slices if not out])
        for m, out, idx in coupled.slices:
            group_of[(id(m), out, idx)] = g
    return terminal_sets, consumer_sets, group_of


def _units(site: GateSite) -> int:
    return site.owner.weight.shape[1] if site.kind == "neuron" else site.owner.weight.shape[0]


def _pairs(sets: list[list[int]], never: list[bool], first: int) -> tuple[list[int], list[int]]:
    """Each group's gate entries on one side, flat, with the place of the group (``first`` + its index) each
    belongs to; sides that are never 'all closed' left out."""
    pairs = [(e, first + g) for g, (entries, skip) in enumerate(zip(sets, never)) if not skip for e in entries]
    return [e for e, _ in pairs], [g for _, g in pairs]


def _side_entries(groups: list[int], sets: list[list[int]], no_group: int, one: int, first: int) -> list[int]:
    """Per slice, the entry holding P(its group side survives): the gate's own when the side has one member,
    ``first`` + the group for a side of several, ``one`` for none."""
    return [one if g == no_group else sets[g][0] if len(sets[g]) == 1 else first + g for g in groups]


def _parameter_gates(model: nn.Module, offsets: dict[int, int]) -> dict[tuple[str, str], tuple[int, int]]:
    """(module name, parameter name) -> (first entry, count) of the parameter gate on it."""
    found = {}
    for name, module in model.named_modules():
        if parametrize.is_parametrized(module):
            for pname, plist in module.parametrizations.items():
                for gate in plist:
                    if isinstance(gate, ParameterGate):
                        found[(name, pname)] = (offsets[id(gate)], gate.n)
    return found


def _detached(example_inputs: Any) -> Any:
    if isinstance(example_inputs, torch.Tensor):
        return example_inputs.detach().clone()
    if isinstance(example_inputs, (tuple, list)):
        return type(example_inputs)(_detached(x) for x in example_inputs)
    return example_inputs


def measure_couplings(model: nn.Module, example_inputs: Any) -> None:
    """Work out, on ``model``'s dependency graph, which gates and coupled groups govern each of its parameters,
    so that :func:`expected_kept` (and the penalty) count exactly what :func:`l0core.compact` removes.

    ``attach(..., example_inputs=x)`` calls it; call it after gating a model without them. Without it the count
    is of :func:`l0core.fold`'s model, whose zeros the gates write in place but whose dead units stay.

    >>> from l0core import attach
    >>> net = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    >>> _ = attach(net, "neuron", droprate_init=0.01)
    >>> measure_couplings(net, torch.randn(1, 4))
    >>> round(expected_kept(net).item() / count_parameters(net), 2)  # every gate open: the whole network
    1.0
    """
    vars(model)[COUNTER_ATTR] = KeptCounter(model, example_inputs)


def gates_and_size(model: nn.Module) -> tuple[list[HardConcrete], int]:
    """The model's gates and its network size (:func:`count_parameters`), in one walk over its modules.

    The penalty needs both every step. Each parameter counts once however many modules share it, as
    ``model.parameters()`` counts it.
    """
    found: list[HardConcrete] = []
    seen: set[int] = set()
    size = 0
    for module in model.modules():
        if isinstance(module, HardConcrete):
            found.append(module)
        for p in module._parameters.values():
            if p is not None and id(p) not in seen:
                seen.add(id(p))
                size += p.numel()
    return found, size - sum(g.n for g in found)


def count_parameters(model: nn.Module) -> int:
    """Parameters of the network itself: everything except the gates' log_alpha."""
    return gates_and_size(model)[1]


def require_gates(found: list[HardConcrete]) -> list[HardConcrete]:
    if not found:
        raise ValueError("the model has no L0 gates: use l0core.attach or gate_parameters first")
    return found


def kept_counter(model: nn.Module, found: list[HardConcrete]) -> KeptCounter:
    """The counter of ``model`` for its gates ``found``, made again (with the same example inputs) when the
    gates changed since it was made."""
    counter = vars(model).get(COUNTER_ATTR)
    if counter is None or not counter.counts(found):
        counter = KeptCounter(model, counter.example_inputs if counter is not None else None)
        vars(model)[COUNTER_ATTR] = counter
    return counter


def expected_fraction_kept(model: nn.Module) -> torch.Tensor:
    """``expected_kept(model) / count_parameters(model)`` (differentiable), in one walk over the model: what the
    penalty and the sparsity target use every step.

    >>> from l0core import attach
    >>> net = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    >>> _ = attach(net, "neuron", droprate_init=0.01, example_inputs=torch.randn(1, 4))
    >>> round(expected_fraction_kept(net).item(), 2)  # every gate open
    1.0
    """
    found, size = gates_and_size(model)
    require_gates(found)
    if size == 0:
        raise ValueError("the expected fraction kept divides by the network's parameter count, and this model has "
                         "none besides its gates' log_alpha: use scale='paper' or gate a model with weights")
    return kept_counter(model, found)(prob_nonzero_together(found)) / size


def expected_kept(model: nn.Module) -> torch.Tensor:
    """E[number of ``model``'s parameters kept] (differentiable), gated or not: see this module's docstring.

    >>> from l0core import attach
    >>> net = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    >>> _ = attach(net, "neuron", example_inputs=torch.randn(1, 4))
    >>> with torch.no_grad(): _ = net[2].l0_gate.log_alpha.fill_(-10)  # every hidden unit closed
    >>> round(expected_kept(net).item(), 1)  # only the output layer's bias is left
    2.0
    """
    found = require_gates(gates_and_size(model)[0])
    return kept_counter(model, found)(prob_nonzero_together(found))
