"""l0core.SparsityTarget and keep_exactly: the Lagrangian steers the expected sparsity to the target, its
multipliers climb by gradient ascent, its effective lambda is the penalty's lambda with the same gradient, and the
exact top-k lands the deterministic sparsity on the target to one unit."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import l0core
from l0core import SparsityTarget, attach, compact, expected_sparsity, keep_exactly, penalty, sparsity
from tests.helpers import TinyInception, set_gate_states


def _mlp(droprate_init: float = 0.5) -> tuple[nn.Module, torch.Tensor]:
    net = nn.Sequential(nn.Linear(20, 32), nn.ReLU(), nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 4))
    x = torch.randn(1, 20)
    attach(net, "neuron", droprate_init=droprate_init, example_inputs=x)
    return net, x


@pytest.mark.parametrize("bad", [0.0, 1.0, -0.1, 1.5])
def test_a_target_outside_zero_one_is_refused(bad):
    with pytest.raises(ValueError, match=r"target sparsity must lie in \(0, 1\)"):
        SparsityTarget(bad)


def test_the_target_ramps_up_linearly_from_zero_over_the_warmup():
    target = SparsityTarget(0.6, warmup_steps=4)
    seen = []
    for _ in range(6):
        seen.append(target.current_target)
        target.step()
    assert seen == pytest.approx([0.0, 0.15, 0.3, 0.45, 0.6, 0.6])
    assert SparsityTarget(0.6).current_target == 0.6  # no warm-up: the target from the first step


def test_multipliers_climb_by_gradient_ascent_with_a_positive_learning_rate():
    net, _ = _mlp(droprate_init=0.05)  # dense: far below the target
    target = SparsityTarget(0.9)
    opt = target.optimizer(lr=0.1)
    assert opt.defaults["maximize"] and opt.defaults["lr"] > 0
    opt.zero_grad()
    target(net).backward()
    opt.step()
    # d/dl1 = s_hat - t < 0: ascent lowers l1; d/dl2 = (s_hat - t)^2 >= 0: ascent raises l2.
    assert target.l1.item() < 0 < target.l2.item()
    assert target.effective_lambda > 0  # denser than the target: it pays for removing parameters


def _multipliers_at(target: SparsityTarget, l1: float, l2: float = 0.0) -> SparsityTarget:
    """``target`` as if its multipliers had climbed to ``l1`` and ``l2``."""
    with torch.no_grad():
        target.l1.fill_(l1)
        target.l2.fill_(l2)
    return target


def test_the_effective_lambda_is_the_penalty_lambda_with_the_same_gradient_on_the_gates():
    net, _ = _mlp()
    set_gate_states(net, p_off=0.2, p_frac=0.5, seed=1)
    target = _multipliers_at(SparsityTarget(0.7), -0.8, 2.5)
    gates = [g.log_alpha for _, g in l0core.gates(net)]
    term_grads = torch.autograd.grad(target(net), gates)
    lam = target.effective_lambda
    assert lam == pytest.approx(-(-0.8 + 2 * 2.5 * (expected_sparsity(net).item() - 0.7)))
    penalty_grads = torch.autograd.grad(penalty(net, lam), gates)
    for a, b in zip(term_grads, penalty_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("goal", [0.3, 0.8])
def test_the_lagrangian_alone_brings_the_expected_sparsity_to_the_target(goal):
    net, _ = _mlp()
    target = SparsityTarget(goal, warmup_steps=50)
    gates = torch.optim.Adam([g.log_alpha for _, g in l0core.gates(net)], lr=0.05)
    multipliers = target.optimizer(lr=0.05)
    for _ in range(600):
        loss = target(net)
        gates.zero_grad()
        multipliers.zero_grad()
        loss.backward()
        gates.step()
        multipliers.step()
        target.step()
    assert expected_sparsity(net).item() == pytest.approx(goal, abs=0.01)


@pytest.mark.parametrize("goal", [0.25, 0.5, 0.9])
def test_keep_exactly_lands_the_exported_model_on_the_target_to_one_unit(goal):
    net, x = _mlp()
    set_gate_states(net, p_off=0.3, p_frac=0.3, seed=2)
    before = sparsity(net, x).sparsity
    change = keep_exactly(net, goal)
    after = sparsity(net, x)
    # The largest unit: a hidden neuron of the first layer holds 20 weights in, a bias and 16 weights out.
    assert abs(after.sparsity - goal) <= 37 / after.total_params
    assert change.sparsity_before == pytest.approx(before) and change.sparsity_after == pytest.approx(after.sparsity)
    small = compact(net, x)
    assert sum(int(p.count_nonzero()) for p in small.parameters()) == after.total_params - after.removed_params
    # What changed is reported: going sparser closes units the gates kept, going denser opens closed ones.
    assert (change.closed > 0) == (goal > before + 37 / after.total_params)
    assert (change.opened > 0) == (goal < before - 37 / after.total_params)


def test_keep_exactly_keeps_the_units_with_the_largest_log_alpha_over_all_gates_and_couplings():
    net = TinyInception()
    x = torch.randn(1, 3, 8, 8)
    attach(net, "channel", example_inputs=x)
    set_gate_states(net, p_off=0.0, p_frac=1.0, seed=3)
    la = {name: g.log_alpha.detach().clone() for name, g in l0core.gates(net)}
    keep_exactly(net, 0.6)
    kept = torch.cat([la[n][g.deterministic() > 0] for n, g in l0core.gates(net)])
    closed = torch.cat([la[n][g.deterministic() == 0] for n, g in l0core.gates(net)])
    assert len(closed) and kept.min() >= closed.max()
    report = sparsity(net, x)
    assert abs(report.sparsity - 0.6) < 0.05  # a channel of TinyInception holds up to 5% of its parameters


@pytest.mark.parametrize("kind, per_sample", [("neuron", False), ("neuron", True), ("parameter", False)])
def test_a_frozen_gate_is_its_deterministic_value_in_training_and_no_longer_trains(kind, per_sample):
    net = nn.Sequential(nn.Linear(20, 32), nn.ReLU(), nn.Linear(32, 4))
    x = torch.randn(8, 20)
    attach(net, kind, per_sample=per_sample, example_inputs=x[:1])
    set_gate_states(net, p_off=0.3, p_frac=0.4, seed=4)
    assert l0core.freeze_gates(net) == len(l0core.gates(net))
    net.train()  # a model's train() reaches every submodule: the gates stay as evaluated
    assert all(not g.training and g.frozen for _, g in l0core.gates(net))
    torch.testing.assert_close(net(x), net.eval()(x))  # no draws: training sees what evaluation sees
    before = {n: g.log_alpha.clone() for n, g in l0core.gates(net)}
    opt = torch.optim.Adam(net.parameters(), lr=0.1)
    net.train()(x).pow(2).mean().backward()
    opt.step()
    for name, gate in l0core.gates(net):
        assert torch.equal(gate.log_alpha, before[name]) and gate.log_alpha.grad is None
    # A deep copy (what MLflow's model logging pickles) stays frozen.
    assert all(g.frozen and not g.train().training for _, g in l0core.gates(copy.deepcopy(net)))


def test_deciding_lands_the_deterministic_gates_on_the_target_and_ends_the_lagrangian():
    net, x = _mlp()
    set_gate_states(net, p_off=0.1, p_frac=0.6, seed=5)
    target = _multipliers_at(SparsityTarget(0.7), -0.5)
    target(net)
    lam = target.effective_lambda
    change = target.decide(net)
    assert target.decided is change and change.sparsity_after == pytest.approx(sparsity(net, x).sparsity)
    assert abs(change.sparsity_after - 0.7) <= 37 / sparsity(net, x).total_params  # one unit, as keep_exactly
    term = target(net)
    assert float(term) == 0.0 and not term.requires_grad  # nothing left to steer: the weights train alone
    assert target.effective_lambda == lam  # what the target cost is what it cost when decided
    # Frozen gates are no longer random: the expected sparsity (MLflow's expected_density) is the decided one.
    assert expected_sparsity(net).item() == pytest.approx(change.sparsity_after)
