"""``l0sweep run``: create or resume a study, run K local worker processes to its budget, then the report.

Workers are separate processes (``l0sweep worker``), each with its own log in this run's folder under
``OUT/logs``. They start first and wait for the study, so their imports (torch, MLflow: seconds) overlap the
launcher's own and the study's creation. A worker that dies (killed, out of memory) has its running trial
failed, its MLflow run closed KILLED and the trial retried here, since a journal file has no heartbeats; on
PostgreSQL the heartbeats do the same for remote workers.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from .settings import CONFIG_ERROR, ERROR_PREFIX, Settings, check_stop, stop_on_signals
from .spec import SpecError, StudySpec
from .storage import check_url, redact

if TYPE_CHECKING:
    import optuna

MAX_RESTARTS = 3


def visible_gpus() -> list[str]:
    """The GPUs this process may use, as ``CUDA_VISIBLE_DEVICES`` entries: that variable's list when set, else
    ``nvidia-smi``'s (no torch import: the launcher stays light). Empty without NVIDIA GPUs."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [g.strip() for g in visible.split(",") if g.strip()]
    try:
        found = subprocess.run(["nvidia-smi", "--query-gpu=index", "--format=csv,noheader"], capture_output=True,
                               text=True, timeout=20, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired):
        return []
    return found.stdout.split() if found.returncode == 0 else []


def _spawn(study_file: Path, settings: Settings, index: int, log_dir: Path, ready: Path,
           gpus: list[str]) -> subprocess.Popen:
    """Start worker ``index``; with ``gpus``, it sees one of them (worker i: GPU i mod N), not all on the first."""
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": gpus[index % len(gpus)]} if gpus else None
    cmd = [sys.executable, "-m", "sweeps.cli", "worker", str(study_file), "--storage", settings.storage,
           "--tracking-uri", settings.tracking_uri, "--out", str(settings.out),
           "--start-after", str(ready), "--launcher-pid", str(os.getpid())]
    if settings.threads:
        cmd += ["--threads", str(settings.threads)]
    if settings.verbose:
        cmd.append("--verbose")
    with open(log_dir / f"worker-{index}.log", "wb") as log:  # the child keeps its own copy
        return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)


def _trials_started(study: optuna.Study) -> bool:
    """Whether any trial got past WAITING (the starting points are enqueued as WAITING trials)."""
    from optuna.trial import TrialState

    return bool(study.get_trials(deepcopy=False, states=tuple(s for s in TrialState if s != TrialState.WAITING)))


def _last_error(path: Path, prefix: str) -> str:
    """The last line of a worker's log that starts with ``prefix``, without it."""
    found = [line[len(prefix):] for line in _tail(path, 50).splitlines() if line.startswith(prefix)]
    return found[-1] if found else f"a worker could not start (see {path})"


def _tail(path: Path, lines: int = 5) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


# What writes the report at the end of a sweep: (study, folder, tracking URI) -> the page's path. The launcher
# draws nothing itself (sweeps does not import dashboards): its callers pass sweeps.api.report in.
Reporter = Callable[["optuna.Study", Path, str], Path]


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
    gpus = visible_gpus()

    def spawn(index: int) -> subprocess.Popen:
        return _spawn(study_file, settings, index, log_dir, ready, gpus)

    procs = {i: spawn(i) for i in range(workers)}
    try:
        return _run(spawn, spec, settings, workers, trials, report, procs, ready, gpus)
    finally:
        ready.unlink(missing_ok=True)


def _stop(procs: dict[int, subprocess.Popen]) -> None:
    for proc in procs.values():
        proc.terminate()
    for proc in procs.values():
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:  # stuck closing its trial (an MLflow server gone?): its trial is
            proc.kill()                    # then failed and retried, as a crashed worker's is
            proc.wait()


def _run(spawn: Callable[[int], subprocess.Popen], spec: StudySpec, settings: Settings, workers: int,
         trials: int | None, report: Reporter | None, procs: dict[int, subprocess.Popen], ready: Path,
         gpus: list[str]) -> int:
    try:
        from tqdm import tqdm

        from .tracking import end_study_run
        from .records import StudyRecord
        from .study import budget_reached, counts, create_or_resume, discard_new_study, recover_orphaned_trials

        study, created = create_or_resume(spec, settings, trials)
    except BaseException:
        _stop(procs)  # they were waiting for this study; nothing of theirs to clean up
        raise
    ready.touch()
    budget = int(StudyRecord.read(study).budget)
    log_dir = ready.parent
    on_gpus = (f" on GPU {', '.join(gpus[:workers])}" + (" (in turn)" if workers > len(gpus) else "")) if gpus else ""
    print(f"l0sweep: study {spec.name!r}: {budget} complete trials wanted, {workers} workers{on_gpus}; "
          f"storage {redact(settings.storage)}; runs in {redact(settings.tracking_uri)}; logs in {log_dir}",
          file=sys.stderr)
    restarts = 0
    status = "FINISHED"
    bar = tqdm(total=budget, desc="complete trials", unit="trial", disable=None, file=sys.stderr)
    done_before = 0
    last_count = 0.0
    try:
        while procs:
            # Notice a worker's exit within 0.2 s (the last one's ends the sweep); read the study once a second.
            time.sleep(0.2)
            check_stop()
            if time.monotonic() - last_count >= 1.0:
                last_count = time.monotonic()
                n = counts(study)
                bar.update(max(0, min(n["COMPLETE"], budget) - done_before))
                done_before = min(n["COMPLETE"], budget)
                bar.set_postfix(running=n["RUNNING"], pruned=n["PRUNED"], failed=n["FAIL"], refresh=False)
            for i, proc in list(procs.items()):
                code = proc.poll()
                if code is None:
                    continue
                del procs[i]
                if code == CONFIG_ERROR:  # the trials cannot run at all: one line, and no study left to fix
                    _stop(procs)
                    message = _last_error(log_dir / f"worker-{i}.log", ERROR_PREFIX)
                    if created and not _trials_started(study):
                        discard_new_study(study, settings.tracking_uri)
                        raise SpecError(f"{message} (the study was not kept: fix the file and run it again)")
                    end_study_run(study, settings.tracking_uri, "FAILED")
                    raise SpecError(message)
                if code != 0:
                    recovered = recover_orphaned_trials(study, settings.tracking_uri, spec.workers.max_retry, proc.pid)
                    tqdm.write(f"l0sweep: worker {i} exited with status {code} ({recovered} trial(s) retried); "
                               f"its log ends:\n{_tail(log_dir / f'worker-{i}.log')}", file=sys.stderr)
                    # A worker killed by a signal is replaced; one that gave up (failing trials) is not.
                    if code < 0 and not budget_reached(study, spec, budget) and restarts < MAX_RESTARTS:
                        restarts += 1
                        procs[i] = spawn(i + workers * restarts)
        # The last trials may complete after the bar's last read (it reads the study once a second): end it on the
        # count the summary gives, not a few short of the budget.
        bar.update(max(0, min(counts(study)["COMPLETE"], budget) - done_before))
    except KeyboardInterrupt:
        status = "KILLED"
        _stop(procs)
        # Anything still RUNNING belongs to a worker that did not get to close it.
        for proc in procs.values():
            recover_orphaned_trials(study, settings.tracking_uri, spec.workers.max_retry, proc.pid)
    finally:
        bar.close()
    n = counts(study)
    reached = budget_reached(study, spec, budget)
    if status == "FINISHED" and not reached:
        status = "FAILED"
    end_study_run(study, settings.tracking_uri, status)
    from .tracking import runs_link  # not at the top: the launcher starts its workers before importing MLflow

    print(f"l0sweep: {n['COMPLETE']} complete, {n['PRUNED']} stopped early, {n['FAIL']} failed or interrupted "
          f"(budget {budget})" + runs_link(study, settings.tracking_uri, "; runs: "), file=sys.stderr)
    if report is not None and n["COMPLETE"]:
        path = report(study, settings.out / "reports" / spec.name, settings.tracking_uri)
        print(f"l0sweep: report {path}", file=sys.stderr)
    return 0 if reached else (130 if status == "KILLED" else 1)

