"""``python -m MODULE ARGS`` for the tests, in a fork of a process that has already imported torch, MLflow and Optuna.

A new interpreter spends 4-6 CPU-seconds importing those before any l0sweep code runs, and the tests start dozens
(`l0sweep create`, `export`, `pick`, `run`'s launcher and its zygote, the benchmark scripts): on a 2-core machine that
was a fifth of ``make test``. Here one server process per test process (the standard library's ``forkserver``)
imports them once, and each command runs in a fork of it, as ``python -m`` would run it: ``sys.path`` as a new
interpreter in its folder has it, ``sys.argv`` as ``-m`` sets it, the command line that ``ps`` shows, multiprocessing's
default start method, its input from /dev/null, its output captured, exit handlers run, killed with the test if the
test ends first.

A command's own ``python -m`` child in :data:`FORKED_CHILDREN` (``l0sweep run``'s zygote) is not a new interpreter
either: each command forks a standby of itself as it starts, before it has run anything, and the child runs there,
a child of the command in its process group as an exec'd one would be.

Only third-party packages are preloaded, never ours, so a command that forgets an import of its own still fails
here. What a fork cannot copy falls back to a new interpreter: an environment that changes what Python or a
preloaded module reads as it starts (:data:`READ_AT_IMPORT`; ``PYTHONWARNINGS=ignore`` is applied in the fork).
Tests of the process itself (signals, a terminal, what a fresh interpreter imports) start it themselves.
``L0SWEEP_TEST_FRESH=1`` starts every command as a new interpreter, as before.
"""
from __future__ import annotations

import atexit
import inspect
import json
import multiprocessing
import os
import runpy
import signal
import socket
import subprocess
import sys
import tempfile
import traceback
import warnings
from multiprocessing import forkserver, resource_tracker
from pathlib import Path

import setproctitle

# What every command imports (the MLflow store and its migrations: another second each); the server also imports
# what the zygote of `l0sweep run` imports for its workers, less our own modules (torch._dynamo: about 2 CPU-s a sweep).
PRELOAD = ["torch", "mlflow", "optuna", "mlflow.store.tracking.sqlalchemy_store", "alembic", "pandas"]
# Environment variables that Python or a preloaded module reads as it starts or imports, of those the tests set
# (torch's inductor reads CXX into its config): a command that sets one differently gets a new interpreter.
READ_AT_IMPORT = ("PYTHON", "TORCH", "CXX")
# What a forked command starts as `python -m` that runs in a fork of the command's clean start rather than a new
# interpreter: the zygote of `l0sweep run`, which would import torch and MLflow again in every sweep.
FORKED_CHILDREN = ("sweeps.zygote",)
_EXECUTE_CHILD = list(inspect.signature(subprocess.Popen._execute_child).parameters)[1:]  # its arguments, by name
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
        # Imported here, not above: each fork imports this module (its target's), and must not have imported ours.
        from sweeps.zygote import WORKER_MODULES

        _context.set_forkserver_preload([*PRELOAD, *(name for name in WORKER_MODULES
                                                     if not name.startswith("sweeps."))])
    return _context


def _exit_code(code: object) -> int:
    """What the interpreter makes of ``SystemExit(code)``."""
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    print(code, file=sys.stderr)
    return 1


def _run_as_main(module: str, args: list[str], cwd: str, env: dict[str, str], path: list[str]) -> None:
    """Become ``python -m module args`` in ``cwd`` with ``env`` (fds 0-2 already in place); never returns."""
    status, interrupted = 1, False
    try:
        # What /proc/PID/cmdline shows after exec: ps, and l0sweep's check that a trial's worker still lives, read it.
        # Set before the environment changes: setproctitle finds the command line's memory from the environment's.
        setproctitle.setproctitle(" ".join([sys.executable, "-m", module, *args]))
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


def _child(module: str, args: list[str], cwd: str, env: dict[str, str], out: str, err: str,
           path: list[str]) -> None:
    """The command, in a fork of the server: input from /dev/null, output to the files ``out`` and ``err``."""
    try:
        for fd, name, flags in ((0, os.devnull, os.O_RDONLY), (1, out, os.O_WRONLY), (2, err, os.O_WRONLY)):
            opened = os.open(name, flags)
            os.dup2(opened, fd)
            os.close(opened)
    except BaseException:
        traceback.print_exc()
        os._exit(1)
    try:  # forked first, while this process is as the server made it (its title too, which names no test folder)
        _Popen.standby = _Standby(path)
    except OSError:
        pass  # no fork to spare: its children get new interpreters
    else:
        atexit.register(_Popen.standby.close)  # so the command ends after it (`l0sweep` runs its handlers, then _exit)
        subprocess.Popen = _Popen
    _run_as_main(module, args, cwd, env, path)


def _forget_the_server() -> None:
    """Close what this fork holds of the forkserver and the resource tracker, as exec with ``close_fds`` would:
    a zygote's workers left running after their test must not keep the test process's servers alive."""
    from_server = [getattr(forkserver._forkserver, "_forkserver_alive_fd", None),
                   getattr(resource_tracker._resource_tracker, "_fd", None)]
    parent = multiprocessing.process._parent_process
    if parent is not None:
        from_server.append(parent.sentinel)
    for fd in from_server:
        if fd is not None:
            try:
                os.close(fd)
            except OSError:
                pass
    forkserver._forkserver._forkserver_alive_fd = None
    resource_tracker._resource_tracker._fd = None
    multiprocessing.process._parent_process = None


class _Standby:
    """A fork of a command made as it starts, before the command has run anything: the process that its
    ``python -m`` child in :data:`FORKED_CHILDREN` becomes (:meth:`start`), in a new interpreter's stead. A child of
    the command, so in its process group, and waited for as ``Popen`` waits; unused, the command ends it as it exits."""

    def __init__(self, path: list[str]) -> None:
        self.socket, theirs = socket.socketpair()
        self.pid = os.fork()
        if self.pid == 0:
            self.socket.close()
            setproctitle.setproctitle(f"{sys.executable} (a test command's standby)")  # not the command's, for ps
            self._wait(theirs, path)
        theirs.close()
        self.spent = False  # started its child, or closed

    @staticmethod
    def _wait(sock: socket.socket, path: list[str]) -> None:
        """In the standby: wait for :meth:`start`'s request, then run it; never returns."""
        try:
            data, fds, _, _ = socket.recv_fds(sock, 65536, 3)
            while chunk := sock.recv(65536):
                data += chunk
            sock.close()
            if not fds:
                os._exit(0)  # the command ended without starting a child
            for fd, to in zip(fds, (0, 1, 2)):
                os.dup2(fd, to)
                os.close(fd)
            _forget_the_server()
            request = json.loads(data)
        except BaseException:
            traceback.print_exc()
            os._exit(1)
        _run_as_main(request["module"], request["args"], request["cwd"], request["env"], path)

    def start(self, module: str, args: list[str], cwd: str, env: dict[str, str], fds: list[int]) -> int:
        """Run ``python -m module args`` in the standby, with ``fds`` as its 0, 1 and 2; its pid."""
        request = json.dumps({"module": module, "args": args, "cwd": cwd, "env": env}).encode()
        try:
            sent = socket.send_fds(self.socket, [request], fds)
            self.socket.sendall(request[sent:])
        except OSError:  # it died: the caller starts a new interpreter instead
            self.close()
            raise
        self.spent = True
        self.socket.close()
        return self.pid

    def close(self) -> None:
        """Unused, end it and wait for it (a fork of this command may hold the socket too: shut down, not closed)."""
        if not self.spent:
            self.spent = True
            try:
                self.socket.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self.socket.close()
            try:
                os.waitpid(self.pid, 0)
            except ChildProcessError:
                pass


class _Popen(subprocess.Popen):
    """``subprocess.Popen`` in a forked command: ``[sys.executable, "-m", M, ...]`` for M in
    :data:`FORKED_CHILDREN`, with no options a fork cannot take, starts in the command's :class:`_Standby`."""

    standby: _Standby | None = None

    def _execute_child(self, *given: object) -> None:
        call = dict(zip(_EXECUTE_CHILD, given))
        argv, standby = call["args"], type(self).standby
        forkable = (standby is not None and not standby.spent and isinstance(argv, list) and len(argv) > 2 and
                    argv[:2] == [sys.executable, "-m"] and argv[2] in FORKED_CHILDREN and not call["shell"] and
                    call["executable"] is None and call["preexec_fn"] is None and not call["pass_fds"] and
                    call["close_fds"] and not call["start_new_session"] and call["process_group"] in (None, -1) and
                    call["uid"] is None and call["gid"] is None and call["gids"] is None and call["umask"] < 0)
        if not forkable:
            return super()._execute_child(*given)
        env = os.environ if call["env"] is None else call["env"]
        fds = [fd if fd != -1 else inherited  # -1: the command's own, as an exec'd child inherits it
               for fd, inherited in zip((call["p2cread"], call["c2pwrite"], call["errwrite"]), (0, 1, 2))]
        try:
            self.pid = standby.start(argv[2], [os.fsdecode(arg) for arg in argv[3:]],
                                     os.path.abspath(os.fsdecode(call["cwd"] or os.getcwd())),
                                     {os.fsdecode(k): os.fsdecode(v) for k, v in env.items()}, fds)
        except OSError:
            return super()._execute_child(*given)
        self._child_created = True
        self._close_pipe_fds(call["p2cread"], call["p2cwrite"], call["c2pread"], call["c2pwrite"], call["errread"],
                             call["errwrite"])


def _starts_differently(env: dict[str, str]) -> bool:
    """Whether ``env`` sets anything that a new interpreter reads as it starts (:data:`READ_AT_IMPORT`), which a
    fork of the server (started in ``_started_with``) cannot take."""
    return any(key.startswith(READ_AT_IMPORT) and env.get(key) != _started_with.get(key) and
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
