"""The expected L0 is exact: lambda means the same on every model, and with decided gates the expected count is
the exported model's nonzero count, which is also what the sparsity report counts."""
from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

import l0core
from l0core import attach, expected_kept, gate_parameters, penalty, sparsity
from l0core.costs import gates_and_size, kept_counter
from sweeps.models import build_model
from tests.helpers import randomize_batchnorm


def _nonzero(model: nn.Module) -> int:
    return sum(int(p.count_nonzero()) for p in model.parameters())


def _set_all(model: nn.Module, value: float) -> None:
    with torch.no_grad():
        for _, gate in l0core.gates(model):
            gate.log_alpha.fill_(value)


def _decide(model: nn.Module, seed: int, p_off: float = 0.5) -> None:
    """Every gate decided: log_alpha of -10 (z = 0) or +10 (z = 1), at random."""
    rng = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, gate in l0core.gates(model):
            gate.log_alpha.copy_(torch.where(torch.rand(gate.n, generator=rng) < p_off, -10.0, 10.0))


def _randomize_weights(model: nn.Module) -> None:
    """No parameter exactly zero before the gates act (a fresh BatchNorm's bias is), so every zero is theirs."""
    randomize_batchnorm(model)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "log_alpha" not in name:
                p.add_((p == 0) * 0.1)


def _check_exact(model: nn.Module, x: torch.Tensor, seeds=(0, 1), rel: float = 0.005) -> None:
    _randomize_weights(model)
    _set_all(model, 10.0)
    with torch.no_grad():
        assert penalty(model, lam=0.1).item() == pytest.approx(0.1, rel=0.01)  # every gate open: lam itself
    for seed in seeds:
        _decide(model, seed)
        small = l0core.compact(model, x)
        nonzero = _nonzero(small)
        with torch.no_grad():
            assert expected_kept(model).item() == pytest.approx(nonzero, rel=rel)
        report = sparsity(model, x)
        assert report.removed_params == report.total_params - nonzero
        assert report.sparsity == pytest.approx(1 - nonzero / report.total_params)


ZOO = {
    "digits-mlp": lambda: (build_model("mlp", (1, 8, 8), 10), torch.randn(1, 1, 8, 8)),
    "lenet5": lambda: (build_model("lenet5", (1, 28, 28), 10), torch.randn(1, 1, 28, 28)),
    "googlenet": lambda: (build_model("googlenet", (3, 32, 32), 10), torch.randn(1, 3, 32, 32)),
    "resnet18": lambda: (torchvision.models.resnet18(num_classes=10), torch.randn(1, 3, 32, 32)),
    "mobilenet_v2": lambda: (torchvision.models.mobilenet_v2(num_classes=10), torch.randn(1, 3, 32, 32)),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(ZOO))
def test_open_penalty_is_lambda_and_decided_expected_l0_is_the_exported_nonzero_count(name):
    model, x = ZOO[name]()
    if name.startswith(("resnet", "mobilenet")):
        attach(model, "channel", example_inputs=x)
    else:
        l0core.measure_couplings(model, x)  # as a sweep's trial does, after building its zoo model
    _check_exact(model, x, seeds=(0,) if name.startswith(("resnet", "mobilenet")) else (0, 1))  # big: one draw


def test_the_count_is_an_outer_product_per_layer():
    """Two dense layers with input gates q (3) and p (4): W1 keeps sum(q) * sum(p), its bias sum(p), W2 its
    columns sum(p) * 2, the output bias 2."""
    net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    attach(net, "neuron", example_inputs=torch.randn(1, 3))
    with torch.no_grad():
        net[0].l0_gate.log_alpha.copy_(torch.tensor([-1.0, 0.5, 2.0]))
        net[2].l0_gate.log_alpha.copy_(torch.tensor([0.0, 1.0, -2.0, 3.0]))
    q, p = net[0].l0_gate.prob_nonzero(), net[2].l0_gate.prob_nonzero()
    by_hand = q.sum() * p.sum() + p.sum() + p.sum() * 2 + 2
    torch.testing.assert_close(expected_kept(net), by_hand)
    by_hand.backward()
    expected_kept(net).backward()  # differentiable: the gradient reaches every log_alpha
    assert all(g.log_alpha.grad.abs().sum() > 0 for _, g in l0core.gates(net))


class ResidualBlock(nn.Module):
    """conv-bn-relu-conv-bn plus the block's input: the second conv's channels are coupled to the input."""

    def __init__(self, c: int = 8) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c)
        self.head = nn.Linear(c, 4)

    def forward(self, x):
        x = self.stem(x)
        y = self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))
        return self.head(torch.relu(x + y).mean((2, 3)))


def test_closed_channels_of_a_residual_branch_count_their_zeros():
    model, x = ResidualBlock(), torch.randn(2, 3, 8, 8)
    attach(model, "channel", include="conv2", example_inputs=x)
    _randomize_weights(model)
    with torch.no_grad():
        model.conv2.l0_gate.log_alpha.copy_(torch.tensor([10.0, -10.0] * 4))  # half of its channels closed
    report = sparsity(model, x)
    # Their filters, biases and BatchNorm stay (the addition keeps the channel) as zeros: 4 * (8 * 9 + 1 + 2).
    assert report.removed_params == 4 * (8 * 9 + 1 + 2) == report.total_params - _nonzero(l0core.compact(model, x))
    with torch.no_grad():
        assert expected_kept(model).item() == pytest.approx(report.total_params - report.removed_params, rel=1e-3)
    _check_exact(model, x)
    # With every channel gated, a residual channel goes only when the stem and the branch are both closed.
    model = ResidualBlock()
    attach(model, "channel", example_inputs=x)
    _check_exact(model, x, seeds=(0, 1, 2))


@pytest.mark.parametrize("name", ["residual", "lenet5"])
def test_between_decided_gates_the_count_is_their_expectation(name):
    """E[kept] over independent gates is affine in each gate's P(z != 0): with the decided corners checked
    against the exported model above, that makes it exact everywhere in between."""
    if name == "residual":
        model, x = ResidualBlock(), torch.randn(2, 3, 8, 8)
        attach(model, "channel", example_inputs=x)  # residual channels: groups of several producers
    else:
        model, x = build_model("lenet5", (1, 28, 28), 10), torch.randn(1, 1, 28, 28)
        l0core.measure_couplings(model, x)
    found, _ = gates_and_size(model)
    count = kept_counter(model, found)
    prob = torch.rand(sum(g.n for g in found), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for i in torch.randperm(len(prob), generator=torch.Generator().manual_seed(1))[:8].tolist():
        opened, closed = prob.clone(), prob.clone()
        opened[i], closed[i] = 1.0, 0.0
        between = prob[i] * count(opened) + (1 - prob[i]) * count(closed)
        assert count(prob).item() == pytest.approx(between.item(), rel=1e-9)
        assert count(opened).item() != pytest.approx(count(closed).item(), rel=1e-9)  # the gate counts


def test_a_vision_transformers_patch_projection_counts_its_closed_channels():
    vit = torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=1, num_heads=2, hidden_dim=16,
                                               mlp_dim=32, num_classes=5)
    x = torch.randn(1, 3, 32, 32)
    attach(vit, "channel", include="conv_proj", example_inputs=x)
    _randomize_weights(vit)  # a fresh ViT's head and class token are zeros, which would count too
    with torch.no_grad():
        vit.conv_proj.l0_gate.log_alpha.copy_(torch.tensor([10.0, -10.0] * 8))
    report = sparsity(vit, x)
    # The residual stream is the model's interface (a class token, position embeddings): the channels stay, as zeros.
    assert report.removed_params == 8 * (3 * 8 * 8 + 1)
    _check_exact(vit, x)


def test_parameter_gates_on_an_lstm_count_and_export():
    class Tagger(nn.Module):
        def __init__(self):
            super().__init__()
            self.lstm, self.head = nn.LSTM(6, 5, batch_first=True), nn.Linear(5, 3)

        def forward(self, x):
            return self.head(self.lstm(x)[0][:, -1])

    model, x = Tagger(), torch.randn(2, 4, 6)
    gated = attach(model, "parameter", include=nn.LSTM)
    assert [g.applied_at for g in gated] == ["lstm.weight_ih_l0", "lstm.weight_hh_l0"]
    _set_all(model, 10.0)
    model.eval()
    before = model(x)
    _decide(model, 0)
    after = model(x)
    assert not torch.allclose(before, after)  # the LSTM really reads its gated weights
    torch.testing.assert_close(l0core.compact(model, x)(x), after)
    report = sparsity(model, x)
    closed = sum(int((g.deterministic() == 0).sum()) for _, g in l0core.gates(model))
    assert report.removed_params == closed and report.flops_ratio is not None
    _check_exact(model, x)


def test_multihead_attention_gets_every_projection_gated_by_either_call():
    x = torch.randn(2, 5, 8)
    by_attach = nn.MultiheadAttention(8, 2, batch_first=True)
    names = [g.applied_at for g in attach(by_attach, "parameter", include=nn.MultiheadAttention)]
    by_hand = nn.MultiheadAttention(8, 2, batch_first=True)
    assert names == [g.applied_at for g in gate_parameters(by_hand)] == ["in_proj_weight", "out_proj.weight"]

    class Attend(nn.Module):
        def __init__(self, mha):
            super().__init__()
            self.mha = mha

        def forward(self, x):
            return self.mha(x, x, x, need_weights=False)[0]

    model = Attend(by_attach)
    _decide(model, 1)
    model.eval()
    torch.testing.assert_close(l0core.compact(model, x)(x), model(x))
    _check_exact(model, x)


def test_a_gated_bias_counts_with_and_without_example_inputs():
    lin, x = nn.Linear(6, 4), torch.randn(1, 6)
    gate_parameters(lin, ["weight", "bias"])
    _decide(lin, 3)
    zeros = sum(int((g.deterministic() == 0).sum()) for _, g in l0core.gates(lin))
    assert 0 < zeros and sparsity(lin).removed_params == sparsity(lin, x).removed_params == zeros
    _check_exact(lin, x)


@pytest.mark.parametrize("context", [torch.no_grad, torch.inference_mode], ids=["no_grad", "inference_mode"])
def test_compact_sparsity_and_attach_work_where_users_evaluate(context):
    model = torchvision.models.resnet18(num_classes=10)
    with context():
        x = torch.randn(1, 3, 64, 64)
        attach(model, "channel", include="layer4.*", example_inputs=x)
        _decide(model, 0) if context is torch.no_grad else None
        small = l0core.compact(model, x)
        report = sparsity(model, x)
    assert report.removed_params == report.total_params - _nonzero(small)


def test_include_patterns_select_among_the_modules_the_kind_can_gate():
    model = torchvision.models.resnet18(num_classes=10)
    gated = attach(model, "channel", include="layer1.*")
    assert [g.module for g in gated] == ["layer1.0.conv1", "layer1.0.conv2", "layer1.1.conv1", "layer1.1.conv2"]
    more = attach(model, "channel", include="layer2.*.conv*")  # never the gates just added
    assert [g.module for g in more] == ["layer2.0.conv1", "layer2.0.conv2", "layer2.1.conv1", "layer2.1.conv2"]
    with pytest.raises(ValueError, match=r"found nothing to gate with include='layer9\.\*'.*'conv1', 'layer1\.0\.conv1'"):
        attach(torchvision.models.resnet18(), "channel", include="layer9.*")
    with pytest.raises(ValueError, match="the model has no convolution"):
        attach(nn.Sequential(nn.Linear(2, 2)), "channel")
    assert [g.module for g in attach(torchvision.models.resnet18(), "neuron", exclude="layer*")] == ["fc"]
