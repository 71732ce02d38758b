"""``python -m MODULE ARGS`` for the tests, in a fork of a process that has already imported torch, MLflow and Optuna.

A new interpreter spends 4-6 CPU-seconds importing those before any l0sweep code runs, and the tests start dozens
(`l0sweep create`, `export`, `pick`, `run`'s launcher and its zygote, the benchmark scripts): on a 2-core machine that
was a fifth of ``make test``. Here one server process per test process (the standard library's ``forkserver``)
imports them once, and each command runs in a fork of it, as ``python -m`` would run it: ``sys.path`` as a new
interpreter in its folder has it, ``sys.argv`` as ``-m`` sets it, the command line that ``ps`` shows, multiprocessing's
default start method, its input from /dev/null, exit handlers run. :func:`run_module` captures its output and kills it
if the test ends first; :func:`popen` starts it as ``subprocess.Popen`` would (its output where the test says, in a
session of its own if asked) and returns a handle with Popen's ``pid``, ``poll``, ``wait`` and signals.

A command's own ``python -m`` children in :data:`FORKED_CHILDREN` (``l0sweep run``'s zygote, the benchmarks' sweeps)
are not new interpreters either: each command forks a nursery of itself as it starts, before it has run anything,
which forks each such child twice over; the one between exits, and the child, reparented to the command (its
subreaper while it asks), is a child of the command in its process group, as an exec'd one would be.

Only third-party packages are preloaded, never ours, so a command that forgets an import of its own still fails
here. What a fork cannot copy falls back to a new interpreter: an environment that changes what Python or a
preloaded module reads as it starts (:data:`READ_AT_IMPORT`; ``PYTHONWARNINGS=ignore`` is applied in the fork).
What a user sees in a terminal is checked on a new interpreter (what libraries print as they import included), and
so is what a fresh interpreter imports. ``L0SWEEP_TEST_FRESH=1`` starts every command as a new interpreter.
"""
from __future__ import annotations

import atexit
import ctypes
import inspect
import json
import multiprocessing
import os
import runpy
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import traceback
import typing
import warnings
from multiprocessing import forkserver, reduction, resource_tracker
from pathlib import Path

import setproctitle

# What every command imports (the MLflow store and its migrations: another second each); the server also imports
# what the zygote of `l0sweep run` imports for its workers, less our own modules (torch._dynamo: about 2 CPU-s a sweep).
PRELOAD = ["torch", "mlflow", "optuna", "mlflow.store.tracking.sqlalchemy_store", "alembic", "pandas"]
# Environment variables that Python or a preloaded module reads as it starts or imports, of those the tests set
# (torch's inductor reads CXX into its config): a command that sets one differently gets a new interpreter.
READ_AT_IMPORT = ("PYTHON", "TORCH", "CXX")
# What a forked command starts as `python -m` that is forked from the command's clean start rather than a new
# interpreter: the zygote of `l0sweep run`, which would import torch and MLflow again in every sweep; any l0sweep
# command (the benchmarks' sweeps, `l0sweep ui`'s dashboard, a pool's workers where its zygote died); the bare
# trainings of benchmarks.sweep_overhead. A child gets the command's state as it started (signal dispositions and
# mask, umask, limits), which no command here changes before it starts one.
FORKED_CHILDREN = ("sweeps.zygote", "sweeps.cli", "benchmarks.sweep_overhead")
# Commands that start none of those (the zygote forks its workers itself): no nursery for them.
CHILDLESS = ("sweeps.zygote",)
_EXECUTE_CHILD = list(inspect.signature(subprocess.Popen._execute_child).parameters)[1:]  # its arguments, by name
_context: multiprocessing.context.ForkServerContext | None = None
_libc = ctypes.CDLL(None, use_errno=True)
_STOPS = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP}
_ROOT = Path(__file__).resolve().parents[1]
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
        if os.isatty(1) and not sys.stdout.line_buffering:  # as a new interpreter's standard output on a terminal
            sys.stdout.reconfigure(line_buffering=True)
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
        if interrupted:
            _end_as_interrupted()
        os._exit(status)


def _end_as_interrupted() -> None:
    """End as Python ends on an uncaught Ctrl-C: killed by SIGINT."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    os.kill(os.getpid(), signal.SIGINT)
    os._exit(130)  # SIGINT blocked: the status a shell gives it


def _child(module: str, args: list[str], cwd: str, env: dict[str, str], fds: list[int | None], new_session: bool,
           ready: int, path: list[str], started_with: dict[str, str]) -> None:
    """The command, in a fork of the server: ``fds`` its 0, 1 and 2 (None: /dev/null); ``new_session`` as
    ``Popen(start_new_session=True)``; ``ready`` closed once both are in place, as exec would have begun."""
    try:
        if new_session:
            os.setsid()
        _as_standard_streams(fds)
    except BaseException:
        traceback.print_exc()
        os._exit(1)
    _start(module, args, cwd, env, path, started_with, ready)


def _as_standard_streams(fds: list[int | None]) -> None:
    """Make ``fds`` this process's 0, 1 and 2 (None: /dev/null), and close the originals."""
    given = [os.open(os.devnull, os.O_RDWR) if fd is None else fd for fd in fds]
    for to, fd in enumerate(given):
        os.dup2(fd, to)
    for fd in set(given) - {0, 1, 2}:
        os.close(fd)


def _start(module: str, args: list[str], cwd: str, env: dict[str, str], path: list[str],
           started_with: dict[str, str], ready: int = -1) -> None:
    """Run the command, its nursery forked first (then ``ready`` closed); never returns."""
    _started_with.update(started_with)
    _Popen.nursery = None
    subprocess.Popen = _Popen
    if module not in CHILDLESS:
        try:  # forked first, while this process is as the server made it (its title too, which names no test folder)
            _Popen.nursery = _Nursery(path, ready)
        except OSError:
            pass  # no fork to spare: its children get new interpreters
        except KeyboardInterrupt:  # a Ctrl-C held back while the nursery was forked
            _end_as_interrupted()
        else:
            atexit.register(_Popen.nursery.close)  # the command ends after it (`l0sweep` runs its handlers, then _exit)
    if ready != -1:
        os.close(ready)
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


def _child_subreaper(on: bool) -> bool:
    """Make this process the one that adopts its orphaned descendants (Linux's PR_SET_CHILD_SUBREAPER), or not;
    whether it was."""
    was, unused = ctypes.c_int(0), ctypes.c_ulong(0)
    if (_libc.prctl(ctypes.c_int(37), ctypes.byref(was), unused, unused, unused) != 0 or  # PR_GET_CHILD_SUBREAPER
            _libc.prctl(ctypes.c_int(36), ctypes.c_ulong(int(on)), unused, unused, unused) != 0):  # PR_SET_...
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER)")
    return bool(was.value)


def _send(sock: socket.socket, message: bytes, fds: list[int]) -> None:
    framed = struct.pack("!Q", len(message)) + message
    sent = socket.send_fds(sock, [framed], fds)
    sock.sendall(framed[sent:])


def _receive(sock: socket.socket) -> tuple[bytes, list[int]] | None:
    """A message :func:`_send` sent and the fds that came with it; None at the end of the stream."""
    data, fds, _, _ = socket.recv_fds(sock, 65536, 3)
    if not data:
        return None
    while len(data) < 8 or len(data) < 8 + struct.unpack("!Q", data[:8])[0]:
        chunk = sock.recv(65536)
        if not chunk:
            raise EOFError("the message ended early")
        data += chunk
    return data[8:], fds


class _Nursery:
    """A fork of a command made as it starts, before the command has run anything, that forks the command's
    ``python -m`` children in :data:`FORKED_CHILDREN` (:meth:`start`) in a new interpreter's stead. Each is forked
    twice over and the one between exits, so the child is reparented to the command (its subreaper while it asks):
    a child of the command in its process group, waited for as ``Popen`` waits, as an exec'd child would be. The
    command ends it as it exits."""

    def __init__(self, path: list[str], ready: int = -1) -> None:
        """``ready``: the command's fd that tells its starter it has begun (the nursery must not hold it open)."""
        self.socket, theirs = socket.socketpair()
        self.owner = os.getpid()
        self.lock = threading.Lock()
        # Stops to the command's group are the command's to handle: the nursery ignores them (it ends when the
        # command does), blocked until it does, so that none lands in it first.
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, _STOPS)
        try:
            self.pid = os.fork()
            if self.pid == 0:
                try:
                    handlers = {stop: signal.signal(stop, signal.SIG_IGN) for stop in _STOPS}
                    signal.pthread_sigmask(signal.SIG_SETMASK, mask)
                    self.socket.close()
                    if ready != -1:
                        os.close(ready)
                    setproctitle.setproctitle(f"{sys.executable} (a test command's nursery)")  # for ps
                except BaseException:
                    traceback.print_exc()
                    os._exit(1)
                self._serve(theirs, path, handlers, mask)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        theirs.close()
        self.closed = False

    @staticmethod
    def _serve(sock: socket.socket, path: list[str], handlers: dict, mask: set) -> None:
        """In the nursery: for each request, fork the child, answer with its pid (0: not forked), and let it begin
        once the command has the pid (it exits if the command never says so); never returns."""
        try:
            while (received := _receive(sock)) is not None:
                request, fds = json.loads(received[0]), received[1]
                (pid_read, pid_write), (go_read, go_write) = os.pipe(), os.pipe()
                try:
                    between = os.fork()
                except OSError:
                    between = -1
                if between == 0:
                    os.close(pid_read)
                    os.close(go_write)
                    _Nursery._between(sock, pid_write, lambda: _Nursery._begin(request, fds, go_read, path,
                                                                               handlers, mask))
                for fd in (pid_write, go_read, *fds):
                    os.close(fd)
                child = 0
                if between > 0:
                    os.waitpid(between, 0)  # it has exited: its child is the command's now
                    with os.fdopen(pid_read, "rb") as answer:
                        child = int(answer.read() or b"0")
                else:
                    os.close(pid_read)
                sock.sendall(struct.pack("!q", child))
                heard = sock.recv(1) if child > 0 else b""  # the command has its pid
                if heard:
                    try:
                        os.write(go_write, b"g")
                    except BrokenPipeError:
                        pass  # it died before it began
                os.close(go_write)  # without a go, it exits
                if child > 0 and not heard:
                    break  # the command closed the nursery
        except (BrokenPipeError, ConnectionResetError, EOFError):
            pass  # the command is gone
        except BaseException:
            traceback.print_exc()
            os._exit(1)
        os._exit(0)

    @staticmethod
    def _between(sock: socket.socket, pid_write: int, begin: typing.Callable[[], None]) -> None:
        """In the process between: fork the child (which runs ``begin``), write its pid (0: not forked), exit."""
        # Stops sent to the child before it has its handlers back wait for them (ignored here, a blocked signal is
        # still kept).
        signal.pthread_sigmask(signal.SIG_BLOCK, _STOPS)
        try:
            child = os.fork()
        except OSError:
            child = -1
        if child == 0:
            os.close(pid_write)
            sock.close()
            begin()
        os.write(pid_write, str(max(child, 0)).encode())
        os._exit(0)

    @staticmethod
    def _begin(request: dict, fds: list[int], go: int, path: list[str], handlers: dict, mask: set) -> None:
        """In the child: wait for the go, then become the command asked for; never returns."""
        try:
            # Not before it is the command's child (its parent's pid is the command's from here on) and the command
            # knows its pid; without it (the nursery or the command gone first), nothing.
            began = os.read(go, 1)
            os.close(go)
            if not began:
                os._exit(1)
            _as_standard_streams(fds)
            _forget_the_server()
            for stop, handler in handlers.items():
                signal.signal(stop, handler)
        except BaseException:
            traceback.print_exc()
            os._exit(1)
        try:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)  # a stop held back until now lands here
        except KeyboardInterrupt:
            _end_as_interrupted()
        _start(request["module"], request["args"], request["cwd"], request["env"], path, _started_with)

    def start(self, module: str, args: list[str], cwd: str, env: dict[str, str], fds: list[int]) -> int:
        """Fork ``python -m module args`` as a child of this command, with ``fds`` as its 0, 1 and 2; its pid."""
        if self.closed or os.getpid() != self.owner:  # a fork of the command: its nursery's children are not its own
            raise OSError("no nursery here")
        request = json.dumps({"module": module, "args": args, "cwd": cwd, "env": env}).encode()
        with self.lock:
            was = _child_subreaper(True)
            try:
                _send(self.socket, request, fds)
                answer = b""
                while len(answer) < 8 and (chunk := self.socket.recv(8 - len(answer))):
                    answer += chunk
                pid = struct.unpack("!q", answer)[0] if len(answer) == 8 else 0
                if pid > 0:
                    self.socket.sendall(b"a")  # the child begins
            except BaseException:  # it died, or this command was stopped while it asked: its child never begins
                self.close()
                raise
            finally:
                _child_subreaper(was)
        if len(answer) < 8:  # it died: a child it forked gets no go and exits
            self.close()
            raise OSError("the nursery is gone")
        if pid <= 0:
            raise OSError("the nursery could not fork")
        return pid

    def close(self) -> None:
        """End it and wait for it (a fork of this command may hold the socket too: shut down, not closed)."""
        if not self.closed and os.getpid() == self.owner:
            self.closed = True
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
    :data:`FORKED_CHILDREN`, with no options a fork cannot take and no environment a fork cannot copy, is forked by
    the command's :class:`_Nursery`."""

    nursery: _Nursery | None = None

    def _execute_child(self, *given: object) -> None:
        call = dict(zip(_EXECUTE_CHILD, given))
        argv, nursery = call["args"], type(self).nursery
        env = os.environ if call["env"] is None else call["env"]
        forkable = (nursery is not None and isinstance(argv, list) and len(argv) > 2 and
                    argv[:2] == [sys.executable, "-m"] and argv[2] in FORKED_CHILDREN and not call["shell"] and
                    call["executable"] is None and call["preexec_fn"] is None and not call["pass_fds"] and
                    call["close_fds"] and not call["start_new_session"] and call["process_group"] in (None, -1) and
                    call["uid"] is None and call["gid"] is None and call["gids"] is None and call["umask"] < 0)
        if not forkable:
            return super()._execute_child(*given)
        env = {os.fsdecode(k): os.fsdecode(v) for k, v in env.items()}
        if _starts_differently(env):
            return super()._execute_child(*given)
        fds = [fd if fd != -1 else inherited  # -1: the command's own, as an exec'd child inherits it
               for fd, inherited in zip((call["p2cread"], call["c2pwrite"], call["errwrite"]), (0, 1, 2))]
        try:
            self.pid = nursery.start(argv[2], [os.fsdecode(arg) for arg in argv[3:]],
                                     os.path.abspath(os.fsdecode(call["cwd"] or os.getcwd())), env, fds)
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


class _Fd:
    """A file descriptor of this process, pickled as the fd itself into a fork of the server (multiprocessing sends
    it along, as it sends a socket)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def __reduce__(self):
        return _Fd._received, (reduction.DupFd(self.fd),)

    @staticmethod
    def _received(dup) -> int:
        return dup.detach()


def _fileno(stream: object, default: int) -> int | None:
    """The fd a Popen-style ``stdout``/``stderr`` argument names (None: /dev/null)."""
    if stream is None:
        return default
    if stream == subprocess.DEVNULL:
        return None
    return stream if isinstance(stream, int) else stream.fileno()


class ForkedCommand:
    """What ``subprocess.Popen`` returns, for a command forked from the preloaded server: ``pid``, ``returncode``,
    ``poll``, ``wait``, ``send_signal``, ``terminate``, ``kill``; exit statuses as Popen's (-N: killed by signal N)."""

    running: set[ForkedCommand] = set()  # killed as the test process exits, if a test left one

    def __init__(self, process: multiprocessing.process.BaseProcess, args: list[str]) -> None:
        self.process, self.args, self.pid, self.returncode = process, args, process.pid, None
        ForkedCommand.running.add(self)

    def poll(self) -> int | None:
        if self.returncode is None and self.process.exitcode is not None:
            self.returncode = self.process.exitcode
            ForkedCommand.running.discard(self)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        self.process.join(timeout)
        if self.poll() is None:
            raise subprocess.TimeoutExpired(self.args, timeout)
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:  # as Popen: never a pid that may have been reused
            try:
                os.kill(self.pid, sig)
            except ProcessLookupError:
                pass  # ended, its status not yet passed on by the server

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def __enter__(self) -> ForkedCommand:
        return self

    def __exit__(self, *exc: object) -> None:
        self.wait()


@atexit.register
def _kill_the_left() -> None:
    for command in list(ForkedCommand.running):  # before multiprocessing's own exit handler joins them
        try:
            command.kill()
            command.wait(30)
        except Exception:
            traceback.print_exc()


def popen(cmd: list[str], *, cwd: Path | None = None, env: dict[str, str] | None = None, stdout: object = None,
          stderr: object = None, start_new_session: bool = False) -> ForkedCommand | subprocess.Popen:
    """``subprocess.Popen(cmd, stdin=DEVNULL, ...)``; for ``cmd = [python, "-m", MODULE, ...]`` with MODULE one of
    this repository's (not ``mlflow server``), forked from the preloaded server where it can be (see the module's
    docstring). ``stdout``, ``stderr``: a file, an fd, None (this process's own) or ``subprocess.DEVNULL``;
    ``stderr`` also ``subprocess.STDOUT``; ``subprocess.PIPE`` gets a new interpreter."""
    env = dict(os.environ if env is None else env)
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in env.items()):
        raise TypeError("env: names and values must be str, as subprocess wants them")
    folder = os.path.abspath(str(cwd or os.getcwd()))
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"cwd {folder!r} is not a folder")
    ours = len(cmd) > 2 and cmd[:2] == [sys.executable, "-m"] and (_ROOT / cmd[2].split(".")[0]).is_dir()
    server = None if os.environ.get("L0SWEEP_TEST_FRESH") == "1" or not ours else _server()
    if server is None or _starts_differently(env) or subprocess.PIPE in (stdout, stderr):
        return subprocess.Popen(cmd, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=stdout, stderr=stderr,
                                start_new_session=start_new_session)
    out = _fileno(stdout, 1)
    err = out if stderr == subprocess.STDOUT else _fileno(stderr, 2)
    ready, set_up = os.pipe()
    try:
        process = server.Process(target=_child, args=(cmd[2], [str(arg) for arg in cmd[3:]], folder, env,
                                                      [None, None if out is None else _Fd(out),
                                                       None if err is None else _Fd(err)],
                                                      start_new_session, _Fd(set_up), _default_path, _started_with))
        process.start()
        command = ForkedCommand(process, cmd)
        os.close(set_up)
        set_up = -1
        try:
            os.read(ready, 1)  # returns once it has closed its end: its group and output in place, as Popen's
        except BaseException:
            command.kill()
            command.wait()
            raise
    finally:
        os.close(ready)
        if set_up != -1:
            os.close(set_up)
    return command


def _text(stream: typing.IO[bytes]) -> str:
    """What ``text=True`` makes of a command's output: decoded, universal newlines."""
    stream.seek(0)
    return stream.read().decode(errors="replace").replace("\r\n", "\n").replace("\r", "\n")


def run_module(module: str, args: list[str], *, cwd: Path | None = None, env: dict[str, str] | None = None,
               timeout: float = 300) -> subprocess.CompletedProcess:
    """``subprocess.run([python, "-m", module, *args], capture_output=True, text=True, stdin=DEVNULL)``, forked
    from the preloaded server where it can be (see the module's docstring); raises ``subprocess.TimeoutExpired``."""
    cmd = [sys.executable, "-m", module, *args]
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        process = popen(cmd, cwd=cwd, env=env, stdout=out, stderr=err)
        try:
            process.wait(timeout)
        except BaseException as stop:  # a timeout, or pytest's own (as subprocess.run, never leave it running)
            process.kill()
            process.wait()
            if isinstance(stop, subprocess.TimeoutExpired):
                raise subprocess.TimeoutExpired(cmd, timeout, _text(out), _text(err)) from None
            raise
        return subprocess.CompletedProcess(cmd, process.returncode, _text(out), _text(err))
