import json
import subprocess
import sys
import textwrap

import pytest
import torch
from pydantic import ValidationError
from torch import nn

import l0core
from sweeps.config import ModelConfig, OptimConfig
from sweeps.data import load_data
from sweeps.models import build_model
from sweeps.spec import SpecError
from sweeps.baseline import baseline_key, dense_baseline
from sweeps.loop import StopTrial, build_optimizer, train_step
from sweeps.preflight import check_fits
from sweeps.training import TrialConfig, train_trial

FAST = {"lr": 3e-3, "gate_lr": 0.05, "epochs": 4}


def _cfg(tmp_path, **kw):
    base = dict(optim=FAST, baseline_dir=str(tmp_path / "baselines"), threads=1)
    base.update(kw)
    return TrialConfig(**base)


def test_trial_reports_per_epoch_and_final_numbers(tmp_path):
    result = train_trial(_cfg(tmp_path, lam=0.3))
    assert [m.epoch for m in result.epochs] == [1, 2, 3, 4]
    assert result.val_metric > 0.9 and 0.0 <= result.test_metric <= 1.0
    assert result.epochs[-1].sparsity == pytest.approx(result.sparsity)
    assert 0 < result.removed_params < result.total_params
    assert set(result.kept_units) == {"1.l0_gate", "3.l0_gate", "5.l0_gate"}
    assert result.epochs[0].train_penalty > 0


def test_chance_accuracy_reads_labels_however_the_dataset_keeps_them(tmp_path):
    from torch.utils.data import Dataset, Subset

    from sweeps.data import chance_accuracy, labels

    y = torch.tensor([2, 0, 2, 1, 2, 0, 1, 2])

    class WithTargets(Dataset):  # as torchvision's datasets keep them: inputs never loaded for the labels
        targets = y.tolist()

        def __len__(self):
            return len(y)

        def __getitem__(self, i):
            raise AssertionError("labels() loaded an input")

    class Plain(Dataset):  # a user's dataset: read once
        def __len__(self):
            return len(y)

        def __getitem__(self, i):
            return torch.zeros(3), y[i]

    for dataset in (WithTargets(), Plain()):
        assert labels(dataset).tolist() == y.tolist()
        assert labels(Subset(dataset, [1, 3, 5])).tolist() == [0, 1, 0]
        assert chance_accuracy(dataset) == 0.5 and chance_accuracy(Subset(dataset, [1, 3, 5])) == pytest.approx(2 / 3)
    # A trial reports it for its own validation split: the digits split's commonest class has 26 of its 216 examples.
    result = train_trial(_cfg(tmp_path, lam=0.1, optim={**FAST, "epochs": 1}))
    val = load_data("digits").val
    assert result.val_examples == len(val) == 216
    assert result.chance_accuracy == chance_accuracy(val) == pytest.approx(26 / 216)


def test_digits_are_scikit_learns_read_without_importing_it():
    from sklearn.datasets import load_digits

    from sweeps.data import digits_arrays

    x, y = digits_arrays()
    expected_x, expected_y = load_digits(return_X_y=True)
    assert x.dtype == expected_x.dtype and (x == expected_x).all() and (y == expected_y).all()


def test_trial_is_deterministic_for_a_seed(tmp_path):
    a = train_trial(_cfg(tmp_path, lam=0.1, optim={**FAST, "epochs": 2}))
    b = train_trial(_cfg(tmp_path, lam=0.1, optim={**FAST, "epochs": 2}))
    assert a.as_dict() == b.as_dict()


@pytest.mark.parametrize("name", ["adam", "adamw", "sgd"])
def test_optimizer_is_fused_with_the_gates_in_their_own_group(name):
    model = build_model("lenet5", (1, 28, 28), 10, gates=True)
    opt, _ = build_optimizer(model, OptimConfig(name=name, lr=0.01, gate_lr=0.1, weight_decay=1e-4))
    assert opt.defaults["fused"] is True  # one kernel per step, not a Python loop over the parameters
    weights, gates = opt.param_groups
    assert (weights["lr"], weights["weight_decay"]) == (0.01, 1e-4)
    assert (gates["lr"], gates["weight_decay"]) == (0.1, 0.0)
    x, y = torch.randn(4, 1, 28, 28), torch.tensor([0, 1, 2, 3])
    torch.nn.functional.cross_entropy(model(x), y).backward()
    before = [p.detach().clone() for p in model.parameters()]
    opt.step()
    assert all(not torch.equal(b, p) for b, p in zip(before, model.parameters()) if p.grad is not None)


def test_gates_share_the_weights_group_when_their_settings_are_the_same():
    """No decay and no gate_lr of their own: one group (a fused step is one call per group), all parameters."""
    model = build_model("lenet5", (1, 28, 28), 10, gates=True)
    for cfg, groups in ((OptimConfig(name="adam", lr=0.01), 1), (OptimConfig(name="adam", lr=0.01, gate_lr=0.01), 1),
                        (OptimConfig(name="adam", lr=0.01, gate_lr=0.1), 2),
                        (OptimConfig(name="adam", lr=0.01, weight_decay=1e-4), 2)):
        opt, _ = build_optimizer(model, cfg)
        assert len(opt.param_groups) == groups
        assert {id(p) for g in opt.param_groups for p in g["params"]} == {id(p) for p in model.parameters()}
        gate_group = opt.param_groups[-1]
        assert (gate_group["lr"], gate_group["weight_decay"]) == (cfg.gate_lr or cfg.lr, 0.0)


@pytest.mark.parametrize("name", ["digits", "tests.helpers:tiny_dataset"])
def test_in_memory_data_is_read_a_batch_at_a_time_in_the_same_order(name):
    from torch.utils.data import DataLoader, Subset, TensorDataset

    from sweeps.data import TensorBatches, data_loader

    splits = load_data(name)
    for dataset in (splits.train, splits.val, splits.test):
        base = dataset.dataset if isinstance(dataset, Subset) else dataset
        assert isinstance(base, TensorBatches)
        # The stock loader on a plain TensorDataset of the same tensors reads example by example.
        plain = TensorDataset(*base.tensors)
        plain = Subset(plain, dataset.indices) if isinstance(dataset, Subset) else plain
        stock = list(DataLoader(plain, batch_size=4, shuffle=True, generator=torch.Generator().manual_seed(5)))
        fast = list(data_loader(dataset, 4, shuffle=True, generator=torch.Generator().manual_seed(5)))
        assert len(fast) == len(stock) > 1
        assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(fast, stock))


def test_fused_optimizer_honours_the_gradient_scaler():
    """The float16 path of a CUDA trial (autocast + GradScaler + the fused step), run on the CPU: a step
    updates every parameter, and a step whose scaled gradients overflow is skipped and lowers the scale."""
    torch.manual_seed(0)
    model = build_model("lenet5", (1, 28, 28), 10, gates=True)
    opt, _ = build_optimizer(model, OptimConfig(name="adam", lr=1e-3))
    x, y = torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,))
    for scale, updates in ((2.0 ** 10, True), (2.0 ** 60, False)):
        scaler = torch.amp.GradScaler("cpu", init_scale=scale)
        before = [p.detach().clone() for p in model.parameters()]
        train_step(model, opt, x, y, 0.1, autocast=torch.float16, scaler=scaler)
        changed = [not torch.equal(b, p) for b, p in zip(before, model.parameters())]
        assert all(changed) if updates else not any(changed)
        assert all(torch.isfinite(p).all() for p in model.parameters())
        assert (scaler.get_scale() == scale) == updates


def test_hook_stops_a_trial(tmp_path):
    seen = []
    with pytest.raises(StopTrial) as stop:
        train_trial(_cfg(tmp_path), on_epoch=lambda m: seen.append(m.epoch) or m.epoch == 2)
    assert seen == [1, 2] and stop.value.metrics.epoch == 2


def test_a_diverged_trial_fails_instead_of_completing(tmp_path):
    # SGD at lr 50 turns the MLP's loss to NaN in its first epoch; it used to complete at chance accuracy
    # with gates read from NaN, a trial of the budget like any other.
    seen = []
    with pytest.raises(FloatingPointError, match=r"training loss is nan in epoch 1: the trial diverged"):
        train_trial(_cfg(tmp_path, optim={"name": "sgd", "lr": 50.0, "epochs": 3}),
                    on_epoch=lambda m: seen.append(m.epoch))
    assert seen == []  # stopped before the epoch was reported


def test_finetune_starts_from_the_baseline(tmp_path):
    cfg = _cfg(tmp_path, mode="finetune", droprate_init=0.05, lam=0.1)
    path = dense_baseline(cfg)
    saved = torch.load(path)
    splits = load_data("digits")
    dense = build_model("mlp", splits.input_shape, 10, gates=False)
    dense.load_state_dict(saved["state_dict"])
    gated = build_model("mlp", splits.input_shape, 10, droprate_init=0.05)
    gated.load_state_dict(saved["state_dict"], strict=False)
    x = splits.val.tensors[0][:16]
    assert torch.equal(gated.eval()(x), dense.eval()(x))  # gates start open: exactly the baseline's outputs
    assert saved["val_metric"] > 0.9
    result = train_trial(cfg)
    assert result.val_metric > 0.9


def test_two_processes_share_one_baseline(tmp_path):
    cfg = _cfg(tmp_path, mode="finetune", droprate_init=0.05)
    script = textwrap.dedent(f"""
        import json, sys, time
        import sweeps.baseline as t
        calls = []
        original = t.run_epochs
        def counted(*a, **k):
            calls.append(1)
            return original(*a, **k)
        t.run_epochs = counted
        cfg = t.TrialConfig.model_validate_json({cfg.model_dump_json()!r})
        t.dense_baseline(cfg)
        print(json.dumps({{"trained": len(calls)}}))
    """)
    procs = [subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [json.loads(p.communicate(timeout=300)[0].strip().splitlines()[-1]) for p in procs]
    assert sorted(o["trained"] for o in outs) == [0, 1]
    assert len(list((tmp_path / "baselines").glob("*.pt"))) == 1


def test_baseline_key_ignores_trial_knobs(tmp_path):
    a = _cfg(tmp_path, lam=0.1, droprate_init=0.05)
    b = _cfg(tmp_path, lam=3.0, droprate_init=0.2, mode="finetune")
    c = _cfg(tmp_path, optim={**FAST, "lr": 1e-2})
    assert baseline_key(a) == baseline_key(b) != baseline_key(c)


@pytest.mark.parametrize("model", ["googlenet", "torchvision:resnet18"])
def test_convnets_run_an_epoch_on_cifar_shaped_data(tmp_path, model):
    cfg = _cfg(tmp_path, data={"name": "synthetic", "batch_size": 64}, model={"name": model},
               optim={"name": "adamw", "lr": 1e-3, "epochs": 1, "schedule": "cosine"})
    result = train_trial(cfg)
    assert len(result.epochs) == 1 and result.total_params > 0
    assert result.flops_ratio is not None


@pytest.mark.parametrize("bad, field", [
    ({"lam": -1}, "lam"), ({"droprate_init": 1.5}, "droprate_init"), ({"mode": "both"}, "mode"),
    ({"optim": {"name": "rmsprop"}}, "optim.name"), ({"optimiser": {}}, "optimiser"),
    ({"optim": {"epochs": 5, "schedule": "multistep", "milestones": [7]}}, "milestones"),
])
def test_bad_configs_name_the_field(bad, field):
    with pytest.raises(ValidationError, match=field.replace(".", r"\.?.*")):
        TrialConfig(**bad)


@pytest.mark.parametrize("model, data, why", [
    ("lenet5", {"name": "digits"}, r"\(inputs \(1, 8, 8\)\): lenet5 needs images of at least 16x16 pixels"),
    ("torchvision:shufflenet_v2_x0_5", {"name": "synthetic", "kwargs": {"shape": [3, 32, 32], "n": 16}},
     "torch-pruning .* cannot trace how the channels of ShuffleNetV2"),
])
def test_a_model_that_cannot_train_on_its_data_is_found_before_training(model, data, why):
    cfg = TrialConfig(data=data, model={"name": model})
    with pytest.raises(SpecError, match=rf"^trial.model '{model}' cannot train on trial.data '{data['name']}' .*{why}"):
        check_fits(cfg)
    check_fits(cfg.model_copy(update={"model": ModelConfig(name="mlp")}))  # the MLP takes any input shape


def test_unknown_model_and_dataset_are_clear_errors():
    with pytest.raises(ValueError, match="model 'resnet' is unknown"):
        build_model("resnet", (3, 32, 32), 10)
    with pytest.raises(ValueError, match="torchvision has no classification model 'nope'"):
        build_model("torchvision:nope", (3, 32, 32), 10)
    with pytest.raises(ValueError, match="dataset 'imagenet' is unknown"):
        load_data("imagenet")


def test_missing_torchvision_data_offline_is_one_clear_error(tmp_path):
    with pytest.raises(ValueError, match=r"dataset 'mnist': no files under .* put torchvision's MNIST files"):
        load_data("mnist", data_dir=str(tmp_path), download=False)


def test_user_model_and_dataset_by_import_path(tmp_path):
    cfg = _cfg(tmp_path, data={"name": "tests.helpers:tiny_dataset"}, model={"name": "tests.helpers:TinyInception"},
               optim={**FAST, "epochs": 1})
    splits = load_data("tests.helpers:tiny_dataset")
    assert splits.input_shape == (1, 12, 12) and splits.num_classes == 3
    with pytest.raises(RuntimeError):  # TinyInception takes 3 channels: the user's model meets the user's data
        train_trial(cfg)
    model = build_model("tests.helpers:TinyInception", (3, 8, 8), 5)
    assert {g for g, _ in __import__("l0core").gates(model)} >= {"stem.0.l0_gate", "mix.0.l0_gate"}


def _write_idx(path, data: torch.Tensor, magic: int) -> None:
    import struct

    header = struct.pack(">I", magic) + b"".join(struct.pack(">I", d) for d in data.shape)
    path.write_bytes(header + data.to(torch.uint8).numpy().tobytes())


def test_mnist_is_read_from_data_dir(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    g = torch.Generator().manual_seed(0)
    for prefix, n in (("train", 60), ("t10k", 20)):
        _write_idx(raw / f"{prefix}-images-idx3-ubyte", torch.randint(0, 256, (n, 28, 28), generator=g), 2051)
        _write_idx(raw / f"{prefix}-labels-idx1-ubyte", torch.randint(0, 10, (n,), generator=g), 2049)
    splits = load_data("mnist", data_dir=str(tmp_path), download=False, val_fraction=0.25)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (45, 15, 20)
    x, y = splits.train[0]
    assert x.shape == (1, 28, 28) and splits.input_shape == (1, 28, 28)
    assert abs(float(x.mean())) < 3  # normalised


def test_large_lambda_trains_a_sparser_model(tmp_path):
    small = train_trial(_cfg(tmp_path, lam=0.001, optim={**FAST, "epochs": 8}))
    large = train_trial(_cfg(tmp_path, lam=0.3, optim={**FAST, "epochs": 8}))
    assert large.sparsity > small.sparsity + 0.15
    assert large.flops_ratio < small.flops_ratio
    assert small.val_metric > 0.95


def test_amp_and_channels_last_train_a_gated_convnet(tmp_path):
    """The GPU knobs on the CPU: bfloat16 autocast and NHWC tensors, fine-tuning LeNet-5 from its baseline."""
    cfg = _cfg(tmp_path, data={"name": "synthetic", "kwargs": {"shape": [1, 28, 28], "n": 256}},
               model={"name": "lenet5"}, optim={**FAST, "epochs": 2}, amp=True, channels_last=True,
               mode="finetune", droprate_init=0.05, lam=0.5)
    result = train_trial(cfg)
    assert all(torch.isfinite(torch.tensor([m.train_task_loss, m.train_penalty])).all() for m in result.epochs)
    assert 0.0 <= result.val_metric <= 1.0 and result.epochs[0].train_penalty > 0
    assert baseline_key(cfg) != baseline_key(cfg.model_copy(update={"amp": False, "channels_last": False}))
    assert all(p.dtype == torch.float32 for p in result.model.parameters())  # autocast, not a half model


def test_compiled_training_forward_trains_and_leaves_the_module_itself_to_evaluate_and_export(tmp_path):
    """trial.compile: the training forward runs compiled (no graph breaks: the gates' draw, products and hooks
    are traced), and the trial returns the plain module, which evaluation, the report and export use."""
    import l0core
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    result = train_trial(_cfg(tmp_path, lam=0.3, compile=True))
    assert counters["stats"]["unique_graphs"] >= 1 and not counters["graph_break"]
    assert result.val_metric > 0.9 and 0 < result.removed_params < result.total_params
    assert result.epochs[0].train_penalty > 0
    assert not isinstance(result.model, torch._dynamo.eval_frame.OptimizedModule)
    small = l0core.compact(result.model, result.example_inputs)
    x = result.example_inputs
    assert torch.allclose(small.eval()(x), result.model.eval()(x), atol=1e-5)
    # The compiled gate draws come from the seeded generator too: a seed repeats its trial.
    assert train_trial(_cfg(tmp_path, lam=0.3, compile=True)).as_dict() == result.as_dict()


def test_a_compiled_gated_model_runs_its_gates_after_its_dense_twin_was_compiled():
    """Per-example gates act through hooks, which dynamo does not guard on: compiled after a dense LeNet-5 (as a
    fine-tuning trial's baseline is), the gated one must get a graph of its own, not the dense one's."""
    from sweeps.runtime import compiled

    x = torch.randn(1, 1, 28, 28).expand(8, 1, 28, 28).contiguous()  # eight identical examples
    compiled(build_model("lenet5", (1, 28, 28), 10, gates=False).train())(x)
    gated = build_model("lenet5", (1, 28, 28), 10, gates=True, per_sample=True, droprate_init=0.5).train()
    out = compiled(gated)(x)
    # Independent gates per example: identical examples get different outputs (the dense graph gives them equal).
    assert (out - out[0]).abs().amax() > 1e-3


def test_compile_without_a_cpp_compiler_is_one_line_before_any_training(monkeypatch, tmp_path):
    import torch._inductor.config

    monkeypatch.setattr(torch._inductor.config.cpp, "cxx", ("no-such-compiler",))
    with pytest.raises(SpecError, match=r"^trial.compile: true needs a C\+\+ compiler on this machine"):
        check_fits(_cfg(tmp_path, compile=True))
    check_fits(_cfg(tmp_path))  # not asked to compile: no compiler needed


_FAULTS_OF_A_BIG_TENSOR = textwrap.dedent("""
    import json, resource, statistics, sys
    import torch
    from sweeps.training import TrialConfig, train_trial
    if sys.argv[1] == "after a trial":
        train_trial(TrialConfig(optim={"epochs": 1}, baseline_dir=sys.argv[2], threads=1))
    torch.empty(1 << 24).fill_(1.0)  # 64 MiB, past glibc's largest adaptive mmap threshold (32 MiB)
    faults = []
    for _ in range(5):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        torch.empty(1 << 24).fill_(1.0)  # freed at once; the next one asks for the same size
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    # The median: with freed memory kept, one in eight processes placed the first of them on fresh pages
    # (16,384 faults, then none); under the defaults every one of them takes all 16,384.
    print(json.dumps(statistics.median(faults)))
""")


@pytest.mark.skipif(sys.platform != "linux", reason="glibc's malloc: Linux only")
def test_a_trial_on_the_cpu_keeps_freed_memory_for_the_next_step(tmp_path):
    """A tensor freed and allocated again is 16,384 fresh pages (page faults) under glibc's defaults, every
    time; once a trial has trained on the CPU, the process reuses the freed memory and takes none (the median
    of five)."""
    faults = {}
    for case in ("glibc defaults", "after a trial"):
        out = subprocess.run([sys.executable, "-c", _FAULTS_OF_A_BIG_TENSOR, case, str(tmp_path)], check=True,
                             capture_output=True, text=True, stdin=subprocess.DEVNULL).stdout
        faults[case] = json.loads(out.strip().splitlines()[-1])
    assert faults["glibc defaults"] > 10_000
    assert faults["after a trial"] < 100


def test_a_decided_target_steps_no_multipliers_so_mixed_precision_training_goes_on():
    """With float16 on CUDA a GradScaler steps the optimizers, and it raises on one whose parameters got no
    gradient: after the decision the multipliers get none. (GradScaler("cpu") runs the same checks.)"""
    net = nn.Sequential(nn.Linear(20, 32), nn.ReLU(), nn.Linear(32, 4))
    l0core.attach(net, "neuron", example_inputs=torch.randn(1, 20))
    target = l0core.SparsityTarget(0.5)
    with torch.no_grad():
        target.l1.fill_(-0.3)
    target.decide(net)
    opt, multipliers = torch.optim.Adam(net.parameters(), lr=0.01), target.optimizer(lr=0.05)
    task, term = train_step(net, opt, torch.randn(4, 20), torch.tensor([0, 1, 2, 3]),
                            scaler=torch.amp.GradScaler("cpu"), target=target, multipliers=multipliers)
    assert float(term) == 0.0 and torch.isfinite(task)
    assert target.l1.item() == pytest.approx(-0.3) and target.l1.grad is None
