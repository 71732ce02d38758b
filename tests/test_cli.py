"""What the command line shows a user: status, help, --verbose (the default sweep in a terminal: test_sweep_local)."""
from __future__ import annotations

import argparse


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
