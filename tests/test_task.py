"""Your loss and metric (``trial.task``): a metric over the whole validation set, regression targets, a minimised
metric through early stopping, and a regression sweep whose report, table and MLflow runs name its metric."""
from __future__ import annotations

from pathlib import Path

import optuna
import pandas as pd
import pytest
import torch
from torch import nn

from sweeps.config import TrialConfig
from sweeps.data import TensorBatches, data_loader, load_data
from sweeps.early_stopping import stopper_for
from sweeps.spec import SpecError, parse_spec
from sweeps.storage import open_storage
from sweeps.loop import evaluate, mse
from sweeps.preflight import check_fits
from tests.sweep_helpers import TINY, l0sweep, runs_of, write_study
from tests.task_helpers import binary_f1

ROOT = Path(__file__).resolve().parents[1]
REGRESSION = {"loss": "mse", "metric": "tests.task_helpers:rmse", "direction": "minimize"}


def test_the_metric_is_computed_over_the_whole_validation_set_not_averaged_over_batches():
    # Two batches of two: F1 1 (one true positive) and F1 0 (one false positive), a mean of 0.5; over all four
    # examples one true positive and one false positive give 2/3.
    predictions = torch.tensor([1, 0, 1, 0])
    labels = torch.tensor([1, 0, 0, 0])
    loader = data_loader(TensorBatches(nn.functional.one_hot(predictions, 2).float(), labels), 2)
    per_batch = [binary_f1(x, y) for x, y in loader]
    assert per_batch == [1.0, 0.0]
    assert evaluate(nn.Identity(), loader, torch.device("cpu"), binary_f1) == pytest.approx(2 / 3)


def test_float_targets_size_the_output_and_mse_meets_them_in_its_shape():
    splits = load_data("tests.task_helpers:regression")
    assert splits.num_classes == 1 and splits.input_shape == (4,)  # the factory's num_classes: one output
    assert float(mse(torch.zeros(3, 1), torch.tensor([1.0, 2.0, 2.0]))) == pytest.approx(3.0)  # not (3, 3)


def test_a_loss_that_cannot_take_the_data_is_one_line_before_any_trial():
    cfg = TrialConfig.model_validate({"data": {"name": "digits"}, "model": {"name": "mlp"}, "task": REGRESSION})
    with pytest.raises(SpecError, match=r"^trial.task.loss 'mse' cannot take trial.model's outputs \(2, 10\) with "
                                        r"trial.data's targets \(2,\) \(torch.int64\): "):
        check_fits(cfg)


def test_early_stopping_compares_a_minimised_metric_lower_is_better():
    spec = parse_spec({**TINY, "trial": {**TINY["trial"], "task": REGRESSION},
                       "early_stopping": {"enabled": True, "warmup_epochs": 1, "min_completed": 1}})
    study = optuna.create_study(directions=spec.directions)
    good = [[1, 0.30, 0.40]]  # rmse 0.3 at sparsity 0.4
    study.add_trial(optuna.trial.create_trial(values=[0.3, 0.4], user_attrs={"history": good}))
    for method in ("dominance", "asha"):
        es = spec.early_stopping.model_copy(update={"method": method, "eta": 2, "min_epochs": 1})
        stop = stopper_for(study, spec.model_copy(update={"early_stopping": es}), epochs=4, trial_number=9)
        assert stop(1, 0.90, 0.10)  # three times the error, less sparse: dominated
        assert not stop(1, 0.10, 0.10)  # a lower error is better, however much less sparse


@pytest.mark.parametrize("floor,ok", [("chance", False), (0.5, True), (None, True)])
def test_chance_is_a_floor_for_accuracy_only(floor, ok):
    data = {**TINY, "trial": {**TINY["trial"], "task": REGRESSION}, "min_metric": floor}
    if ok:
        assert parse_spec(data).min_accuracy == floor and parse_spec(data).metric_names == ["val_rmse", "sparsity"]
    else:
        with pytest.raises(SpecError, match="min_metric: 'chance' is the accuracy of always answering the commonest "
                                            "class and needs trial.task.metric accuracy"):
            parse_spec(data)
    assert parse_spec(TINY).min_accuracy == "chance" and parse_spec(TINY).directions == ["maximize", "maximize"]


def test_a_regression_sweep_minimises_its_metric_and_names_it_everywhere(tmp_path):
    """Two workers on a regression (mse, rmse minimised): Optuna's direction, the MLflow names, the trials table,
    pick and the report's axes all follow the metric."""
    trial = {**TINY["trial"], "data": {"name": "tests.task_helpers:regression", "batch_size": 64},
             "model": {"name": "mlp", "kwargs": {"hidden": [16, 8]}}, "task": REGRESSION,
             "optim": {**TINY["trial"]["optim"], "epochs": 2}}
    path = write_study(tmp_path / "study.yaml", name="regression", trial=trial, trials=3,
                       min_metric=3.0)  # a ceiling on rmse: lower is better
    out = tmp_path / "out"
    result = l0sweep("run", path, "--workers", "2", "--out", out, cwd=ROOT, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    study = optuna.load_study(study_name="regression", storage=open_storage(str(out / "optuna.journal")))
    assert [d.name for d in study.directions] == ["MINIMIZE", "MAXIMIZE"]
    assert study.metric_names == ["val_rmse", "sparsity"]
    complete = [t for t in study.trials if t.state.name == "COMPLETE"]
    assert len(complete) >= 3 and all("test_rmse" in t.user_attrs for t in complete)
    assert study.user_attrs["dense_baseline"]["val_rmse"] < 3.0  # the fine-tuning trial's baseline, measured in rmse
    runs = [r for r in runs_of(f"sqlite:///{out / 'mlflow.db'}", "regression") if r.data.tags.get("l0sweep.trial")]
    assert runs and all({"val_rmse", "test_rmse"} <= set(r.data.metrics) for r in runs)
    assert not any({"val_accuracy", "chance_accuracy"} & set(r.data.metrics) for r in runs)
    front = pd.read_csv(out / "reports" / "regression" / "front.csv")
    assert {"val_rmse", "test_rmse"} <= set(front.columns) and "val_accuracy" not in front.columns
    page = (out / "reports" / "regression" / "report.html").read_text()
    assert "validation rmse (lower is better)" in page and "Validation rmse against sparsity" in page
    assert "Selection uses validation rmse (lower is better)" in page
    picked = l0sweep("pick", "regression", "--out", out, cwd=ROOT, timeout=120)
    assert picked.returncode == 0 and "val rmse" in picked.stdout and "lower is better" in picked.stdout
