"""What a study and its trials record in Optuna's storage: every user-attr key, typed readers and writers over
them, and the predicates every reader judges trials by.

- :class:`StudyRecord`: the study's attrs (its spec, budget, dense baseline, dense latency, MLflow ids);
- :class:`TrialRecord`: a trial's attrs (the values it trained with, who ran it, its epoch history, its results);
- :class:`TaskMetric`: the metric a study selects by, and its names (``val_<name>``, ``test_<name>``);
- :func:`feasible` and :func:`dominated`: whether a trial meets its floor, whether a point is beaten by a front;
- :func:`retry_history` and :func:`retry_system_attrs`: Optuna's retry convention in the system attrs.

Workers write through these; the report, ``pick``, ``status``, ``export`` and early stopping read through them.
No other module spells a key. The keys are those of the studies already stored: a field whose name reads better
than its key keeps the key (``pid_space`` is stored as ``worker_pid_space``), so old studies stay readable.

Light on purpose (Optuna and the standard library): workers, the launcher and the dashboards all import it.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from typing import Any, Mapping, Protocol, Sequence

import optuna
from optuna.trial import FrozenTrial

_KEY = "key"  # a field's metadata entry naming its stored key, where that differs from the field's name
TEST_METRIC = "test_metric"  # the TrialRecord field stored under its study's metric name, test_<name>


def _stored_as(key: str, **kwargs: Any) -> Any:
    return field(metadata={_KEY: key}, **kwargs)


def _keys(record: type) -> dict[str, str]:
    """Field name -> stored key, for a record class."""
    return {f.name: f.metadata.get(_KEY, f.name) for f in fields(record)}


class _HasUserAttrs(Protocol):
    @property
    def user_attrs(self) -> dict[str, Any]: ...


@dataclass(frozen=True)
class TaskMetric:
    """The metric a study selects trials by, as its stored spec's ``trial.task`` says (accuracy, maximised, by
    default): its table columns, MLflow names and test attr are ``val_<name>`` and ``test_<name>``."""

    name: str = "accuracy"
    direction: str = "maximize"
    is_accuracy: bool = True  # the built-in classification accuracy: shown in percent, a chance floor possible

    @property
    def val(self) -> str:
        return f"val_{self.name}"

    @property
    def test(self) -> str:
        return f"test_{self.name}"

    @property
    def sign(self) -> float:
        """1 for a maximised metric, -1 for a minimised one: ``sign * value`` is larger when better."""
        return 1.0 if self.direction == "maximize" else -1.0

    def label(self, split: str = "validation") -> str:
        """Axis and column words, e.g. "validation accuracy", "validation rmse (lower is better)"."""
        return f"{split} {self.name}" + ("" if self.direction == "maximize" else " (lower is better)")

    def show(self, value: float) -> str:
        """A value as the report writes it: accuracy in percent, other metrics to four significant digits."""
        return f"{value:.2%}" if self.is_accuracy else f"{value:.4g}"


ACCURACY = TaskMetric()


def task_metric(study_or_spec: _HasUserAttrs | Mapping[str, Any]) -> TaskMetric:
    """The :class:`TaskMetric` of a study, or of its study file as stored (a dict); a study from before tasks
    existed: accuracy.

    >>> task_metric({"trial": {"task": {"metric": "m:rmse", "metric_name": "rmse", "direction": "minimize"}}}).val
    'val_rmse'
    """
    if not isinstance(study_or_spec, Mapping):
        return StudyRecord.read(study_or_spec).metric
    task = (study_or_spec.get("trial") or {}).get("task") or {}
    metric = task.get("metric", "accuracy")
    return TaskMetric(task.get("metric_name") or metric.rpartition(":")[2], task.get("direction", "maximize"),
                      metric == "accuracy")


@dataclass(frozen=True)
class StudyRecord:
    """What a study keeps in its user attrs. Each field is None until someone wrote it."""

    spec_json: str | None = _stored_as("spec", default=None)  # the study file, as sweeps.spec.StudySpec's JSON
    budget: int | None = _stored_as("n_trials", default=None)  # complete trials wanted
    # The dense model's {val_<metric>, test_<metric>, source}: the report's reference line, pick's yardstick.
    dense_baseline: dict[str, Any] | None = None
    # The dense model as first timed: {runtime: {batch: {device, dense_ms, noise}}}.
    dense_latency: dict[str, dict[str, dict[str, Any]]] | None = None
    mlflow_experiment_id: str | None = None
    mlflow_parent_run_id: str | None = None  # the study's MLflow run; each trial's run is its child

    @classmethod
    def read(cls, study: _HasUserAttrs) -> StudyRecord:
        """The record of ``study`` (an ``optuna.Study`` or a ``FrozenStudy``)."""
        attrs = study.user_attrs
        return cls(**{name: attrs[key] for name, key in STUDY_KEYS.items() if key in attrs})

    @staticmethod
    def write(study: optuna.Study, **values: Any) -> None:
        """Store ``values`` (field name -> value) on ``study``; fields not named are left as they are."""
        for name, value in values.items():
            if name not in STUDY_KEYS:
                raise TypeError(f"StudyRecord has no field {name!r}")
            study.set_user_attr(STUDY_KEYS[name], value)

    @property
    def spec(self) -> dict[str, Any]:
        """The stored study file as a dict ({} for a study without one)."""
        return json.loads(self.spec_json or "{}")

    @property
    def metric(self) -> TaskMetric:
        return task_metric(self.spec)

    @property
    def epoch_budget(self) -> int | None:
        """The study file's ``budget.epochs`` (None: no epoch budget)."""
        return (self.spec.get("budget") or {}).get("epochs")


STUDY_KEYS: Mapping[str, str] = _keys(StudyRecord)


@dataclass(frozen=True)
class TrialRecord:
    """What a trial keeps in its user attrs. Each field is None (``history``: empty) until someone wrote it."""

    # The values it trained with, whatever the sampler calls them (a study searches lam or target_sparsity).
    lam: float | None = None
    target_sparsity: float | None = None
    droprate_init: float | None = None
    mode: str | None = None
    # Who runs it: ``host:pid`` (sweeps.tracking.worker_tag), where that pid means something (pid_space), its run.
    worker: str | None = None
    pid_space: str | None = _stored_as("worker_pid_space", default=None)
    mlflow_run_id: str | None = None
    # [[epoch, validation metric, sparsity], ...], written while it runs (early stopping compares them).
    history: list[list[float]] = field(default_factory=list)
    # Its results: the test metric (stored as test_<metric name>), what the compacted model keeps.
    test_metric: float | None = None
    sparsity: float | None = None
    flops_ratio: float | None = None
    total_params: int | None = None
    removed_params: int | None = None
    kept_units: dict[str, list[int]] | None = None  # gate -> [kept, units]
    effective_lambda: float | None = None  # a target trial: the lambda its target cost
    exact_target: dict[str, Any] | None = None  # a target trial with trial.export.exact_target: what the top-k changed
    # A target trial whose gates were decided (trial.optim.decide_gates_at): what that changed, and after which epoch.
    gates_decided: dict[str, Any] | None = None
    # The validation metric it had to reach (study file: min_accuracy / min_metric; None: no floor).
    metric_floor: float | None = _stored_as("accuracy_floor", default=None)
    log_alpha_hist: dict[str, Any] | None = None  # sweeps.tracking.log_alpha_histogram
    latency: dict[str, dict[str, dict[str, Any]]] | None = None  # sweeps.latency.figures, where it was measured
    latency_seconds: float | None = None  # what timing it added to the trial
    model_logged: bool | None = None  # whether its compacted model went to MLflow
    # Its training (and the dense baseline's, where it had it trained): the sweep's own cost is the rest.
    train_seconds: float | None = None
    stopped_at_epoch: int | None = None  # an early-stopped trial's last epoch

    VALUE_FIELDS = ("lam", "target_sparsity", "droprate_init", "mode")  # (a class attribute: no annotation)

    @classmethod
    def read(cls, trial: FrozenTrial | optuna.Trial, metric: TaskMetric = ACCURACY) -> TrialRecord:
        """The record of ``trial``; ``metric`` names its test metric."""
        attrs = trial.user_attrs
        found = {name: attrs[key] for name, key in TRIAL_KEYS.items() if key in attrs}
        if metric.test in attrs:
            found[TEST_METRIC] = attrs[metric.test]
        return cls(**found)

    @staticmethod
    def read_history(trial: FrozenTrial) -> list[list[float]]:
        """Only ``history``: early stopping reads it from every trial after each epoch, the rest it never needs."""
        return trial.user_attrs.get(TRIAL_KEYS["history"], [])

    @staticmethod
    def attrs(metric: TaskMetric = ACCURACY, **values: Any) -> dict[str, Any]:
        """``values`` (field name -> value) as user attrs, e.g. for ``optuna.create_trial(user_attrs=...)``."""
        found = {}
        for name, value in values.items():
            if name == TEST_METRIC:
                found[metric.test] = value
            elif name in TRIAL_KEYS:
                found[TRIAL_KEYS[name]] = value
            else:
                raise TypeError(f"TrialRecord has no field {name!r}")
        return found

    @staticmethod
    def write(trial: optuna.Trial, metric: TaskMetric = ACCURACY, **values: Any) -> None:
        """Store ``values`` (field name -> value) on ``trial``; fields not named are left as they are. ``metric``
        names the test metric's attr."""
        for key, value in TrialRecord.attrs(metric, **values).items():
            trial.set_user_attr(key, value)

    @property
    def values(self) -> dict[str, Any]:
        """The values it trained with (lam or target_sparsity, droprate_init, mode), by field name."""
        return {name: getattr(self, name) for name in self.VALUE_FIELDS if getattr(self, name) is not None}

    @property
    def trained_lambda(self) -> float | None:
        """The lambda it trained with: its ``lam``, or in a target study the lambda its target cost."""
        return self.lam if self.lam is not None else self.effective_lambda


TRIAL_KEYS: Mapping[str, str] = {name: key for name, key in _keys(TrialRecord).items() if name != TEST_METRIC}

# The constraint a trial short of its floor breaks (its shortfall; feasible when <= 0). Named for accuracy, the
# name existing studies have, whatever the metric.
FLOOR_CONSTRAINT = "min_accuracy"


def record_shortfall(trial: optuna.Trial, shortfall: float) -> None:
    """Store how far ``trial`` falls short of its floor as an Optuna constraint: a trial short of it stays off the
    front (``study.best_trials``), and TPE and NSGA-II rank it below every feasible trial."""
    trial.set_constraint(FLOOR_CONSTRAINT, shortfall)


def feasible(trial: FrozenTrial) -> bool:
    """Whether a trial meets its constraints (the study file's floor), as Optuna judges it: every constraint value
    <= 0. Trials without constraints (stopped early, or from before floors) are feasible."""
    return all(v <= 0 for v in trial.constraints.values())


def epochs_trained(study: optuna.Study) -> int:
    """Epochs the study's trials have trained, stopped and running ones included (a running trial's as far as
    its history was last written)."""
    return sum(len(TrialRecord.read_history(t)) for t in study.get_trials(deepcopy=False))


def dominated(values: Sequence[float], front: Sequence[FrozenTrial], directions: Sequence[str]) -> bool:
    """Whether some trial of ``front`` is at least as good as ``values`` on every objective and better on one
    (``directions``: "maximize" or "minimize" per objective).

    >>> t = optuna.trial.create_trial(values=[0.9, 0.5])
    >>> dominated([0.8, 0.5], [t], ["maximize", "maximize"]), dominated([0.8, 0.6], [t], ["maximize", "maximize"])
    (True, False)
    """
    signs = [1.0 if d == "maximize" else -1.0 for d in directions]  # compared as maxima

    def beats(t: FrozenTrial) -> bool:
        pairs = [(s * a, s * b) for s, a, b in zip(signs, t.values, values)]
        return all(a >= b for a, b in pairs) and any(a > b for a, b in pairs)

    return any(beats(t) for t in front)


def metric_names(study: optuna.Study) -> list[str]:
    """The study's objective names, e.g. ["val_accuracy", "sparsity"]; a study that names none (made by hand, or
    before names were stored) is read as the default objectives, in their order."""
    return study.metric_names or ["val_accuracy", "sparsity", "flops_reduction"][:len(study.directions)]


def objective_values(study: optuna.Study, trial: FrozenTrial) -> dict[str, float]:
    """A complete trial's objective values by name (:func:`metric_names`)."""
    return dict(zip(metric_names(study), trial.values))


def final_point(study: optuna.Study, trial: FrozenTrial, metric: TaskMetric = ACCURACY) -> tuple[float, float]:
    """(validation metric, sparsity) where a finished trial ended: a complete trial's objectives (its recorded
    sparsity where sparsity is no objective), a stopped trial's last epoch; NaN for what it never recorded."""
    record = TrialRecord.read(trial, metric)
    if trial.state == optuna.trial.TrialState.COMPLETE:
        values = objective_values(study, trial)
        recorded = record.sparsity if record.sparsity is not None else float("nan")
        return values.get(metric.val, trial.values[0]), values.get("sparsity", recorded)
    last = record.history[-1] if record.history else [0, float("nan"), float("nan")]
    return last[1], last[2]


# Optuna's retry convention (its RetryFailedTrialCallback's system attrs): a retry names the trial it retries
# first and every attempt since.
FAILED_TRIAL = "failed_trial"
RETRY_HISTORY = "retry_history"


def retry_history(trial: FrozenTrial) -> list[int]:
    """The numbers of the earlier attempts ``trial`` retries (empty for a first attempt)."""
    return trial.system_attrs.get(RETRY_HISTORY, [])


def retry_system_attrs(trial: FrozenTrial) -> dict[str, Any]:
    """The system attrs of a retry of ``trial``: its own, with the original trial and every attempt named."""
    return {**trial.system_attrs, FAILED_TRIAL: trial.system_attrs.get(FAILED_TRIAL, trial.number),
            RETRY_HISTORY: [*retry_history(trial), trial.number]}


# Every key a record defines (the test metric's is its study's test_<metric name>): nothing else spells them.
ALL_KEYS = frozenset({*STUDY_KEYS.values(), *TRIAL_KEYS.values(), FAILED_TRIAL, RETRY_HISTORY})
