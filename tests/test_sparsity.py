import pytest
import torch
from sklearn.datasets import load_digits
from torch import nn

import l0core
from l0core import attach, sparsity
from tests.helpers import randomize_batchnorm


def _close(gate, idx):
    with torch.no_grad():
        gate.log_alpha.fill_(5.0)
        gate.log_alpha[idx] = -5.0


def test_mlp_sparsity_agrees_with_hand_count():
    mlp = nn.Sequential(nn.Linear(10, 20), nn.ReLU(), nn.Linear(20, 4))
    attach(mlp, "neuron")
    _close(mlp[0].l0_gate, slice(0, 3))  # 3 input pixels: their columns become zeros
    _close(mlp[2].l0_gate, slice(0, 7))  # 7 hidden units: rows of layer 0 and columns of layer 2 go
    report = sparsity(mlp, torch.randn(2, 10))
    total = 10 * 20 + 20 + 20 * 4 + 4
    kept = 10 * 13 + 13 + 13 * 4 + 4
    zeroed = 3 * 13
    assert report.total_params == total
    assert report.removed_params == total - kept + zeroed
    assert report.sparsity == pytest.approx((total - kept + zeroed) / total)
    assert report.compacted
    layer0 = report.layers[0]
    assert (layer0.units, layer0.kept, layer0.open) == (10, 7, 7)


def test_conv_sparsity_counts_filter_bias_batchnorm_and_downstream_slices():
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 16, 3), nn.ReLU(),
                        nn.Flatten(), nn.Linear(16 * 4 * 4, 10))
    x = torch.randn(1, 3, 8, 8)
    attach(net, "channel", example_inputs=x)
    _close(net[0].l0_gate, [0, 1, 2])
    _close(net[3].l0_gate, [5])
    randomize_batchnorm(net)  # a fresh BatchNorm's zero biases would count as zeros too
    per_conv0_channel = 3 * 9 + 1 + 2 + 16 * 9  # filter, bias, BN weight+bias, conv1 input slice
    per_conv3_channel = 8 * 9 + 1 + 16 * 10  # filter, bias, 4x4 flattened features into the classifier
    overlap = 3 * 9  # conv3's closed filter already lost its 3 input slices
    report = sparsity(net, x)
    assert report.removed_params == 3 * per_conv0_channel + per_conv3_channel - overlap
    # without example inputs: the zeros the gates write into the folded model (filters, biases, BatchNorm)
    estimate = sparsity(net)
    assert not estimate.compacted
    assert estimate.removed_params == 3 * (3 * 9 + 1 + 2) + (8 * 9 + 1)
    assert report.flops_ratio < 1.0 and estimate.flops_ratio is None


def test_parameter_gates_count_zeros_and_keep_shape():
    lin = nn.Linear(6, 4)
    l0core.gate_parameters(lin, ["weight"])
    _close(lin.parametrizations.weight[0], slice(0, 9))
    report = sparsity(lin, torch.randn(1, 6))
    assert report.removed_params == 9 and report.total_params == 28
    assert report.flops_ratio == 1.0  # dense shape unchanged: no FLOPs saved, said honestly
    assert sparsity(lin).removed_params == 9 and not sparsity(lin).compacted


@pytest.mark.slow
def test_training_on_digits_large_lambda_gives_more_sparsity():
    X, y = load_digits(return_X_y=True)
    X = torch.tensor(X / 16.0, dtype=torch.float32)
    y = torch.tensor(y)
    perm = torch.randperm(len(X), generator=torch.Generator().manual_seed(0))
    train, val = perm[:1400], perm[1400:]

    def train_with(lam: float) -> tuple[float, float]:
        torch.manual_seed(0)
        net = nn.Sequential(nn.Linear(64, 100), nn.ReLU(), nn.Linear(100, 10))
        attach(net, "neuron", example_inputs=X[:1])
        opt = torch.optim.Adam(l0core.param_groups(net, 0.0), lr=1e-2)
        for _ in range(30):
            net.train()
            for idx in train[torch.randperm(len(train))].split(100):
                loss = nn.functional.cross_entropy(net(X[idx]), y[idx]) + l0core.penalty(net, lam)
                opt.zero_grad()
                loss.backward()
                opt.step()
        net.eval()
        with torch.no_grad():
            acc = (net(X[val]).argmax(1) == y[val]).float().mean().item()
        report = sparsity(net, X[:1])
        # the report agrees with counting by hand from the deterministic gates
        kept_in = [(layer.l0_gate.deterministic() > 0) for layer in (net[0], net[2])]
        kept_hidden = int(kept_in[1].sum())
        hand_kept = int(kept_in[0].sum()) * kept_hidden + kept_hidden + kept_hidden * 10 + 10
        assert report.removed_params == report.total_params - hand_kept
        return acc, report.sparsity

    acc_small, sp_small = train_with(1e-3)
    acc_large, sp_large = train_with(0.5)
    assert acc_small > 0.9 and acc_large > 0.85
    assert sp_large > sp_small + 0.15
