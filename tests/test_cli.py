"""What the command line shows a user: the default sweep in a terminal, status, help, --verbose."""
from __future__ import annotations

import argparse
import re

import pytest
from mlflow.tracking import MlflowClient


ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def _shown_lines(shown: str) -> list[str]:
    """What a terminal shows, line by line: a progress bar redraws itself after ``\\r``, each frame a line here."""
    return [frame.strip() for line in ANSI.sub("", shown).split("\n") for frame in line.split("\r") if frame.strip()]


@pytest.mark.slow
def test_the_default_sweep_shows_its_progress_bar_and_summary_and_nothing_of_other_libraries(default_sweep):
    code, shown, out = default_sweep
    assert code == 0, shown[-3000:]
    lines = _shown_lines(shown)
    expected = {
        "start": r"l0sweep: study 'digits-mlp': 12 complete trials wanted, 2 workers; storage \S+optuna\.journal; "
                 r"runs in sqlite:///\S+mlflow\.db; logs in \S+/logs/\d{8}-\d{6}-\d+",
        "bar": r"complete trials: +\d+%\|.*\| *\d+/12 \[.*\]",
        "summary": r"l0sweep: 1[23] complete, \d+ stopped early, 0 failed or interrupted \(budget 12\)",
        "report": rf"l0sweep: report {re.escape(str(out.resolve()))}/reports/digits-mlp/report\.html",
    }
    kinds = [next((k for k, pattern in expected.items() if re.fullmatch(pattern, line)), line) for line in lines]
    # Every line is one of ours (no "[I ...] A new study created", no MLflow "INFO ... database tables"), in order.
    assert [k for k in kinds if k != "bar"] == ["start", "summary", "report"], [
        line for line, k in zip(lines, kinds) if k not in expected] or kinds
    assert any(re.search(r"\| 1[23]/12 \[", line) for line in lines)  # the bar reached the budget
    assert (out / "reports" / "digits-mlp" / "report.html").is_file()


@pytest.mark.slow
def test_every_metric_history_has_one_point_per_step(default_sweep):
    """val_accuracy read steps [1 ... 10, 10]: the final figures were logged again at the last epoch's step."""
    code, _, out = default_sweep
    assert code == 0
    client = MlflowClient(f"sqlite:///{out.resolve() / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("digits-mlp")
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    trials = [r for r in client.search_runs([experiment.experiment_id], max_results=1000)
              if "mlflow.parentRunId" in r.data.tags]
    finished = [r for r in trials if r.info.status == "FINISHED"]
    assert len(finished) >= 12
    for run in trials:  # stopped-early (KILLED) ones too: their epochs so far
        histories = {m: [p.step for p in client.get_metric_history(run.info.run_id, m)] for m in run.data.metrics}
        epochs = histories["val_accuracy"]
        assert epochs == list(range(1, len(epochs) + 1)), (run.info.run_name, histories)
        # Every metric: each epoch's (val_accuracy, sparsity, train losses...) or the final figures' (test_accuracy,
        # parameter counts...) at the last epoch, once.
        for metric, steps in histories.items():
            assert steps in (epochs, epochs[-1:]), (run.info.run_name, metric, steps)
        if run.info.status == "FINISHED":
            assert epochs[-1] == 10
            assert histories["sparsity"] == histories["train_penalty"] == epochs
            assert histories["test_accuracy"] == histories["chance_accuracy"] == [10]


def test_status_counts_each_state_once_in_words(capsys):
    import optuna

    from sweeps.status import print_status
    from tests.test_report import hand_built_study

    study = hand_built_study()  # 6 complete trials
    study.set_user_attr("n_trials", 6)
    print_status(study)
    assert capsys.readouterr().out.splitlines()[0] == "study known: 6/6 complete trials"
    study.add_trial(optuna.trial.create_trial(state=optuna.trial.TrialState.FAIL))
    study.enqueue_trial({"lam": 0.5})
    print_status(study)
    assert capsys.readouterr().out.splitlines()[0] == "study known: 6/6 complete trials; 1 queued, 1 failed"
    print_status(optuna.create_study(study_name="empty"))
    assert capsys.readouterr().out == "study empty: 0/? complete trials; no trials yet\n"


def test_every_option_of_every_command_says_what_it_does():
    from sweeps.cli import build_parser

    commands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices
    for name, command in commands.items():
        for action in command._actions:
            if action.option_strings and action.help != argparse.SUPPRESS and not isinstance(action,
                                                                                            argparse._HelpAction):
                assert action.help, f"l0sweep {name} {'/'.join(action.option_strings)} has no help text"
    assert "by all workers together" in commands["create"].format_help()
    assert "torch threads" in commands["worker"].format_help()
