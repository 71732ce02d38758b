"""Study files: YAML validated into a typed ``StudySpec``; every mistake is one line naming the field.

A study file says what one trial is (``trial``: a ``TrialConfig`` without the searched values), what the
sampler searches (``search``), what is maximised (``objectives``), and how the sweep runs (budget, sampler,
early stopping, MLflow, heartbeats). ``studies/default.yaml`` is the small offline example.

>>> spec = StudySpec.model_validate({"name": "s", "search": {"lam": {"low": 0.01, "high": 1.0}}})
>>> spec.objectives, spec.search.mode, spec.search.size_field
(['accuracy', 'sparsity'], ['scratch', 'finetune'], 'lam')
>>> StudySpec.model_validate({"name": "s", "search": {"target_sparsity": {"low": 0.3, "high": 0.97}}}).search.size_field
'target_sparsity'
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Literal, Union

import yaml
from pydantic import (AliasChoices, BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator,
                      model_validator)

from .config import (TARGET_ONLY_OPTIM, OptimConfig, TaskConfig, TrialConfig, check_dataset, check_model,
                     check_task_function)
from .records import TaskMetric

MODES = ("scratch", "finetune")
# What each objective reads from a finished trial; all are maximised but the task's metric, which goes in the
# direction trial.task says. "accuracy" stands for the task's metric (validation accuracy by default), logged as
# val_<metric_name>. "latency" is the measured speed-up of the compacted model over the dense one
# (sweeps.latency), at the study's latency batch size and runtime.
OBJECTIVE_METRICS = {"sparsity": "sparsity", "flops": "flops_reduction", "latency": "speedup"}
OBJECTIVE_SETS = (["accuracy", "sparsity"], ["accuracy", "sparsity", "flops"], ["accuracy", "latency"],
                  ["accuracy", "sparsity", "latency"])


class SpecError(ValueError):
    """A study file that cannot be used; the message is one line naming the field or value."""


def one_line(exc: BaseException) -> str:
    """An exception's message as one line: its first, or its type's name when it has none."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Range(_Strict):
    """A float range to search: ``{low: 0.01, high: 10, log: true}``."""

    low: float
    high: float
    log: bool = False

    @model_validator(mode="after")
    def _ordered(self) -> "Range":
        if not self.low < self.high:
            raise ValueError(f"low ({self.low}) must be below high ({self.high})")
        if self.log and self.low <= 0:
            raise ValueError(f"a log range needs low > 0, got {self.low}")
        return self


class Choices(_Strict):
    """A categorical choice: ``{choices: [a, b]}``."""

    choices: list[Union[float, int, str, bool]] = Field(min_length=1)


Param = Union[float, Range, Choices]  # a fixed value, a range or a choice
PerMode = dict[Literal["scratch", "finetune"], Param]  # a different range per training mode


class SearchSpace(_Strict):
    """What the sampler varies: how much to remove, as a price (``lam``) or as a size (``target_sparsity``, one
    of the two), and ``droprate_init``; each may differ per mode (fine-tuning wants larger lam)."""

    lam: Union[Param, PerMode, None] = None
    target_sparsity: Union[Param, PerMode, None] = None
    droprate_init: Union[Param, PerMode] = 0.5
    mode: list[Literal["scratch", "finetune"]] = Field(default_factory=lambda: list(MODES), min_length=1)
    params: dict[str, Param] = Field(default_factory=dict)  # further knobs: dotted TrialConfig path -> Param

    @field_validator("mode")
    @classmethod
    def _unique(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError(f"modes must not repeat, got {v}")
        return v

    @field_validator("params")
    @classmethod
    def _known_paths(cls, v: dict[str, Param]) -> dict[str, Param]:
        for path in v:
            if path in ("lam", "target_sparsity", "droprate_init", "mode"):
                raise ValueError(f"{path!r} has its own entry under search, not under params")
            _check_path(path)
        return v

    @property
    def size_field(self) -> str:
        """``"lam"`` or ``"target_sparsity"``: which of the two says how much a trial removes."""
        return "lam" if self.lam is not None else "target_sparsity"


SIZE_FIELDS = ("lam", "target_sparsity")


def _check_path(path: str) -> None:
    """A dotted path must name a field of TrialConfig (``optim.lr``, ``data.batch_size``...)."""
    model: type[BaseModel] = TrialConfig
    parts = path.split(".")
    for i, part in enumerate(parts):
        fields = model.model_fields
        if part not in fields:
            raise ValueError(f"{path!r} is not a trial setting: {'.'.join(parts[:i]) or 'trial'} has "
                             f"{', '.join(fields)}")
        annotation = fields[part].annotation
        if i < len(parts) - 1:
            if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
                raise ValueError(f"{path!r} is not a trial setting: {part!r} has no sub-fields")
            model = annotation


class SamplerSpec(_Strict):
    name: Literal["tpe", "nsgaii"] = "tpe"
    seed: int = 0  # trial n's random draws are seeded from (seed, n): no two trials share them
    n_startup_trials: int = Field(8, ge=0)  # TPE: random trials before the model
    population_size: int = Field(8, ge=2)  # NSGA-II


class EarlyStoppingSpec(_Strict):
    """Early stopping of multi-objective trials.

    ``dominance``: stop a trial that completed trials clearly dominated at the same epoch. ``asha``: asynchronous
    successive halving on the Pareto ranks (MO-ASHA): at rungs ``min_epochs * eta**k``, a trial goes on only if
    it ranks in the top 1/eta of the trials that reached the rung.
    """

    enabled: bool = False
    method: Literal["dominance", "asha"] = "dominance"
    min_epochs: int = Field(1, ge=1)  # asha: the first rung (rungs inside the warm-up are skipped)
    eta: int = Field(3, ge=2)  # asha: a rung keeps the top 1/eta
    warmup_epochs: int = Field(2, ge=1)  # never stop before this epoch
    min_completed: int = Field(3, ge=1)  # completed trials needed before anything is stopped
    margin_accuracy: float = Field(0.02, ge=0)  # "clearly": better by at least this much of the validation metric
    margin_sparsity: float = Field(0.02, ge=0)  # ... and at least this much sparsity


class BudgetSpec(_Strict):
    """A budget in epochs beside ``trials``: no new trial starts once the study's trials, stopped ones included,
    have trained this many epochs, so sweeps with and without early stopping can be compared at equal cost."""

    epochs: int | None = Field(None, ge=1)


class MlflowSpec(_Strict):
    experiment: str | None = None  # default: the study's name
    log_models: Literal["front", "all", "none"] = "front"  # which trials log their exported small model


class LatencySpec(_Strict):
    """How front trials (every trial, where latency is an objective) time their compacted model against the
    dense one (sweeps.latency says what is timed)."""

    batch_size: int | None = Field(None, ge=1)  # default: trial.data.batch_size; batch 1 is always timed too
    runtime: Literal["torch", "onnxruntime"] = "torch"  # onnxruntime: also converts each measured trial to ONNX
    device: str | None = None  # default: the trial's device (trial.device); onnxruntime always runs on the CPU
    budget_seconds: float = Field(0.1, gt=0)  # timed seconds per batch size and runtime (repetitions scale to it)


class ExportSpec(_Strict):
    round_to: int = Field(1, ge=1)  # exported widths kept multiples of this (closed units kept as zeros)


class WorkerSpec(_Strict):
    """Crash safety on an RDB storage (PostgreSQL): how fast a dead worker's trial is noticed and retried."""

    heartbeat_interval: int = Field(10, ge=1)
    grace_period: int = Field(60, ge=2)
    max_retry: int = Field(2, ge=0)
    max_consecutive_failures: int = Field(3, ge=1)  # a worker gives up after this many failed trials in a row
    reconnect_patience: float = Field(300.0, ge=0)  # seconds a worker waits for a lost database

    @model_validator(mode="after")
    def _grace(self) -> "WorkerSpec":
        if self.grace_period <= self.heartbeat_interval:
            raise ValueError(f"grace_period ({self.grace_period}) must exceed heartbeat_interval "
                             f"({self.heartbeat_interval})")
        return self


class StudySpec(_Strict):
    """One study: ``trial`` is the fixed part of every trial, ``search`` the part the sampler chooses."""

    name: str  # the Optuna study, the MLflow experiment and the report's folder
    description: str = ""
    trial: TrialConfig = Field(default_factory=TrialConfig)
    search: SearchSpace = Field(default_factory=SearchSpace)
    objectives: list[Literal["accuracy", "sparsity", "flops", "latency"]] = Field(
        default_factory=lambda: ["accuracy", "sparsity"], min_length=2)
    # Trials whose validation metric falls short of this (lies above it, for a minimised metric) are infeasible
    # (Optuna constraints): off the front, and the sampler steers away from them. "chance": a trial must beat
    # always answering the commonest class (classification accuracy only). Default: "chance" for accuracy, no
    # floor for other metrics (None). ``min_metric`` is the same setting under the name that fits other metrics.
    min_accuracy: Union[Literal["chance"], float, None] = Field(
        None, validation_alias=AliasChoices("min_accuracy", "min_metric"))
    trials: int = Field(20, ge=1)  # the study's budget, in complete trials, however many workers join
    sampler: SamplerSpec = Field(default_factory=SamplerSpec)
    enqueue: list[dict[str, Union[float, int, str, bool]]] = Field(default_factory=list)  # starting points
    early_stopping: EarlyStoppingSpec = Field(default_factory=EarlyStoppingSpec)
    budget: BudgetSpec = Field(default_factory=BudgetSpec)
    mlflow: MlflowSpec = Field(default_factory=MlflowSpec)
    latency: LatencySpec = Field(default_factory=LatencySpec)
    export: ExportSpec = Field(default_factory=ExportSpec)
    workers: WorkerSpec = Field(default_factory=WorkerSpec)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}", v):
            raise ValueError(f"{v!r} is not a usable study name: letters, digits, '.', '_' and '-', starting with a "
                             "letter or digit, at most 100 (it names the report's folder)")
        return v

    @field_validator("min_accuracy", mode="before")
    @classmethod
    def _floor(cls, v: object, info: ValidationInfo) -> object:
        trial = info.data.get("trial")  # validated before this field (None if it was broken)
        task = trial.task if trial is not None else TaskConfig()
        number = isinstance(v, (int, float)) and not isinstance(v, bool)
        if task.is_accuracy:
            if v is None or v == "chance" or (number and 0.0 <= v <= 1.0):
                return v
            raise ValueError(f"must be 'chance' or a validation accuracy in [0, 1] (0: no floor), got {v!r}")
        if v == "chance":
            raise ValueError(f"'chance' is the accuracy of always answering the commonest class and needs "
                             f"trial.task.metric accuracy, not {task.metric!r}: give a value of {task.metric_name} "
                             "or leave it out (no floor)")
        if v is None or number:
            return v
        raise ValueError(f"must be a value of {task.metric_name} (or left out: no floor), got {v!r}")

    @field_validator("objectives")
    @classmethod
    def _objectives(cls, v: list[str]) -> list[str]:
        if v not in OBJECTIVE_SETS:
            raise ValueError(f"must be one of {', '.join('[' + ', '.join(o) + ']' for o in OBJECTIVE_SETS)}, got {v}")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> "StudySpec":
        if self.min_accuracy is None and self.trial.task.is_accuracy:
            self.min_accuracy = "chance"
        for field in ("lam", "target_sparsity", "droprate_init"):
            value = getattr(self.search, field)
            if isinstance(value, dict):
                missing = [m for m in self.search.mode if m not in value]
                if missing:
                    raise ValueError(f"search.{field} gives ranges per mode but none for {missing}")
        _check_bounds("search.lam", self.search.lam, lambda x: x >= 0, ">= 0")
        _check_bounds("search.target_sparsity", self.search.target_sparsity, lambda x: 0 < x < 1, "in (0, 1)")
        _check_bounds("search.droprate_init", self.search.droprate_init, lambda x: 0 < x < 1, "in (0, 1)")
        given = [f for f in SIZE_FIELDS if getattr(self.search, f) is not None]
        if len(given) != 1:
            raise ValueError(f"search: give either lam (a price on the parameters kept) or target_sparsity (the share "
                             f"of parameters to remove), {'not both' if given else 'one of them'}")
        if self.search.target_sparsity is not None and (problem := self.trial.optim.target_problem()):
            raise ValueError(f"trial.{problem}")
        if self.trial.export.exact_target and self.search.target_sparsity is None:
            raise ValueError("trial.export.exact_target needs search.target_sparsity: with lam there is no target "
                             "to keep exactly")
        size = self.search.size_field
        for i, point in enumerate(self.enqueue):
            unknown = set(point) - {size, "droprate_init", "mode", *self.search.params}
            if unknown:
                raise ValueError(f"enqueue[{i}] has {sorted(unknown)}: starting points may set {size}, droprate_init, "
                                 f"mode and the search.params keys")
            if size == "target_sparsity" and "target_sparsity" in point and not 0 < point["target_sparsity"] < 1:
                raise ValueError(f"enqueue[{i}].target_sparsity must be in (0, 1), got {point['target_sparsity']}")
            if "mode" in point and point["mode"] not in self.search.mode:
                raise ValueError(f"enqueue[{i}].mode {point['mode']!r} is not searched (search.mode is "
                                 f"{self.search.mode})")
        return self

    @property
    def metric(self) -> TaskMetric:
        """The task's metric (accuracy, maximised, by default) and its names."""
        return self.trial.task.task_metric

    @property
    def metric_column(self) -> str:
        """The task's validation metric as logged and tabled: ``val_<metric_name>`` (``val_accuracy`` by default)."""
        return self.metric.val

    @property
    def metric_names(self) -> list[str]:
        """The objectives as Optuna names them (its metric names), e.g. ``["val_accuracy", "sparsity"]``."""
        return [self.metric_column if o == "accuracy" else OBJECTIVE_METRICS[o] for o in self.objectives]

    @property
    def directions(self) -> list[str]:
        """Optuna's direction of each objective: the task's for its metric, ``maximize`` for the others."""
        return [self.trial.task.direction if o == "accuracy" else "maximize" for o in self.objectives]


def _check_bounds(name: str, value: object, ok, allowed: str) -> None:
    values = value.values() if isinstance(value, dict) else [] if value is None else [value]
    for v in values:
        numbers = [v] if isinstance(v, (int, float)) else [v.low, v.high] if isinstance(v, Range) else \
            [c for c in v.choices if isinstance(c, (int, float))]
        for x in numbers:
            if not ok(x):
                raise ValueError(f"{name} must be {allowed}, got {x}")


def _where(error: dict) -> str:
    # pydantic lists union alternatives in the location (e.g. "Range", "function-after[...]"); drop them.
    parts = [str(p) for p in error["loc"] if not re.match(r"^[A-Z]|^function-|^(float|int|str|bool)$|^dict\[",
                                                          str(p))]
    return ".".join(parts)


def format_validation_error(exc: ValidationError) -> str:
    """One line: the first problem pydantic found, with its field path."""
    # With unions (a value, a range, or one per mode), pydantic reports every alternative; our own checks say
    # the most, then anything not about the alternative's type, then the deepest.
    def rank(e: dict) -> tuple[int, int]:
        if e["type"] == "value_error":
            return 3, len(e["loc"])
        if "[key]" in map(str, e["loc"]) or e["type"] in ("float_type", "model_type", "dict_type", "float_parsing",
                                                           "model_attributes_type", "missing"):
            return 1, len(e["loc"])
        return 2, len(e["loc"])

    error = max(exc.errors(), key=rank)
    message = error["msg"].removeprefix("Value error, ")
    if error["type"] == "extra_forbidden":
        message = "unknown key"
    elif error["type"] == "literal_error":
        message = f"{message}, got {error.get('input')!r}"
    where = _where(error)
    return f"{where}: {message}" if where else message


def parse_spec(data: object, source: str = "study") -> StudySpec:
    """Validate already-parsed data (a dict) into a StudySpec, or raise one-line SpecError."""
    if not isinstance(data, dict):
        raise SpecError(f"{source}: a study file must be a YAML mapping, got {type(data).__name__}")
    try:
        spec = StudySpec.model_validate(data)
    except ValidationError as exc:
        raise SpecError(f"{source}: {format_validation_error(exc)}") from None
    if spec.search.target_sparsity is None:
        # Checked on what a user gives (a file, a dict), not on stored specs: a lambda study stored with such a
        # setting before this check must still resume and export.
        for field in TARGET_ONLY_OPTIM:
            value = getattr(spec.trial.optim, field)
            if value != OptimConfig.model_fields[field].default:
                raise SpecError(f"{source}: trial.optim.{field} {value} steers a sparsity target, and this study "
                                f"searches lam (no target): remove it, or search target_sparsity")
    try:
        check_model(spec.trial.model.name)
        check_dataset(spec.trial.data.name)
        for field in ("loss", "metric"):
            check_task_function(field, getattr(spec.trial.task, field))
    except ValueError as exc:
        first = str(exc).split()[0]
        field = {"model": "trial.model.name", "dataset": "trial.data.name", "loss": "trial.task.loss",
                 "metric": "trial.task.metric"}[first]
        raise SpecError(f"{source}: {field}: {exc}") from None
    return spec


def load_spec(path: str | Path) -> StudySpec:
    """Read and validate a study file.

    Raises SpecError with one line such as ``studies/x.yaml: search.lam.low: Input should be a valid number``.
    """
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise SpecError(f"{path}: cannot read the study file ({exc.strerror})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise SpecError(f"{path}: broken YAML{where}: {problem}") from None
    return parse_spec(resolve_study_paths(path.parent, data), str(path))


# File paths a study file may give, resolved against the file's folder (not the shell's).
STUDY_PATHS = (("trial", "data", "data_dir"), ("trial", "model", "checkpoint"))


def resolve_study_paths(folder: Path, data: object) -> object:
    """``data`` with each relative path of :data:`STUDY_PATHS` joined to ``folder``, the study file's."""
    for keys in STUDY_PATHS:
        node = data
        for key in keys[:-1]:
            node = node.get(key) if isinstance(node, dict) else None
        value = node.get(keys[-1]) if isinstance(node, dict) else None
        if isinstance(value, str) and value and not Path(value).expanduser().is_absolute():
            node[keys[-1]] = str((folder / value).resolve())
    return data
