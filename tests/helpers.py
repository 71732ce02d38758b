"""Small models and gate states shared by the tests."""
from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import parametrize

import l0core


class TinyInception(nn.Module):
    """Two conv branches concatenated, then a conv and a classifier: the shape of a GoogleNet block."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.b1 = nn.Sequential(nn.Conv2d(8, 6, 1), nn.BatchNorm2d(6), nn.ReLU())
        self.b2 = nn.Sequential(nn.Conv2d(8, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())
        self.mix = nn.Sequential(nn.Conv2d(10, 12, 3, padding=1), nn.BatchNorm2d(12), nn.ReLU())
        self.head = nn.Linear(12, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = torch.cat([self.b1(x), self.b2(x)], dim=1)
        x = self.mix(x)
        return self.head(x.mean(dim=(2, 3)))


def set_gate_states(model: nn.Module, p_off: float = 0.4, p_frac: float = 0.2, seed: int = 0) -> None:
    """Random gate states: some closed (z=0), some fractional (0<z<1), the rest open (z=1)."""
    rng = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, gate in l0core.gates(model):
            r = torch.rand(gate.n, generator=rng)
            la = torch.full((gate.n,), 5.0)
            la[r < p_off] = -5.0
            la[(r >= p_off) & (r < p_off + p_frac)] = 0.3
            gate.log_alpha.copy_(la)


def randomize_batchnorm(model: nn.Module) -> None:
    """Non-trivial BN statistics and affine parameters, so folding mistakes would show."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                if m.affine:  # the stored tensors: a per-batch channel gate may scale the BatchNorm's own
                    _stored(m, "weight").uniform_(0.5, 1.5)
                    _stored(m, "bias").uniform_(-0.5, 0.5)


def _stored(module: nn.Module, name: str) -> torch.Tensor:
    return module.parametrizations[name].original if parametrize.is_parametrized(module, name) else getattr(module, name)


def tiny_dataset(n: int = 120):
    """A user's dataset factory: (train, test) datasets of 1x12x12 images, 3 classes."""
    from torch.utils.data import TensorDataset

    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 3, (n,), generator=g)
    x = torch.randn(n, 1, 12, 12, generator=g) + y.view(-1, 1, 1, 1).float()
    return TensorDataset(x[:100], y[:100]), TensorDataset(x[100:], y[100:])
