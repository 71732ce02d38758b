"""The exported model: a gated model folded (:func:`l0core.fold`), then every unit that can no longer affect the
output physically removed with torch-pruning's dependency graph, by the rule in :mod:`l0core.dependency`.
Fractional gates are folded, never dropped.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .dependency import DependencyGraph, autograd_on, has_params, prunes_outputs, zero_output_mask
from .fold import GateSite, fold
from .kinds import GATE_ATTR, UnitGate


def _closed_units(site: GateSite) -> list[int]:
    """Units whose own folded gate is zero; whether each can go is the group's decision."""
    if site.kind == "neuron":
        return torch.nonzero((site.owner.weight == 0).all(dim=0)).flatten().tolist()
    mask = zero_output_mask(site.target)
    return [] if mask is None else torch.nonzero(mask).flatten().tolist()


def _dead_units(graph: DependencyGraph, site: GateSite, closed: list[int]) -> list[int]:
    """Which of ``site``'s closed units can go: usually all of them, decided by one group check."""
    inputs = site.kind == "neuron"
    whole = graph.group(site.owner, inputs, closed)
    if graph.removable(whole):
        return closed
    if not graph.has_producer(whole):
        return []  # fed by the model's input, which stays whatever subset is asked
    # Unit by unit, but one verdict per coupled block: the units a group ties together (e.g. the features a
    # flatten makes of one channel) form the same group whichever of them asks, so each block is checked once.
    closed_set, decided, dead = set(closed), set(), []
    for i in closed:
        if i in decided:
            continue
        group = graph.group(site.owner, inputs, [i])
        block = graph.own_units(group, site.owner, inputs) or [i]
        decided.update(block)
        if graph.removable(group):
            dead += sorted(j for j in block if j in closed_set)
    return dead


def _width(site: GateSite) -> int:
    """How many units ``site``'s layer has now: a dense layer's inputs, or a layer's outputs."""
    return int(site.owner.weight.shape[1 if site.kind == "neuron" else 0])


def _rounded(graph: DependencyGraph, site: GateSite, dead: list[int], round_to: int,
             priority: list[float] | None) -> list[int]:
    """The dead units to remove so that ``site``'s width stays a multiple of ``round_to``: the rest of them, the
    most probable (highest log_alpha, ``priority`` by current unit), stay as zeros. Where a coupling removes
    units in blocks (a flatten's features of one channel) that cannot land on a multiple, all of them go."""
    width = _width(site)
    extra = (round_to - (width - len(dead)) % round_to) % round_to
    if extra == 0 or extra >= len(dead):
        return dead if extra == 0 else []
    order = sorted(dead, key=lambda i: priority[i] if priority is not None else 0.0)
    chosen = sorted(order[:len(dead) - extra])
    group = graph.group(site.owner, site.kind == "neuron", chosen)
    own = set(graph.own_units(group, site.owner, site.kind == "neuron"))
    return chosen if own == set(chosen) else dead


def _prune_dead(plain: nn.Module, sites: list[GateSite], example_inputs: Any, round_to: int = 1,
                priorities: dict[str, list[float]] | None = None) -> None:
    graph = DependencyGraph(plain, example_inputs)
    # Each site's log_alpha by its layer's current units, kept in step as the site's own units go; a coupled
    # removal through another site leaves it out of step, and the choice of which closed units stay falls back
    # to any (they output zero whichever they are).
    alive = {site.name: list(range(_width(site))) for site in sites}
    changed = True
    while changed:
        changed = False
        for site in sites:
            closed = _closed_units(site)
            if not closed:
                continue
            dead = _dead_units(graph, site, closed)
            inputs = site.kind == "neuron"
            if round_to > 1 and dead:
                units = alive[site.name]
                known = priorities is not None and site.name in priorities and len(units) == _width(site)
                dead = _rounded(graph, site, dead, round_to,
                                [priorities[site.name][u] for u in units] if known else None)
            group = graph.group(site.owner, inputs, dead) if dead else None
            while group is not None and graph.empties_a_layer(group):
                # torch-pruning cannot leave a layer empty: the last dead block stays, zeroed (it is dead: zero
                # on the way out or ignored on the way in), so that it counts as removed all the same. The
                # emptied layer need not be this site's own (the conv before a flatten, for a neuron site).
                kept = graph.group(site.owner, inputs, dead[-1:])
                keep = set(graph.own_units(kept, site.owner, inputs)) | {dead[-1]}
                _zero(kept)
                dead = [i for i in dead if i not in keep]
                group = graph.group(site.owner, inputs, dead) if dead else None
            if group is not None:
                removed = set(graph.own_units(group, site.owner, inputs)) | set(dead)
                alive[site.name] = [u for i, u in enumerate(alive[site.name]) if i not in removed]
                _prune(group)
                changed = True


def _zero(group) -> None:
    """Zero every parameter slice of a dead group that stays: its producers' rows, its consumers' columns."""
    with torch.no_grad():
        for item in group.items:
            module = item.dep.target.module
            if not has_params(module):
                continue
            idxs = torch.as_tensor(sorted({int(i) for i in item.idxs}), dtype=torch.long)
            for p in module.parameters(recurse=False):
                if prunes_outputs(item) and p.dim() >= 1:
                    p[idxs] = 0
                elif not prunes_outputs(item) and p.dim() >= 2 and getattr(module, "groups", 1) == 1:
                    p[:, idxs] = 0


def _prune(group) -> None:
    """``group.prune()`` with each layer's indices listed once. A flatten maps each of a channel's features
    to that channel, and torch-pruning (1.6) keeps the repeats: the weights come out right but the layer's
    ``out_channels`` drops once per repeat, so the exported conv misreports its width and the next pruning
    step reads channel indices off the wrong width (an IndexError for a mostly closed LeNet-5)."""
    for k, item in enumerate(group.items):
        group[k] = type(item)(item.dep, list(dict.fromkeys(item.idxs)))
    group.prune()


def run(model: nn.Module, example_inputs: Any) -> Any:
    """``model(example_inputs)`` without autograd (a tuple or list is unpacked into arguments)."""
    with torch.no_grad():
        if isinstance(example_inputs, (tuple, list)):
            return model(*example_inputs)
        return model(example_inputs)


def compact(model: nn.Module, example_inputs: Any, check: bool = True, round_to: int = 1) -> nn.Module:
    """A plain, physically smaller copy of a gated ``model``: no gates, dead units removed.

    Channels and neurons whose deterministic gate is 0 go with everything coupled to them (BatchNorm,
    consumers' input slices, concatenated and added branches); fractional gates are folded into the
    weights; parameter gates leave zeros in weights of the original shape. ``check`` verifies that the
    result computes what the gated model computes in eval mode on ``example_inputs``. Works under
    ``torch.no_grad()`` and ``torch.inference_mode()``.

    ``round_to`` (k >= 1) keeps each gated layer's width a multiple of k where it can, by keeping its most
    probable closed units (highest log_alpha) as zeros: hardware runs widths of 8 or 16 faster. Outputs do not
    change, since closed units output zero; a layer narrower than k keeps its closed units.

    >>> net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))
    >>> from l0core import attach
    >>> _ = attach(net, "neuron")
    >>> with torch.no_grad(): net[2].l0_gate.log_alpha[:10] = -10.0  # close 10 of 16 hidden units
    >>> small = compact(net, torch.randn(4, 8))
    >>> small[0].out_features, small[2].in_features
    (6, 6)
    """
    if round_to < 1:
        raise ValueError(f"round_to must be at least 1, got {round_to}")
    priorities = {name: gate.log_alpha.detach().flatten().tolist()
                  for name, module in model.named_modules()
                  if isinstance(gate := module._modules.get(GATE_ATTR), UnitGate)} if round_to > 1 else None
    with autograd_on():
        return compact_folded(*fold(model), example_inputs, check, round_to, priorities)


def compact_folded(plain: nn.Module, sites: list[GateSite], example_inputs: Any, check: bool = True,
                   round_to: int = 1, priorities: dict[str, list[float]] | None = None) -> nn.Module:
    """:func:`compact` on what :func:`l0core.fold` returned (``plain`` is pruned in place); ``priorities``: each
    site's log_alpha by unit, which closed units ``round_to`` keeps first."""
    reference = run(plain, example_inputs) if check else None
    if sites:
        _prune_dead(plain, sites, example_inputs, round_to, priorities)
    if check:
        _assert_same(reference, run(plain, example_inputs))
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
