import io

import pytest
import torch
import torchvision
from torch import nn

import l0core
from l0core import attach, compact, count_flops, gates, sparsity
from sweeps.models import build_model

from .helpers import TinyInception, randomize_batchnorm, set_gate_states

CASES = {
    "mlp": (lambda: build_model("mlp", (1, 28, 28), 10), (4, 1, 28, 28)),
    "lenet5": (lambda: build_model("lenet5", (1, 28, 28), 10), (4, 1, 28, 28)),
    "googlenet": (lambda: build_model("googlenet", (3, 32, 32), 10), (4, 3, 32, 32)),
    # per-example gates: fused with the ReLU after their layer, folded into the layer before it
    "lenet5-per-sample": (lambda: build_model("lenet5", (1, 28, 28), 10, per_sample=True), (4, 1, 28, 28)),
    "googlenet-per-sample": (lambda: build_model("googlenet", (3, 32, 32), 10, per_sample=True), (4, 3, 32, 32)),
    "resnet18": (lambda: build_model("torchvision:resnet18", (3, 64, 64), 10), (2, 3, 64, 64)),
    "mobilenet_v2": (lambda: build_model("torchvision:mobilenet_v2", (3, 64, 64), 10), (2, 3, 64, 64)),
}


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _widths_agree_with_weights(model: nn.Module) -> None:
    """Every exported layer says the widths its weights have (its repr, and code that reads them, rely on it)."""
    for name, m in model.named_modules():
        if isinstance(m, nn.modules.conv._ConvNd):
            assert (m.out_channels, m.in_channels // m.groups) == tuple(m.weight.shape[:2]), name
        elif isinstance(m, nn.Linear):
            assert (m.out_features, m.in_features) == tuple(m.weight.shape), name
        elif isinstance(m, nn.modules.batchnorm._BatchNorm):
            assert m.num_features == m.running_mean.numel(), name


def _gated_case(name: str, p_off: float, p_frac: float) -> tuple[nn.Module, torch.Tensor]:
    """A CASES model in eval mode with random BatchNorm and gate states, and an input for it."""
    make, shape = CASES[name]
    model = make()
    randomize_batchnorm(model)
    set_gate_states(model, p_off=p_off, p_frac=p_frac)
    return model.eval(), torch.randn(*shape)


def _exported_and_checked(model: nn.Module, x: torch.Tensor) -> nn.Module:
    """``compact(model, x)``, checked: widths match weights, outputs and FLOPs agree with the gated model's."""
    small = compact(model, x)
    _widths_agree_with_weights(small)
    assert torch.allclose(small(x), model(x), atol=1e-5)
    assert sparsity(model, x).effective_flops == count_flops(small, x)
    return small


@pytest.mark.parametrize("name", list(CASES))
def test_exported_model_computes_the_same_and_is_smaller(name):
    model, x = _gated_case(name, p_off=0.4, p_frac=0.2)
    small = compact(model, x, check=False)
    assert not list(gates(small)), "the exported model has no gates"
    _widths_agree_with_weights(small)
    expected, got = model(x), small(x)
    scale = expected.abs().max().clamp_min(1.0)
    assert (expected - got).abs().max() <= 1e-5 * scale
    report = sparsity(model, x)
    # counts come from the exported model itself and agree with the gated model's report
    assert _params(small) < l0core.count_parameters(model)
    assert report.effective_flops == count_flops(small, x) < report.dense_flops
    zeroed = report.removed_params - (l0core.count_parameters(model) - _params(small))
    assert zeroed >= 0  # zeros written into kept shapes (neuron gates after a flatten), never negative


@pytest.mark.parametrize("name", ["mlp", "lenet5", "googlenet", "resnet18", "mobilenet_v2"])
def test_a_model_with_every_gate_closed_exports(name):
    # What a large lambda can leave: every layer keeps one (dead) unit, and the output is the constant the
    # gated model computes.
    _exported_and_checked(*_gated_case(name, p_off=1.0, p_frac=0.0))


def test_fractional_gates_are_folded_not_dropped():
    mlp = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))
    attach(mlp, "neuron")
    with torch.no_grad():
        mlp[2].l0_gate.log_alpha.fill_(0.3)  # every hidden unit fractional: 0 < z < 1
    z = mlp[2].l0_gate.deterministic()
    assert ((z > 0) & (z < 1)).all()
    x = torch.randn(5, 4)
    small = compact(mlp.eval(), x)
    assert small[2].in_features == 6
    assert torch.allclose(small(x), mlp(x), atol=1e-6)
    assert not torch.allclose(small[2].weight, mlp[2].weight)  # z was folded into the weights


def test_residual_channels_go_only_when_every_coupled_gate_is_off():
    model = torchvision.models.resnet18(num_classes=10).eval()
    attach(model, "channel")
    x = torch.randn(1, 3, 64, 64)
    # layer1's residual stream: stem conv1, layer1.0.conv2, layer1.1.conv2 all add into the same channels
    coupled = [model.conv1, model.layer1[0].conv2, model.layer1[1].conv2]
    with torch.no_grad():
        for _, g in gates(model):
            g.log_alpha.fill_(5.0)
        for conv in coupled[:2]:
            conv.l0_gate.log_alpha[:10] = -5.0  # channels 0-9 closed in two of three coupled gates
        coupled[2].l0_gate.log_alpha[:4] = -5.0  # ... and 0-3 closed in the third too
    small = compact(model, x)
    assert small.conv1.out_channels == 60  # only the 4 channels closed everywhere go
    assert small.layer1[0].conv1.in_channels == 60 and small.layer1[0].conv2.out_channels == 60
    assert torch.allclose(small(x), model(x), atol=1e-5)


def test_features_after_a_flatten_go_a_whole_channel_at_a_time():
    # LeNet-5: conv2 (50 channels of 4x4) is flattened into fc1's 800 input features, 16 per channel.
    model = build_model("lenet5", (1, 28, 28), 10).eval()
    conv2, fc1 = model[3], model[7]
    with torch.no_grad():
        for _, g in gates(model):
            g.log_alpha.fill_(5.0)
        conv2.l0_gate.log_alpha[[0, 1, 2]] = -5.0  # three channels closed at the conv
        features = fc1.l0_gate.log_alpha.view(50, 16)
        features[5] = -5.0  # every feature of channel 5 closed at fc1: nothing reads the channel
        features[6, :8] = -5.0  # half of channel 6's: the other half is read, so the channel stays
        features[1, :3] = -5.0  # some of a channel already closed at the conv
    x = torch.randn(2, 1, 28, 28)
    small = compact(model, x)
    assert small[3].weight.shape[0] == 46 and small[7].in_features == 46 * 16
    _widths_agree_with_weights(small)
    assert int((small[7].weight == 0).all(dim=0).sum()) == 8  # channel 6's closed half: zeros, in place
    assert sparsity(model, x).removed_params == l0core.count_parameters(model) - _params(small) + 8 * 500
    assert torch.allclose(small(x), model(x), atol=1e-5)


@pytest.mark.parametrize("p_off,seed", [(0.85, 0), (0.85, 1), (0.97, 2), (1.0, 0)])
def test_a_mostly_closed_lenet5_exports(p_off, seed):
    # As trained LeNet-5s end (the paper keeps 20-25-45-462 of 20-50-800-500): most fc1 features closed,
    # often all of an open channel's; the widths must stay right through every pruning step. Closing
    # everything removes all but one (dead) unit of each layer, including the conv a flatten empties.
    model = build_model("lenet5", (1, 28, 28), 10).eval()
    set_gate_states(model, p_off=p_off, p_frac=0.05 if p_off < 1 else 0.0, seed=seed)
    x = torch.randn(2, 1, 28, 28)
    small = _exported_and_checked(model, x)
    assert all(m.weight.shape[0] >= 1 for m in small.modules() if isinstance(m, (nn.Conv2d, nn.Linear)))


def test_concatenated_branches_export():
    model = TinyInception().eval()
    attach(model, "channel")
    randomize_batchnorm(model)
    with torch.no_grad():
        for _, g in gates(model):
            g.log_alpha.fill_(5.0)
        model.b2[0].l0_gate.log_alpha[[1, 3]] = -5.0
    x = torch.randn(2, 3, 8, 8)
    small = compact(model, x)
    assert small.b2[0].out_channels == 2 and small.mix[0].in_channels == 8
    assert torch.allclose(small(x), model(x), atol=1e-5)


def test_channels_of_a_grouped_conv_stay_and_the_rest_export():
    # ResNeXt/RegNet-style grouped convolution: torch-pruning 1.6 cut single channels of it unevenly across its
    # groups and broke its weight (ResNeXt-50 failed to export). Its channels stay (closed ones as zeros).
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.Conv2d(8, 8, 3, padding=1, groups=4), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.Conv2d(8, 6, 1), nn.BatchNorm2d(6), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 5))
    x = torch.randn(2, 3, 8, 8)
    attach(model, "channel", example_inputs=x)
    randomize_batchnorm(model)
    with torch.no_grad():
        for _, g in gates(model):
            g.log_alpha.fill_(10.0)
            g.log_alpha[:2] = -10.0  # two channels closed in every gated layer
    model.eval()
    small = _exported_and_checked(model, x)
    assert [small[i].out_channels for i in (0, 3, 6)] == [8, 8, 4]  # only the plain conv after the groups shrinks
    # The expected L0 counts what stays: the grouped conv's closed channels as the zeros they are.
    nonzero = sum(int(p.count_nonzero()) for p in small.parameters())
    assert l0core.expected_kept(model).item() == pytest.approx(nonzero, rel=1e-3)


def test_parameter_gates_export_zeros_in_dense_shape():
    lin = nn.Linear(6, 4)
    l0core.gate_parameters(lin, ["weight"])
    with torch.no_grad():
        lin.parametrizations.weight[0].log_alpha[:9] = -5.0
        lin.parametrizations.weight[0].log_alpha[9:] = 5.0
    small = compact(lin.eval(), torch.randn(2, 6))
    assert small.weight.shape == (4, 6)
    assert int((small.weight == 0).sum()) == 9
    assert type(small) is nn.Linear  # plain module again
    assert l0core.gates(lin)  # the original keeps its gates


def test_exported_model_saves_loads_and_exports():
    model = build_model("lenet5", (1, 28, 28), 10)
    set_gate_states(model)
    x = torch.randn(2, 1, 28, 28)
    small = compact(model.eval(), x)
    expected = small(x)
    buffer = io.BytesIO()
    torch.save(small, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert torch.equal(loaded(x), expected)
    buffer = io.BytesIO()
    torch.save(small.state_dict(), buffer)
    buffer.seek(0)
    fresh = build_model("lenet5", (1, 28, 28), 10, gates=False)
    with pytest.raises(RuntimeError):  # the architecture changed: the state dict only fits the exported one
        fresh.load_state_dict(torch.load(buffer))
    buffer.seek(0)
    small.load_state_dict(torch.load(buffer))
    exported = torch.export.export(small, (x,))
    assert torch.allclose(exported.module()(x), expected, atol=1e-6)


def test_a_model_torch_pruning_cannot_trace_is_a_clear_error_and_stays_ungated():
    # ShuffleNetV2's channel shuffle (a reshape torch-pruning 1.6 cannot map) used to surface as a bare
    # ZeroDivisionError from deep inside torch-pruning, after the gates were already on.
    model = torchvision.models.shufflenet_v2_x0_5(num_classes=10)
    x = torch.randn(1, 3, 64, 64)
    with pytest.raises(ValueError, match=r"cannot trace how the channels of ShuffleNetV2 depend on each other "
                                         r"\(ZeroDivisionError in .*\).*parameter gates"):
        attach(model, "channel", example_inputs=x)
    assert gates(model) == []
    attach(model, "channel")  # without example inputs nothing is traced yet; export needs the graph
    with pytest.raises(ValueError, match="cannot trace"):
        compact(model.eval(), x)
    with pytest.raises(RuntimeError, match="expected input"):  # the model's own errors pass through as they are
        sparsity(build_model("lenet5", (1, 28, 28), 10), torch.randn(1, 3, 28, 28))


def test_hand_placed_gates_cannot_be_folded():
    net = nn.Sequential(nn.Linear(4, 4), l0core.NeuronGate(4), nn.Linear(4, 2))
    with pytest.raises(ValueError, match="place them with l0core.attach"):
        compact(net, torch.randn(1, 4))


@pytest.mark.parametrize("name", ["mlp", "googlenet", "mobilenet_v2"])
def test_round_to_keeps_widths_multiples_of_k_with_the_most_probable_closed_units(name):
    """round_to: every exported width that changed is a multiple of 8 (or the layer's full width), outputs are the
    gated model's, and the closed units kept are the most probable ones (a layer's kept closed units have higher
    log_alpha than the ones removed: checked on the MLP's hidden layers, where units map one to one)."""
    build, shape = CASES[name]
    model = build().eval()
    set_gate_states(model, p_off=0.5, p_frac=0.0, seed=1)
    with torch.no_grad():  # closed gates of distinct log_alpha, so that "the most probable" means something
        for _, gate in gates(model):
            closed = gate.log_alpha < 0
            gate.log_alpha[closed] = -3.0 - torch.rand(int(closed.sum()))
    x = torch.randn(*shape)
    plain, rounded = compact(model, x[:1]), compact(model, x[:1], round_to=8)
    with torch.no_grad():
        ref = model(x)
        assert (rounded(x) - ref).abs().max() <= 1e-5 * ref.abs().max().clamp_min(1.0)
    _widths_agree_with_weights(rounded)
    before = {n: m.weight.shape[0] for n, m in build().named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    after = {n: m.weight.shape[0] for n, m in rounded.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    narrower = {n: w for n, w in after.items() if w < before[n]}
    assert narrower and all(w % 8 == 0 for w in narrower.values()), narrower
    assert _params(plain) <= _params(rounded) < _params(build())
    if name == "mlp":  # hidden unit i of layer 1 is gated by layer 3's gate (on its inputs) unit i, and so on
        for producer, consumer in ((1, 3), (3, 5)):
            log_alpha = dict(gates(model))[f"{consumer}.l0_gate"].log_alpha.detach()
            original = model[producer].parametrizations.weight.original if hasattr(model[producer], "parametrizations") \
                else model[producer].weight
            # Which original units survived: the producer's rows are kept as they were (folding zeroes the
            # consumer's columns of closed units, not their producers' rows).
            rows = rounded[producer].weight.detach()
            survivors = [int((original[:, :rows.shape[1]] - r).abs().sum(1).argmin()) if rows.shape[1] == original.shape[1]
                         else None for r in rows]
            if None in survivors:
                continue  # an earlier layer narrowed this one's inputs; the first pair is the clear case
            kept_closed = [i for i in survivors if log_alpha[i] < 0]
            dropped = [i for i in range(len(log_alpha)) if i not in survivors]
            assert 0 < len(kept_closed) < 8 and dropped
            assert min(log_alpha[kept_closed]) >= max(log_alpha[dropped])


def test_round_to_must_be_positive():
    model = build_model("mlp", (1, 8, 8), 10)
    with pytest.raises(ValueError, match="round_to must be at least 1, got 0"):
        compact(model, torch.randn(1, 1, 8, 8), round_to=0)
