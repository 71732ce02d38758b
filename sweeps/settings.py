"""Where a sweep's processes find the study, log their runs and keep their files, and how they stop (no
heavy imports here: the launcher starts its workers before it imports MLflow, and the dashboard needs no torch)."""
from __future__ import annotations

import contextlib
import fcntl
import os
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

# A worker's exit status when the study's trials cannot run at all (the model does not fit the data, the data
# does not load); its last line starting ERROR_PREFIX says why, and the launcher removes a study it just created.
CONFIG_ERROR = 3
ERROR_PREFIX = "l0sweep worker: error: "


@dataclass
class Settings:
    """Where a worker finds the study, logs its runs and keeps its files."""

    storage: str
    tracking_uri: str
    out: Path
    threads: int | None = None
    verbose: bool = False  # other libraries' INFO lines too (--verbose); `run` passes it on to its workers


def default_tracking_uri(out: str | Path) -> str:
    """The embedded tracking store of a local sweep: a SQLite file under the output folder."""
    return f"sqlite:///{Path(out).resolve() / 'mlflow.db'}"


def user_cache() -> Path:
    """``~/.cache/l0sweep``: where l0sweep keeps, by default, what it makes or downloads once per machine."""
    return Path.home() / ".cache" / "l0sweep"


def settings_from(storage: str, tracking_uri: str, out: str | os.PathLike, **kw: Any) -> Settings:
    return Settings(storage=storage, tracking_uri=tracking_uri, out=Path(out).resolve(), **kw)


_STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP)  # a process supervisor's stop; the terminal closing
_stop_requested = False


def stop_on_signals(once: bool = False) -> None:
    """Treat SIGTERM and SIGHUP as Ctrl-C, so ``finally``/``except KeyboardInterrupt`` close trials, runs and
    children (by default both kill at once: trials and runs would be left RUNNING).

    ``once``: the first of them (or SIGINT) interrupts and later ones are ignored, so the closing that follows is
    not cut short. A sweep needs it: Ctrl-C in a terminal reaches its workers, then the launcher's SIGTERM does.
    The stop is remembered (:func:`check_stop`), in case the interrupt lands in code that swallows it.
    """

    def handler(signum: int, frame: Any) -> None:
        global _stop_requested
        _stop_requested = True
        if once:
            for sig in (signal.SIGINT, *_STOP_SIGNALS):
                signal.signal(sig, signal.SIG_IGN)
        raise KeyboardInterrupt

    for sig in (signal.SIGINT, *_STOP_SIGNALS) if once else _STOP_SIGNALS:
        signal.signal(sig, handler)


def stop_requested() -> bool:
    """Whether a stop signal came (:func:`stop_on_signals`), whatever became of its KeyboardInterrupt."""
    return _stop_requested


def check_stop() -> None:
    """Raise KeyboardInterrupt if a stop signal came and its interrupt was swallowed on the way. A bare
    ``except:`` in a library does that: torch-pruning retries its tracing forward pass under one, and the
    per-epoch sparsity report traces the model, so a Ctrl-C landing there was lost and (the later signals
    being ignored) the worker trained on. Call it where stopping is safe: between epochs, between trials."""
    if stop_requested():
        raise KeyboardInterrupt


@contextlib.contextmanager
def file_lock(path: str | os.PathLike) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` (created if missing) for the block: processes of this machine, or
    sharing the folder's volume, take turns. The OS releases it if the holder dies."""
    with open(path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield
