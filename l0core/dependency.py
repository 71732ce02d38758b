"""Which channels of a plain model depend on each other: torch-pruning's dependency graph, and the one rule
that decides when a coupled group of units can go. The only module of l0core that imports torch_pruning.

After folding, a coupled group of channels (as torch-pruning's DepGraph groups them: a conv's filters, its
BatchNorm, the consumers' input slices, the other branches of a residual addition or a concatenation) is
removable when either
- every *terminal* producer of those channels (the last layer before they are consumed) outputs exactly zero
  on them, or
- every consumer ignores them (its input columns are zero, as neuron gates leave them),
and no channel of the group is a model input or output, belongs to a grouped (not depthwise) convolution, or
sits in a layer whose slices l0core does not know how to count (:data:`COUNTED`). A residual channel therefore
goes only when every branch feeding the addition is closed.
"""
from __future__ import annotations

import contextlib
import copy
import traceback
from dataclasses import dataclass
from typing import Any, Iterator

import torch
import torch_pruning as tp
from torch import nn

LINEAR_LIKE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
NORM = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
# Layers whose removable slices are counted exactly (out: rows of every parameter; in: columns of the weight).
COUNTED = LINEAR_LIKE + NORM + (nn.LayerNorm,)

Slice = tuple[nn.Module, bool, int]  # (layer, whether its outputs (else its inputs), unit index)


@dataclass(frozen=True)
class Coupled:
    """Units that go together: their layer slices, and the ids of the group's terminal producers (None: the
    group can never go, whatever its gates)."""

    slices: frozenset[Slice] | set[Slice]
    terminal: set[int] | None


@contextlib.contextmanager
def autograd_on() -> Iterator[None]:
    """Autograd on, whatever the caller's context: torch-pruning traces the graph through ``grad_fn``, which
    ``torch.no_grad()`` and ``torch.inference_mode()`` (how people evaluate) leave empty."""
    with torch.inference_mode(False), torch.enable_grad():
        yield


def normal_tensors(example_inputs: Any) -> Any:
    """``example_inputs`` with inference-mode tensors cloned into normal ones, which autograd can record."""
    if isinstance(example_inputs, torch.Tensor):
        return example_inputs.clone() if example_inputs.is_inference() else example_inputs
    if isinstance(example_inputs, (tuple, list)):
        return type(example_inputs)(normal_tensors(x) for x in example_inputs)
    return example_inputs


def prunes_outputs(item: Any) -> bool:
    """Whether a pruning-group item removes output channels of its layer (else its input channels)."""
    return item.dep.handler.__name__ == "prune_out_channels"


def has_params(module: Any) -> bool:
    return isinstance(module, nn.Module) and next(module.parameters(recurse=False), None) is not None


def grouped(module: Any) -> bool:
    """A grouped convolution other than a depthwise one (ResNeXt, RegNet): torch-pruning 1.6 removes single
    channels of it unevenly across its groups and breaks the weight."""
    return isinstance(module, nn.modules.conv._ConvNd) and module.groups > 1 and not (
        module.groups == module.in_channels == module.out_channels)


def zero_output_mask(module: nn.Module) -> torch.Tensor | None:
    """Per output channel: does ``module`` output exactly zero there whatever its input? (None: never known)"""
    if isinstance(module, NORM):
        return (module.weight == 0) & (module.bias == 0) if module.affine else None
    if isinstance(module, LINEAR_LIKE):
        rows = (module.weight == 0).flatten(1).all(dim=1)
        return rows if module.bias is None else rows & (module.bias == 0)
    return None


def _outputs_zero(module: nn.Module, idxs: list[int]) -> bool:
    mask = zero_output_mask(module)
    return mask is not None and bool(mask[torch.as_tensor(idxs, dtype=torch.long)].all())


def _ignores_inputs(module: nn.Module, idxs: list[int]) -> bool:
    """Does ``module`` give zero weight to its input channels ``idxs``?"""
    if isinstance(module, LINEAR_LIKE) and getattr(module, "groups", 1) == 1:
        return bool((module.weight[:, torch.as_tensor(idxs, dtype=torch.long)] == 0).all())
    return False


def check_traceable(model: nn.Module, example_inputs: Any) -> None:
    """Raise ValueError if torch-pruning cannot trace ``model`` (a copy of it, in eval mode)."""
    with autograd_on():
        DependencyGraph(copy.deepcopy(model).eval(), example_inputs)


class DependencyGraph:
    """torch-pruning's dependency graph of a plain (gate-free) model, plus which producers are terminal."""

    def __init__(self, model: nn.Module, example_inputs: Any) -> None:
        try:
            with autograd_on():
                self.dg = tp.DependencyGraph().build_dependency(model, example_inputs=normal_tensors(example_inputs))
        except Exception as exc:
            where = traceback.extract_tb(exc.__traceback__)[-1]
            if "torch_pruning" not in where.filename:
                raise  # the model's own forward failed (e.g. inputs of the wrong shape): its error says why
            # e.g. ShuffleNetV2's channel shuffle: a ZeroDivisionError deep in torch-pruning's reshape mapping
            raise ValueError(f"torch-pruning {tp.__version__} cannot trace how the channels of "
                             f"{type(model).__name__} depend on each other ({type(exc).__name__} in {where.name}: "
                             f"{str(exc).splitlines()[0] if str(exc) else 'no message'}), so its channel and neuron "
                             "gates can be neither counted nor exported; parameter gates (kind='parameter') need no "
                             "such graph") from exc
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
                    if has_params(nxt.module):
                        found.add(id(nxt.module))
                    else:
                        stack.append(nxt)
            self._reach[key] = (found, reaches_output)
        return self._reach[key]

    def group(self, owner: nn.Module, inputs: bool, idxs: list[int]):
        """The pruning group of units ``idxs`` of ``owner``: its input features (``inputs``, a dense layer's, for
        a neuron gate) or its output channels."""
        fn = tp.prune_linear_in_channels if inputs else self.dg.get_pruner_of_module(owner).prune_out_channels
        return self.dg.get_pruning_group(owner, fn, idxs=idxs)

    @staticmethod
    def own_units(group, owner: nn.Module, inputs: bool) -> list[int]:
        """The units of ``owner`` itself in ``group``: those coupled to the ones it was built for."""
        return [int(i) for item in group.items if item.dep.target.module is owner
                and prunes_outputs(item) != inputs for i in item.idxs]

    def coupled_units(self, owners: list[tuple[nn.Module, bool, int]]) -> list[Coupled]:
        """The coupled groups of units that the units of ``owners`` (layer, whether its inputs, unit count)
        belong to: each group's layer slices, and its terminal producers unless it can never go.

        One pruning group of all a layer's units gives each unit's slices by their root index, except where
        several of the layer's units map onto one unit elsewhere (features a flatten makes of one channel):
        torch-pruning then keeps one root per slice, so those layers are asked one coupled block at a time.
        """
        parent: dict[tuple[int, bool, int], tuple[int, bool, int]] = {}
        modules: dict[int, nn.Module] = {}
        blocked: set[tuple[int, bool, int]] = set()

        def find(key):
            while parent.setdefault(key, key) != key:
                parent[key] = parent[parent[key]]
                key = parent[key]
            return key

        def add(group) -> None:
            never = self.structure(group) is None
            by_root: dict[int, tuple[int, bool, int]] = {}
            for item in group.items:
                module = item.dep.target.module
                if not has_params(module):
                    continue  # an operation (its slices hold nothing), or a bare parameter: structure() keeps it
                modules[id(module)] = module
                out = prunes_outputs(item)
                for idx, root in zip(item.idxs, item.root_idxs):
                    key = (id(module), out, int(idx))
                    first = by_root.setdefault(int(root), key)
                    parent[find(key)] = find(first)
                    if never:
                        blocked.add(key)

        for owner, inputs, n in owners:
            whole = self.group(owner, inputs, list(range(n)))
            if all(len(set(item.idxs)) >= n for item in whole.items):
                add(whole)
                continue
            decided: set[int] = set()
            for i in range(n):
                if i not in decided:
                    group = self.group(owner, inputs, [i])
                    decided.update(self.own_units(group, owner, inputs) or [i])
                    add(group)
        members: dict[tuple[int, bool, int], list[tuple[int, bool, int]]] = {}
        for key in parent:
            members.setdefault(find(key), []).append(key)
        found = []
        for keys in members.values():
            slices = {(modules[m], out, idx) for m, out, idx in keys}
            if any(key in blocked for key in keys):
                found.append(Coupled(slices, None))
                continue
            producers = {m for m, out, _ in keys if out}
            terminal = {m for m in producers if not self.reach(modules[m])[0] <= producers}
            found.append(Coupled(slices, terminal))
        return found

    @staticmethod
    def has_producer(group) -> bool:
        """Whether a parameterised layer in ``group`` produces the channels (else they are a model input)."""
        return any(has_params(item.dep.target.module) and prunes_outputs(item) for item in group.items)

    def empties_a_layer(self, group) -> bool:
        """Whether pruning ``group`` would remove every output (or input) unit of one of its layers."""
        for item in group.items:
            module = item.dep.target.module
            if not has_params(module):
                continue
            width = self.dg.get_out_channels(module) if prunes_outputs(item) else self.dg.get_in_channels(module)
            if width is not None and len(set(item.idxs)) >= width:
                return True
        return False

    def structure(self, group) -> tuple[list[tuple[nn.Module, list[int]]], list[tuple[nn.Module, list[int]]]] | None:
        """(terminal producers, consumers) of ``group``, each a layer with its unit indices; None where the
        group can never go, whatever its gates (a model input or output, a grouped conv, an uncounted layer)."""
        producers, consumers = [], []
        for item in group.items:
            module = item.dep.target.module
            if not isinstance(module, nn.Module):
                return None  # a bare nn.Parameter (a class token, a layer scale): not counted, so kept
            if not has_params(module):
                continue
            if not isinstance(module, COUNTED) or grouped(module):
                return None
            (producers if prunes_outputs(item) else consumers).append((module, [int(i) for i in item.idxs]))
        if not producers or any(self.reach(m)[1] for m, _ in producers):
            return None  # the model's inputs or outputs: never removed, the interface stays
        in_group = {id(m) for m, _ in producers}
        terminal = [(m, i) for m, i in producers if not self.reach(m)[0] <= in_group]
        return terminal, consumers

    def removable(self, group) -> bool:
        found = self.structure(group)
        if found is None:
            return False
        terminal, consumers = found
        if terminal and all(_outputs_zero(m, i) for m, i in terminal):
            return True
        return bool(consumers) and all(_ignores_inputs(m, i) for m, i in consumers)
