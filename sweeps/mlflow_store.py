"""The embedded MLflow store (``sqlite:///OUT/mlflow.db``), made as a copy of an empty store already migrated.

MLflow makes a new SQLite store by running its alembic migrations one by one: 2.2 s of CPU for every new output
folder, paid by the launcher while its workers start. The migrated empty store is made once per MLflow version
(under ``$L0SWEEP_CACHE_DIR``, else ``~/.cache/l0sweep``) and copied. It holds no experiment: MLflow adds its
Default experiment on first open, as it does to a store it migrated itself.
"""
from __future__ import annotations

import os
import shutil
import sqlite3
import tempfile
from pathlib import Path

import mlflow

from .settings import user_cache


def cache_dir() -> Path:
    """Where l0sweep keeps what it makes once per machine."""
    return Path(os.environ.get("L0SWEEP_CACHE_DIR") or user_cache()).expanduser()


def sqlite_path(tracking_uri: str) -> Path | None:
    """The file of a ``sqlite:///FILE`` tracking URI (``sqlite:////abs`` or ``sqlite:///rel``); None for others.

    >>> sqlite_path("sqlite:////tmp/out/mlflow.db"), sqlite_path("http://127.0.0.1:5000")
    (PosixPath('/tmp/out/mlflow.db'), None)
    """
    prefix = "sqlite:///"
    return Path(tracking_uri[len(prefix):]) if tracking_uri.startswith(prefix) and "?" not in tracking_uri else None


def prepare_store(tracking_uri: str) -> None:
    """Where ``tracking_uri`` names a SQLite file that does not exist yet, make it a copy of the migrated empty
    store. Call it before MLflow first opens the store, from one process at a time (the launcher holds the output
    folder's creation lock); any other URI is left to MLflow."""
    path = sqlite_path(tracking_uri)
    if path is None or path.exists():
        return
    template = _migrated_empty_store()
    path.parent.mkdir(parents=True, exist_ok=True)
    # Copied under another name, then linked into place: a store MLflow finds is never a half-copied file.
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        shutil.copyfile(template, partial)
        os.link(partial, path)
    except FileExistsError:
        pass  # made meanwhile by a process that did not take the lock: theirs stands
    finally:
        partial.unlink(missing_ok=True)


def _migrated_empty_store() -> Path:
    """This MLflow version's migrated store with no experiment in it, made on first use."""
    template = cache_dir() / "mlflow-store" / f"mlflow-{mlflow.__version__}.db"
    if template.exists():
        return template
    # Imported only here: 1.5 s of CPU that a worker logging to an MLflow server never needs.
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    template.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=template.parent) as scratch:
        made = Path(scratch) / "mlflow.db"
        SqlAlchemyStore(f"sqlite:///{made}", str(Path(scratch) / "artifacts")).engine.dispose()
        with sqlite3.connect(made) as db:  # the Default experiment MLflow added: its location is this scratch one
            db.execute("DELETE FROM experiment_tags WHERE experiment_id = 0")
            db.execute("DELETE FROM experiments WHERE experiment_id = 0")
        db.close()
        os.replace(made, template)  # whole or not at all, whoever of two makers finishes last
    return template
