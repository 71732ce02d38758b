"""Gate kinds: what a hard-concrete gate vector multiplies.

- :class:`ChannelGate` / :class:`NeuronGate` scale whole units of an activation (dim 1 of ``(N, C, ...)``).
- :class:`ParameterGate` scales single elements of a weight, through ``torch.nn.utils.parametrize``.

All three are :class:`~l0core.hard_concrete.HardConcrete`; they differ only in how ``z`` is applied.
Each carries ``unit_cost``: how many model parameters one unit governs, which the penalty and the
sparsity report weigh it by.
"""
from __future__ import annotations

import torch

from .hard_concrete import HardConcrete


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
        unit_cost: float = 1.0,
        **hard_concrete: float,
    ) -> None:
        super().__init__(num_units, droprate_init, **hard_concrete)
        self.per_sample = per_sample
        self.current: torch.Tensor | None = None  # this forward pass's z, when applied through parameters
        self.register_buffer("unit_cost", torch.full((num_units,), float(unit_cost)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() < 2 or x.shape[1] != self.n:
            raise ValueError(f"{type(self).__name__}({self.n}) got an input of shape {tuple(x.shape)}: "
                             f"dim 1 must have {self.n} units")
        trailing = (1,) * (x.dim() - 2)
        if self.training and self.per_sample:
            z = self.sample((x.shape[0],)).view(x.shape[0], self.n, *trailing)
        else:
            z = self.gate().view(self.n, *trailing)
        return x * z.to(x.dtype)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", per_sample={self.per_sample}"


class ChannelGate(UnitGate):
    """Gates output channels of a convolution: multiplies ``(N, C, H, W)`` channel-wise.

    >>> gate = ChannelGate(16, per_sample=True)
    >>> gate(torch.ones(8, 16, 4, 4)).shape
    torch.Size([8, 16, 4, 4])
    """

    kind = "channel"


class NeuronGate(UnitGate):
    """Gates features of a dense layer's input ``(N, D)`` (the paper's input-unit gates, the TF seed's l0_layer).

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
        self.register_buffer("unit_cost", torch.ones(shape.numel()))

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight * self.gate().view(self.shape).to(weight.dtype)

    def extra_repr(self) -> str:
        return f"shape={tuple(self.shape)}, droprate_init={self.droprate_init}"
