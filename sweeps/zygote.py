"""The zygote of ``l0sweep run``: one process that imports what a worker needs (torch, MLflow, Optuna, our own modules)
once, then forks each of the run's workers from itself (the name is Android's and Chromium's for such a process). A
worker started as a new interpreter spends about 6 CPU-seconds on those imports; a fork starts at once, and shares
their memory with its siblings.

The launcher (sweeps.pool, through sweeps.forked) starts it as ``python -m sweeps.zygote worker STUDY_FILE --storage
...``: a worker's own command line, so ``ps`` shows each fork as the worker it is. It runs in the launcher's folder,
environment and process group, with the current folder first on ``sys.path`` (as ``python -m sweeps.cli worker`` has
it, whatever started the launcher), and talks to the launcher over its standard streams, one JSON object a line:

- the launcher asks ``{"log": PATH, "env": {NAME: VALUE}}``: fork a worker that runs ``l0sweep worker ...`` with
  these variables set (its GPU), its output in ``PATH`` and its input from /dev/null;
- the zygote answers ``{"started": PID}`` (or ``{"started": null}`` when the fork failed, said in ``PATH``), and
  ``{"exited": PID, "status": CODE}`` when that worker ends, ``CODE`` as ``Popen.returncode`` has it (negative: the
  signal that killed it).

It blocks SIGINT, SIGTERM and SIGHUP, which a terminal, ``timeout`` or a job scheduler sends the whole process
group: the launcher stops the workers, and the zygote stays to report how they ended. Each fork takes the default
handlers back, then takes any stop sent to it meanwhile. The zygote exits when the launcher closes its input (at the
sweep's end, or dying); its own errors (and whatever an import prints) go to its standard error, which the launcher
points at ``zygote.log`` beside the workers' logs. Should its imports leave it with more than one Python thread, it
forks nothing and exits: the launcher then starts the workers as new processes.

Nothing it imports initialises CUDA, so each fork can still be given its own GPU; ``gc.freeze()`` keeps the
collector off what was imported (Python's advice before forking without exec): a worker's collections neither walk
those objects nor copy their pages.
"""
from __future__ import annotations

import gc
import importlib
import json
import os
import select
import signal
import sys
import threading
import traceback

from . import cli

# Every module a worker imports as it runs trials, as a worker's sys.modules lists them at its end. Besides our
# own and torch: torch._dynamo (torch's optimizers import it at their first step); the MLflow store, pyfunc and
# tracing modules that a first run and a logged model bring in; matplotlib for the log_alpha histograms; git and
# IPython, which MLflow imports at each run (to tag the source commit; to ask whether it runs in a notebook).
WORKER_MODULES = ("sweeps.worker", "sweeps.deploy", "torch._dynamo", "mlflow.pytorch", "mlflow.pyfunc",
                  "mlflow.store.tracking.sqlalchemy_store", "mlflow.store.tracking.sqlalchemy_workspace_store",
                  "mlflow.tracing.processor.otel", "matplotlib.figure", "matplotlib.backends.backend_agg", "git",
                  "IPython")
STOPS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def preload() -> None:
    """Import :data:`WORKER_MODULES`; one that fails (missing from this install, or broken) is left to the workers,
    as before, and said on standard error."""
    for name in WORKER_MODULES:
        try:
            importlib.import_module(name)
        except ModuleNotFoundError:
            pass
        except Exception:
            traceback.print_exc()


def tell(answers: int, message: dict) -> None:
    os.write(answers, (json.dumps(message) + "\n").encode())


def run_worker(argv: list[str], log: str, env: dict[str, str], answers: int) -> None:
    """In a fork: become ``l0sweep ARGV`` with ``env`` added to the environment, output to ``log``; never returns."""
    try:
        os.close(answers)
        for sig in STOPS[1:]:
            signal.signal(sig, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOPS)  # a stop sent since the fork arrives now
        os.environ.update(env)
        null = os.open(os.devnull, os.O_RDONLY)
        out = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        for fd, to in ((null, 0), (out, 1), (out, 2)):
            os.dup2(fd, to)
        os.close(null)
        os.close(out)
        sys.stdin = open(os.devnull)
        # Its parent, this zygote, lives while the launcher does: the worker waits for the study while it does.
        argv = [*argv, "--launcher-pid", str(os.getppid())]
        sys.argv = [cli.__file__, *argv]  # as `python -m sweeps.cli` has it (MLflow tags a run's source from it)
        cli.entry(argv)  # ends in os._exit
    except KeyboardInterrupt:
        os._exit(130)  # stopped before it began, as `l0sweep worker` exits on Ctrl-C
    except BaseException:
        traceback.print_exc()
    finally:
        os._exit(1)


def fork_worker(argv: list[str], request: dict, answers: int) -> int | None:
    """Fork a worker for ``request``; its pid, or None (said in its log) if the system refused the fork."""
    try:
        pid = os.fork()
    except OSError as exc:
        with open(request["log"], "w") as log:
            print(f"l0sweep run: could not fork a worker: {exc}", file=log)
        return None
    if pid == 0:
        run_worker(argv, request["log"], request["env"], answers)
    return pid


def serve(argv: list[str]) -> None:
    """Preload, then fork a worker running ``l0sweep ARGV`` for each request on standard input, and report each
    one's start and end on standard output, until the input closes."""
    # Blocked rather than ignored: a stop sent to a fork before it has its handlers back waits for them (an ignored
    # one would be lost, and the worker left waiting for a study that never comes).
    signal.pthread_sigmask(signal.SIG_BLOCK, STOPS)
    # The answers get a descriptor of their own: what an imported library prints goes to the log, not into them.
    answers = os.dup(1)
    os.dup2(2, 1)
    preload()
    # A fork copies one thread: a lock another Python thread held stays locked in the fork for good. (The C
    # libraries' own threads, OpenBLAS's and jemalloc's, come back in a fork through their at-fork handlers.)
    if threading.active_count() > 1:
        print(f"l0sweep zygote: {threading.active_count()} Python threads after the imports, so no forks: the "
              "workers start as new processes", file=sys.stderr)
        return
    gc.freeze()
    pending = b""
    while True:
        if select.select([0], [], [], 0.1)[0]:
            chunk = os.read(0, 65536)
            if not chunk:
                return  # the launcher is done (or gone); a worker still running carries on, as its own process
            *lines, pending = (pending + chunk).split(b"\n")
            for line in lines:
                tell(answers, {"started": fork_worker(argv, json.loads(line), answers)})
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            tell(answers, {"exited": pid, "status": os.waitstatus_to_exitcode(status)})


if __name__ == "__main__":
    status = 0
    try:
        serve(sys.argv[1:])
    except BrokenPipeError:
        pass  # the launcher died between two answers
    except BaseException:
        traceback.print_exc()
        status = 1
    sys.stderr.flush()
    os._exit(status)  # skip the teardown of everything preloaded: seconds of a garbage collection over it
