"""Target studies end to end: trials trained to a target sparsity on digits, the exact top-k at export, and a
target study through the real CLI (MLflow metrics, the report's target plot and flags, ``pick --target``)."""
from __future__ import annotations

import pytest

from sweeps.config import TrialConfig
from sweeps.training import train_trial
from tests.sweep_helpers import TINY, l0sweep, runs_of, write_study

# The default study's MLP (64-300-100-10 on 8x8 digits): a unit is at most an input pixel's 300 weights.
LARGEST_UNIT = 300


def _trial(mode: str, target: float, exact_target: bool = False, **optim) -> TrialConfig:
    return TrialConfig.model_validate({
        "data": {"name": "digits", "batch_size": 64}, "model": {"name": "mlp"},
        "optim": {"name": "adam", "lr": 0.003, "gate_lr": 0.05, "epochs": 6, **optim}, "mode": mode,
        "export": {"exact_target": exact_target},
        "target_sparsity": target, "droprate_init": 0.5 if mode == "scratch" else 0.05, "threads": 1})


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["scratch", "finetune"])
def test_digits_trials_land_on_their_targets_exactly_and_the_lagrangian_orders_them(mode, tmp_path):
    results = {}
    for target in (0.5, 0.8, 0.9, 0.95):
        cfg = _trial(mode, target).model_copy(update={"baseline_dir": str(tmp_path)})
        results[target] = r = train_trial(cfg)
        # Decided after epoch 5 of 6 (decide_gates_at 0.8), exact to one unit: the top-k's cut falls inside one unit.
        decided = r.gates_decided
        assert decided["after_epoch"] == 5 and r.exact_target is None
        assert abs(r.sparsity - target) * r.total_params <= LARGEST_UNIT, (mode, target, r.sparsity)
        assert decided["sparsity_after"] == pytest.approx(r.sparsity)
        # Frozen: the epoch trained after the decision left the gates as decided.
        assert [e.sparsity for e in r.epochs[5:]] == [pytest.approx(r.sparsity)]
        assert r.val_metric > 0.5  # the decided model still classifies
        assert r.effective_lambda is not None and r.epochs[-1].target_sparsity == target
    # Before the decision, the Lagrangian alone: a higher target trained a sparser model at a higher price.
    before = [results[t].gates_decided["sparsity_before"] for t in (0.5, 0.8, 0.95)]
    assert before == sorted(before) and before[-1] - before[0] > 0.1
    assert results[0.95].effective_lambda > results[0.5].effective_lambda


@pytest.mark.slow
def test_never_deciding_leaves_the_lagrangian_to_the_end_and_exact_target_cuts_at_export(tmp_path):
    cfg = _trial("scratch", 0.9, exact_target=True, decide_gates_at=1.0).model_copy(
        update={"baseline_dir": str(tmp_path)})
    r = train_trial(cfg)
    assert r.gates_decided is None
    assert abs(r.sparsity - 0.9) * r.total_params <= LARGEST_UNIT
    assert r.exact_target["sparsity_after"] == pytest.approx(r.sparsity)
    assert r.exact_target["sparsity_before"] == pytest.approx(r.epochs[-1].sparsity)  # what the last epoch trained


@pytest.mark.slow
def test_a_target_study_runs_reports_and_picks_through_the_cli(tmp_path):
    trial = {**TINY["trial"], "optim": {**TINY["trial"]["optim"], "epochs": 4}}
    search = {"target_sparsity": {"low": 0.3, "high": 0.9}, "droprate_init": 0.5, "mode": ["scratch"]}
    study_file = write_study(tmp_path / "tiny.yaml", trial=trial, search=search, trials=3,
                             enqueue=[{"target_sparsity": 0.4}, {"target_sparsity": 0.8}])
    out = tmp_path / "out"
    result = l0sweep("run", study_file, "--workers", "1", "--out", out)
    assert result.returncode == 0, result.stderr[-3000:]

    import optuna

    from sweeps.storage import open_storage

    study = optuna.load_study(study_name="tiny", storage=open_storage(str(out / "optuna.journal")))
    complete = study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    assert len(complete) == 3
    for t in complete:
        assert "lam" not in t.user_attrs and 0.3 <= t.user_attrs["target_sparsity"] <= 0.9
        assert isinstance(t.user_attrs["effective_lambda"], float) and t.user_attrs["gates_decided"]["after_epoch"] == 3
    runs = [r for r in runs_of(f"sqlite:///{out / 'mlflow.db'}", "tiny") if r.data.tags.get("l0sweep.trial")]
    for run in runs:
        m = run.data.metrics
        assert {"target_sparsity", "effective_lambda", "target_miss", "decided_sparsity_before"} <= set(m)
        assert m["target_miss"] == pytest.approx(m["sparsity"] - m["target_sparsity"])
    from mlflow.tracking import MlflowClient

    history = MlflowClient(f"sqlite:///{out / 'mlflow.db'}").get_metric_history(runs[0].info.run_id, "effective_lambda")
    assert sorted(h.step for h in history) == [1, 2, 3, 4]  # one point per epoch: the final figure is the last

    page = (out / "reports" / "tiny" / "report.html").read_text()
    assert "Achieved sparsity against each trial" in page and "(it cost lambda " in page
    picked = l0sweep("pick", "tiny", "--out", out, "--target", "0.8")
    assert picked.returncode == 0, picked.stderr
    assert "target         0.8" in picked.stdout and "what the target cost" in picked.stdout
    assert "gates decided  after epoch 3: the top-k of log_alpha closed" in picked.stdout
    bad = l0sweep("pick", "tiny", "--out", out, "--target", "1.5")
    assert bad.returncode != 0 and bad.stderr.strip() == "l0sweep pick: error: --target must lie in (0, 1), got 1.5"


def test_the_report_flags_trials_that_missed_their_target_and_keeps_them(tmp_path):
    import optuna

    from dashboards import trials_table, write_report
    from dashboards.table import missed_target

    study = optuna.create_study(directions=["maximize", "maximize"])
    for number, (target, achieved) in enumerate([(0.5, 0.505), (0.8, 0.75), (0.9, 0.9)]):
        trial = study.ask()
        for key, value in {"target_sparsity": target, "effective_lambda": 1.0 + number, "mode": "scratch",
                           "droprate_init": 0.5, "test_accuracy": 0.9, "flops_ratio": 0.5, "removed_params": 1,
                           "total_params": 2, "mlflow_run_id": f"r{number}"}.items():
            trial.set_user_attr(key, value)
        study.tell(trial, [0.95 - 0.01 * number, achieved])
    table = trials_table(study)
    assert missed_target(table).tolist() == [False, True, False]
    assert table.lam.tolist() == [1.0, 2.0, 3.0]  # a target trial's lambda is what its target cost
    page = write_report(study, tmp_path).read_text()
    assert "1 missed their target sparsity by more than 2 points (flagged, not hidden)" in page
    assert "0.800 (missed)" in (tmp_path / "front.md").read_text()
