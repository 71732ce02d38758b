"""The workers of ``l0sweep run`` are forks of its zygote (sweeps.zygote), driven through the launcher's end of it
(sweeps.forked) and the worker pool. Whole sweeps through it are tested in test_sweep_local, test_stop_signals and
test_service."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import sweeps.cli
from sweeps.forked import LOST, Zygote
from sweeps.pool import WorkerPool
from sweeps.settings import Settings
from tests.processes import processes_naming
from tests.sweep_helpers import TINY, write_study

FACTORY = '''
import json, math, os, sys
from torch import nn

def build(num_classes, input_shape):
    with open("seen.json", "w") as f:
        json.dump({"cwd": os.getcwd(), "gpu": os.environ.get("CUDA_VISIBLE_DEVICES"), "argv": sys.argv}, f)
    return nn.Sequential(nn.Flatten(), nn.Linear(math.prod(input_shape), num_classes))
'''


def _until(condition, timeout: float = 120.0):
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        if time.monotonic() > deadline:  # a bound against hanging, not a timing under test
            raise TimeoutError(f"still waiting after {timeout} s")
        time.sleep(0.05)
    return value


def _cmdline(pid: int) -> bytes:
    return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")


def test_a_fork_is_the_worker_command_in_the_launchers_folder_with_its_gpu_and_log(tmp_path, monkeypatch):
    """As a worker started as ``python -m sweeps.cli worker`` would: a ``module:factory`` of the launcher's folder
    imports (the folder is first on sys.path, whatever started the launcher), the environment has its GPU added,
    its output is its own log, and its exit status comes back."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mymodel.py").write_text(FACTORY)
    write_study(tmp_path / "tiny.yaml", trial={**TINY["trial"], "model": {"name": "mymodel:build"}})
    zygote = Zygote(["worker", "tiny.yaml", "--out", "out"], tmp_path / "zygote.log")
    try:
        worker = zygote.fork(tmp_path / "worker.log", {"CUDA_VISIBLE_DEVICES": "7"})
        assert worker.wait(timeout=120) == 1  # its model fits; the study was never created
        assert (tmp_path / "worker.log").read_text().splitlines()[-1] == (
            "l0sweep worker: error: study 'tiny' does not exist in this storage: create it with 'l0sweep create' "
            "or 'l0sweep run'")
        seen = json.loads((tmp_path / "seen.json").read_text())
        assert seen == {"cwd": str(tmp_path), "gpu": "7",  # argv[0] as `python -m sweeps.cli` has it
                        "argv": [sweeps.cli.__file__, "worker", "tiny.yaml", "--out", "out", "--launcher-pid",
                                 str(zygote.proc.pid)]}
    finally:
        zygote.close()
    assert zygote.proc.returncode == 0


def test_the_zygote_outlives_a_groups_stop_signals_and_reports_how_each_worker_ended(tmp_path):
    """A terminal's hang-up, ``timeout``'s SIGTERM and Ctrl-C reach the launcher's whole process group: the zygote
    stays (the launcher stops the workers) and reports each end, a signal as its negative number. A waiting worker
    is seen as a live worker (its command line is the worker's) and leaves when the zygote goes."""
    write_study(tmp_path / "tiny.yaml")
    ready = tmp_path / "never-ready"
    zygote = Zygote(["worker", str(tmp_path / "tiny.yaml"), "--out", str(tmp_path / "out"), "--start-after",
                     str(ready)], tmp_path / "zygote.log")
    try:
        first = zygote.fork(tmp_path / "first.log", {})
        second = zygote.fork(tmp_path / "second.log", {})
        _until(lambda: first.pid is not None and second.pid is not None)
        for sig in (signal.SIGHUP, signal.SIGTERM, signal.SIGINT):
            os.kill(zygote.proc.pid, sig)
        assert b"sweeps.zygote worker" in _cmdline(first.pid)  # what sweeps.study.worker_gone looks for
        first.kill()
        assert first.wait(timeout=60) == -signal.SIGKILL
        assert zygote.proc.poll() is None
        third = zygote.fork(tmp_path / "third.log", {})
        _until(lambda: third.pid is not None)
        third.terminate()  # the worker's own handler stops it as on Ctrl-C (130); before it has one, SIGTERM does
        assert third.wait(timeout=60) in (130, -signal.SIGTERM)
        assert second.poll() is None  # still waiting for the study
    finally:
        zygote.close()
    # Its zygote gone, the waiting worker leaves (l0sweep run's launcher is gone too when that happens).
    _until(lambda: "the launcher exited before the study was ready" in (tmp_path / "second.log").read_text(), 60)


def test_a_worker_left_by_a_dead_zygote_is_seen_to_end_and_no_more_are_forked(tmp_path):
    """Killed outright, the zygote can neither fork nor tell how its forks ended: a fork it left is seen to end
    (status LOST), and the pool starts later workers as new processes (fork returns None)."""
    write_study(tmp_path / "tiny.yaml")
    zygote = Zygote(["worker", str(tmp_path / "tiny.yaml"), "--out", str(tmp_path / "out"), "--start-after",
                     str(tmp_path / "never-ready")], tmp_path / "zygote.log")
    try:
        worker = zygote.fork(tmp_path / "worker.log", {})
        _until(lambda: worker.pid is not None)
        zygote.proc.kill()
        zygote.proc.wait()
        assert worker.wait(timeout=60) == LOST  # it saw its parent go, and left
        assert zygote.fork(tmp_path / "later.log", {}) is None
    finally:
        zygote.close()


def test_workers_not_yet_forked_when_the_launcher_stops_never_start(tmp_path):
    """A launcher that fails before its study exists (an unreachable database) stops its workers at once, while
    the zygote is still importing: they never start, and nothing is left running."""
    write_study(tmp_path / "tiny.yaml")
    out = tmp_path / "out"
    zygote = Zygote(["worker", str(tmp_path / "tiny.yaml"), "--out", str(out), "--start-after",
                     str(tmp_path / "never-ready")], tmp_path / "zygote.log")
    worker = zygote.fork(tmp_path / "worker.log", {})
    zygote.forget_unforked()  # seconds before its imports end
    assert worker.poll() == LOST and worker.pid is None and zygote.proc.returncode == -signal.SIGKILL
    assert zygote.fork(tmp_path / "later.log", {}) is None
    zygote.close()
    assert processes_naming(str(out)) == []


def test_nothing_the_zygote_imports_asks_cuda_anything():
    """Each fork is given its GPU through CUDA_VISIBLE_DEVICES after the fork, which CUDA reads when first asked:
    nothing preloaded may have asked it (on a machine without GPUs, seen only by recording the questions)."""
    probe = """
import importlib.util, sys
import torch
asked = []
def record(name):
    def ask(*args, **kwargs):
        asked.append(name)
        return 0
    return ask
for name in ("is_available", "device_count", "init"):
    setattr(torch.cuda, name, record(name))
torch._C._cuda_getDeviceCount = record("_cuda_getDeviceCount")
from sweeps import zygote
zygote.preload()
assert not torch.cuda.is_initialized()
installed = [name for name in zygote.WORKER_MODULES if importlib.util.find_spec(name.split(".")[0]) is not None]
print(asked, [name for name in installed if name not in sys.modules])
"""
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    # Nothing asked CUDA, and every module a worker needs that this install has was loaded.
    assert result.stdout.strip() == "[] []"


def test_a_pool_whose_zygote_died_starts_its_workers_as_new_processes(tmp_path):
    """Killed while still importing (say by the OOM killer), the zygote forks nothing: the pool starts the worker it
    asked for as ``python -m sweeps.cli worker`` instead, in the same slot and log."""
    write_study(tmp_path / "tiny.yaml")
    settings = Settings(storage=str(tmp_path / "optuna.journal"), tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}",
                        out=tmp_path / "out")
    ready = tmp_path / "ready"
    ready.touch()  # as if the study were ready: the worker goes at once, and finds no study
    pool = WorkerPool(tmp_path / "tiny.yaml", settings, 1, tmp_path, ready, gpus=[])
    pool.zygote.proc.kill()
    try:
        [(slot, proc, code)] = _until(pool.exited)
        assert slot == 0 and code == 1 and proc.args[1:3] == ["-m", "sweeps.cli"]
        assert pool.tail(0).splitlines()[-1].startswith("l0sweep worker: error: study 'tiny' does not exist")
    finally:
        pool.stop()
        pool.close()
