"""``python -m MODULE ARGS`` for the tests, in a fork of a process that has already imported torch, MLflow and Optuna.

A new interpreter spends 4-6 CPU-seconds importing those before any l0sweep code runs, and the tests start dozens
(`l0sweep create`, `export`, `pick`, `run`'s launcher, the benchmark scripts): on a 2-core machine that was a fifth
of ``make test``. Here one server process per test process (the standard library's ``forkserver``) imports
them once, and each command runs in a fork of it, as ``python -m`` would run it: ``sys.path`` as a new
interpreter in its folder has it, ``sys.argv`` as ``-m`` sets it, multiprocessing's default start method, its input
from /dev/null, its output captured, exit handlers run, killed with the test if the test ends first.

Only third-party packages are preloaded, never ours, so a command that forgets an import of its own still fails
here. What a fork cannot copy falls back to a new interpreter: an environment that changes how Python starts
(``PYTHONPATH``, say; ``PYTHONWARNINGS=ignore`` is applied in the fork). Tests of the process itself (signals, a
terminal, what a fresh interpreter imports) start it themselves. ``L0SWEEP_TEST_FRESH=1`` starts every command as a
new interpreter, as before.
"""
from __future__ import annotations

import atexit
import json
import multiprocessing
import os
import runpy
import signal
import subprocess
import sys
import tempfile
import traceback
import warnings
from pathlib import Path

# What every command imports (the MLflow store and its migrations: another second each). Not torch._dynamo or
# torch.export: importing them reads CXX, which a test sets for one command.
PRELOAD = ["torch", "mlflow", "optuna", "mlflow.store.tracking.sqlalchemy_store", "alembic", "pandas"]
_context: multiprocessing.context.ForkServerContext | None = None
_started_with: dict[str, str] = {}  # the environment the server started in
_default_path: list[str] = []  # sys.path of a new interpreter, less its first entry (the folder)


def _server() -> multiprocessing.context.ForkServerContext:
    global _context
    if _context is None:
        _started_with.update(os.environ)
        shown = subprocess.run([sys.executable, "-c", "import json, sys; print(json.dumps(sys.path[1:]))"],
                               capture_output=True, text=True, check=True, cwd="/", stdin=subprocess.DEVNULL)
        _default_path[:] = json.loads(shown.stdout)
        _context = multiprocessing.get_context("forkserver")
        _context.set_forkserver_preload(PRELOAD)
    return _context


def _exit_code(code: object) -> int:
    """What the interpreter makes of ``SystemExit(code)``."""
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    print(code, file=sys.stderr)
    return 1


def _child(module: str, args: list[str], cwd: str, env: dict[str, str], out: str, err: str,
           path: list[str]) -> None:
    status, interrupted = 1, False
    try:
        for fd, name, flags in ((0, os.devnull, os.O_RDONLY), (1, out, os.O_WRONLY), (2, err, os.O_WRONLY)):
            opened = os.open(name, flags)
            os.dup2(opened, fd)
            os.close(opened)
        os.chdir(cwd)
        os.environ.clear()
        os.environ.update(env)
        if env.get("PYTHONWARNINGS") == "ignore":
            warnings.simplefilter("ignore")
        multiprocessing.set_start_method(None, force=True)  # the platform's default again, not the forkserver
        sys.path[:] = [cwd, *path]  # as `python -m` in that folder has it
        sys.argv = [module, *args]
        try:
            runpy.run_module(module, run_name="__main__", alter_sys=True)
            status = 0
        except SystemExit as stop:
            status = _exit_code(stop.code)
        except KeyboardInterrupt:
            traceback.print_exc()
            interrupted = True
        except BaseException:
            traceback.print_exc()
        atexit._run_exitfuncs()
    except BaseException:
        traceback.print_exc()
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:
                pass
        if interrupted:  # as Python ends on an uncaught Ctrl-C: killed by SIGINT
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGINT)
        os._exit(status)


def _starts_differently(env: dict[str, str]) -> bool:
    """Whether ``env`` sets anything that a new interpreter reads as it starts, which a fork of the server (started in
    ``_started_with``) cannot take."""
    return any(key.startswith("PYTHON") and env.get(key) != _started_with.get(key) and
               not (key == "PYTHONWARNINGS" and env.get(key) == "ignore") for key in set(env) | set(_started_with))


def run_module(module: str, args: list[str], *, cwd: Path | None = None, env: dict[str, str] | None = None,
               timeout: float = 300) -> subprocess.CompletedProcess:
    """``subprocess.run([python, "-m", module, *args], capture_output=True, text=True, stdin=DEVNULL)``, forked
    from the preloaded server where it can be (see the module's docstring); raises ``subprocess.TimeoutExpired``."""
    env = dict(os.environ if env is None else env)
    cmd = [sys.executable, "-m", module, *args]
    folder = str(cwd or os.getcwd())
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in env.items()):
        raise TypeError("env: names and values must be str, as subprocess wants them")
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"cwd {folder!r} is not a folder")
    server = None if os.environ.get("L0SWEEP_TEST_FRESH") == "1" else _server()
    if server is None or _starts_differently(env):
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=cwd, env=env,
                              stdin=subprocess.DEVNULL)
    with tempfile.TemporaryDirectory(prefix="l0sweep-test-") as scratch:
        out, err = os.path.join(scratch, "stdout"), os.path.join(scratch, "stderr")
        for name in (out, err):
            Path(name).touch()
        process = server.Process(target=_child, args=(module, args, folder, env, out, err, _default_path))
        process.start()
        try:
            process.join(timeout)
            if process.exitcode is None:
                raise subprocess.TimeoutExpired(cmd, timeout, Path(out).read_text(), Path(err).read_text())
        except BaseException:  # a timeout, or pytest's own (as subprocess.run, never leave the command running)
            process.kill()
            process.join()
            raise
        return subprocess.CompletedProcess(cmd, process.exitcode, Path(out).read_text(), Path(err).read_text())
