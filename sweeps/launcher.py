"""``l0sweep run``: create or resume a study, run K local worker processes to its budget, then the report.

Workers are separate processes (``l0sweep worker``, on Linux forked from the run's zygote: sweeps.zygote), each
with its own log in this run's folder under ``OUT/logs``. They start first and wait for the study, so their
imports (torch, MLflow: seconds, made once in the zygote) overlap the launcher's own and the study's creation. A
worker that dies (killed, out of memory) has its running trial failed, its MLflow run closed KILLED and the trial
retried here, since a journal file has no heartbeats; on PostgreSQL the heartbeats do the same for remote workers.
"""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import TYPE_CHECKING

from .pool import WorkerPool, visible_gpus
from .settings import Settings, stop_on_signals
from .spec import StudySpec
from .storage import check_url

if TYPE_CHECKING:  # the launcher stays light: it starts its workers before importing MLflow
    from .supervise import Reporter


def run_sweep(study_file: Path, spec: StudySpec, settings: Settings, workers: int, trials: int | None,
              report: Reporter | None = None) -> int:
    """The whole local sweep, then ``report`` into ``OUT/reports/NAME`` (if any trial completed); returns the exit
    status (0 when the study reached its budget)."""
    stop_on_signals(once=True)  # SIGTERM or a closed terminal: stop the workers as Ctrl-C does; finish closing
    check_url(settings.storage, workers)
    # A folder per run: a reused --out showed the last run's lines (its error among them) above this run's, and
    # truncating shared files would cut the logs of another `l0sweep run` of the same folder still running.
    log_dir = settings.out / "logs" / f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    log_dir.mkdir(parents=True, exist_ok=True)
    if settings.threads is None and spec.trial.threads is None:
        settings.threads = max(1, (os.cpu_count() or 1) // workers)
    ready = log_dir / f".study-ready-{os.getpid()}"
    ready.unlink(missing_ok=True)
    pool = WorkerPool(study_file, settings, workers, log_dir, ready, visible_gpus())
    try:
        try:
            from .supervise import supervise  # only now: it imports MLflow, seconds the workers spend starting
        except BaseException:
            pool.stop()  # they were waiting for a study this launcher cannot make
            raise
        return supervise(pool, spec, settings, trials, report)
    finally:
        pool.close()
        ready.unlink(missing_ok=True)
