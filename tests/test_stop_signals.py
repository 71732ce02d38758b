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
