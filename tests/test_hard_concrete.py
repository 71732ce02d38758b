import math

import pytest
import torch

from l0core import ChannelGate, HardConcrete, NeuronGate
from l0core.hard_concrete import BETA, GAMMA, ZETA, prob_nonzero_together, sample_together


def test_closed_form_matches_monte_carlo():
    gate = HardConcrete(5)
    with torch.no_grad():
        gate.log_alpha.copy_(torch.tensor([-4.0, -1.0, 0.0, 1.5, 4.0]))
    z = gate.sample((200_000,))
    empirical = (z > 0).float().mean(0)
    assert torch.allclose(empirical, gate.prob_nonzero().detach(), atol=5e-3)


def test_closed_form_formula():
    gate = HardConcrete(1)
    with torch.no_grad():
        gate.log_alpha.fill_(0.7)
    expected = 1 / (1 + math.exp(-(0.7 - BETA * math.log(-GAMMA / ZETA))))
    assert gate.prob_nonzero().item() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("log_alpha, expected", [
    (-3.0, 0.0), (-2.4, 0.0), (0.0, 0.5 * (ZETA - GAMMA) + GAMMA), (1.0, None), (2.4, 1.0), (3.0, 1.0)])
def test_deterministic_gate(log_alpha, expected):
    gate = HardConcrete(1)
    with torch.no_grad():
        gate.log_alpha.fill_(log_alpha)
    z = gate.deterministic().item()
    if expected is None:
        expected = min(1.0, max(0.0, (1 / (1 + math.exp(-log_alpha))) * (ZETA - GAMMA) + GAMMA))
        assert 0.0 < z < 1.0
    assert z == pytest.approx(expected, abs=1e-6)


def test_deterministic_threshold_is_2_398():
    gate = HardConcrete(2)
    with torch.no_grad():
        gate.log_alpha.copy_(torch.tensor([-2.39, -2.40]))
    z = gate.deterministic()
    assert z[0] > 0 and z[1] == 0


@pytest.mark.parametrize("d", [0.05, 0.2, 0.5, 0.8])
def test_initial_log_alpha_from_droprate(d):
    gate = HardConcrete(20_000, droprate_init=d)
    mean = gate.log_alpha.mean().item()
    assert mean == pytest.approx(math.log(1 - d) - math.log(d), abs=1e-3)
    assert gate.log_alpha.std().item() == pytest.approx(0.01, rel=0.05)


def test_no_floor_on_prob_nonzero():
    # The paper code clamps log_alpha to >= ln 0.01, pinning P(z != 0) >= 0.047; we must not.
    gate = HardConcrete(1)
    opt = torch.optim.SGD(gate.parameters(), lr=10.0)
    for _ in range(50):
        opt.zero_grad()
        gate.prob_nonzero().sum().backward()
        opt.step()
    assert gate.prob_nonzero().item() < 0.01
    assert gate.log_alpha.item() < math.log(0.01)


def test_sample_and_its_gradient_follow_the_reparameterisation():
    """z = clamp(sigmoid((logit(u) + log_alpha) / beta) * (zeta - gamma) + gamma, 0, 1) with the same u, and
    dz/dlog_alpha = (zeta - gamma) * s * (1 - s) / beta where 0 < z < 1, else 0 (summed over the batch)."""
    gate = HardConcrete(64).double()
    with torch.no_grad():
        gate.log_alpha.copy_(torch.linspace(-6, 6, 64, dtype=torch.float64))
    torch.manual_seed(3)
    z = gate.sample((50,))
    torch.manual_seed(3)
    u = torch.rand(50, 64, dtype=torch.float64)
    s = torch.sigmoid((torch.logit(u, eps=1e-6) + gate.log_alpha.detach()) / BETA)
    pre = s * (ZETA - GAMMA) + GAMMA
    assert torch.allclose(z.detach(), pre.clamp(0, 1), atol=1e-12)
    assert ((z == 0).any() and (z == 1).any() and ((z > 0) & (z < 1)).any())  # all three regions exercised
    weights = torch.randn(50, 64, dtype=torch.float64)
    (z * weights).sum().backward()
    inside = ((pre > 0) & (pre < 1)).double()
    expected = (weights * (ZETA - GAMMA) * s * (1 - s) / BETA * inside).sum(0)
    assert torch.allclose(gate.log_alpha.grad, expected, atol=1e-10)


def test_gradients_reach_log_alpha_and_weights():
    lin = torch.nn.Linear(6, 3)
    gate = NeuronGate(6).train()
    out = lin(gate(torch.randn(4, 6))).pow(2).sum()
    out.backward()
    assert gate.log_alpha.grad is not None and gate.log_alpha.grad.abs().sum() > 0
    assert lin.weight.grad.abs().sum() > 0


def test_eval_is_deterministic_training_is_not():
    gate = ChannelGate(8)
    x = torch.randn(4, 8, 3, 3)
    gate.eval()
    assert torch.equal(gate(x), gate(x))
    gate.train()
    assert not torch.equal(gate(x), gate(x))


def test_per_sample_gates_differ_across_the_batch():
    gate = ChannelGate(16, per_sample=True).train()
    y = gate(torch.ones(32, 16, 2, 2))
    per_example = y[:, :, 0, 0]
    assert not torch.allclose(per_example[0], per_example[1])
    # within one example, a channel's gate is shared across spatial positions
    assert torch.equal(y[:, :, 0, 0], y[:, :, 1, 1])
    batch_gate = ChannelGate(16, per_sample=False).train()
    y = batch_gate(torch.ones(32, 16, 2, 2))[:, :, 0, 0]
    assert torch.equal(y[0], y[1])


def test_noise_follows_parameter_dtype_and_device():
    gate = HardConcrete(3).to(torch.float64)
    z = gate.sample((2,))
    assert z.dtype == torch.float64 and z.device == gate.log_alpha.device


def test_bad_arguments_are_rejected():
    with pytest.raises(ValueError, match="droprate_init"):
        HardConcrete(3, droprate_init=1.0)
    with pytest.raises(ValueError, match="dim 1 must have 4 units"):
        ChannelGate(4)(torch.randn(2, 5, 3, 3))


def _gates_with_values(*sizes: int, **constants: float) -> list[HardConcrete]:
    found = []
    for i, n in enumerate(sizes):
        gate = HardConcrete(n, **constants)
        with torch.no_grad():
            gate.log_alpha.copy_(torch.linspace(-3.0, 3.0, n) + 0.1 * i)
        found.append(gate)
    return found


@pytest.mark.parametrize("batch_shape", [(), (4,)], ids=["per-batch", "per-example"])
def test_sampling_together_is_sampling_each_gate_from_the_same_noise(batch_shape):
    """One pass over concatenated log_alpha gives each gate exactly its own sample and gradient.

    On the CPU, rand(3) then rand(5) are the first and last values of rand(8) from the same seed, so the same
    seed must give the same z, to the bit, and the same log_alpha gradients.
    """
    a, b = _gates_with_values(3, 5)
    torch.manual_seed(1)
    alone = [a.sample(batch_shape), b.sample(batch_shape)]
    sum(z.square().sum() for z in alone).backward()
    grads_alone = [a.log_alpha.grad.clone(), b.log_alpha.grad.clone()]
    a.log_alpha.grad = b.log_alpha.grad = None
    torch.manual_seed(1)
    together = sample_together([a, b], batch_shape)
    sum(z.square().sum() for z in together).backward()
    if batch_shape:  # per example, rows interleave the gates: compare distributions, not values
        assert [z.shape for z in together] == [z.shape for z in alone]
    else:
        assert all(torch.equal(x, y) for x, y in zip(alone, together))
        torch.testing.assert_close(a.log_alpha.grad, grads_alone[0])
        torch.testing.assert_close(b.log_alpha.grad, grads_alone[1])
    assert a.log_alpha.grad.abs().sum() > 0 and b.log_alpha.grad.abs().sum() > 0


def test_sampling_together_has_each_gates_distribution():
    a, b = _gates_with_values(3, 5)
    z_a, z_b = sample_together([a, b], (100_000,))
    expected = torch.cat([a.prob_nonzero(), b.prob_nonzero()]).detach()
    torch.testing.assert_close(torch.cat([(z_a > 0).float().mean(0), (z_b > 0).float().mean(0)]), expected,
                               atol=6e-3, rtol=0)


def test_gates_with_different_constants_are_sampled_and_counted_each_with_their_own():
    a, = _gates_with_values(3)
    b, = _gates_with_values(4, beta=0.5, zeta=1.2)
    p = prob_nonzero_together([a, b])
    torch.testing.assert_close(p, torch.cat([a.prob_nonzero(), b.prob_nonzero()]))
    z_a, z_b = sample_together([a, b], (20_000,))
    torch.testing.assert_close((z_b > 0).float().mean(0), b.prob_nonzero().detach(), atol=2e-2, rtol=0)
    assert z_a.shape == (20_000, 3) and z_b.shape == (20_000, 4)
    assert sample_together([]) == []
    with pytest.raises(ValueError, match="no gates"):
        prob_nonzero_together([])
