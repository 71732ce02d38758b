"""l0core: hard-concrete L0 gates for PyTorch (Louizos, Welling, Kingma 2018).

>>> import torch, l0core
>>> net = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10))
>>> gated = l0core.attach(net, "neuron")            # gates on each dense layer's inputs
>>> loss = net(torch.randn(8, 64)).logsumexp(1).mean() + l0core.penalty(net, lam=0.1)
>>> report = l0core.sparsity(net, torch.randn(1, 64))
>>> small = l0core.compact(net, torch.randn(1, 64))  # plain, physically smaller model
"""
from .accounting import LayerReport, SparsityReport, count_flops, measure_unit_costs, sparsity
from .placement import Gated, attach, gate_parameters, gates
from .export import compact, fold
from .kinds import ChannelGate, NeuronGate, ParameterGate, UnitGate
from .hard_concrete import HardConcrete
from .regularizer import count_parameters, expected_kept, param_groups, penalty

__all__ = [
    "HardConcrete", "ChannelGate", "NeuronGate", "ParameterGate", "UnitGate",
    "attach", "gate_parameters", "gates", "Gated",
    "penalty", "param_groups", "count_parameters", "expected_kept",
    "sparsity", "SparsityReport", "LayerReport", "count_flops", "measure_unit_costs",
    "compact", "fold",
]
