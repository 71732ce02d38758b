"""Study files: every shipped study validates; every mistake is one line naming the field."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import optuna
import pytest

from sweeps.search import starting_point, suggest, trial_config
from sweeps.spec import SpecError, load_spec, parse_spec

STUDIES = sorted((Path(__file__).parents[1] / "studies").glob("*.yaml"))


def test_shipped_studies_validate():
    names = {p.stem for p in STUDIES}
    assert {"default", "mnist-mlp", "mnist-lenet5", "cifar10-googlenet"} <= names
    for path in STUDIES:
        spec = load_spec(path)
        assert spec.trial.optim.gate_lr, f"{path.name}: gates barely move without gate_lr"
        for point in spec.enqueue:
            starting_point(spec, point)


def test_googlenet_study_keeps_the_seed_recipe():
    spec = load_spec(Path(__file__).parents[1] / "studies" / "cifar10-googlenet.yaml")
    o = spec.trial.optim
    assert (o.name, o.lr, spec.trial.data.batch_size, o.epochs, o.schedule) == ("adamw", 1e-3, 128, 180, "multistep")
    assert spec.search.lam["finetune"].low > spec.search.lam["scratch"].high  # fine-tuning wants a larger lambda


BAD = [
    ({"name": "s", "colour": 1}, "colour: unknown key"),
    ({"name": "s", "search": {"lam": {"low": 1.0, "high": 0.1}}}, "search.lam"),
    ({"name": "s", "search": {"lam": {"low": 0.0, "high": 1.0, "log": True}}}, "log range needs low > 0"),
    ({"name": "s", "search": {"droprate_init": 1.5}}, "search.droprate_init must be in (0, 1)"),
    ({"name": "s", "search": {"mode": ["scratch", "sideways"]}}, "search.mode.1"),
    ({"name": "s", "search": {"params": {"optim.colour": {"low": 1, "high": 2}}}}, "'optim.colour' is not a trial"),
    ({"name": "s", "trials": 0}, "trials: Input should be greater than or equal to 1"),
    ({"name": "s", "trial": {"optim": {"lr": "fast"}}}, "trial.optim.lr"),
    ({"name": "s", "trial": {"model": {"name": "resnet9000"}}}, "trial.model.name: model 'resnet9000' is unknown"),
    ({"name": "s", "trial": {"data": {"name": "imagenet"}}}, "trial.data.name: dataset 'imagenet' is unknown"),
    ({"name": "s", "objectives": ["sparsity"]}, "objectives"),
    ({"name": "bad name!"}, "name: 'bad name!' is not a usable study name: letters, digits, '.', '_' and '-'"),
    ({"name": "s", "enqueue": [{"lam": 1, "beta": 2}]}, "enqueue[0] has ['beta']"),
    ({"name": "s", "workers": {"heartbeat_interval": 10, "grace_period": 5}}, "grace_period (5) must exceed"),
    ({"name": "s", "search": {"lam": {"scratch": {"low": 0.1, "high": 1}}}}, "none for ['finetune']"),
    ({"name": "s", "min_accuracy": 90}, "min_accuracy: must be 'chance' or a validation accuracy in [0, 1] (0: no "
                                        "floor), got 90"),
    ({"name": "s", "min_accuracy": "random"}, "min_accuracy: must be 'chance' or a validation accuracy in [0, 1]"),
    ({"name": "s", "search": {"lam": 0.1, "target_sparsity": 0.8}},
     "search: give either lam (a price on the parameters kept) or target_sparsity (the share of parameters to remove), "
     "not both"),
    ({"name": "s", "search": {"droprate_init": 0.5}}, "search: give either lam (a price on the parameters kept) or "
                                                      "target_sparsity (the share of parameters to remove), one of them"),
    ({"name": "s", "search": {"target_sparsity": 1.0}}, "search.target_sparsity must be in (0, 1), got 1.0"),
    ({"name": "s", "search": {"target_sparsity": {"low": 0.0, "high": 0.9}}}, "search.target_sparsity must be in (0, 1)"),
    ({"name": "s", "search": {"target_sparsity": {"scratch": 0.5}}}, "search.target_sparsity gives ranges per mode "
                                                                     "but none for ['finetune']"),
    ({"name": "s", "search": {"lam": 0.1}, "trial": {"export": {"exact_target": True}}},
     "trial.export.exact_target needs search.target_sparsity"),
    ({"name": "s", "search": {"lam": 0.1}, "trial": {"optim": {"decide_gates_at": 0.6}}},
     "trial.optim.decide_gates_at 0.6 steers a sparsity target, and this study searches lam (no target): remove it, "
     "or search target_sparsity"),
    ({"name": "s", "search": {"lam": 0.1}, "trial": {"optim": {"target_warmup": 0.5}}},
     "trial.optim.target_warmup 0.5 steers a sparsity target"),
    ({"name": "s", "search": {"target_sparsity": 0.8}, "enqueue": [{"lam": 1.0}]},
     "enqueue[0] has ['lam']: starting points may set target_sparsity"),
]


@pytest.mark.parametrize("data,expected", BAD, ids=[b[1][:30] for b in BAD])
def test_bad_spec_is_one_clear_line(data, expected):
    data = {"search": {"lam": 0.1}, **data}  # a study says lam or target_sparsity: the mistake is elsewhere
    with pytest.raises(SpecError) as info:
        parse_spec(data, "x.yaml")
    message = str(info.value)
    assert "\n" not in message and message.startswith("x.yaml: ")
    assert expected in message


def test_accuracy_floor_is_the_number_given_or_one_example_above_chance():
    from sweeps.worker import metric_floor

    result = (26 / 216, 216)  # the chance accuracy and size of the digits validation split
    assert metric_floor(0.9, *result) == 0.9 and metric_floor(0, *result) == 0.0
    # A tie with always answering the commonest class falls short; one example more reaches it.
    assert 26 / 216 < metric_floor("chance", *result) <= 27 / 216


def test_broken_yaml_names_the_line(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text("name: s\nsearch: {lam: [1, 2\n")
    with pytest.raises(SpecError, match=r"broken YAML at line \d+"):
        load_spec(path)


def test_suggest_uses_per_mode_ranges_and_applies_dotted_params():
    spec = parse_spec({"name": "s", "search": {
        "lam": {"scratch": {"low": 0.1, "high": 1.0}, "finetune": {"low": 5.0, "high": 50.0}},
        "droprate_init": {"scratch": {"low": 0.2, "high": 0.7}, "finetune": 0.05},
        "params": {"optim.lr": {"low": 1e-4, "high": 1e-2, "log": True}, "data.batch_size": {"choices": [32, 64]}}}})
    study = optuna.create_study(directions=["maximize", "maximize"], sampler=optuna.samplers.RandomSampler(seed=1))
    seen = set()
    for _ in range(12):
        trial = study.ask()
        cfg, values = suggest(trial, spec)
        low, high = (0.1, 1.0) if cfg.mode == "scratch" else (5.0, 50.0)
        assert low <= cfg.lam <= high and f"lam_{cfg.mode}" in trial.params
        assert cfg.droprate_init == 0.05 if cfg.mode == "finetune" else 0.2 <= cfg.droprate_init <= 0.7
        assert 1e-4 <= cfg.optim.lr <= 1e-2 and cfg.data.batch_size in (32, 64)
        assert values["lam"] == cfg.lam
        seen.add(cfg.mode)
        study.tell(trial, [0.5, 0.5])
    assert seen == {"scratch", "finetune"}
    assert starting_point(spec, {"mode": "finetune", "lam": 10, "droprate_init": 0.05}) == \
        {"mode": "finetune", "lam_finetune": 10}
    assert trial_config(spec, {"lam": 2.0, "mode": "scratch", "optim.lr": 0.5}).optim.lr == 0.5


def test_a_target_study_suggests_targets_per_mode_and_trains_towards_them():
    spec = parse_spec({"name": "s", "search": {
        "target_sparsity": {"scratch": {"low": 0.3, "high": 0.6}, "finetune": {"choices": [0.9, 0.95]}}},
        "trial": {"export": {"exact_target": True}, "optim": {"target_warmup": 0.2, "multiplier_lr": 0.1}}})
    study = optuna.create_study(directions=["maximize", "maximize"], sampler=optuna.samplers.RandomSampler(seed=2))
    seen = set()
    for _ in range(10):
        trial = study.ask()
        cfg, values = suggest(trial, spec)
        assert "lam" not in values and f"target_sparsity_{cfg.mode}" in trial.params
        assert 0.3 <= cfg.target_sparsity <= 0.6 if cfg.mode == "scratch" else cfg.target_sparsity in (0.9, 0.95)
        assert cfg.export.exact_target and cfg.optim.multiplier_lr == 0.1
        seen.add(cfg.mode)
        study.tell(trial, [0.5, 0.5])
    assert seen == {"scratch", "finetune"}
    assert starting_point(spec, {"mode": "scratch", "target_sparsity": 0.4}) == \
        {"mode": "scratch", "target_sparsity_scratch": 0.4}


def test_the_target_settings_leave_the_dense_baselines_key_alone():
    from sweeps.config import TrialConfig
    from sweeps.baseline import baseline_key

    plain = TrialConfig()
    tuned = TrialConfig.model_validate({"optim": {"target_warmup": 0.5, "multiplier_lr": 1.0, "decide_gates_at": 0.9},
                                        "target_sparsity": 0.5})
    assert baseline_key(plain) == baseline_key(tuned)


def test_a_study_made_before_a_new_setting_existed_still_resumes():
    """A study's stored spec lacks settings added in later versions; they count with their defaults."""
    import json

    from sweeps.study import check_same_study

    spec = load_spec(Path(__file__).parents[1] / "studies" / "default.yaml")
    older = json.loads(spec.model_dump_json())
    del older["trial"]["amp"], older["trial"]["channels_last"], older["trial"]["compile"], older["min_accuracy"]
    check_same_study(spec, json.dumps(older))
    # Which trials count cannot change under a study either: its front would mix two floors.
    with pytest.raises(SpecError, match="different 'min_accuracy';"):
        check_same_study(spec, json.dumps({**older, "min_accuracy": 0.9}))
    older["trial"]["seed"] = 99
    with pytest.raises(SpecError, match="different 'trial';"):
        check_same_study(spec, json.dumps(older))


def test_a_target_study_made_before_gates_were_decided_resumes_only_as_it_ran():
    """Its trials left the Lagrangian to the end: new ones must not decide their gates in the same study."""
    import json

    from sweeps.study import check_same_study

    spec = load_spec(Path(__file__).parents[1] / "studies" / "default-target.yaml")
    older = json.loads(spec.model_dump_json())
    del older["trial"]["optim"]["decide_gates_at"]
    with pytest.raises(SpecError, match="different 'trial';"):
        check_same_study(spec, json.dumps(older))  # the file decides at 0.8
    as_it_ran = spec.model_copy(update={"trial": spec.trial.model_copy(
        update={"optim": spec.trial.optim.model_copy(update={"decide_gates_at": 1.0})})})
    check_same_study(as_it_ran, json.dumps(older))


def test_study_files_validate_without_importing_torch():
    """``l0sweep run`` starts its workers right after validating the study file, then creates the study while
    they import torch: keep both steps free of torch."""
    code = ("import sys; from pathlib import Path; from sweeps.spec import load_spec; "
            "[load_spec(f) for f in Path('studies').glob('*.yaml')]; import sweeps.launcher; "
            "heavy = [m for m in ('torch', 'mlflow') if m in sys.modules]; assert not heavy, heavy; "
            "import sweeps.study; assert 'torch' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[1], timeout=120)


def test_dataset_names_match_the_loaders():
    from sweeps import config, data

    assert set(data._TORCHVISION) == set(config.TORCHVISION_DATASETS)


@pytest.mark.parametrize("sampler", [{"name": "tpe", "n_startup_trials": 4}, {"name": "nsgaii", "population_size": 4}])
def test_sampler_draws_are_seeded_per_trial(sampler):
    """Workers (here: two samplers on one study, asking in turn) never share draws, and a study file's
    trial n gets the same start-up values in every run."""
    from sweeps.search import make_sampler

    spec = parse_spec({"name": "s", "trial": {"data": {"name": "digits"}, "model": {"name": "mlp"}},
                       "search": {"lam": {"low": 1e-3, "high": 3.0, "log": True}}, "sampler": {"seed": 3, **sampler}})

    def objective(trial):
        _, values = suggest(trial, spec)
        return [values["lam"], -values["lam"]]

    def run(workers: int) -> list:
        storage = optuna.storages.InMemoryStorage()
        studies = [optuna.create_study(study_name="s", storage=storage, load_if_exists=True, sampler=make_sampler(spec),
                                       directions=["maximize"] * 2) for _ in range(workers)]
        for i in range(8):
            studies[i % workers].optimize(objective, n_trials=1)
        return [t.params for t in studies[0].trials]

    two_workers = run(2)
    assert len({tuple(sorted(p.items())) for p in two_workers[:4]}) == 4  # per-process seeds gave pairs of equals
    assert run(1)[:4] == run(1)[:4] == two_workers[:4]  # start-up draws depend on the trial number alone


def test_budget_and_starting_points_follow_an_edited_study_file(tmp_path):
    from sweeps.settings import settings_from
    from sweeps.records import StudyRecord
    from sweeps.study import create_or_resume

    out = tmp_path / "out"
    settings = settings_from(str(out / "optuna.journal"), f"sqlite:///{out / 'mlflow.db'}", out)
    base = {"name": "budget", "trial": {"data": {"name": "digits"}, "model": {"name": "mlp"}},
            "search": {"lam": {"low": 1e-3, "high": 3.0, "log": True}}}

    def budget(file_trials: int, trials: int | None = None) -> int:
        study, _ = create_or_resume(parse_spec({**base, "trials": file_trials}), settings, trials)
        return StudyRecord.read(study).budget

    assert budget(2) == 2
    assert budget(5) == 5  # the file was edited: its new budget applies (it used to stay 2, silently)
    assert budget(5, trials=7) == 7  # --trials wins
    assert budget(5) == 7  # the file unchanged since: an earlier --trials stands
    assert budget(3) == 3

    # Starting points: each runs once; one added to the file later is queued when the file is run again.
    point = {"mode": "scratch", "lam": 0.5, "droprate_init": 0.3}
    for points in ([point], [point], [point, {**point, "lam": 0.2}]):
        study, _ = create_or_resume(parse_spec({**base, "trials": 3, "enqueue": points}), settings)
    queued = [t.system_attrs["fixed_params"] for t in study.get_trials(states=(optuna.trial.TrialState.WAITING,))]
    assert sorted(v for p in queued for k, v in p.items() if k.startswith("lam")) == [0.2, 0.5]


def test_latency_objective_and_its_settings():
    from sweeps.spec import StudySpec, parse_spec

    spec = StudySpec.model_validate({"name": "s", "objectives": ["accuracy", "latency"], "search": {"lam": 0.1},
                                     "latency": {"batch_size": 16, "runtime": "onnxruntime"},
                                     "export": {"round_to": 8}})
    assert spec.metric_names == ["val_accuracy", "speedup"]
    assert (spec.latency.batch_size, spec.latency.runtime, spec.export.round_to) == (16, "onnxruntime", 8)
    for bad, where in (({"objectives": ["latency", "accuracy"]}, "objectives"),
                       ({"latency": {"runtime": "tensorrt"}}, "latency.runtime"),
                       ({"export": {"round_to": 0}}, "export.round_to")):
        with pytest.raises(SpecError, match=where):
            parse_spec({"name": "s", "search": {"lam": 0.1}, **bad})


def test_a_lambda_study_stored_with_target_settings_resumes_from_a_file_without_them():
    """A lambda study never read trial.optim's target settings; files may no longer set them (a one-line error), so
    one made with them resumes from its file once they are removed, and a changed setting that matters still counts."""
    import json

    from sweeps.study import check_same_study

    spec = load_spec(Path(__file__).parents[1] / "studies" / "default.yaml")
    stored = json.loads(spec.model_dump_json())
    stored["trial"]["optim"].update(target_warmup=0.5, decide_gates_at=0.6)
    check_same_study(spec, json.dumps(stored))
    stored["trial"]["optim"]["lr"] = 0.123
    with pytest.raises(SpecError, match="different 'trial';"):
        check_same_study(spec, json.dumps(stored))
