"""Gate kinds: what a hard-concrete gate vector multiplies.

- :class:`ChannelGate` / :class:`NeuronGate` scale whole units of an activation (dim 1 of ``(N, C, ...)``).
- :class:`ParameterGate` scales single elements of a weight, through ``torch.nn.utils.parametrize``.

All three are :class:`~l0core.hard_concrete.HardConcrete`; they differ only in how ``z`` is applied. Which
parameters each one governs is worked out where they are counted (:mod:`l0core.costs`), not stored on the gate.
"""
from __future__ import annotations

import torch
from torch import nn

from .hard_concrete import HardConcrete

# Where attach puts a structured gate: on the module whose units it governs, so it travels with its state dict.
GATE_ATTR = "l0_gate"
# Where l0core.costs keeps, on a gated model, its count of which gates govern each parameter.
COUNTER_ATTR = "_l0_kept_counter"


class UnitGate(HardConcrete):
    """Gates the units on dim 1 of an activation ``(N, C, *spatial)``.

    ``per_sample=True`` draws an independent gate per example in training (``(N, C)`` noise, never a
    per-example copy of any weight); otherwise one draw serves the whole batch.
    """

    kind = "unit"

    def __init__(
        self,
        num_units: int,
        droprate_init: float = 0.5,
        per_sample: bool = False,
        **hard_concrete: float,
    ) -> None:
        super().__init__(num_units, droprate_init, **hard_concrete)
        self.per_sample = per_sample

    def _z_for(self, x: torch.Tensor) -> torch.Tensor:
        """This pass's ``z``, shaped to broadcast over ``x``: ``(N, C, 1, ...)`` per example, else ``(C, 1, ...)``."""
        if x.dim() < 2 or x.shape[1] != self.n:
            raise ValueError(f"{type(self).__name__}({self.n}) got an input of shape {tuple(x.shape)}: "
                             f"dim 1 must have {self.n} units")
        trailing = (1,) * (x.dim() - 2)
        if self.training and self.per_sample:
            return self.sample((x.shape[0],)).view(x.shape[0], self.n, *trailing).to(x.dtype)
        return self.gate().view(self.n, *trailing).to(x.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self._z_for(x)

    def relu_then_gate(self, x: torch.Tensor, relu_x: torch.Tensor | None = None) -> torch.Tensor:
        """``relu(x) * z``, which equals ``relu(x * z)`` because ``z >= 0``: the gate fused with the ReLU after it.

        Per-example gates keep only the output for backward (the ReLU's own saved output, in effect), so
        they cost no second copy of the activation. ``relu_x``: ``relu(x)`` when already computed (by the ReLU
        module this gate is fused with), to spare a pass.

        >>> ChannelGate(3, per_sample=True).relu_then_gate(-torch.ones(2, 3, 4, 4)).abs().sum().item()
        0.0
        """
        z = self._z_for(x)
        relu_x = torch.relu(x) if relu_x is None else relu_x
        if z.dim() == x.dim():  # per example
            return _ReluThenScale.apply(x, z, relu_x.detach())
        return relu_x * z

    def extra_repr(self) -> str:
        return super().extra_repr() + f", per_sample={self.per_sample}"


class _ReluThenScale(torch.autograd.Function):
    """``y = relu(x) * z`` with ``z >= 0`` of shape ``(N, C, 1, ...)``, saving only ``y`` and ``z``.

    Takes ``relu(x)`` ready-made (detached: its gradient is computed here, from ``y``) and scales it in
    place: the ReLU that made it is dropped from the graph, so nothing else reads it.

    Where ``z > 0``, ``relu(x) = y / z`` and ``x > 0`` exactly where ``y > 0``. Where ``z == 0`` the input
    gets no gradient either way, and ``z``'s own gradient is never used: the clamp that made it 0 passes
    none back to ``log_alpha``.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, z: torch.Tensor, relu_x: torch.Tensor) -> torch.Tensor:
        y = relu_x.mul_(z)
        ctx.save_for_backward(y, z)
        return y

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None]:
        y, z = ctx.saved_tensors
        # Per (example, unit): sum over positions of grad * y; vecdot, which is faster than a batched matmul of
        # the (N*C) little dot products and frees its temporary at once.
        dot = torch.linalg.vecdot(grad.flatten(2), y.flatten(2)).view_as(z)
        grad_z = torch.where(z > 0, dot / z, 0.0)
        grad_x = torch.ops.aten.threshold_backward(grad, y, 0).mul_(z)  # ReLU's own backward kernel
        return grad_x, grad_z, None


class ChannelGate(UnitGate):
    """Gates output channels of a convolution: multiplies ``(N, C, H, W)`` channel-wise.

    >>> gate = ChannelGate(16, per_sample=True)
    >>> gate(torch.ones(8, 16, 4, 4)).shape
    torch.Size([8, 16, 4, 4])
    """

    kind = "channel"


class NeuronGate(UnitGate):
    """Gates features of a dense layer's input ``(N, D)`` (the paper's input-unit gates).

    >>> NeuronGate(300).eval()(torch.ones(2, 300)).shape
    torch.Size([2, 300])
    """

    kind = "neuron"


class ParameterGate(HardConcrete):
    """One gate per element of a weight tensor; a ``torch.nn.utils.parametrize`` parametrization.

    One mask is drawn per forward pass (per-example masks would need per-example weight copies).
    Use :func:`l0core.gate_parameters` rather than registering it by hand.
    """

    kind = "parameter"

    def __init__(self, shape: torch.Size | tuple[int, ...], droprate_init: float = 0.5, **hard_concrete: float):
        shape = torch.Size(shape)
        super().__init__(shape.numel(), droprate_init, **hard_concrete)
        self.shape = shape

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight * self.gate().view(self.shape).to(weight.dtype)

    def extra_repr(self) -> str:
        return f"shape={tuple(self.shape)}, droprate_init={self.droprate_init}"


def gates(model: nn.Module) -> list[tuple[str, HardConcrete]]:
    """Every gate in ``model`` with its qualified name."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, HardConcrete)]


def gate_modules(model: nn.Module) -> list[HardConcrete]:
    """Every gate in ``model``, without names: for what runs every step (building the names costs more)."""
    return [m for m in model.modules() if isinstance(m, HardConcrete)]


def freeze_gates(model: nn.Module) -> int:
    """Freeze every gate of ``model`` (:meth:`HardConcrete.freeze`): from now on the model trains its weights under
    its deterministic gates. Returns how many gates were frozen.

    >>> from l0core import attach
    >>> net = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    >>> _ = attach(net, "neuron", example_inputs=torch.randn(1, 4))
    >>> freeze_gates(net), any(p.requires_grad for n, p in net.named_parameters() if "log_alpha" in n)
    (2, False)
    """
    found = gate_modules(model)
    for gate in found:
        gate.freeze()
    return len(found)
