"""How a gate's ``z`` reaches the network: the hooks and the parametrization l0core registers.

Each is an object of a :class:`GateHook` class that knows its gate, so :func:`l0core.fold` finds l0core's own
hooks by type (as ``torch.nn.utils.prune`` finds its ``BasePruningMethod`` hooks) and leaves the user's alone.

- :class:`GateOutput` / :class:`GateInput`: multiply a module's output / first input by ``z``.
- :class:`GateAfterRelu`: ``relu(x) * z`` on the ReLU that follows the gated layer (per-example gates).
- :class:`DrawGate` / :class:`ForgetGate`: one draw per pass for a gate applied through :class:`ScaleUnits`.
- :class:`DrawTogether` / :class:`ForgetTogether`: on the gated model itself, the draw of all its once-per-batch
  gates in one pass over their concatenated ``log_alpha``.
- :class:`RefreshFlatWeights` / :class:`RestoreFlatWeights`: recurrent layers read their weights from a list
  made at construction; with gated weights that list must hold the gated tensors during each pass.
"""
from __future__ import annotations

import torch
from torch import nn

from .hard_concrete import HardConcrete, sample_together
from .kinds import UnitGate, gate_modules


class GateHook:
    """A forward (pre-)hook registered by l0core. ``gate``: the gate it applies (None for model-wide hooks)."""

    gate: UnitGate | None = None

    def folds_into(self, module: nn.Module) -> nn.Module | None:
        """The module whose parameters absorb this hook's gate when folded (``module``: where the hook is
        registered); None where the hook applies no gate of its own."""
        return None


class GateOutput(GateHook):
    """Forward hook: the module's output times ``z``."""

    def __init__(self, gate: UnitGate) -> None:
        self.gate = gate

    def __call__(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        return self.gate(output)

    def folds_into(self, module: nn.Module) -> nn.Module:
        return module


class GateInput(GateHook):
    """Forward pre-hook: the module's first input times ``z`` (a dense layer's input features)."""

    def __init__(self, gate: UnitGate) -> None:
        self.gate = gate

    def __call__(self, module: nn.Module, args: tuple) -> tuple:
        return (self.gate(args[0]), *args[1:])

    def folds_into(self, module: nn.Module) -> nn.Module:
        return module


class GateAfterRelu(GateHook):
    """Forward hook on a ReLU: ``relu(x) * z`` for the gate of ``target``, the layer before the ReLU.

    Connected to the graph through the ReLU's input, so the ReLU's node (and the output it saved) is dropped.
    """

    def __init__(self, gate: UnitGate, target: nn.Module) -> None:
        self.gate = gate
        self.target = target

    def __call__(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        return self.gate.relu_then_gate(args[0], output)

    def folds_into(self, module: nn.Module) -> nn.Module:
        return self.target


class DrawGate(GateHook):
    """Forward pre-hook: one draw for the whole pass, shared by the weight and bias that :class:`ScaleUnits`
    scales. Folding needs nothing more: unparametrizing in eval mode bakes ``z`` in."""

    def __init__(self, gate: UnitGate) -> None:
        self.gate = gate

    def __call__(self, module: nn.Module, args: tuple) -> None:
        self.gate.current = self.gate.gate()

    def folds_into(self, module: nn.Module) -> nn.Module:
        return module


class ForgetGate(GateHook):
    """Forward hook (always called): the pass's draw of a :class:`DrawGate` is dropped after the pass."""

    def __init__(self, gate: UnitGate) -> None:
        self.gate = gate

    def __call__(self, module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        self.gate.current = None


class DrawTogether(GateHook):
    """Forward pre-hook of a gated model: this pass's draw of every once-per-batch gate in it, in one pass.

    ``drawn`` keeps the gates drawn, so the :class:`ForgetTogether` after the pass touches those and does not
    walk the model again.
    """

    def __init__(self) -> None:
        self.drawn: list[HardConcrete] = []

    def __call__(self, model: nn.Module, args: tuple) -> None:
        if not model.training:
            return
        self.drawn[:] = [g for g in gate_modules(model)
                         if g.training and g.current is None and not getattr(g, "per_sample", False)]
        if self.drawn:
            for gate, z in zip(self.drawn, sample_together(self.drawn)):
                gate.current = gate.drawn_for_pass = z


class ForgetTogether(GateHook):
    """Forward hook (always called) of a gated model: forgets what its :class:`DrawTogether` drew."""

    def __init__(self, draw: DrawTogether) -> None:
        self.draw = draw

    def __call__(self, model: nn.Module, args: tuple, output: torch.Tensor) -> None:
        for gate in self.draw.drawn:
            gate.current = None
        self.draw.drawn.clear()


class RefreshFlatWeights(GateHook):
    """Forward pre-hook of an ``nn.RNNBase`` with gated weights: its forward reads ``_flat_weights``, a list
    taken at construction, which would bypass the parametrization. The gated tensors go in for the pass."""

    def __call__(self, module: nn.Module, args: tuple) -> None:
        module._flat_weights = [getattr(module, name) if hasattr(module, name) else None
                                for name in module._flat_weights_names]


class RestoreFlatWeights(GateHook):
    """Forward hook (always called) after :class:`RefreshFlatWeights`: the stored tensors go back, since a pass's
    gated tensors belong to its autograd graph (and a module holding them cannot be copied)."""

    def __call__(self, module: nn.Module, args: tuple, output: object) -> None:
        stored = module.parametrizations if hasattr(module, "parametrizations") else {}
        module._flat_weights = [stored[name].original if name in stored else getattr(module, name, None)
                                for name in module._flat_weights_names]


def draw_gates_together(model: nn.Module) -> None:
    """Hook :class:`DrawTogether` (and the forgetting after the pass) onto ``model``, once."""
    if not any(isinstance(h, DrawTogether) for h in model._forward_pre_hooks.values()):
        draw = DrawTogether()
        model.register_forward_pre_hook(draw)
        model.register_forward_hook(ForgetTogether(draw), always_call=True)


class ScaleUnits(nn.Module):
    """Parametrization: a layer's weight (or bias) with its output units scaled by a gate's ``z``.

    ``layer(x; w * z, b * z) == layer(x; w, b) * z`` per output unit, for a conv and for a BatchNorm's
    affine parameters. Inside a forward pass ``z`` is that pass's draw; outside it, the deterministic gate.
    """

    def __init__(self, gate: UnitGate) -> None:
        super().__init__()
        self._gate = [gate]  # a reference, not a submodule: the gate lives, and is saved, on its conv

    @property
    def gate(self) -> UnitGate:
        return self._gate[0]

    def forward(self, tensor: torch.Tensor) -> torch.Tensor:
        z = self.gate.current if self.gate.current is not None else self.gate.deterministic()
        return tensor * z.view(-1, *(1,) * (tensor.dim() - 1)).to(tensor.dtype)
