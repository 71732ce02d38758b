"""The hard-concrete distribution (Louizos, Welling, Kingma 2018): the only place its math lives.

Every gate kind in l0core (channels, neurons, single parameters) is a :class:`HardConcrete`
with a different way of applying its gate vector ``z``. :func:`sample_together` and
:func:`prob_nonzero_together` run the same math once over many gates' concatenated ``log_alpha``: a
model's gates then cost a handful of kernels a step, not a handful per gate.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

BETA = 2.0 / 3.0
GAMMA = -0.1
ZETA = 1.1
# Keep u away from 0 and 1 so logit(u) stays finite; the paper uses the same margin.
_EPS = 1e-6


class HardConcrete(nn.Module):
    """``n`` hard-concrete gates with learnable location ``log_alpha`` (shape ``(n,)``).

    Training draws stretched, clamped concrete samples; evaluation uses the deterministic gate, and so does a
    gate after :meth:`freeze`, in either mode. ``log_alpha`` is never clamped, so P(z != 0) can go as low as the
    data asks (the paper code's clamp to [ln 0.01, ln 100] pinned it above ~0.047).

    >>> gate = HardConcrete(4, droprate_init=0.5)
    >>> gate.sample((8,)).shape
    torch.Size([8, 4])
    >>> bool(((gate.deterministic() >= 0) & (gate.deterministic() <= 1)).all())
    True
    """

    def __init__(
        self,
        n: int,
        droprate_init: float = 0.5,
        beta: float = BETA,
        gamma: float = GAMMA,
        zeta: float = ZETA,
    ) -> None:
        super().__init__()
        if not 0.0 < droprate_init < 1.0:
            raise ValueError(f"droprate_init must be in (0, 1), got {droprate_init}")
        if n < 1:
            raise ValueError(f"a gate needs at least one unit, got n={n}")
        if not (gamma < 0.0 and zeta > 1.0 and beta > 0.0):
            raise ValueError(f"need gamma < 0 < 1 < zeta and beta > 0, got {gamma=}, {zeta=}, {beta=}")
        self.n = n
        self.droprate_init = droprate_init
        self.beta, self.gamma, self.zeta = beta, gamma, zeta
        self.log_alpha = nn.Parameter(torch.empty(n))
        # This forward pass's draw, shared by every use of the gate in the pass (set by placement's hooks).
        self.current: torch.Tensor | None = None
        # The last draw made for a whole model's pass, kept for activation checkpointing: a checkpointed block
        # recomputed during backward must see the z its forward saw, which was drawn outside the block.
        self.drawn_for_pass: torch.Tensor | None = None
        self.frozen = False
        self.reset_parameters()

    def __getstate__(self) -> dict:
        # A pass's draws belong to that pass's autograd graph: copies and pickles start without them
        # (deepcopy refuses tensors that are not graph leaves).
        return {**self.__dict__, "current": None, "drawn_for_pass": None}

    def __setstate__(self, state: dict) -> None:
        # pickles from before these existed
        super().__setstate__({"current": None, "drawn_for_pass": None, "frozen": False, **state})

    def train(self, mode: bool = True) -> HardConcrete:
        # A frozen gate stays in evaluation mode when its model trains: model.train() reaches every submodule.
        return super().train(mode and not self.frozen)

    def freeze(self) -> HardConcrete:
        """Fix the gate at its deterministic value for good: no draws in training either, and ``log_alpha`` no
        longer trained (its ``requires_grad`` off). What is left to train is the network's weights under fixed
        gates, as after pruning.

        >>> gate = HardConcrete(3).freeze()
        >>> gate.train().training, torch.equal(gate.gate(), gate.deterministic())
        (False, True)
        """
        self.frozen = True
        self.log_alpha.requires_grad_(False)
        return self.train(False)

    def reset_parameters(self) -> None:
        d = self.droprate_init
        nn.init.normal_(self.log_alpha, math.log(1.0 - d) - math.log(d), 1e-2)

    def sample(self, batch_shape: tuple[int, ...] | torch.Size = ()) -> torch.Tensor:
        """Reparameterised training sample of shape ``(*batch_shape, n)``, noise drawn on log_alpha's device."""
        return _sample(self.log_alpha, batch_shape, self.beta, self.gamma, self.zeta)

    def deterministic(self) -> torch.Tensor:
        """The evaluation gate: exactly 0 for log_alpha < -2.398, exactly 1 above 2.398, fractional between."""
        return _stretch(torch.sigmoid(self.log_alpha), self.gamma, self.zeta)

    def prob_nonzero(self) -> torch.Tensor:
        """Closed-form P(z != 0) per gate: the differentiable expected L0 norm. A frozen gate is no longer random:
        its probability is 1 where its deterministic gate is open, else 0."""
        if self.frozen:
            return (self.deterministic() > 0).to(self.log_alpha.dtype)
        return _prob_nonzero(self.log_alpha, self.beta, self.gamma, self.zeta)

    def gate(self, batch_shape: tuple[int, ...] | torch.Size = ()) -> torch.Tensor:
        """A sample in training mode (this forward pass's ``current`` draw, if one was made for the whole
        pass and no batch shape is asked for; in a recomputation during backward, the pass's draw), the
        deterministic gate in evaluation mode."""
        if not self.training:
            return self.deterministic()
        if not batch_shape:
            if self.current is not None:
                return self.current
            if self.drawn_for_pass is not None:
                if recomputing():
                    return self.drawn_for_pass
                self.drawn_for_pass = None  # a draw of this call's own, which a recomputation makes again alike
        return self.sample(batch_shape)

    def extra_repr(self) -> str:
        return f"n={self.n}, droprate_init={self.droprate_init}"


def recomputing() -> bool:
    """Whether this forward runs inside a backward pass: the recomputation of an activation-checkpointed block
    (``torch.utils.checkpoint(..., use_reentrant=False)``; the legacy reentrant kind is not supported: it runs
    its own backward through the reused draw). torch's checkpoint asks the same question this way."""
    return torch._C._current_graph_task_id() != -1


def _stretch(s: torch.Tensor, gamma: float, zeta: float) -> torch.Tensor:
    # hardtanh is clamp to [0, 1] with a one-kernel backward (clamp's takes three passes over a
    # per-example (N, n) sample); they differ only at exactly 0 or 1, where hardtanh passes no gradient.
    return F.hardtanh(s.mul(zeta - gamma).add_(gamma), 0.0, 1.0)


def _sample(log_alpha: torch.Tensor, batch_shape: tuple[int, ...] | torch.Size, beta: float, gamma: float,
            zeta: float) -> torch.Tensor:
    u = torch.rand(*batch_shape, log_alpha.shape[-1], device=log_alpha.device, dtype=log_alpha.dtype)
    # logit(u) = log u - log(1-u): logistic noise in one kernel; in place, no temporaries of the sample's size.
    return _stretch(torch.sigmoid(torch.logit(u, eps=_EPS).add_(log_alpha).div_(beta)), gamma, zeta)


def _prob_nonzero(log_alpha: torch.Tensor, beta: float, gamma: float, zeta: float) -> torch.Tensor:
    return torch.sigmoid(log_alpha - beta * math.log(-gamma / zeta))


def _concatenated(gates: Sequence[HardConcrete]) -> torch.Tensor | None:
    """The gates' log_alpha end to end, or None when one pass cannot serve them all (different
    temperatures or stretch, devices or dtypes)."""
    if len(gates) == 1:
        return gates[0].log_alpha
    first = gates[0]
    log_alphas = [g.log_alpha for g in gates]  # each read once: a module attribute lookup is not free every step
    constants, device, dtype = (first.beta, first.gamma, first.zeta), log_alphas[0].device, log_alphas[0].dtype
    if any((g.beta, g.gamma, g.zeta) != constants for g in gates) or \
            any(la.device != device or la.dtype != dtype for la in log_alphas):
        return None
    return torch.cat(log_alphas)


def sample_together(gates: Sequence[HardConcrete], batch_shape: tuple[int, ...] | torch.Size = ()) -> list[torch.Tensor]:
    """One training sample per gate, as :meth:`HardConcrete.sample` draws it, in one pass over all of them.

    Same distribution and gradients as sampling each gate on its own; the kernels run once instead of once
    per gate (on a GPU, each is a launch that a small network's step waits for). Falls back to one pass per
    gate where their constants, devices or dtypes differ.

    >>> a, b = HardConcrete(3), HardConcrete(5)
    >>> [tuple(z.shape) for z in sample_together([a, b], (2,))]
    [(2, 3), (2, 5)]
    """
    if not gates:
        return []
    log_alpha = _concatenated(gates)
    if log_alpha is None:
        return [g.sample(batch_shape) for g in gates]
    first = gates[0]
    z = _sample(log_alpha, batch_shape, first.beta, first.gamma, first.zeta)
    return list(z.split([g.n for g in gates], dim=-1)) if len(gates) > 1 else [z]


def prob_nonzero_together(gates: Sequence[HardConcrete]) -> torch.Tensor:
    """Every gate's P(z != 0), end to end in the order given, in one pass (see :func:`sample_together`).

    >>> prob_nonzero_together([HardConcrete(3), HardConcrete(5)]).shape
    torch.Size([8])
    """
    if not gates:
        raise ValueError("no gates given")
    log_alpha = None if any(g.frozen for g in gates) else _concatenated(gates)
    if log_alpha is None:
        return torch.cat([g.prob_nonzero() for g in gates])
    first = gates[0]
    return _prob_nonzero(log_alpha, first.beta, first.gamma, first.zeta)
