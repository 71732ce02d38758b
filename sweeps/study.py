"""A study in its storage: created once (spec, budget, starting points, MLflow parent run), then checked,
loaded and counted by every process that joins it.

Light on purpose (Optuna and MLflow, no torch): ``l0sweep run`` creates the study while its workers are
still importing torch.
"""
from __future__ import annotations

import json
import logging
import os
import socket
from pathlib import Path

import optuna
from optuna.trial import FrozenTrial, TrialState

from .records import StudyRecord, TrialRecord, epochs_trained, retry_history, retry_system_attrs
from .search import starting_point
from .settings import Settings, file_lock
from .config import TARGET_ONLY_OPTIM
from .spec import STUDY_PATHS, SpecError, StudySpec
from .storage import open_storage
from .tracking import check_tracking, delete_study_run, end_run_of, ensure_study_run, pid_space

_log = logging.getLogger(__name__)
# Settings that define what a trial is, or which trials count: resuming a study with any of them changed would mix
# two studies.
_IDENTITY = ("trial", "search", "objectives", "min_accuracy")


def retry_trial(study: optuna.Study, trial: FrozenTrial, max_retry: int | None) -> bool:
    """Queue a trial that never finished (its worker died or was stopped) again, same values, first in line.

    As Optuna's ``RetryHeartbeatStaleTrialCallback`` (the same ``failed_trial`` / ``retry_history`` system attrs,
    at most ``max_retry`` retries of one original), but the copy does not carry the failed attempt's user attrs:
    its worker's tag would make the retry look orphaned before its new worker tags it, and its MLflow run and
    epoch history are the old attempt's.
    """
    if max_retry is not None and len(retry_history(trial)) + 1 > max_retry:
        return False
    study.add_trial(optuna.create_trial(
        state=TrialState.WAITING, params=trial.params, distributions=trial.distributions,
        user_attrs=TrialRecord.attrs(**TrialRecord.read(trial).values), system_attrs=retry_system_attrs(trial)))
    return True


def stale_trial_callback(tracking_uri: str, max_retry: int):
    """On a dead worker's trial: end its MLflow run KILLED, then retry it."""

    def callback(study: optuna.Study, trial: FrozenTrial) -> None:
        try:
            end_run_of(trial, tracking_uri, "KILLED")
        except Exception as exc:  # the retry matters more than the log
            _log.warning("could not close the MLflow run of trial %d: %s", trial.number, exc)
        retry_trial(study, trial, max_retry)

    return callback


def worker_gone(trial: FrozenTrial, pid: int | None) -> bool:
    """Whether the worker (``host:pid``) running ``trial`` is known to be gone: decidable only where its pid means
    something, on its host in its pid namespace; anywhere else the RDB heartbeats decide."""
    record = TrialRecord.read(trial)
    host, _, owner = (record.worker or "").rpartition(":")
    if host != socket.gethostname() or not owner.isdigit():
        return False
    theirs, mine = record.pid_space or "", pid_space()
    if theirs != mine:
        # The same namespace on an earlier boot (the host's own, after a reboot) is gone; another container's
        # namespace (containers sharing the host's name) cannot be looked into.
        (boot, _, namespace), (my_boot, _, my_namespace) = theirs.partition("/"), mine.partition("/")
        return bool(theirs) and namespace == my_namespace and boot != my_boot
    owner_pid = int(owner)
    if pid is not None:
        return owner_pid == pid
    if owner_pid == os.getpid():
        return True  # asked between this process's trials: an earlier process with this pid (a restarted container)
    try:
        os.kill(owner_pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    try:
        cmdline = Path(f"/proc/{owner_pid}/cmdline").read_bytes()
    except OSError:
        return False  # no /proc (macOS): the pid is alive, that is all we know
    return b"worker" not in cmdline  # the pid now belongs to another program (or a dead, unreaped worker)


def recover_orphaned_trials(study: optuna.Study, tracking_uri: str, max_retry: int, pid: int | None = None) -> int:
    """Fail the RUNNING trials of dead workers on this machine (``pid``: of that worker), end their MLflow runs
    KILLED and queue them again; returns how many.

    On PostgreSQL, heartbeats do this for workers anywhere. An Optuna journal has no heartbeats: without this,
    a sweep killed outright (SIGKILL, the OOM killer, a reboot) left its trials RUNNING for good, and the resumed
    sweep counted them as running elsewhere and waited on them forever.
    """
    callback = stale_trial_callback(tracking_uri, max_retry)
    n = 0
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if worker_gone(t, pid):
            try:
                study._storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
            except optuna.exceptions.UpdateFinishedTrialError:
                continue  # another worker recovered it first (and queued it again)
            callback(study, study._storage.get_trial(t._trial_id))
            n += 1
    return n


def storage_for(spec: StudySpec, settings: Settings) -> optuna.storages.BaseStorage:
    w = spec.workers
    return open_storage(settings.storage, heartbeat_interval=w.heartbeat_interval, grace_period=w.grace_period,
                        stale_trial_callback=stale_trial_callback(settings.tracking_uri, w.max_retry),
                        reconnect_patience=w.reconnect_patience)


def check_same_study(spec: StudySpec, stored_json: str) -> None:
    """Raise SpecError if ``spec`` differs from the study's stored spec in what defines a trial."""
    # Both through today's schema: a field added since the study was made counts with its default, or with the
    # value that does what the study did (target studies made before decide_gates_at never decided their gates).
    raw = json.loads(stored_json)
    optim = raw.get("trial", {}).get("optim", {}) if isinstance(raw.get("trial"), dict) else {}
    if (raw.get("search") or {}).get("target_sparsity") is not None and "decide_gates_at" not in optim:
        raw["trial"]["optim"] = {**optim, "decide_gates_at": 1.0}
    try:
        stored = json.loads(StudySpec.model_validate(raw).model_dump_json())
    except ValueError:
        stored = raw
    mine = json.loads(spec.model_dump_json())
    for spec_dict in (stored, mine):
        # A lambda study never read the target's settings (files may no longer set them): they define none of it.
        optim = (spec_dict.get("trial") or {}).get("optim")
        if isinstance(optim, dict) and (spec_dict.get("search") or {}).get("target_sparsity") is None:
            for field in TARGET_ONLY_OPTIM:
                optim.pop(field, None)
    for spec_dict in (stored, mine):  # where a file lies on this machine is not what the trial is
        for *parents, leaf in STUDY_PATHS:
            node = spec_dict
            for part in parents:
                node = node.get(part, {}) if isinstance(node, dict) else {}
            if isinstance(node, dict):
                node.pop(leaf, None)
    for key in _IDENTITY:
        if stored.get(key) != mine.get(key):
            raise SpecError(f"study {spec.name!r} already exists with a different '{key}'; "
                            "give the changed study a new name")


def create_or_resume(spec: StudySpec, settings: Settings, trials: int | None = None) -> tuple[optuna.Study, bool]:
    """Create the study (once: spec, budget, starting points, MLflow parent run) or check and resume it;
    returns the study and whether this call created it.

    The budget is ``trials`` when given, else the file's ``trials`` when the study is made or when that number
    was edited since; otherwise it stays what it was (an earlier ``--trials`` included).

    Launchers sharing ``settings.out`` take turns (two ``l0sweep run`` of one file at once: the second resumes
    what the first created, and the embedded MLflow store is created once). Launchers on different machines
    must not create the same study at the same moment: enqueueing is not race-free.
    """
    settings.out.mkdir(parents=True, exist_ok=True)
    with file_lock(settings.out / ".create.lock"):
        return _create_or_resume(spec, settings, trials)


def _create_or_resume(spec: StudySpec, settings: Settings, trials: int | None) -> tuple[optuna.Study, bool]:
    check_tracking(settings.tracking_uri)
    storage = storage_for(spec, settings)
    existed = spec.name in optuna.get_all_study_names(storage)
    study = optuna.create_study(study_name=spec.name, storage=storage, load_if_exists=True,
                                directions=spec.directions)
    spec_json = spec.model_dump_json()
    try:
        file_budget_changed = False
        stored = StudyRecord.read(study)
        if stored.spec_json is not None:
            check_same_study(spec, stored.spec_json)
            # The file's `trials` was edited since the study last read it: the new budget applies, as --trials would.
            file_budget_changed = stored.spec.get("trials") != spec.trials
            if file_budget_changed:
                StudyRecord.write(study, spec_json=spec_json)
        elif existed:
            raise SpecError(f"study {spec.name!r} exists in the storage but was not made by l0sweep")
        else:
            study.set_metric_names(spec.metric_names)
            StudyRecord.write(study, spec_json=spec_json)
        for point in spec.enqueue:  # also on resume: a point added to the file since runs; one already run does not
            study.enqueue_trial(starting_point(spec, point), skip_if_exists=True)
        if trials is not None or file_budget_changed or stored.budget is None:
            StudyRecord.write(study, budget=trials or spec.trials)
        ensure_study_run(study, settings.tracking_uri, spec.mlflow.experiment or spec.name,
                         settings.out / "mlartifacts", spec_json)
    except BaseException:
        if not existed:  # nothing half-written: a study without its spec or MLflow run is no study
            optuna.delete_study(study_name=spec.name, storage=storage)
        raise
    return study, not existed


def discard_new_study(study: optuna.Study, tracking_uri: str) -> None:
    """Delete a study no trial ever ran in, with its MLflow run: for a launcher whose fresh study turned out
    unusable, so that the corrected study file can be run under the same name."""
    delete_study_run(study, tracking_uri)
    optuna.delete_study(study_name=study.study_name, storage=study._storage)


def load_existing(name: str, storage: optuna.storages.BaseStorage, sampler=None) -> optuna.Study:
    try:
        study = optuna.load_study(study_name=name, storage=storage, sampler=sampler)
    except KeyError:
        raise SpecError(f"study {name!r} does not exist in this storage: create it with "
                        "'l0sweep create' or 'l0sweep run'") from None
    if StudyRecord.read(study).spec_json is None:
        raise SpecError(f"study {name!r} was not made by l0sweep (it has no spec)")
    return study


def budget_reached(study: optuna.Study, spec: StudySpec, budget: int) -> bool:
    """Whether the study has its ``budget`` of complete trials, or has trained ``spec.budget.epochs`` epochs."""
    return counts(study)["COMPLETE"] >= budget or (
        spec.budget.epochs is not None and epochs_trained(study) >= spec.budget.epochs)


def counts(study: optuna.Study) -> dict[str, int]:
    result = {s.name: 0 for s in TrialState}
    for t in study.get_trials(deepcopy=False):
        result[t.state.name] += 1
    return result
