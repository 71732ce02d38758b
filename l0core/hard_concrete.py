"""The hard-concrete distribution (Louizos, Welling, Kingma 2018): the only place its math lives.

Every gate kind in l0core (channels, neurons, single parameters) is a :class:`HardConcrete`
with a different way of applying its gate vector ``z``.
"""
from __future__ import annotations

import math

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

    Training draws stretched, clamped concrete samples; evaluation uses the deterministic gate.
    ``log_alpha`` is never clamped, so P(z != 0) can go as low as the data asks (the paper code's
    clamp to [ln 0.01, ln 100] pinned it above ~0.047).

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
        self.reset_parameters()

    def reset_parameters(self) -> None:
        d = self.droprate_init
        nn.init.normal_(self.log_alpha, math.log(1.0 - d) - math.log(d), 1e-2)

    def _stretch(self, s: torch.Tensor) -> torch.Tensor:
        # hardtanh is clamp to [0, 1] with a one-kernel backward (clamp's takes three passes over a
        # per-example (N, n) sample); they differ only at exactly 0 or 1, where hardtanh passes no gradient.
        return F.hardtanh(s.mul(self.zeta - self.gamma).add_(self.gamma), 0.0, 1.0)

    def sample(self, batch_shape: tuple[int, ...] | torch.Size = ()) -> torch.Tensor:
        """Reparameterised training sample of shape ``(*batch_shape, n)``, noise drawn on log_alpha's device."""
        la = self.log_alpha
        u = torch.rand(*batch_shape, self.n, device=la.device, dtype=la.dtype)
        # logit(u) = log u - log(1-u): logistic noise in one kernel; in place, no temporaries of the sample's size.
        s = torch.sigmoid(torch.logit(u, eps=_EPS).add_(la).div_(self.beta))
        return self._stretch(s)

    def deterministic(self) -> torch.Tensor:
        """The evaluation gate: exactly 0 for log_alpha < -2.398, exactly 1 above 2.398, fractional between."""
        return self._stretch(torch.sigmoid(self.log_alpha))

    def prob_nonzero(self) -> torch.Tensor:
        """Closed-form P(z != 0) per gate: the differentiable expected L0 norm."""
        return torch.sigmoid(self.log_alpha - self.beta * math.log(-self.gamma / self.zeta))

    def gate(self, batch_shape: tuple[int, ...] | torch.Size = ()) -> torch.Tensor:
        """A sample in training mode, the deterministic gate in evaluation mode."""
        if self.training:
            return self.sample(batch_shape)
        return self.deterministic()

    def extra_repr(self) -> str:
        return f"n={self.n}, droprate_init={self.droprate_init}"
