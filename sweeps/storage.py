"""Where a study lives: a journal file for one machine, PostgreSQL (RDB) for many.

``--storage`` takes an RDB URL (``postgresql://user:pass@host/db``; ``sqlite:///x.db`` for one worker only,
optuna#820) or a file path, which means Optuna's journal file (safe for several processes on one host).
On an RDB the storage gets heartbeats, so a killed worker's trial is failed and retried, and every call is
retried while the database is unreachable, so a restart of PostgreSQL pauses workers instead of killing them.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Callable

import optuna
import sqlalchemy.exc
from optuna.storages import BaseStorage, JournalStorage, RDBStorage
from optuna.storages._cached_storage import _CachedStorage
from optuna.storages._heartbeat import BaseHeartbeat
from optuna.storages.journal import JournalFileBackend

_log = logging.getLogger(__name__)
RDB_SCHEMES = ("postgresql", "mysql", "sqlite")


class StorageError(RuntimeError):
    """A storage that cannot be opened; one line naming the URL and why."""


def is_rdb(url: str) -> bool:
    return url.split("://", 1)[0].split("+", 1)[0] in RDB_SCHEMES and "://" in url


def check_url(url: str, workers: int = 1) -> None:
    """Refuse URLs that cannot work before anything is created."""
    if "://" in url and not is_rdb(url):
        raise StorageError(f"--storage {url!r}: unsupported scheme; use postgresql://..., mysql://..., "
                           "sqlite:///FILE (one worker) or a file path for a journal file")
    if url.startswith("sqlite") and workers > 1:
        raise StorageError(f"--storage {url!r}: SQLite cannot be shared by {workers} parallel workers "
                           "(database is locked); use a journal file path or PostgreSQL")


def _unreachable(exc: BaseException) -> bool:
    """Whether ``exc`` means the database went away (worth waiting for), not a bad request."""
    while exc is not None:
        if isinstance(exc, (sqlalchemy.exc.OperationalError, sqlalchemy.exc.InterfaceError)):
            return True
        if isinstance(exc, sqlalchemy.exc.DBAPIError) and exc.connection_invalidated:
            return True
        exc = exc.__cause__ or exc.__context__
    return False


class ReconnectingStorage(BaseStorage, BaseHeartbeat):
    """Wraps an RDB storage; a call that finds the database unreachable is retried for ``patience`` seconds.

    SQLAlchemy's ``pool_pre_ping`` replaces the dead connections once the server is back. A retried write
    that had in fact committed is harmless for Optuna's calls except ``create_new_trial`` (a rare duplicate).
    """

    def __init__(self, inner: BaseStorage, patience: float) -> None:
        self._inner = inner
        self._patience = patience

    def _call(self, name: str, *args: Any, **kwargs: Any) -> Any:
        deadline = time.monotonic() + self._patience
        delay = 0.5
        while True:
            try:
                return getattr(self._inner, name)(*args, **kwargs)
            except Exception as exc:
                if not _unreachable(exc) or time.monotonic() > deadline:
                    raise
                _log.warning("storage unreachable (%s); retrying %s in %.1fs", type(exc).__name__, name, delay)
                time.sleep(delay)
                delay = min(delay * 2, 5.0)

    def __getattr__(self, name: str) -> Any:  # anything not wrapped below (e.g. RDB-specific helpers)
        return getattr(self._inner, name)


def _wrap(name: str) -> Callable[..., Any]:
    def method(self: ReconnectingStorage, *args: Any, **kwargs: Any) -> Any:
        return self._call(name, *args, **kwargs)

    method.__name__ = name
    return method


# Every storage and heartbeat method goes through _call: one rule, not a hand-written copy per method.
for _name in [m for m in dir(BaseStorage) if not m.startswith("_")] + [
        "record_heartbeat", "_get_stale_trial_ids", "get_heartbeat_interval",
        "get_heartbeat_stale_trial_callback", "get_failed_trial_callback"]:
    setattr(ReconnectingStorage, _name, _wrap(_name))
ReconnectingStorage.__abstractmethods__ = frozenset()


def open_storage(url: str, *, heartbeat_interval: int | None = None, grace_period: int | None = None,
                 stale_trial_callback: Callable[[optuna.Study, optuna.trial.FrozenTrial], None] | None = None,
                 reconnect_patience: float = 300.0) -> BaseStorage:
    """An Optuna storage for ``url`` (RDB URL or journal file path); raises StorageError if unreachable."""
    check_url(url)
    if not is_rdb(url):
        path = Path(url)
        path.parent.mkdir(parents=True, exist_ok=True)
        return JournalStorage(JournalFileBackend(str(path)))
    engine_kwargs: dict[str, Any] = {"pool_pre_ping": True}
    if url.startswith("postgresql"):
        engine_kwargs["connect_args"] = {"connect_timeout": 5}
    heartbeat = {} if url.startswith("sqlite") else {
        "heartbeat_interval": heartbeat_interval, "grace_period": grace_period,
        "heartbeat_stale_trial_callback": stale_trial_callback}
    try:
        rdb = RDBStorage(url, engine_kwargs=engine_kwargs, **heartbeat)
    except Exception as exc:  # the driver's message names host/port/database; keep its first line
        text = str(exc.__cause__ or exc).strip()
        reason = text.splitlines()[0] if text else type(exc).__name__
        raise StorageError(f"--storage {redact(url)}: cannot open the database: {reason}") from None
    return ReconnectingStorage(_CachedStorage(rdb), reconnect_patience)


def redact(url: str) -> str:
    """The URL without its password, for messages and logs."""
    if "://" not in url or "@" not in url:
        return url
    scheme, rest = url.split("://", 1)
    creds, host = rest.rsplit("@", 1)
    user = creds.split(":", 1)[0]
    return f"{scheme}://{user}:***@{host}" if ":" in creds else url
