"""``python -m MODULE ARGS`` for the tests, in a fork of a process that has already imported torch, MLflow and Optuna.

A new interpreter spends 4-6 CPU-seconds importing those before any l0sweep code runs, and the tests start about a
hundred (`l0sweep create`, `export`, `pick`, `run`'s launcher, the benchmark scripts): on a 2-core machine that was a
fifth of ``make test``. Here one server process per test process (the standard library's ``forkserver``) imports
them once, and each command runs in a fork of it, as ``python -m`` would run it: its own folder first on
``sys.path``, ``sys.argv`` as ``-m`` sets it, its input from /dev/null, its output captured, exit handlers run.

Only third-party packages are preloaded, never ours, so a command that forgets an import of its own still fails
here. What a fork cannot copy falls back to a new interpreter: an environment that changes how Python starts
(``PYTHONPATH``, say; ``PYTHONWARNINGS=ignore`` is applied in the fork). Tests of the process itself (signals, a
terminal, what a fresh interpreter imports) start it themselves. ``L0SWEEP_TEST_FRESH=1`` starts every command as a
new interpreter, as before.
"""
from __future__ import annotations

import atexit
import multiprocessing
import os
import runpy
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


def _server() -> multiprocessing.context.ForkServerContext:
    global _context
    if _context is None:
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


def _child(module: str, args: list[str], cwd: str, env: dict[str, str], out: str, err: str) -> None:
    status = 1
    try:
        os.chdir(cwd)
        os.environ.clear()
        os.environ.update(env)
        if env.get("PYTHONWARNINGS") == "ignore":
            warnings.simplefilter("ignore")
        for fd, path, flags in ((0, os.devnull, os.O_RDONLY), (1, out, os.O_WRONLY), (2, err, os.O_WRONLY)):
            opened = os.open(path, flags)
            os.dup2(opened, fd)
            os.close(opened)
        sys.path.insert(0, cwd)  # `python -m` puts the current folder first
        sys.argv = [module, *args]
        try:
            runpy.run_module(module, run_name="__main__", alter_sys=True)
            status = 0
        except SystemExit as stop:
            status = _exit_code(stop.code)
        except BaseException:
            traceback.print_exc()
        atexit._run_exitfuncs()
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:
                pass
        os._exit(status)


def _starts_differently(env: dict[str, str]) -> bool:
    """Whether ``env`` sets anything that a new interpreter reads as it starts, which a fork cannot take."""
    return any(key.startswith("PYTHON") and env.get(key) != os.environ.get(key) and
               not (key == "PYTHONWARNINGS" and env[key] == "ignore") for key in set(env) | set(os.environ))


def run_module(module: str, args: list[str], *, cwd: Path | None = None, env: dict[str, str] | None = None,
               timeout: float = 300) -> subprocess.CompletedProcess:
    """``subprocess.run([python, "-m", module, *args], capture_output=True, text=True, stdin=DEVNULL)``, forked
    from the preloaded server where it can be (see the module's docstring); raises ``subprocess.TimeoutExpired``."""
    env = dict(os.environ if env is None else env)
    cmd = [sys.executable, "-m", module, *args]
    if _starts_differently(env) or os.environ.get("L0SWEEP_TEST_FRESH"):
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=cwd, env=env,
                              stdin=subprocess.DEVNULL)
    with tempfile.TemporaryDirectory(prefix="l0sweep-test-") as folder:
        out, err = os.path.join(folder, "stdout"), os.path.join(folder, "stderr")
        for path in (out, err):
            Path(path).touch()
        process = _server().Process(target=_child, args=(module, args, str(cwd or os.getcwd()), env, out, err))
        process.start()
        process.join(timeout)
        if process.exitcode is None:
            process.kill()
            process.join()
            raise subprocess.TimeoutExpired(cmd, timeout, Path(out).read_text(), Path(err).read_text())
        return subprocess.CompletedProcess(cmd, process.exitcode, Path(out).read_text(), Path(err).read_text())
