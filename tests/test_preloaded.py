"""The tests' own way of starting commands (tests/preloaded.py): a fork of a process that imported torch, MLflow and
Optuna, standing in for ``python -m MODULE``. What the sweep tests lean on is checked here: exit statuses, process
groups, output, and a command's own ``python -m`` children forked as its real children."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import tests.preloaded as preloaded
from tests.preloaded import popen, run_module

ROOT = Path(__file__).resolve().parents[1]
forks = pytest.mark.skipif(os.environ.get("L0SWEEP_TEST_FRESH") == "1",
                           reason="L0SWEEP_TEST_FRESH=1 starts every command as a new interpreter")


def _ctrl_c() -> str:
    return repr(signal.getsignal(signal.SIGINT))


def _probe(argv: list[str]) -> int:
    """Run as ``python -m tests.test_preloaded``: report how this process started, and how a child did."""
    forked = "torch" in sys.modules  # imported by the preloaded server, never by this module
    if argv[0] == "child":
        print(json.dumps({"pid": os.getpid(), "ppid": os.getppid(), "pgid": os.getpgrp(), "forked": forked,
                          "ctrl_c": _ctrl_c()}))
        sys.stdout.flush()
        if argv[1] == "kill-myself":
            os.kill(os.getpid(), signal.SIGKILL)
        return int(argv[1])
    if argv[0] == "sleep":
        time.sleep(float(argv[1]))
        return 0
    preloaded.FORKED_CHILDREN += ("tests.test_preloaded",)  # only in this command
    seen = {"pid": os.getpid(), "pgid": os.getpgrp(), "forked": forked, "ctrl_c": _ctrl_c(), "children": []}
    for how in ("7", "kill-myself"):
        child = subprocess.run([sys.executable, "-m", "tests.test_preloaded", "child", how], capture_output=True,
                               text=True, stdin=subprocess.DEVNULL)
        seen["children"].append({**json.loads(child.stdout), "returncode": child.returncode})
    # A stop sent the moment Popen returns reaches the child (held back until it has its handlers, never lost).
    sleeper = subprocess.Popen([sys.executable, "-m", "tests.test_preloaded", "sleep", "60"], stdin=subprocess.DEVNULL)
    sleeper.terminate()
    seen["terminated"] = sleeper.wait(30)
    print(json.dumps(seen))
    return 0


@forks
def test_a_commands_python_m_children_are_forked_as_its_own_children_with_their_exit_status():
    result = run_module("tests.test_preloaded", ["parent"], cwd=ROOT)
    assert result.returncode == 0, result.stderr
    seen = json.loads(result.stdout)
    assert seen["forked"]
    assert [child["returncode"] for child in seen["children"]] == [7, -signal.SIGKILL]
    assert seen["terminated"] == -signal.SIGTERM
    for child in seen["children"]:
        # Its parent's pid is the command's from its first line on; Ctrl-C does to it what it does to the command
        # (its nursery ignores it).
        assert child["forked"] and child["ppid"] == seen["pid"] and child["pgid"] == seen["pgid"]
        assert child["ctrl_c"] == seen["ctrl_c"]


def test_an_environment_read_at_start_gets_a_new_interpreter():
    result = run_module("tests.test_preloaded", ["child", "0"], cwd=ROOT, env={**os.environ, "PYTHONHASHSEED": "3"})
    assert result.returncode == 0 and not json.loads(result.stdout)["forked"]


@forks
def test_a_started_command_leads_its_own_group_writes_where_it_is_told_and_reports_its_signal(tmp_path):
    with open(tmp_path / "log", "w") as log:
        command = popen([sys.executable, "-m", "tests.test_preloaded", "sleep", "60"], cwd=ROOT, stdout=log,
                        stderr=subprocess.STDOUT, start_new_session=True)
    try:
        assert isinstance(command, preloaded.ForkedCommand)
        assert os.getpgid(command.pid) == command.pid and command.poll() is None
        with pytest.raises(subprocess.TimeoutExpired):
            command.wait(0.1)
        os.killpg(command.pid, signal.SIGKILL)
        assert command.wait(30) == -signal.SIGKILL and command.returncode == -signal.SIGKILL
    finally:
        command.kill()
    with open(tmp_path / "log", "w") as log:
        assert popen([sys.executable, "-m", "tests.test_preloaded", "child", "3"], cwd=ROOT, stdout=log).wait(60) == 3
    assert json.loads((tmp_path / "log").read_text())["forked"]


if __name__ == "__main__":
    sys.exit(_probe(sys.argv[1:]))
