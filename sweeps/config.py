"""What a trial is, validated: its data, model, optimisation and gates (:class:`TrialConfig`), and the names
of the models and datasets l0sweep knows.

Nothing here imports torch, so a study file validates (and ``l0sweep run`` starts its workers) in a fraction
of a second; the zoo itself lives in ``models.py`` and ``data.py``.
"""
from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from .imports import import_object
from .records import TaskMetric

MODELS = ("mlp", "lenet5", "googlenet")  # built in; also "torchvision:NAME" and "package.module:factory"
TORCHVISION_DATASETS = ("mnist", "fashion-mnist", "cifar10")
DATASETS = ("digits", "synthetic", *TORCHVISION_DATASETS)
LOSSES = ("cross_entropy", "mse")  # built in; also "package.module:function"
METRICS = ("accuracy",)  # built in; also "package.module:function"


def check_model(name: str) -> None:
    """Raise one clear ValueError if ``name`` names no model, without building it (cheap, for validation)."""
    if name in MODELS:
        return
    if name.startswith("torchvision:"):
        import torchvision

        arch = name.split(":", 1)[1]
        if arch not in torchvision.models.list_models(module=torchvision.models):
            raise ValueError(f"model {name!r}: torchvision has no classification model {arch!r}")
    elif ":" in name:
        import_object(name, "model")
    else:
        raise ValueError(f"model {name!r} is unknown: use one of {', '.join(MODELS)}, "
                         "'torchvision:NAME' or 'package.module:factory'")


def check_dataset(name: str) -> None:
    """Raise one clear ValueError if ``name`` names no dataset, without loading it."""
    if name in DATASETS:
        return
    if ":" in name:
        import_object(name, "dataset")
        return
    raise ValueError(f"dataset {name!r} is unknown: use one of {', '.join(DATASETS)} or 'package.module:factory'")


def check_task_function(field: str, name: str) -> None:
    """Raise one clear ValueError if a ``pkg.mod:fn`` loss or metric (``field``: "loss" or "metric") cannot be
    imported or is not callable; built-in names pass (the form itself is :class:`TaskConfig`'s to check)."""
    if ":" in name and not callable(import_object(name, field)):
        raise ValueError(f"{field} {name!r} is not a function")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DataConfig(_Strict):
    name: str = "digits"
    data_dir: str | None = None
    val_fraction: float = Field(0.15, gt=0, lt=1)
    batch_size: int = Field(64, ge=1)
    download: bool = True
    kwargs: dict = Field(default_factory=dict)  # passed to the dataset (e.g. synthetic's shape) or your factory


class ModelConfig(_Strict):
    name: str = "mlp"
    kwargs: dict = Field(default_factory=dict)
    per_sample: bool = False
    # A trained dense model (a state dict, a whole module, or a Lightning-style checkpoint holding "state_dict"):
    # fine-tuning trials start from it instead of a baseline l0sweep trains. Relative to the study file.
    checkpoint: str | None = None


class OptimConfig(_Strict):
    name: Literal["adam", "adamw", "sgd"] = "adam"
    lr: float = Field(1e-3, gt=0)
    gate_lr: float | None = Field(None, gt=0)  # learning rate of log_alpha (default: lr)
    weight_decay: float = Field(0.0, ge=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    nesterov: bool = True
    schedule: Literal["none", "multistep", "cosine"] = "none"
    milestones: list[int] = Field(default_factory=list)
    gamma: float = Field(0.1, gt=0, le=1)
    epochs: int = Field(10, ge=1)
    baseline_epochs: int | None = Field(None, ge=1)
    # A sparsity target (trial.target_sparsity): the target rises from 0 over this fraction of the training
    # steps, and the Lagrange multipliers climb at this learning rate (Adam, gradient ascent).
    target_warmup: float = Field(0.3, ge=0, le=1)
    multiplier_lr: float = Field(0.05, gt=0)
    # ... and after this fraction of the epochs the gates are decided, exactly at the target (the top-k of
    # log_alpha), and frozen: the epochs left fine-tune the weights of a model of the target's size. 1: never.
    decide_gates_at: float = Field(0.8, gt=0, le=1)

    def target_problem(self) -> str | None:
        """Why these settings cannot steer a target trial, in one line (None: they can). A decision needs an epoch
        before it and one after it, and must come after the target's warm-up."""
        if self.decide_gates_at >= 1:
            return None
        if self.epochs < 2:
            return (f"optim.decide_gates_at {self.decide_gates_at} needs optim.epochs >= 2 (an epoch after the "
                    f"decision), got {self.epochs}; decide_gates_at: 1 leaves the Lagrangian to the end")
        if self.target_warmup >= self.decide_gates_at:
            return (f"optim.target_warmup {self.target_warmup} must end before optim.decide_gates_at "
                    f"{self.decide_gates_at}: the gates are decided at the full target")
        return None


# The optim settings only a target study reads (the warm-up, the multipliers, the decision): outside the dense
# baseline's identity, and refused in a lambda study.
TARGET_ONLY_OPTIM = ("target_warmup", "multiplier_lr", "decide_gates_at")


class ExportConfig(_Strict):
    # With a target_sparsity: close or open units by the top-k of log_alpha so that the deterministic gates (and
    # the exported model) remove exactly the target's share of the parameters, to one unit.
    exact_target: bool = False


class TaskConfig(_Strict):
    """What a trial learns and how it is judged: the training loss, the metric that selects trials (computed once
    over the whole validation or test set, so F1 or mean IoU work), the name it is shown and logged under
    (``val_NAME``, ``test_NAME``) and whether it is maximised or minimised. The default is classification:
    cross-entropy, judged by accuracy."""

    loss: str = "cross_entropy"  # cross_entropy | mse | package.module:function(outputs, targets) -> scalar tensor
    metric: str = "accuracy"  # accuracy | package.module:function(outputs, targets) -> float, over a whole split
    metric_name: str | None = None  # default: "accuracy", or a custom metric's function name
    direction: Literal["maximize", "minimize"] = "maximize"

    @field_validator("loss", "metric")
    @classmethod
    def _known(cls, v: str, info) -> str:
        known = LOSSES if info.field_name == "loss" else METRICS
        if v not in known and not re.fullmatch(r"[\w.]+:\w+", v):
            raise ValueError(f"{v!r} is unknown: use {', '.join(known)} or 'package.module:function'")
        return v

    @field_validator("metric_name")
    @classmethod
    def _usable_name(cls, v: str | None) -> str | None:
        # It becomes MLflow metric names and table columns (val_NAME): keep it a plain identifier.
        if v is not None and not re.fullmatch(r"[A-Za-z][A-Za-z0-9_]{0,49}", v):
            raise ValueError(f"{v!r} is not a usable metric name: a letter, then letters, digits or '_' (at most 50)")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> "TaskConfig":
        if self.metric == "accuracy":
            if self.loss == "mse":
                raise ValueError("metric accuracy compares the argmax of the outputs with class labels; a loss of "
                                 "mse trains a regression: give your own metric ('package.module:function')")
            if self.direction == "minimize":
                raise ValueError("direction minimize with metric accuracy: accuracy is maximised")
        if self.metric_name is None:
            self.metric_name = self.metric.rpartition(":")[2]
        return self

    @property
    def is_accuracy(self) -> bool:
        """Whether trials are judged by the built-in classification accuracy (a ``chance`` floor needs it)."""
        return self.metric == "accuracy"

    @property
    def task_metric(self) -> TaskMetric:
        """The metric and its names as the study records them (``val_<metric_name>``, ``test_<metric_name>``)."""
        return TaskMetric(self.metric_name, self.direction, self.is_accuracy)


class TrialConfig(_Strict):
    """Everything one trial needs; the sweep fills lam (or target_sparsity), droprate_init and mode from the
    sampler. With ``target_sparsity`` set, a Lagrangian steers the expected sparsity to it and lam is unused."""

    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    export: ExportConfig = Field(default_factory=ExportConfig)
    task: TaskConfig = Field(default_factory=TaskConfig)
    lam: float = Field(0.1, ge=0)
    target_sparsity: float | None = Field(None, gt=0, lt=1)
    penalty_scale: Literal["model", "paper"] = "model"
    droprate_init: float = Field(0.5, gt=0, lt=1)
    mode: Literal["scratch", "finetune"] = "scratch"
    seed: int = 0
    device: str = "auto"
    amp: bool = False  # autocast: bfloat16 on CPU, float16 with a gradient scaler on CUDA
    channels_last: bool = False  # NHWC memory format for convnets (faster convolutions on recent GPUs)
    compile: bool = False  # torch.compile the training forward (inductor; needs a C++ compiler on a CPU)
    threads: int | None = Field(None, ge=1)
    baseline_dir: str = "l0sweep-out/baselines"

    @model_validator(mode="after")
    def _check_milestones(self) -> "TrialConfig":
        bad = [m for m in self.optim.milestones if not 0 < m < self.optim.epochs]
        if bad:
            raise ValueError(f"optim.milestones {bad} must lie between 0 and optim.epochs={self.optim.epochs}")
        if self.target_sparsity is not None and self.penalty_scale != "model":
            raise ValueError("a target_sparsity is a share of the model's parameters: penalty_scale must be 'model'")
        if self.target_sparsity is not None and (problem := self.optim.target_problem()):
            raise ValueError(problem)
        return self
