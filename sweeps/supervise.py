"""What ``l0sweep run`` does once its workers are starting: create or resume the study, watch the workers to the
study's budget (a progress bar; dead workers' trials retried, killed workers replaced), then close the study's
run, sum up and write the report.

Imported by the launcher after it has started its workers: MLflow (through sweeps.study) takes seconds to import.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Callable

import optuna
from optuna.trial import TrialState
from tqdm import tqdm

from .pool import WorkerPool
from .records import StudyRecord, epochs_trained
from .settings import CONFIG_ERROR, ERROR_PREFIX, Settings, check_stop
from .spec import SpecError, StudySpec
from .storage import redact
from .study import budget_reached, counts, create_or_resume, discard_new_study, recover_orphaned_trials
from .tracking import end_study_run, runs_link

MAX_RESTARTS = 3  # workers killed by a signal that are replaced, in all

# What writes the report at the end of a sweep: (study, folder, tracking URI) -> the page's path. The launcher
# draws nothing itself (sweeps does not import dashboards): its callers pass sweeps.api.report in.
Reporter = Callable[[optuna.Study, Path, str], Path]


def supervise(pool: WorkerPool, spec: StudySpec, settings: Settings, trials: int | None,
              report: Reporter | None) -> int:
    """Run the sweep with ``pool``'s workers to the study's budget, then ``report`` into ``OUT/reports/NAME`` (if
    any trial completed); returns the exit status (0 when the study reached its budget)."""
    try:
        study, created = create_or_resume(spec, settings, trials)
    except BaseException:
        pool.stop()  # they were waiting for this study; nothing of theirs to clean up
        raise
    pool.ready.touch()
    sweep = Supervisor(study, created, pool, spec, settings)
    sweep.announce()
    return sweep.finish(sweep.watch(), report)


class Supervisor:
    """One local sweep under way: its study (``created`` by this launcher or resumed), its workers, its budget."""

    def __init__(self, study: optuna.Study, created: bool, pool: WorkerPool, spec: StudySpec,
                 settings: Settings) -> None:
        self.study, self.created, self.pool, self.spec, self.settings = study, created, pool, spec, settings
        self.budget = int(StudyRecord.read(study).budget)
        self.epoch_budget = spec.budget.epochs  # or None: with it, the sweep speaks in epochs trained

    def announce(self) -> None:
        """One line: the study, its budget, the workers (and their GPUs), where the trials, runs and logs go."""
        workers, gpus, settings = self.pool.workers, self.pool.gpus, self.settings
        on_gpus = (f" on GPU {', '.join(gpus[:workers])}" + (" (in turn)" if workers > len(gpus) else "")) \
            if gpus else ""
        wanted = f"{self.budget} complete trials wanted" + (
            f", or {self.epoch_budget} epochs trained (stopped trials' too) if that comes first" if self.epoch_budget
            else "")
        print(f"l0sweep: study {self.spec.name!r}: {wanted}, {workers} workers{on_gpus}; "
              f"storage {redact(settings.storage)}; runs in {redact(settings.tracking_uri)}; logs in "
              f"{self.pool.log_dir}", file=sys.stderr)

    def progress(self, n: dict[str, int]) -> int:
        """What the progress bar counts, at most its total: complete trials (``n``: the study's counts), or with an
        epoch budget the epochs trained (which early stopping saves, and which the budget then counts)."""
        if self.epoch_budget:
            return min(epochs_trained(self.study), self.epoch_budget)
        return min(n["COMPLETE"], self.budget)

    def watch(self) -> str:
        """Show complete trials (or epochs trained, with an epoch budget) on a progress bar until every worker has
        exited; handle each exit as it comes. Returns the study run's status so far: FINISHED, or KILLED on Ctrl-C
        (the workers stopped, their trials queued again)."""
        study, pool = self.study, self.pool
        if self.epoch_budget:
            bar = tqdm(total=self.epoch_budget, desc="epochs trained", unit="epoch", disable=None, file=sys.stderr)
        else:
            bar = tqdm(total=self.budget, desc="complete trials", unit="trial", disable=None, file=sys.stderr)
        done_before = 0
        last_count = 0.0
        try:
            while pool.procs:
                # Notice a worker's exit within 0.2 s (the last one's ends the sweep); read the study once a second.
                time.sleep(0.2)
                check_stop()
                if time.monotonic() - last_count >= 1.0:
                    last_count = time.monotonic()
                    n = counts(study)
                    done = self.progress(n)
                    bar.update(max(0, done - done_before))
                    done_before = done
                    bar.set_postfix(**({"complete": n["COMPLETE"]} if self.epoch_budget else {}), running=n["RUNNING"],
                                    pruned=n["PRUNED"], failed=n["FAIL"], refresh=False)
                for slot, proc, code in pool.exited():
                    self.on_exit(slot, proc.pid, code)
            # The last trials may complete after the bar's last read (it reads the study once a second): end it on
            # the count the summary gives, not a few short of the budget.
            bar.update(max(0, self.progress(counts(study)) - done_before))
        except KeyboardInterrupt:
            pool.stop()
            # Anything still RUNNING belongs to a worker that did not get to close it.
            for proc in pool.procs.values():
                recover_orphaned_trials(study, self.settings.tracking_uri, self.spec.workers.max_retry, proc.pid)
            return "KILLED"
        finally:
            bar.close()
        return "FINISHED"

    def on_exit(self, slot: int, pid: int, code: int) -> None:
        """Worker ``slot`` (process ``pid``) exited with ``code``. A configuration error ends the sweep (SpecError;
        a study just created, in which no trial ran, is discarded); any other failure has its trials queued again,
        and a worker killed by a signal is replaced while the budget is not reached (MAX_RESTARTS in all)."""
        study, tracking_uri = self.study, self.settings.tracking_uri
        if code == CONFIG_ERROR:  # the trials cannot run at all: one line, and no study left to fix
            self.pool.stop()
            message = self.pool.last_error(slot, ERROR_PREFIX)
            if self.created and not _trials_started(study):
                discard_new_study(study, tracking_uri)
                raise SpecError(f"{message} (the study was not kept: fix the file and run it again)")
            end_study_run(study, tracking_uri, "FAILED")
            raise SpecError(message)
        if code != 0:
            recovered = recover_orphaned_trials(study, tracking_uri, self.spec.workers.max_retry, pid)
            tqdm.write(f"l0sweep: worker {slot} exited with status {code} ({recovered} trial(s) retried); "
                       f"its log ends:\n{self.pool.tail(slot)}", file=sys.stderr)
            # A worker killed by a signal is replaced; one that gave up (failing trials) is not.
            if code < 0 and not budget_reached(study, self.spec, self.budget) and self.pool.restarts < MAX_RESTARTS:
                self.pool.replace(slot)

    def finish(self, status: str, report: Reporter | None) -> int:
        """Close the study's run (FAILED if the workers stopped short of the budget), sum up, write the report;
        returns the exit status."""
        study, settings = self.study, self.settings
        n = counts(study)
        reached = budget_reached(study, self.spec, self.budget)
        if status == "FINISHED" and not reached:
            status = "FAILED"
        end_study_run(study, settings.tracking_uri, status)
        budget = f"{self.budget} trials or {self.epoch_budget} epochs; {epochs_trained(study)} epochs trained" \
            if self.epoch_budget else self.budget
        print(f"l0sweep: {n['COMPLETE']} complete, {n['PRUNED']} stopped early, {n['FAIL']} failed or interrupted "
              f"(budget {budget})"
              + runs_link(study, settings.tracking_uri, "; runs: "), file=sys.stderr)
        if report is not None and n["COMPLETE"]:
            path = report(study, settings.out / "reports" / self.spec.name, settings.tracking_uri)
            print(f"l0sweep: report {path}", file=sys.stderr)
        return 0 if reached else (130 if status == "KILLED" else 1)


def _trials_started(study: optuna.Study) -> bool:
    """Whether any trial got past WAITING (the starting points are enqueued as WAITING trials)."""
    return bool(study.get_trials(deepcopy=False, states=tuple(s for s in TrialState if s != TrialState.WAITING)))
