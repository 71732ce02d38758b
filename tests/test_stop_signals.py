"""A stop signal is not lost when a library swallows its KeyboardInterrupt.

torch-pruning runs its tracing forward pass under a bare ``except:`` (and retries it), and every epoch's
sparsity report traces the model. A Ctrl-C or SIGTERM landing there was swallowed; the worker, ignoring later
signals so that its closing is not cut short, then trained on to the end of the sweep. Seen in CI as a
stopped sweep that exited 0 after its workers finished the budget.
"""
from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = textwrap.dedent("""
    import os, signal, time
    import torch_pruning as tp
    from sweeps.config import TrialConfig
    from sweeps.settings import check_stop, stop_on_signals
    from sweeps.training import train_trial

    stop_on_signals(once=True)  # as a worker does
    original, events = tp.DependencyGraph._trace, []

    def trace_hit_by_a_stop(self, model, *args, **kwargs):
        if not events:
            def hook(module, inputs):
                handle.remove()
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(1.0)  # the handler raises KeyboardInterrupt here, inside torch-pruning's bare except
            handle = model.register_forward_pre_hook(hook)
        out = original(self, model, *args, **kwargs)
        events.append("trace returned")  # the interrupt did not get out of it
        return out

    tp.DependencyGraph._trace = trace_hit_by_a_stop
    cfg = TrialConfig.model_validate({"data": {"name": "digits"}, "model": {"name": "mlp", "kwargs": {"hidden": [16]}},
                                      "optim": {"epochs": 5}, "threads": 1})
    epochs = []

    def on_epoch(m):
        if CHECK:
            check_stop()  # as the worker's on_epoch does
        epochs.append(m.epoch)
        return False

    try:
        train_trial(cfg, on_epoch)
        print("trained", len(epochs), "epochs;", events[0])
    except KeyboardInterrupt:
        print("stopped before epoch", len(epochs) + 1, "ended;", events[0])
    os.kill(os.getpid(), signal.SIGTERM)  # the stop's later signals are still ignored
    print("alive")
""")


@pytest.mark.parametrize("check", [False, True])
def test_a_stop_swallowed_by_torch_pruning_still_stops_the_trial(check):
    proc = subprocess.run([sys.executable, "-c", f"CHECK = {check}\n" + SCRIPT], cwd=ROOT, capture_output=True,
                          text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.split("\n")
    if check:
        # The signal came during the first trace (the unit costs, before any epoch): the first epoch boundary stops it.
        assert lines[:2] == ["stopped before epoch 1 ended; trace returned", "alive"]
    else:
        # Without the check the same signal is lost: the trial trains every epoch (what the worker used to do).
        assert lines[:2] == ["trained 5 epochs; trace returned", "alive"]


# A library can also turn the stop into another error: Optuna's journal-file lock, interrupted in its release
# before its rename, runs its cleanup's unlink of the file it never renamed and raises FileNotFoundError instead.
# Emulated here at the first lock release after training began (the real one also leaves its lock behind, which
# costs the next writer the lock's 30 s grace period).
STOP_AS_ANOTHER_ERROR = textwrap.dedent("""
    import os, signal, sys, time
    from pathlib import Path
    import optuna
    from optuna.storages.journal import _file
    from sweeps import worker
    from sweeps.settings import default_tracking_uri, settings_from
    from sweeps.spec import load_spec
    from sweeps.study import create_or_resume

    out = Path(sys.argv[2])
    spec = load_spec(sys.argv[1])
    settings = settings_from(str(out / "optuna.journal"), default_tracking_uri(out), out, threads=1)
    create_or_resume(spec, settings)
    armed, fired = [], []
    original_train, original_release = worker.Objective._train, _file.JournalFileSymlinkLock.release

    def train(self, *args, **kwargs):
        armed.append(True)
        return original_train(self, *args, **kwargs)

    def release(self):
        if armed and not fired:
            fired.append(True)
            try:
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(5)
            except KeyboardInterrupt:
                original_release(self)
                raise FileNotFoundError("optuna.journal.lock...rename")
        return original_release(self)

    worker.Objective._train, _file.JournalFileSymlinkLock.release = train, release
    print("exit", worker.run_worker(spec, settings, poll=0.1))
""")


def test_a_stop_that_a_library_turns_into_another_error_still_queues_the_trial_again(tmp_path):
    from mlflow.tracking import MlflowClient
    from optuna.trial import TrialState

    from sweeps.storage import open_storage
    from tests.sweep_helpers import TINY, write_study

    study_file = write_study(tmp_path / "tiny.yaml", enqueue=[], trials=1,
                             trial={**TINY["trial"], "optim": {**TINY["trial"]["optim"], "epochs": 50}})
    proc = subprocess.run([sys.executable, "-c", STOP_AS_ANOTHER_ERROR, str(study_file), str(tmp_path / "out")],
                          cwd=ROOT, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert proc.stdout.splitlines()[-1:] == ["exit 130"], proc.stderr[-3000:]
    assert "FileNotFoundError" in proc.stderr  # the stop did reach the trial as the other error
    import optuna

    study = optuna.load_study(study_name="tiny", storage=open_storage(str(tmp_path / "out" / "optuna.journal")))
    [failed] = study.get_trials(states=(TrialState.FAIL,))
    [queued] = study.get_trials(states=(TrialState.WAITING,))
    assert queued.params == failed.params and queued.system_attrs["failed_trial"] == failed.number
    run = MlflowClient(f"sqlite:///{tmp_path / 'out' / 'mlflow.db'}").get_run(failed.user_attrs["mlflow_run_id"])
    assert run.info.status == "KILLED"
