"""``l0sweep export``: a chosen trial's compacted model as files to ship, with its measured speed.

Front trials log, besides their MLflow model, the gated model's state (``gated.pt``: state dict, input shape,
classes, one example input). Export rebuilds the gated model from it and the study's stored spec, compacts it
(``round_to``), and writes into ``--to``:

- ``model.pt2``: ``torch.export.save`` of the compacted model, batch dimension dynamic;
- ``model.onnx``: the same program through the torch.export-based ONNX exporter (input ``input``, output ``output``);
- ``metrics.json``: the trial's values and figures, kept units per layer, measured latencies;
- ``README.md``: how to load each file.

Every form's outputs are checked against the gated model's eval outputs before anything is written; the files
are made in a temporary folder beside ``--to`` and moved in only when all of them passed.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import IO, Any

import optuna
import torch
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from torch import nn

import l0core

from . import latency
from .formats import export_program, onnx_bytes, onnx_session, to_onnx
from .models import build_model
from .records import StudyRecord, TrialRecord, feasible, task_metric
from .search import trial_config
from .spec import StudySpec
from .runtime import resolve_device

GATED_ARTIFACT = "gated.pt"  # a logged trial's gated model state, what export rebuilds the model from
TOLERANCE = 1e-5  # of the output scale (max |output|, at least 1): how far an exported form may differ


class ExportError(ValueError):
    """A request ``l0sweep export`` cannot serve; one line."""


def gated_state(model: nn.Module, example: torch.Tensor) -> dict[str, Any]:
    """What a trial logs (``gated.pt``) so that export can rebuild its gated model exactly."""
    with torch.no_grad():
        classes = int(model.eval()(example[:1]).shape[1])
    return {"state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
            "input_shape": list(example.shape[1:]), "num_classes": classes, "example": example[:1].detach().cpu()}


def rebuild_gated(spec_json: str, values: dict[str, Any], saved: dict[str, Any]) -> tuple[nn.Module, Any]:
    """The trial's gated model (eval mode, on the CPU) from its logged state; and its TrialConfig."""

    cfg = trial_config(StudySpec.model_validate_json(spec_json), values)
    model = build_model(cfg.model.name, tuple(saved["input_shape"]), saved["num_classes"], gates=True,
                        droprate_init=cfg.droprate_init, per_sample=cfg.model.per_sample, **cfg.model.kwargs)
    model.load_state_dict(saved["state_dict"])
    l0core.measure_couplings(model, saved["example"])
    return model.eval(), cfg


def trial_values(trial: optuna.trial.FrozenTrial, spec_json: str) -> dict[str, Any]:
    """The values a trial trained with: lam (or target_sparsity), droprate_init, mode and the searched dotted
    paths."""
    params = json.loads(spec_json).get("search", {}).get("params", {})
    values = TrialRecord.read(trial).values
    values.update({path: trial.params[path] for path in params if path in trial.params})
    return values


def choose_trial(study: optuna.Study, number: int) -> optuna.trial.FrozenTrial:
    """Trial ``number``, checked: one-line errors for one that has no model to export."""
    if not 0 <= number < len(study.trials):
        raise ExportError(f"study {study.study_name!r} has no trial {number} (its trials are 0-{len(study.trials) - 1})"
                          if study.trials else f"study {study.study_name!r} has no trials yet")
    trial = study.trials[number]
    if trial.state != optuna.trial.TrialState.COMPLETE:
        raise ExportError(f"trial {number} of study {study.study_name!r} is {trial.state.name}, not COMPLETE: "
                          "only complete trials have a model")
    if not feasible(trial):
        metric = task_metric(study)
        floor = TrialRecord.read(trial).metric_floor
        floor = float("nan") if floor is None else floor
        raise ExportError(f"trial {number} is short of the {metric.name} floor (validation {metric.name} "
                          f"{trial.values[0]:.4f}, floor {floor:.4f}, min_accuracy / min_metric in the study file): "
                          "choose another")
    return trial


def _check_target(to: Path, force: bool) -> None:
    if to.exists() and not to.is_dir():
        raise ExportError(f"--to {to}: exists and is not a folder")
    if to.is_dir() and any(to.iterdir()) and not force:
        raise ExportError(f"--to {to}: exists and is not empty (give --force to replace the exported files)")


def _download_gated(tracking_uri: str, run_id: str | None, number: int, tmp: Path) -> dict[str, Any]:

    how = (f"trial {number}'s model was not logged (only trials on the front when they finish log theirs): set "
           "'mlflow: {log_models: all}' in the study file and run it again, or export a front trial")
    if not run_id:
        raise ExportError(how)
    try:
        path = MlflowClient(tracking_uri).download_artifacts(run_id, GATED_ARTIFACT, str(tmp))
    except (MlflowException, OSError):
        raise ExportError(how) from None
    return torch.load(path, map_location="cpu", weights_only=True)


def _max_diff(expected: torch.Tensor, actual: Any) -> float:
    actual = torch.as_tensor(actual)
    return float((expected - actual).abs().max()) if expected.shape == actual.shape else float("inf")


def _readme(shape: list[int], trial: int, study: str) -> str:
    dims = ", ".join(map(str, [1, *shape]))
    return f"""# Trial {trial} of study {study}: the compacted model

Run in this folder; each line needs only the package it names (torch, onnxruntime):

    python -c "import torch; m = torch.export.load('model.pt2').module(); print(m(torch.rand({dims})))"
    python -c "import numpy as np, onnxruntime as ort; s = ort.InferenceSession('model.onnx'); print(s.run(None, {{'input': np.random.rand({dims}).astype('float32')}})[0])"
    python -c "import json; print(json.load(open('metrics.json'))['latency'])"

The batch dimension is dynamic in both models. `metrics.json` holds the trial's values and figures.
"""


def export_trial(study: optuna.Study, tracking_uri: str, to: Path, number: int, force: bool = False,
                 round_to: int | None = None, latency_budget_s: float = 0.2) -> dict[str, Any]:
    """Write trial ``number``'s model files into ``to`` (see the module docstring); returns ``metrics.json``'s
    content. ``round_to``: default the study file's ``export.round_to``. (Which trial to export is the caller's
    choice: ``l0sweep export`` asks ``dashboards.pick`` when no ``--trial`` is given.)"""

    if round_to is not None and round_to < 1:
        raise ExportError(f"--round-to must be at least 1, got {round_to}")
    to = Path(to)
    _check_target(to, force)
    trial = choose_trial(study, number)
    stored = StudyRecord.read(study)
    spec_json, spec = stored.spec_json, stored.spec
    k = round_to or int(spec.get("export", {}).get("round_to", 1))
    to.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{to.name}.", dir=to.parent) as tmp_name:
        tmp = Path(tmp_name)
        metric = task_metric(spec)
        record = TrialRecord.read(trial, metric)
        saved = _download_gated(tracking_uri, record.mlflow_run_id, trial.number, tmp / "dl")
        gated, cfg = rebuild_gated(spec_json, trial_values(trial, spec_json), saved)
        example = saved["example"]
        small = l0core.compact(gated, example, round_to=k).eval()
        program = export_program(small, example)
        files = tmp / "files"
        files.mkdir()
        torch.export.save(program, files / "model.pt2")
        to_onnx(program, example, files / "model.onnx")
        # The check: a few inputs around the example, at a batch size the programs were not traced with.
        x = torch.cat([example, example + 0.5 * torch.randn(4, *example.shape[1:])])
        with torch.no_grad():
            reference = gated(x)
        scale = max(1.0, float(reference.abs().max()))
        diffs = {"compact": _max_diff(reference, small(x).detach()),
                 "pt2": _max_diff(reference, torch.export.load(files / "model.pt2").module()(x).detach()),
                 "onnx": _max_diff(reference, onnx_session(str(files / "model.onnx")).run(
                     None, {"input": x.numpy()})[0])}
        bad = {form: d for form, d in diffs.items() if not d <= TOLERANCE * scale}
        if bad:
            raise ExportError(f"the exported forms do not compute the gated model's outputs (max abs diff "
                              f"{', '.join(f'{f} {d:.3g}' for f, d in bad.items())}; output scale {scale:.3g}): "
                              "please report this model")
        dense = build_model(cfg.model.name, tuple(saved["input_shape"]), saved["num_classes"], gates=False,
                            **cfg.model.kwargs).eval()
        batch = int((spec.get("latency") or {}).get("batch_size") or cfg.data.batch_size)
        device = (spec.get("latency") or {}).get("device") or str(resolve_device(cfg.device))
        timed = latency.compare(dense, small, saved["input_shape"], sorted({1, batch}), ("torch", "onnxruntime"),
                                device, latency_budget_s,
                                onnx={"dense": onnx_bytes(dense, example),
                                      "compact": (files / "model.onnx").read_bytes()})
        one = torch.zeros(1, *saved["input_shape"])
        dense_flops, small_flops = l0core.count_flops(dense, one), l0core.count_flops(small.cpu(), one)
        metrics = {
            "study": study.study_name, "trial": trial.number, "mlflow_run_id": record.mlflow_run_id,
            "lambda": record.trained_lambda, "droprate_init": record.droprate_init, "mode": record.mode,
            metric.val: trial.values[0], metric.test: record.test_metric,
            "dense_baseline": stored.dense_baseline,
            "sparsity": trial.values[1] if record.sparsity is None else record.sparsity,
            "parameters": {"dense": record.total_params, "removed": record.removed_params,
                           "exported_tensors": sum(p.numel() for p in small.parameters())},
            "flops": {"dense": dense_flops, "exported": small_flops, "ratio": small_flops / max(dense_flops, 1),
                      "per_example": True},
            "kept_units": {g.removesuffix(".l0_gate"): {"kept": v[0], "units": v[1]}
                           for g, v in (record.kept_units or {}).items()},
            "round_to": k, "input_shape": saved["input_shape"], "num_classes": saved["num_classes"],
            "max_abs_diff": diffs, "output_scale": scale,
            "latency": latency.figures(timed), "latency_definition": latency.__doc__.split("\n\n")[1].replace("\n", " "),
        }
        (files / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
        (files / "README.md").write_text(_readme(saved["input_shape"], trial.number, study.study_name))
        _check_target(to, force)  # again: something may have appeared there meanwhile
        to.mkdir(parents=True, exist_ok=True)
        for f in files.iterdir():
            os.replace(f, to / f.name)  # same filesystem (the temp folder sits beside --to): each move is atomic
    return metrics


def describe_export(metrics: dict[str, Any], to: Path) -> str:
    """What ``l0sweep export`` prints: where the files are, and the speed measured."""
    lines = [f"trial {metrics['trial']} of study {metrics['study']!r} exported to {to}/ "
             f"(model.pt2, model.onnx, metrics.json, README.md)",
             f"  sparsity {metrics['sparsity']:.4f}, FLOPs ratio {metrics['flops']['ratio']:.4f}"
             + (f", widths rounded to multiples of {metrics['round_to']}" if metrics["round_to"] > 1 else "")]
    for runtime, by_batch in metrics["latency"].items():
        for batch, f in by_batch.items():
            lines.append(f"  {runtime:11s} batch {batch:>4s} ({f['device']}): {f['compact_ms']:.3f} ms against dense "
                         f"{f['dense_ms']:.3f} ms, speed-up {f['speedup']:.2f}x (noise {f['noise']:.0%})")
    return "\n".join(lines)
