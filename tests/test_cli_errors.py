"""Bad input: one clear line, a non-zero exit, and no study or MLflow run left behind."""
from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest

from sweeps.storage import open_storage
from tests.processes import processes_naming
from tests.servers import free_port
from tests.sweep_helpers import TINY, l0sweep, runs_of, write_study


CASES = {
    "broken-yaml": ("name: tiny\nsearch: {lam: [1, 2\n", [], "broken YAML at line"),
    "unknown-key": ({"colour": "red"}, [], "colour: unknown key"),
    "bad-range": ({"search": {"lam": {"low": 2.0, "high": 1.0}}}, [], "low (2.0) must be below high (1.0)"),
    "unknown-model": ({"trial": {"model": {"name": "resnet9000"}}}, [], "model 'resnet9000' is unknown"),
    "unknown-dataset": ({"trial": {"data": {"name": "imagenet"}}}, [], "dataset 'imagenet' is unknown"),
    "unreachable-storage": ({}, ["--storage", "postgresql://u:secret@127.0.0.1:{port}/db"], "cannot open the database"),
    "unreachable-mlflow": ({}, ["--tracking-uri", "http://127.0.0.1:{port}"], "MLflow server does not answer"),
    "sqlite-shared": ({}, ["--storage", "sqlite:///{tmp}/x.db", "--workers", "2"], "SQLite cannot be shared"),
    "bad-workers": ({}, ["--workers", "0"], "--workers must be at least 1"),
    "unwritable-out": ({}, ["--out", "/proc/l0sweep-out"], "--out /proc/l0sweep-out: cannot create it"),
    "missing-file": (None, [], "cannot read the study file"),
    "lam-and-target": ({"search": {"target_sparsity": 0.8}}, [],
                       "search: give either lam (a price on the parameters kept) or target_sparsity (the share of "
                       "parameters to remove), not both"),
    "target-outside": ({"search": {"lam": None, "target_sparsity": {"low": 0.5, "high": 1.2}}}, [],
                       "search.target_sparsity must be in (0, 1), got 1.2"),
    "decided-in-one-epoch": ({"search": {"lam": None, "target_sparsity": 0.8},
                              "trial": {"optim": {"epochs": 1}}}, [],
                             "trial.optim.decide_gates_at 0.8 needs optim.epochs >= 2 (an epoch after the decision), "
                             "got 1; decide_gates_at: 1 leaves the Lagrangian to the end"),
    "decided-in-the-warm-up": ({"search": {"lam": None, "target_sparsity": 0.8},
                                "trial": {"optim": {"target_warmup": 0.8, "decide_gates_at": 0.6}}}, [],
                               "trial.optim.target_warmup 0.8 must end before optim.decide_gates_at 0.6: the gates "
                               "are decided at the full target"),
    "unknown-loss": ({"trial": {"task": {"loss": "hinge"}}}, [],
                     "trial.task.loss: 'hinge' is unknown: use cross_entropy, mse or 'package.module:function'"),
    "unknown-metric": ({"trial": {"task": {"metric": "f1"}}}, [],
                       "trial.task.metric: 'f1' is unknown: use accuracy or 'package.module:function'"),
    "unimportable-metric": ({"trial": {"task": {"metric": "nowhere.metrics:f1"}}}, [],
                            "trial.task.metric: metric 'nowhere.metrics:f1' cannot be imported"),
    "bad-direction": ({"trial": {"task": {"direction": "up"}}}, [],
                      "trial.task.direction: Input should be 'maximize' or 'minimize', got 'up'"),
    "chance-without-accuracy": ({"trial": {"task": {"loss": "mse", "metric": "tests.task_helpers:rmse",
                                                    "direction": "minimize"}}, "min_metric": "chance"}, [],
                                "min_metric: 'chance' is the accuracy of always answering the commonest class and "
                                "needs trial.task.metric accuracy, not 'tests.task_helpers:rmse'"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input(case, tmp_path):
    content, extra, expected = CASES[case]
    path = tmp_path / "study.yaml"
    if isinstance(content, str):
        path.write_text(content)
    elif isinstance(content, dict):
        write_study(path, **{k: ({**TINY[k], **v} if isinstance(v, dict) and k in TINY else v)
                             for k, v in content.items()})
    out = tmp_path / "out"
    args = [a.format(port=free_port(), tmp=tmp_path) for a in extra]
    result = l0sweep("run", path, "--out", out, *args, timeout=120)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode != 0
    assert len(lines) == 1, result.stderr
    assert expected in lines[0] and "secret" not in lines[0]
    journal = out / "optuna.journal"
    if journal.exists():
        assert optuna.get_all_study_names(open_storage(str(journal))) == []
    if (out / "mlflow.db").exists():
        assert runs_of(f"sqlite:///{out / 'mlflow.db'}", "tiny") == []
    # Workers start before the study is created (to overlap their imports); a failed creation stops them.
    assert processes_naming(str(out)) == []


UNRUNNABLE = {
    # LeNet-5 needs 16x16 images; digits are 8x8.
    "model-does-not-fit": ({"model": {"name": "lenet5"}}, {},
                           "trial.model 'lenet5' cannot train on trial.data 'digits' (inputs (1, 8, 8)): lenet5 needs "
                           "images of at least 16x16 pixels, got 8x8"),
    # A data factory that returns neither datasets nor an object holding them.
    "data-factory-returns-a-dict": ({"data": {"name": "tests.test_your_model:not_datasets"}}, {},
                                    "trial.data 'tests.test_your_model:not_datasets' cannot be loaded: dataset "
                                    "'tests.test_your_model:not_datasets' returned dict: a data factory returns "
                                    "(train, test) or (train, val, test) datasets, or an object with train, val and "
                                    "test (or train_dataset, val_dataset and test_dataset) datasets"),
    # torch.compile would find no C++ compiler at every trial's first step.
    "compile-without-compiler": ({"compile": True}, {"CXX": "no-such-compiler"},
                                 "trial.compile: true needs a C++ compiler on this machine (torch.compile builds its "
                                 "kernels with it): install g++ or set CXX to one, or set trial.compile: false"),
}


def test_a_study_whose_trials_cannot_run_is_one_line_and_leaves_no_study(tmp_path):
    """Every trial would fail: the workers check one trial (its model on its data, the compiler it asks for)
    before training, the launcher stops them and removes the study it had just created, so the corrected file
    runs under the same name.
    ``create`` checks the same before it creates anything.
    Both cases run in one --out, as a user's attempts do: each run's worker logs are its own (they were appended
    to, and showed the previous run's error line)."""
    out = tmp_path / "out"
    earlier: set[Path] = set()
    for case, (trial, env, expected) in UNRUNNABLE.items():
        path = write_study(tmp_path / f"{case}.yaml", trial={**TINY["trial"], **trial})
        result = l0sweep("run", path, "--out", out, "--workers", "2", timeout=180, env=env)
        assert result.returncode == 1
        assert result.stderr.strip().splitlines()[-1] == (f"l0sweep run: error: {expected} (the study was not kept: "
                                                          "fix the file and run it again)")
        assert "Traceback" not in result.stderr
        assert optuna.get_all_study_names(open_storage(str(out / "optuna.journal"))) == []
        assert runs_of(f"sqlite:///{out / 'mlflow.db'}", "tiny") == []  # the study's run is deleted, not left
        assert processes_naming(str(out)) == []
        logs = set((out / "logs").glob("*/worker-*.log")) - earlier
        assert len({log.parent for log in logs}) == 1  # this run's folder
        # A worker the launcher stopped before its own check ended has no error line; none has an earlier run's.
        errors = {tuple(line for line in log.read_text().splitlines() if "error" in line) for log in logs}
        assert errors - {()} == {(f"l0sweep worker: error: {expected}",)}, errors
        earlier |= logs
        created = l0sweep("create", path, "--out", tmp_path / f"created-{case}", timeout=120, env=env)
        assert created.returncode == 1 and created.stderr.strip() == f"l0sweep create: error: {expected}"
        assert not (tmp_path / f"created-{case}").exists()


def test_workers_wait_for_the_study_and_leave_when_the_launcher_does(tmp_path):
    """A worker started by ``l0sweep run`` waits for the study to be ready; if its launcher dies first
    (here: exits right after starting it), it exits instead of lingering."""
    ready, result = tmp_path / "ready", tmp_path / "result"
    worker = (f"import os, sys; from pathlib import Path; from sweeps.worker import wait_for_launcher; "
              f"Path({str(result)!r}).write_text(str(wait_for_launcher(Path({str(ready)!r}), int(sys.argv[1]))))")
    launcher = f"import os, subprocess, sys; subprocess.Popen([sys.executable, '-c', {worker!r}, str(os.getpid())])"
    subprocess.run([sys.executable, "-c", launcher], check=True, timeout=60)
    deadline = time.monotonic() + 60
    while not result.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert result.read_text() == "False"
    while processes_naming(str(ready)) and time.monotonic() < deadline:  # it is on its way out
        time.sleep(0.1)
    assert processes_naming(str(ready)) == []
