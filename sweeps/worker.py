"""A worker: joins a study and runs trials until the study's budget of complete trials is reached.

Any number of workers on any number of machines can join the same study; the budget (``n_trials`` in the
study's user attrs) counts complete trials in the storage, so it holds however many join. A trial is
trained by ``train_trial``, logged to MLflow as a child run of the study's run, and returns
(the validation metric, sparsity[, FLOPs reduction]) to Optuna: the metric in the task's direction, the rest
maximised.
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any, NamedTuple

import optuna
import torch
from torch import nn

import l0core

from .baseline import dense_baseline
from .config import TrialConfig
from .early_stopping import TrialHistory, stopper_for
from .loop import EpochMetrics, StopTrial
from .models import build_model
from .preflight import check_fits
from .records import StudyRecord, TrialRecord, dominated, record_shortfall
from .runtime import resolve_device
from .search import first_point, make_sampler, suggest, trial_config
from .settings import CONFIG_ERROR, ERROR_PREFIX, Settings, check_stop, stop_on_signals, stop_requested
from .spec import SpecError, StudySpec
from .study import (budget_reached, check_same_study, counts, load_existing, recover_orphaned_trials, retry_trial,
                    storage_for)
from .tracking import TrialRun, end_study_run, log_alpha_by_gate, log_alpha_histogram, pid_space, worker_tag
from .training import TrialResult, train_trial


def latency_batch(spec: StudySpec, cfg) -> int:
    """The batch size the latency objective and the report's speed-up use: the study's, else the training batch."""
    return spec.latency.batch_size or cfg.data.batch_size


def latency_speedup(spec: StudySpec, cfg, figures: dict) -> float:
    """The speed-up the latency objective maximises: at the study's latency batch size and runtime."""
    return float(figures[spec.latency.runtime][str(latency_batch(spec, cfg))]["speedup"])


def metric_floor(min_metric: float | str | None, chance_accuracy: float | None, val_examples: int) -> float | None:
    """The validation metric a trial must reach to be feasible: ``min_metric`` (None: no floor), or for
    ``"chance"`` (classification accuracy) one validation example more than ``chance_accuracy``, always answering
    the commonest class (a model that only ties it may answer that class to everything; half an example keeps the
    comparison clear of rounding)."""
    if min_metric == "chance":
        return chance_accuracy + 0.5 / max(val_examples, 1)
    return None if min_metric is None else float(min_metric)


def shortfall(value: float, floor: float | None, direction: str) -> float:
    """How far ``value`` falls short of ``floor`` in ``direction`` (an Optuna constraint: feasible when <= 0).

    >>> shortfall(0.8, 0.9, "maximize"), shortfall(0.8, 0.9, "minimize"), shortfall(5.0, None, "minimize")
    (0.09999999999999998, -0.09999999999999998, 0.0)
    """
    if floor is None:
        return 0.0
    return floor - value if direction == "maximize" else value - floor


def objective_points(spec: StudySpec, result: TrialResult) -> dict[str, float]:
    """A trained trial's objectives that need no timing, by Optuna metric name (``spec.metric_names``)."""
    return {spec.metric_column: result.val_metric, "sparsity": result.sparsity,
            "flops_reduction": 1.0 - result.flops_ratio}


class Scored(NamedTuple):
    """What a trained trial's objectives came to, and what was measured on the way."""

    objectives: list[float]  # in spec.metric_names' order
    on_front: bool  # whether it enters the study's front (feasible and not dominated)
    small: nn.Module | None  # the compacted model, where it was needed (timed, or to be logged)
    latency: dict | None  # sweeps.latency.figures, where measured


class Objective:
    """One trial: suggest -> train -> record -> log; returns the objectives (in ``spec.directions``)."""

    def __init__(self, spec: StudySpec, settings: Settings) -> None:
        self.spec = spec
        self.settings = settings
        self.failed = False  # whether the last trial raised (stopped-early trials did not fail)
        self.current: int | None = None  # the Optuna trial id of the trial in hand, None between trials
        self._dense: tuple | None = None  # (what it is, the dense model) timed against each trial's compacted one

    def __call__(self, trial: optuna.Trial) -> list[float]:
        self.failed, self.current = False, trial._trial_id  # until it ends, a stop interrupts this trial
        stopped = False
        try:
            return self._run(trial)
        except BaseException as exc:
            self.failed = not isinstance(exc, optuna.TrialPruned)
            stopped = _is_stop(exc)
            raise
        finally:
            if not stopped:  # it ended, or failed of itself (then retried only as max_retry allows)
                self.current = None

    def _run(self, trial: optuna.Trial) -> list[float]:
        cfg, values = self._suggest(trial)
        run = TrialRun(trial, self.settings.tracking_uri, values, cfg)
        try:
            result, trained = self._train(trial, cfg, run)
            feasible = self._record(trial, result)
            scored = self._score(trial, cfg, result, feasible)
            self._log(trial, cfg, run, result, scored, trained)
        except StopTrial as stop:
            TrialRecord.write(trial, stopped_at_epoch=stop.metrics.epoch)
            run.end("KILLED")
            raise optuna.TrialPruned(f"stopped early at epoch {stop.metrics.epoch} "
                                     f"({self.spec.early_stopping.method})") from None
        except BaseException as exc:
            run.end("KILLED" if _is_stop(exc) else "FAILED")
            raise
        return scored.objectives

    def _suggest(self, trial: optuna.Trial) -> tuple[TrialConfig, dict[str, Any]]:
        """The trial's config and values, as the sampler suggests them; recorded on the trial with its worker."""
        cfg, values = suggest(trial, self.spec)
        cfg = cfg.model_copy(update={"baseline_dir": str(self.settings.out / "baselines"),
                                     "threads": self.settings.threads or cfg.threads})
        TrialRecord.write(trial, **{k: values[k] for k in TrialRecord.VALUE_FIELDS if k in values},
                          worker=worker_tag(), pid_space=pid_space())
        return cfg, values

    def _train(self, trial: optuna.Trial, cfg: TrialConfig, run: TrialRun) -> tuple[TrialResult, float]:
        """Train the trial, logging each epoch and asking the study's stopper after it (StopTrial when it says
        stop); returns the result and the seconds training took, the epoch hook's own left out."""
        stopper = stopper_for(trial.study, self.spec, cfg.optim.epochs, trial.number)
        history = TrialHistory(trial)
        in_hook = 0.0  # seconds of the epoch hook (logging, early stopping), which are the sweep's, not training

        def on_epoch(m: EpochMetrics) -> bool:
            nonlocal in_hook
            start = time.perf_counter()
            try:
                check_stop()
                run.log_epoch(m)
                history.add(m.epoch, m.val_metric, m.sparsity)
                if stopper.at_rung(m.epoch):
                    history.flush()  # the trials ranked at this rung after it must see it
                return stopper(m.epoch, m.val_metric, m.sparsity)
            finally:
                in_hook += time.perf_counter() - start

        try:
            start = time.perf_counter()
            result = train_trial(cfg, on_epoch)
            return result, time.perf_counter() - start - in_hook
        finally:
            history.flush()  # whole, before the trial is told COMPLETE (or stopped, or failed)

    def _record(self, trial: optuna.Trial, result: TrialResult) -> bool:
        """Record the trained trial's figures and its floor, and set its shortfall (an Optuna constraint, which
        steers the sampler away from trials short of the floor); returns whether it is feasible."""
        spec = self.spec
        TrialRecord.write(trial, spec.metric, test_metric=result.test_metric, flops_ratio=result.flops_ratio,
                          total_params=result.total_params, removed_params=result.removed_params,
                          kept_units=result.kept_units, sparsity=result.sparsity)
        if result.target_sparsity is not None:  # what the target cost, in lambda's units, and what the top-k changed
            TrialRecord.write(trial, effective_lambda=result.effective_lambda)
            if result.exact_target is not None:
                TrialRecord.write(trial, exact_target=result.exact_target)
            if result.gates_decided is not None:
                TrialRecord.write(trial, gates_decided=result.gates_decided)
        floor = metric_floor(spec.min_accuracy, result.chance_accuracy, result.val_examples)
        TrialRecord.write(trial, metric_floor=floor)
        short = shortfall(result.val_metric, floor, spec.trial.task.direction)
        record_shortfall(trial, short)
        return short <= 0

    def _score(self, trial: optuna.Trial, cfg: TrialConfig, result: TrialResult, feasible: bool) -> Scored:
        """The trial's objectives, and whether it enters the front. Latency costs time: it is measured (and
        recorded) where it is an objective, else only for a trial entering the front."""
        spec = self.spec
        metrics = objective_points(spec, result)
        front = trial.study.best_trials
        timed = "latency" in spec.objectives
        if not timed:
            on_front = feasible and not dominated([metrics[n] for n in spec.metric_names], front, spec.directions)
        small, latency = None, None
        if timed or on_front or spec.mlflow.log_models == "all":
            small = l0core.compact(result.model, result.example_inputs, round_to=spec.export.round_to)
        if timed or on_front:
            start = time.perf_counter()
            latency = self._latency(trial.study, cfg, result, small)
            TrialRecord.write(trial, latency=latency, latency_seconds=time.perf_counter() - start)
            metrics["speedup"] = latency_speedup(spec, cfg, latency)
        objectives = [metrics[name] for name in spec.metric_names]
        if timed:
            on_front = feasible and not dominated(objectives, front, spec.directions)
        return Scored(objectives, on_front, small, latency)

    def _log(self, trial: optuna.Trial, cfg: TrialConfig, run: TrialRun, result: TrialResult, scored: Scored,
             trained: float) -> None:
        """Finish the trial's MLflow run (its model too, as the study's log_models says) and record what was
        logged and what training took."""
        log_models = self.spec.mlflow.log_models
        alphas = log_alpha_by_gate(result.model)
        hist = log_alpha_histogram(alphas)
        TrialRecord.write(trial, log_alpha_hist=hist)
        log_model = log_models == "all" or (log_models == "front" and scored.on_front)
        run.finish(result, scored.small if log_model else None, alphas, hist, scored.latency)
        TrialRecord.write(trial, model_logged=log_model)
        # What the trial's training took (and the dense baseline's, where this trial had it trained), timed
        # while the sweep ran: the sweep's own cost is its wall time less the sum of these
        # (benchmarks/sweep_overhead.py), free of the machine's drift between separate runs.
        TrialRecord.write(trial, train_seconds=trained + self._record_baseline(trial.study, cfg))

    def _latency(self, study: optuna.Study, cfg, result, small) -> dict:
        """Time ``small`` against the dense model (random weights: time does not depend on them) at batch 1 and
        the study's latency batch size; record the dense figures on the study the first time."""
        from . import latency

        shape = tuple(result.example_inputs.shape[1:])
        key = (cfg.model.name, shape, json.dumps(cfg.model.kwargs, sort_keys=True))
        if self._dense is None or self._dense[0] != key:
            with torch.no_grad():
                classes = int(result.model.eval()(result.example_inputs[:1]).shape[1])
            self._dense = key, build_model(cfg.model.name, shape, classes, gates=False, **cfg.model.kwargs).eval()
        lat = self.spec.latency
        runtimes = ("torch", "onnxruntime") if lat.runtime == "onnxruntime" else ("torch",)
        device = lat.device or str(resolve_device(cfg.device))
        figures = latency.figures(latency.compare(
            self._dense[1], small, shape, sorted({1, latency_batch(self.spec, cfg)}), runtimes, device,
            lat.budget_seconds))
        if StudyRecord.read(study).dense_latency is None:
            StudyRecord.write(study, dense_latency={r: {b: {k: f[k] for k in ("device", "dense_ms", "noise")}
                                                        for b, f in by.items()} for r, by in figures.items()})
        return figures

    def _record_baseline(self, study: optuna.Study, cfg) -> float:
        """The dense model's validation and test metric, once per study: the report's reference line and ``pick``'s
        yardstick.
        Returns the seconds it took (training the baseline, if no trial has yet)."""
        if StudyRecord.read(study).dense_baseline is not None:
            return 0.0
        import torch

        start = time.perf_counter()
        path = dense_baseline(cfg)
        took = time.perf_counter() - start
        saved = torch.load(path, map_location="cpu")
        metric = cfg.task.task_metric
        source = saved.get("source", "trained")
        epochs = 0 if source == "checkpoint" else cfg.optim.baseline_epochs or cfg.optim.epochs
        # Baseline files saved before tasks existed name their (accuracy) figures val_accuracy and test_accuracy.
        val = saved.get("val_metric", saved.get("val_accuracy"))
        StudyRecord.write(study, dense_baseline={
            metric.val: val, metric.test: saved.get("test_metric", saved.get("test_accuracy")),
            "source": source, "epochs_trained": epochs, "seconds": round(took, 3)})
        how = f"measured from {cfg.model.checkpoint}" if source == "checkpoint" else f"trained for {epochs} epochs"
        print(f"l0sweep worker: dense baseline {how} ({metric.val} {val:.4f}) in {took:.1f} s", flush=True)
        return took


def _is_stop(exc: BaseException) -> bool:
    """Whether ``exc`` ended a trial because the worker was told to stop. A stop can surface as another error:
    Optuna's journal lock, interrupted in its release before the rename, raises FileNotFoundError in its place
    (seen under load as a Ctrl-C'd trial left FAIL and not queued again)."""
    return isinstance(exc, KeyboardInterrupt) or stop_requested()


def retry_interrupted(study: optuna.Study, trial_id: int) -> None:
    """Queue an interrupted trial again (same values, first in line), as a dead worker's trial is: it never
    finished, and a starting point the study file asked for would otherwise be lost to the resumed sweep.
    However often it happens: a stop the user asked for is not the trial failing (``max_retry`` is for those)."""
    trial = study._storage.get_trial(trial_id)
    if trial.state == optuna.trial.TrialState.FAIL:  # Optuna closes it FAIL on the way out of optimize
        retry_trial(study, trial, max_retry=None)


def wait_for_launcher(ready: Path, launcher: int, poll: float = 0.05) -> bool:
    """Block until the launcher says the study is ready by creating ``ready``; False if this process's parent, pid
    ``launcher`` (the launcher, or its zygote, which exits with it), is gone first. Workers start before the study
    exists so that their imports overlap the launcher's own start-up and study creation."""
    while not ready.exists():
        if os.getppid() != launcher:
            return False
        time.sleep(poll)
    return True


def run_worker(spec: StudySpec, settings: Settings, poll: float = 1.0,
               start_after: tuple[Path, int] | None = None) -> int:
    """Run trials until the study has its budget of complete trials; returns the exit status.

    ``start_after``: (a file the launcher creates once the study is ready, the launcher's pid); see
    :func:`wait_for_launcher`.
    """
    stop_on_signals(once=True)  # a stopped worker ends its trial FAIL, its run KILLED, queues the trial again
    try:
        # Before any trial (and while the launcher creates the study): a model that cannot train on its data
        # would fail every trial, so say so once and leave.
        check_fits(trial_config(spec, first_point(spec)))
        if start_after is not None and not wait_for_launcher(*start_after):
            print("l0sweep worker: the launcher exited before the study was ready", file=sys.stderr)
            return 1
    except SpecError as exc:
        print(f"{ERROR_PREFIX}{exc}", file=sys.stderr, flush=True)
        return CONFIG_ERROR
    except KeyboardInterrupt:  # the launcher stopped us: it could not create the study
        return 130
    if settings.threads:
        import torch

        torch.set_num_threads(settings.threads)
    study = load_existing(spec.name, storage_for(spec, settings), make_sampler(spec))
    check_same_study(spec, StudyRecord.read(study).spec_json)
    objective = Objective(spec, settings)
    failures = 0
    try:
        while True:
            check_stop()
            # Trials of dead workers on this machine are failed and queued again (heartbeats do it on an RDB;
            # a journal has none): otherwise a sweep killed outright leaves them RUNNING, waited on forever.
            recover_orphaned_trials(study, settings.tracking_uri, spec.workers.max_retry)
            budget = int(StudyRecord.read(study).budget)
            n = counts(study)
            if budget_reached(study, spec, budget):
                if not n["RUNNING"]:  # the sweep is over: whichever worker sees it last closes the study's run
                    end_study_run(study, settings.tracking_uri, "FINISHED")
                return 0
            if n["COMPLETE"] + n["RUNNING"] >= budget:
                # The remaining trials are running elsewhere; wait, and notice if their workers die.
                optuna.storages.fail_stale_trials(study)
                time.sleep(poll)
                continue
            study.optimize(objective, n_trials=1, catch=(Exception,))
            failures = failures + 1 if objective.failed else 0
            if failures >= spec.workers.max_consecutive_failures:
                print(f"l0sweep worker: {failures} trials failed in a row; stopping (see the log above)",
                      file=sys.stderr)
                return 1
    except KeyboardInterrupt:
        if objective.current is not None:
            retry_interrupted(study, objective.current)
        return 130

