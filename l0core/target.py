"""Controlling sparsity directly: a Lagrangian on the expected sparsity (CoFiPruning, Sheared-LLaMA), and an
exact top-k at export.

With ``s_hat = 1 - expected_kept(model) / count_parameters(model)`` and a target ``t`` ramped up from 0 over a
warm-up, the term added to the task loss is

    l1 * (s_hat - t) + l2 * (s_hat - t)^2

whose multipliers ``l1`` and ``l2`` are trained by gradient *ascent* (an optimizer with ``maximize=True``): while
the model is denser than the target, ``l1`` goes negative and the term rewards removing parameters, and the
other way round. Its slope in ``s_hat`` is ``l1 + 2 * l2 * (s_hat - t)``; the penalty
``lam * expected_kept / count_parameters = lam * (1 - s_hat)`` has slope ``-lam``, so the lambda this target
costs (:attr:`SparsityTarget.effective_lambda`, on the scale of docs/lambda-and-sparsity.md) is
``-(l1 + 2 * l2 * (s_hat - t))``.

:func:`keep_exactly` makes the deterministic gates keep exactly a share of the parameters (to one unit), by the
top-k of ``log_alpha`` over all gates. :meth:`SparsityTarget.decide` does that at the target and freezes the gates,
so that the training left fine-tunes the weights of a model that already has the target's size (the Lagrangian
steers the *expected* sparsity, which the deterministic gates can miss by points while many gates are undecided).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .costs import expected_fraction_kept, gates_and_size, kept_counter, require_gates
from .kinds import freeze_gates

# log_alpha written into gates keep_exactly decides: far below the closing point (-2.398), and just above it
# (the smallest positive deterministic gate, about 0.01: a unit opened only to reach the target barely acts).
_CLOSED_LOG_ALPHA = -10.0
_BARELY_OPEN_LOG_ALPHA = -2.3


def expected_sparsity(model: nn.Module) -> torch.Tensor:
    """``1 - expected_kept(model) / count_parameters(model)`` (differentiable).

    >>> from l0core import attach
    >>> net = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    >>> _ = attach(net, "neuron", droprate_init=0.01, example_inputs=torch.randn(1, 4))
    >>> round(expected_sparsity(net).item(), 2)  # every gate open
    0.0
    """
    return 1.0 - expected_fraction_kept(model)


@dataclass
class ExactKeep:
    """What :func:`keep_exactly` changed: units it closed that the deterministic gates kept, units it opened
    that they closed, and the sparsity before and after."""

    closed: int
    opened: int
    sparsity_before: float
    sparsity_after: float


class SparsityTarget(nn.Module):
    """The Lagrangian term that steers a gated model's expected sparsity to ``target``.

    ``warmup_steps``: the target rises linearly from 0 to ``target`` over this many calls of :meth:`step` (one
    per optimizer step), then stays. The multipliers ``l1``, ``l2`` are this module's parameters: train them
    with :meth:`optimizer` (gradient ascent), not with the model's optimizer.

    >>> from l0core import attach
    >>> net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))
    >>> _ = attach(net, "neuron", droprate_init=0.01, example_inputs=torch.randn(1, 8))  # dense to start
    >>> target = SparsityTarget(0.8, warmup_steps=10)
    >>> opt, multipliers = torch.optim.Adam(net.parameters(), 0.01), target.optimizer(lr=0.05)
    >>> for _ in range(3):
    ...     loss = net(torch.randn(4, 8)).pow(2).mean() + target(net)
    ...     opt.zero_grad(); multipliers.zero_grad(); loss.backward(); opt.step(); multipliers.step()
    ...     target.step()
    >>> round(target.current_target, 3)  # 3 of 10 warm-up steps: 30% of the way to 0.8
    0.24
    >>> target.effective_lambda > 0  # denser than the target: the term pays for removing parameters
    True
    """

    def __init__(self, target: float, warmup_steps: int = 0) -> None:
        super().__init__()
        if not 0.0 < target < 1.0:
            raise ValueError(f"target sparsity must lie in (0, 1), got {target}")
        if warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
        self.target = float(target)
        self.warmup_steps = int(warmup_steps)
        self.steps = 0
        self.l1 = nn.Parameter(torch.zeros(()))
        self.l2 = nn.Parameter(torch.zeros(()))
        # The last expected sparsity seen (detached, left on its device: reading it every step would sync a GPU).
        self.last_sparsity: torch.Tensor | None = None
        self.decided: ExactKeep | None = None  # what decide() changed, once called

    @property
    def current_target(self) -> float:
        """The target now: ``target * steps / warmup_steps`` during the warm-up, then ``target``."""
        if self.steps >= self.warmup_steps:
            return self.target
        return self.target * self.steps / self.warmup_steps

    def step(self) -> None:
        """Advance the warm-up by one optimizer step."""
        self.steps += 1

    def forward(self, model: nn.Module) -> torch.Tensor:
        """``l1 * (s_hat - t) + l2 * (s_hat - t)^2`` for ``model`` now (add it to the task loss); 0 once decided."""
        if self.decided is not None:
            return torch.zeros((), device=self.l1.device)
        s_hat = expected_sparsity(model)
        self.last_sparsity = s_hat.detach()
        gap = s_hat - self.current_target
        return self.l1.to(gap.dtype) * gap + self.l2.to(gap.dtype) * gap * gap

    @property
    def effective_lambda(self) -> float:
        """The lambda (``penalty``'s scale) the term acts as now: ``-(l1 + 2 * l2 * (s_hat - t))``, with ``s_hat``
        the expected sparsity of the last call (``t`` alone before any). Positive: it pays for removing
        parameters; negative: for keeping them."""
        gap = float(self.last_sparsity) - self.current_target if self.last_sparsity is not None else 0.0
        return -(self.l1.item() + 2.0 * self.l2.item() * gap)

    def optimizer(self, lr: float) -> torch.optim.Optimizer:
        """Adam over ``l1`` and ``l2`` with ``maximize=True``: gradient ascent, with a positive learning rate."""
        return torch.optim.Adam(self.parameters(), lr=lr, maximize=True)

    def decide(self, model: nn.Module) -> ExactKeep:
        """End the steering: ``model``'s gates keep exactly the target's share of the parameters
        (:func:`keep_exactly`) and are frozen (:func:`l0core.freeze_gates`). From then on the term is 0, the
        model trains its weights alone, and :attr:`effective_lambda` stays what it was.

        >>> from l0core import attach, sparsity as report
        >>> net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))
        >>> x = torch.randn(1, 8)
        >>> _ = attach(net, "neuron", example_inputs=x)
        >>> change = SparsityTarget(0.5).decide(net)
        >>> abs(report(net, x).sparsity - 0.5) <= 11 / 178, net.train()[0].l0_gate.training
        (True, False)
        """
        self.decided = keep_exactly(model, self.target)
        freeze_gates(model)
        return self.decided


def _sparsity_of(counter, keep: torch.Tensor, size: int) -> float:
    return 1.0 - float(counter(keep)) / size


def keep_exactly(model: nn.Module, sparsity: float) -> ExactKeep:
    """Decide every gate of ``model`` (in place) so that its deterministic gates remove ``sparsity`` of its
    parameters as closely as one unit allows: the units with the largest ``log_alpha``, over all gates, stay.

    Kept units keep their deterministic gate (folded into the weights at export); units beyond the cut are
    closed, and units the gates had closed but the cut keeps get the smallest open gate (about 0.01). Counted
    as :func:`l0core.expected_kept` counts, so with example inputs given to ``attach`` (or
    :func:`l0core.measure_couplings`) the result is :func:`l0core.compact`'s size.

    >>> from l0core import attach, sparsity as report
    >>> net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))
    >>> x = torch.randn(1, 8)
    >>> _ = attach(net, "neuron", example_inputs=x)
    >>> change = keep_exactly(net, 0.5)
    >>> abs(report(net, x).sparsity - 0.5) <= 11 / 178  # one hidden unit holds 8 + 1 + 2 of 178 parameters
    True
    """
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must lie in [0, 1), got {sparsity}")
    found, size = gates_and_size(model)
    counter = kept_counter(model, require_gates(found))
    with torch.no_grad():
        log_alpha = torch.cat([g.log_alpha.detach().reshape(-1) for g in counter.gates]).double().cpu()
        was_open = torch.cat([g.deterministic().detach().reshape(-1) > 0 for g in counter.gates]).cpu()
        before = _sparsity_of(counter, was_open.double(), size)
        order = torch.argsort(log_alpha, descending=True, stable=True)

        def keeping(m: int) -> torch.Tensor:
            keep = torch.zeros_like(log_alpha)
            keep[order[:m]] = 1.0
            return keep

        # Sparsity falls as more units are kept: the fewest kept units whose sparsity is <= the target, or one
        # fewer, whichever lands nearer.
        lo, hi = 0, len(order)
        while lo < hi:
            mid = (lo + hi) // 2
            if _sparsity_of(counter, keeping(mid), size) <= sparsity:
                hi = mid
            else:
                lo = mid + 1
        best = lo
        if lo > 0 and abs(_sparsity_of(counter, keeping(lo - 1), size) - sparsity) < \
                abs(_sparsity_of(counter, keeping(lo), size) - sparsity):
            best = lo - 1
        keep = keeping(best).bool()
        start = 0
        for gate in counter.gates:
            mine, opened = keep[start:start + gate.n], was_open[start:start + gate.n]
            la = gate.log_alpha.detach().reshape(-1).clone()
            la[~mine.to(la.device)] = _CLOSED_LOG_ALPHA
            la[(mine & ~opened).to(la.device)] = _BARELY_OPEN_LOG_ALPHA
            gate.log_alpha.copy_(la.view_as(gate.log_alpha))
            start += gate.n
        return ExactKeep(closed=int((was_open & ~keep).sum()), opened=int((keep & ~was_open).sum()),
                         sparsity_before=before, sparsity_after=_sparsity_of(counter, keep.double(), size))
