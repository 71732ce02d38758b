"""l0core: hard-concrete L0 gates for PyTorch (Louizos, Welling, Kingma 2018).

>>> import torch, l0core
>>> net = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10))
>>> x = torch.randn(1, 64)
>>> gated = l0core.attach(net, "neuron", example_inputs=x)   # gates on each dense layer's inputs
>>> loss = net(torch.randn(8, 64)).logsumexp(1).mean() + l0core.penalty(net, lam=0.1)
>>> report = l0core.sparsity(net, x)
>>> small = l0core.compact(net, x)                            # plain, physically smaller model

The modules, from the bottom up: ``hard_concrete`` (the distribution), ``kinds`` (gate kinds), ``hooks`` (how z
reaches the network), ``dependency`` (torch-pruning's graph and the removal rule), ``fold``, ``export``
(compact), ``costs`` (the expected L0), ``regularizer`` (the penalty), ``target`` (a sparsity target instead of
a penalty), ``placement`` (attach), ``report``.
"""
from .costs import KeptCounter, count_parameters, expected_fraction_kept, expected_kept, measure_couplings
from .export import compact
from .fold import GateSite, fold
from .hard_concrete import HardConcrete
from .kinds import ChannelGate, NeuronGate, ParameterGate, UnitGate, freeze_gates, gates
from .placement import Gated, attach, gate_parameters, select
from .regularizer import param_groups, penalty
from .target import ExactKeep, SparsityTarget, expected_sparsity, keep_exactly
from .report import LayerReport, SparsityReport, count_flops, sparsity

__all__ = [
    "HardConcrete", "ChannelGate", "NeuronGate", "ParameterGate", "UnitGate",
    "attach", "gate_parameters", "select", "gates", "freeze_gates", "Gated",
    "penalty", "param_groups", "count_parameters", "expected_kept", "expected_fraction_kept", "measure_couplings", "KeptCounter",
    "sparsity", "SparsityReport", "LayerReport", "count_flops",
    "compact", "fold", "GateSite",
    "SparsityTarget", "expected_sparsity", "keep_exactly", "ExactKeep",
]
