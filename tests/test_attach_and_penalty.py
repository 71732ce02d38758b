import copy
import weakref

import pytest
import torch
import torch.utils.checkpoint
import torchvision
from torch import nn

import l0core
from l0core import attach, gate_parameters, gates, param_groups, penalty

from .helpers import TinyInception, randomize_batchnorm


def _open_all(model):
    with torch.no_grad():
        for _, g in gates(model):
            g.log_alpha.fill_(10.0)


def test_attach_resnet_channels_after_batchnorm():
    model = torchvision.models.resnet18(num_classes=10)
    n_convs = sum(isinstance(m, nn.Conv2d) for m in model.modules())
    gated = attach(model, "channel")
    assert len(gated) == n_convs
    by_module = {g.module: g for g in gated}
    assert by_module["layer1.0.conv1"].applied_at == "output of layer1.0.bn1 (scaling its weight and bias)"
    assert by_module["layer2.0.downsample.0"].applied_at == "output of layer2.0.downsample.1 (scaling its weight and bias)"
    assert by_module["conv1"].units == 64
    # gate lives on the conv it governs, so it travels with the state dict
    assert "layer1.0.conv1.l0_gate.log_alpha" in model.state_dict()


def test_attach_exclusions_by_pattern_and_type():
    model = torchvision.models.resnet18(num_classes=10)
    gated = attach(model, "channel", exclude=["layer4.*", "conv1"])
    names = {g.module for g in gated}
    assert not any(n.startswith("layer4.") for n in names) and "conv1" not in names
    assert "layer3.1.conv2" in names
    mlp = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    assert [g.module for g in attach(mlp, "neuron", exclude=["2"])] == ["0"]
    with pytest.raises(ValueError, match="found nothing to gate"):
        attach(nn.Sequential(nn.Linear(2, 2)), "neuron", exclude=nn.Linear)


def test_finetune_starts_from_exactly_the_original_outputs():
    model = torchvision.models.resnet18(num_classes=10).eval()
    randomize_batchnorm(model)
    x = torch.randn(2, 3, 64, 64)
    before = model(x)
    attach(model, "channel", droprate_init=0.05)
    _open_all(model)  # fully open gates are exactly 1 in eval
    assert torch.equal(model.eval()(x), before)


def test_attach_on_concatenated_branches():
    model = TinyInception().eval()
    gated = attach(model, "channel")
    assert {g.module for g in gated} == {"stem.0", "b1.0", "b2.0", "mix.0"}
    x = torch.randn(2, 3, 8, 8)
    model.train()(x).sum().backward()
    assert all(g.log_alpha.grad is not None for _, g in gates(model))


def test_gate_parameters_keeps_weights_and_opens_exactly():
    lin = nn.Linear(5, 3)
    original = lin.weight.detach().clone()
    x = torch.randn(4, 5)
    expected = lin(x)
    gate_parameters(lin, ["weight"], droprate_init=0.05)
    assert torch.equal(lin.parametrizations.weight.original, original)
    _open_all(lin)
    assert torch.equal(lin.eval()(x), expected)
    lin.train()
    lin(x).sum().backward()
    assert lin.parametrizations.weight.original.grad is not None
    assert lin.parametrizations.weight[0].log_alpha.grad is not None


def test_attach_parameter_kind_gates_every_weight():
    mlp = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    gated = attach(mlp, "parameter")
    assert [(g.module, g.units) for g in gated] == [("0", 32), ("2", 16)]


def test_network_size_counts_a_shared_weight_once_and_no_log_alpha():
    tied = nn.Sequential(nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 6))
    tied[2].weight = tied[0].weight  # tied weights, as in language models' embeddings
    attach(tied, "neuron")
    assert l0core.count_parameters(tied) == 6 * 6 + 6 + 6
    assert l0core.count_parameters(tied) == sum(p.numel() for p in tied.parameters()) - 2 * 6  # two gates of 6


def test_model_scale_penalty_on_a_model_of_gates_only_is_refused():
    with pytest.raises(ValueError, match="has none besides its gates' log_alpha"):
        penalty(nn.Sequential(l0core.NeuronGate(4)), lam=0.1)


def test_model_scale_penalty_is_expected_fraction_kept():
    mlp = nn.Sequential(nn.Linear(10, 20), nn.ReLU(), nn.Linear(20, 4))
    attach(mlp, "neuron")
    total = l0core.count_parameters(mlp)
    assert total == 10 * 20 + 20 + 20 * 4 + 4
    with torch.no_grad():
        for _, g in gates(mlp):
            g.log_alpha.fill_(50.0)  # P(z != 0) == 1
    assert penalty(mlp, lam=2.0).item() == pytest.approx(2.0)  # the whole network kept: lam itself
    with torch.no_grad():
        for _, g in gates(mlp):
            g.log_alpha.fill_(-50.0)
    # Without a dependency graph, what the folded model keeps: both biases.
    assert penalty(mlp, lam=2.0).item() == pytest.approx(2.0 * (20 + 4) / total)
    l0core.measure_couplings(mlp, torch.randn(1, 10))
    # With it, what the exported model keeps: the hidden units are gone with their bias, the output bias stays.
    assert penalty(mlp, lam=2.0).item() == pytest.approx(2.0 * 4 / total, rel=1e-4)


def test_model_scale_means_the_same_for_a_bigger_model():
    small = nn.Sequential(nn.Linear(10, 20), nn.ReLU(), nn.Linear(20, 4))
    big = nn.Sequential(nn.Linear(100, 400), nn.ReLU(), nn.Linear(400, 4))
    for m in (small, big):
        attach(m, "neuron", droprate_init=0.5)
        with torch.no_grad():
            for _, g in gates(m):
                g.log_alpha.fill_(0.0)
    # same gate state -> same penalty, whatever the size (up to the ungated biases)
    assert penalty(small, 1.0).item() == pytest.approx(penalty(big, 1.0).item(), rel=0.1)


def test_paper_scale_matches_the_formula():
    mlp = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    attach(mlp, "neuron")
    lam, wd, n = 0.1, 5e-4, 1000
    expected = 0.0
    for layer in (mlp[0], mlp[2]):
        p = layer.l0_gate.prob_nonzero()
        w = layer.weight  # (out, in): unit i governs column i
        expected = expected + (p * (lam * w.shape[0] + 0.5 * wd * w.pow(2).sum(0))).sum()
    got = penalty(mlp, lam, scale="paper", n_train=n, weight_decay=wd)
    assert got.item() == pytest.approx(expected.item() / n, rel=1e-6)
    with pytest.raises(ValueError, match="n_train"):
        penalty(mlp, lam, scale="paper")


def test_param_groups_keep_decay_off_log_alpha():
    model = TinyInception()
    attach(model, "channel")
    groups = param_groups(model, weight_decay=1e-4)
    ids_decayed = {id(p) for p in groups[0]["params"]}
    assert groups[1]["weight_decay"] == 0.0
    assert all(id(g.log_alpha) not in ids_decayed for _, g in gates(model))
    assert len(groups[0]["params"]) + len(groups[1]["params"]) == len(list(model.parameters()))


def test_deepcopy_keeps_gates_wired():
    mlp = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    attach(mlp, "neuron")
    clone = copy.deepcopy(mlp).eval()
    with torch.no_grad():
        clone[0].l0_gate.log_alpha.fill_(-10.0)  # close every input of the copy only
    x = torch.randn(3, 4)
    assert torch.allclose(clone(x), clone[2](torch.relu(clone[0].bias).expand(3, 8)))
    assert not torch.allclose(mlp.eval()(x), clone(x))


def test_gates_take_the_mode_of_the_model_they_join():
    mlp = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)).eval()
    attach(mlp, "neuron")
    x = torch.randn(3, 4)
    assert torch.equal(mlp(x), mlp(x))  # eval: deterministic gates, not samples
    assert all(not g.training for _, g in gates(mlp))


@pytest.mark.parametrize("with_norm", [True, False], ids=["conv-bn", "conv"])
def test_per_batch_channel_gates_scale_parameters_exactly_as_the_output(with_norm):
    """Folding a per-batch gate into the weight and bias computes layer(x) * z, and trains log_alpha."""
    torch.manual_seed(0)
    layers = [nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6)] if with_norm else [nn.Conv2d(3, 6, 3)]
    net = nn.Sequential(*layers, nn.ReLU())
    plain = copy.deepcopy(net).train()
    (gated,) = attach(net, "channel")
    assert gated.applied_at.endswith("(scaling its weight and bias)")
    gate = net[0].l0_gate
    z = torch.rand(6)
    gate.gate = lambda: z  # one known draw for the pass
    x = torch.randn(4, 3, 8, 8)
    out = net.train()(x)
    expected = plain[:-1](x) * z.view(1, -1, 1, 1)
    torch.testing.assert_close(out, torch.relu(expected), rtol=1e-5, atol=1e-6)
    assert gate.current is None  # the draw lives for one pass only
    del gate.gate
    net(x).sum().backward()
    assert gate.log_alpha.grad is not None and gate.log_alpha.grad.abs().sum() > 0


def test_per_sample_channel_gates_keep_multiplying_the_output():
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    (gated,) = attach(net, "channel", per_sample=True)
    assert gated.applied_at == "output of 1"
    assert not torch.nn.utils.parametrize.is_parametrized(net[1])


def _conv_net(relu_inplace: bool) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6), nn.ReLU(inplace=relu_inplace),
                         nn.Conv2d(6, 5, 3), nn.ReLU(inplace=relu_inplace), nn.Flatten(), nn.LazyLinear(3))


def test_per_sample_gates_fused_with_the_next_relu_compute_the_same_values_and_gradients():
    """relu(x) * z saving only its output gives what x * z then ReLU gives: outputs, and the gradients of
    every weight and of log_alpha (exact zeros of z included: the clamp passes them no gradient)."""
    torch.manual_seed(0)
    fused, plain = _conv_net(False), _conv_net(True)  # an in-place ReLU is never fused
    x = torch.randn(8, 3, 9, 9)
    fused(x), plain.load_state_dict(fused.state_dict())
    applied = [attach(n, "channel", per_sample=True, droprate_init=0.4) for n in (fused, plain)]
    assert [g.applied_at for g in applied[0]] == ["output of 1 (fused with the ReLU after it)",
                                                  "output of 3 (fused with the ReLU after it)"]
    assert [g.applied_at for g in applied[1]] == ["output of 1", "output of 3"]
    plain.load_state_dict(fused.state_dict())
    with torch.no_grad():
        for net in (fused, plain):  # gates closed, fractional and open in every draw
            net[0].l0_gate.log_alpha.copy_(torch.tensor([-3.0, -0.5, 0.0, 0.5, 1.0, 3.0]))
    outs = []
    for net in (fused, plain):
        torch.manual_seed(1)
        out = net.train()(x)
        (out * torch.arange(3.0)).sum().backward()
        outs.append(out)
    torch.testing.assert_close(outs[0], outs[1])
    grads = [{n: p.grad for n, p in net.named_parameters()} for net in (fused, plain)]
    assert grads[0].keys() == grads[1].keys() and "0.l0_gate.log_alpha" in grads[0]
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], msg=name)
    assert fused[0].l0_gate.log_alpha.grad.abs().sum() > 0
    fused.eval(), plain.eval()  # evaluation: the deterministic gate, the same function
    torch.testing.assert_close(fused(x), plain(x))


def test_fused_per_sample_gates_under_bfloat16_autocast_and_channels_last():
    """The GPU knobs (autocast, NHWC) on the fused path: same values as the plain path, finite gradients."""
    torch.manual_seed(0)
    fused, plain = _conv_net(False), _conv_net(True)
    x = torch.randn(8, 3, 9, 9).contiguous(memory_format=torch.channels_last)
    fused(x), plain.load_state_dict(fused.state_dict())
    for net in (fused, plain):
        attach(net, "channel", per_sample=True, droprate_init=0.4)
        net.to(memory_format=torch.channels_last)
    plain.load_state_dict(fused.state_dict())
    outs = []
    for net in (fused, plain):
        torch.manual_seed(1)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = net.train()(x)
        out.float().sum().backward()
        outs.append(out)
    assert outs[0].dtype == torch.bfloat16
    torch.testing.assert_close(outs[0], outs[1])
    for (name, p), (_, q) in zip(fused.named_parameters(), plain.named_parameters()):
        assert torch.isfinite(p.grad).all(), name
        torch.testing.assert_close(p.grad, q.grad, rtol=0.05, atol=0.05, msg=name)


def _saved_bytes(net: nn.Module, x: torch.Tensor) -> int:
    """Bytes of distinct storages autograd still keeps for backward at the end of a forward pass."""
    saved: list[weakref.ref] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        kept = t.detach()  # not t: a saved output would hold its own grad_fn, a cycle that outlives the graph
        saved.append(weakref.ref(kept))
        return kept

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = net.train()(x)  # noqa: F841 - keeps the graph (and what it saved) alive
        alive = [t for t in (ref() for ref in saved) if t is not None]
        return sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in alive}.values())


def test_per_sample_gates_fused_with_a_relu_keep_no_second_copy_of_the_activation():
    torch.manual_seed(0)
    x = torch.randn(16, 3, 20, 20)
    nets = {name: _conv_net(inplace) for name, inplace in (("dense", False), ("fused", False), ("plain", True))}
    for net in nets.values():
        net(x)
    for name in ("fused", "plain"):
        attach(nets[name], "channel", per_sample=True)
    saved = {name: _saved_bytes(net, x) for name, net in nets.items()}
    activation = 16 * 6 * 18 * 18 * 4  # the first layer's output, in bytes
    gate_noise = 16 * (6 + 5) * 4 * 4  # per-example z and the sampling's own saved tensors, per gate
    assert saved["fused"] <= saved["dense"] + gate_noise
    assert saved["plain"] >= saved["dense"] + activation  # what the fusion saves


def test_paper_penalty_uses_the_stored_weights_whichever_way_a_gate_is_applied():
    """Per-batch gates scale the conv's weight through parametrize; the paper's L2 term must still see the
    weight itself (as it does with per-example gates, which leave the weight alone)."""
    torch.manual_seed(0)
    nets = []
    for per_sample in (False, True):
        torch.manual_seed(0)
        net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 2, 3))
        attach(net, "channel", per_sample=per_sample, droprate_init=0.3)
        nets.append(net)
    by_param, by_hook = (penalty(n, lam=0.5, scale="paper", n_train=100, weight_decay=1e-2) for n in nets)
    torch.testing.assert_close(by_param, by_hook)


def _lenet_like(per_sample: bool = False) -> nn.Module:
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 8),
                        nn.ReLU(), nn.Linear(8, 3))
    attach(net, "channel", per_sample=per_sample)
    attach(net, "neuron", per_sample=per_sample)
    return net


def test_a_training_pass_draws_every_per_batch_gate_once_and_together(monkeypatch):
    """The model given to attach draws all its per-batch gates in one sample_together call per pass, each gate
    reads that draw (no gate samples on its own), and the draws are forgotten after the pass, even a failed one."""
    net = _lenet_like().train()
    calls = []
    real = l0core.hooks.sample_together
    monkeypatch.setattr(l0core.hooks, "sample_together", lambda gs: calls.append(len(gs)) or real(gs))
    monkeypatch.setattr(l0core.HardConcrete, "sample", lambda *a: pytest.fail("a gate drew on its own"))
    x = torch.randn(5, 1, 8, 8)
    net(x).sum().backward()
    assert calls == [3]  # the conv's channel gate and both dense layers' neuron gates
    assert all(g.current is None for _, g in gates(net))
    assert all(g.log_alpha.grad.abs().sum() > 0 for _, g in gates(net))
    with pytest.raises(ValueError, match="dim 1 must have 144 units"):
        net(torch.randn(5, 1, 9, 9))  # fails at the first dense layer's gate, after the draw
    assert all(g.current is None for _, g in gates(net))
    net.eval()(x)
    assert calls == [3, 3]  # evaluation uses the deterministic gates: no draw


def test_per_example_gates_draw_where_they_apply_not_with_the_rest(monkeypatch):
    net = _lenet_like(per_sample=True).train()
    calls = []
    real = l0core.hooks.sample_together
    monkeypatch.setattr(l0core.hooks, "sample_together", lambda gs, shape=(): calls.append(len(gs)) or real(gs))
    x = torch.randn(1, 1, 8, 8).expand(64, -1, -1, -1).contiguous()
    with torch.no_grad():
        for _, g in gates(net):
            g.log_alpha.fill_(0.0)
        out = net(x)
    assert calls == []  # no (N, n) sample drawn ahead of its use
    assert not torch.allclose(out[:32], out[32:])  # identical examples, different gates each


def test_a_per_example_gate_gates_the_batch_it_meets():
    """A model that reshapes its batch (here: two views of each example side by side) still gates per example."""

    class Pairs(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.dense = nn.Linear(6, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.dense(x.reshape(-1, 6))  # (N, 12) -> (2N, 6)

    net = Pairs().train()
    attach(net, "neuron", per_sample=True)
    with torch.no_grad():
        net.dense.l0_gate.log_alpha.fill_(0.0)
    out = net(torch.ones(8, 12))
    assert out.shape == (16, 2) and not torch.allclose(out[0], out[1])


def test_a_submodule_called_on_its_own_still_gets_fresh_training_draws():
    net = _lenet_like().train()
    head = net[4:]
    x = torch.randn(64, 4 * 6 * 6)
    with torch.no_grad():
        net[4].l0_gate.log_alpha.fill_(0.0)
        assert not torch.equal(head(x), head(x))
        net(torch.randn(2, 1, 8, 8))  # a whole pass's draw stays on its gates, for checkpointed recomputation only
        assert not torch.equal(head(x), head(x))


class _Checkpointed(nn.Module):
    """A conv block (conv-BN-ReLU-conv-ReLU) and a dense block, each recomputed in backward when ``checkpointed``."""

    def __init__(self, checkpointed: bool) -> None:
        super().__init__()
        self.checkpointed = checkpointed
        self.convs = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                   nn.Conv2d(8, 6, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten())
        self.dense = nn.Sequential(nn.Linear(24, 16), nn.ReLU(), nn.Linear(16, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in (self.convs, self.dense):
            x = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False) if self.checkpointed else block(x)
        return x


@pytest.mark.parametrize("kind,per_sample", [("channel", False), ("channel", True), ("neuron", False),
                                             ("neuron", True), ("parameter", False)])
def test_gates_in_activation_checkpointed_blocks_train_as_without_checkpointing(kind, per_sample):
    """A checkpointed block is recomputed in backward: it must see the z its forward saw (drawn for the whole
    model, outside the block), or torch refuses the recomputation (or, worse, gradients mix two draws)."""
    nets = []
    for checkpointed in (False, True):
        net = _Checkpointed(checkpointed)
        if kind == "parameter":
            attach(net, "parameter")
        else:
            attach(net, kind, per_sample=per_sample)
        nets.append(net)
    nets[1].load_state_dict(nets[0].state_dict())
    x = torch.randn(5, 3, 6, 6)
    for step in range(2):  # the second pass draws anew: nothing of the first is reused
        results = []
        for net in nets:
            net.zero_grad()
            torch.manual_seed(step)
            out = net(x)
            (out.square().mean() + penalty(net, 0.5)).backward()
            results.append((out, {n: p.grad for n, p in net.named_parameters()}))
        (plain, plain_grads), (recomputed, recomputed_grads) = results
        torch.testing.assert_close(recomputed, plain)
        assert plain_grads.keys() == recomputed_grads.keys()
        for name, grad in plain_grads.items():
            torch.testing.assert_close(recomputed_grads[name], grad, msg=name)
        assert all(g.log_alpha.grad.abs().sum() > 0 for _, g in gates(nets[1]))
    copy.deepcopy(nets[1])  # a pass's draw kept for recomputation does not stop a copy


def test_penalty_is_lambda_times_the_expected_fraction_kept_of_the_folded_model():
    net = _lenet_like()
    with torch.no_grad():
        for i, (_, g) in enumerate(gates(net)):
            g.log_alpha.normal_(i - 1.0, 1.0)
    torch.testing.assert_close(penalty(net, 0.3), 0.3 * l0core.expected_kept(net) / l0core.count_parameters(net))
    randomize_batchnorm(net)  # no zeros but the gates'
    with torch.no_grad():
        for _, g in gates(net):
            g.log_alpha.copy_(torch.where(torch.rand(g.n) < 0.5, -10.0, 10.0))
    folded = sum(int(p.count_nonzero()) for p in l0core.fold(net)[0].parameters())
    assert l0core.expected_kept(net).item() == pytest.approx(folded, rel=1e-3)  # no example inputs: fold's count


def test_the_folded_model_keeps_none_of_the_gates_hooks():
    net = _lenet_like()
    attach(net, "parameter", include=["6"])
    assert len(net._forward_pre_hooks) == 1 and len(net._forward_hooks) == 1  # one draw, however many attach calls
    plain, _ = l0core.fold(net)
    assert not plain._forward_pre_hooks and not plain._forward_hooks and not plain._forward_hooks_always_called
    assert len(net._forward_pre_hooks) == 1  # the gated original keeps its own
