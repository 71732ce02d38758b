"""Choosing a lambda: one trial of the Pareto front, by an accuracy budget, a least sparsity, a target sparsity,
or the knee.

All choices use the task's validation metric (accuracy by default; a minimised metric counts as better when
lower); the test metric is shown, never used to choose.
"""
from __future__ import annotations

import numpy as np
import optuna
import pandas as pd

from sweeps.records import StudyRecord, TaskMetric, TrialRecord, task_metric

from .table import front_table, spec_of


class PickError(ValueError):
    """A request no trial satisfies, said plainly."""


def trade_off(study_or_spec: optuna.Study | dict) -> str:
    """The front's column traded against accuracy: ``speedup`` for a study whose objectives are
    [accuracy, latency], else ``sparsity``."""
    spec = spec_of(study_or_spec) if isinstance(study_or_spec, optuna.Study) else study_or_spec
    objectives = spec.get("objectives", ["accuracy", "sparsity"])
    return "speedup" if "latency" in objectives and "sparsity" not in objectives else "sparsity"


def knee(front: pd.DataFrame, x: str = "sparsity", metric: TaskMetric = TaskMetric()) -> int:
    """Row index of the front's knee: farthest from the chord between its two ends (normalised axes).

    >>> f = pd.DataFrame({"val_accuracy": [0.99, 0.98, 0.90], "sparsity": [0.1, 0.6, 0.8]})
    >>> knee(f)
    1
    """
    acc, sp = metric.sign * front[metric.val].to_numpy(float), front[x].to_numpy(float)  # larger is better
    if len(front) <= 2:
        return int(np.argmax(acc))
    a = (acc - acc.min()) / max(np.ptp(acc), 1e-12)
    s = (sp - sp.min()) / max(np.ptp(sp), 1e-12)
    i, j = int(np.argmax(s)), int(np.argmax(a))  # the sparsest and the most accurate ends
    chord = np.array([s[j] - s[i], a[j] - a[i]])
    norm = np.linalg.norm(chord) or 1.0
    # Signed distance above the chord: the knee bulges towards (high sparsity, high accuracy).
    dist = (chord[0] * (a - a[i]) - chord[1] * (s - s[i])) / norm
    return int(np.argmax(-dist if chord[0] < 0 else dist))


def _sparsest_within(front: pd.DataFrame, reference: float, points: float, x: str = "sparsity",
                     metric: TaskMetric = TaskMetric()) -> pd.DataFrame:
    """Front trials within ``points`` of ``reference``, the sparsest (highest ``x``) last: accuracy points
    (percent) for accuracy, the metric's own units for other metrics, in its direction."""
    allowed = points / 100 if metric.is_accuracy else points
    ok = front[metric.sign * front[metric.val] >= metric.sign * reference - allowed - 1e-12]
    # The signed value computed on ok itself: assigning a longer Series to an empty frame would take its index.
    return ok.assign(_signed=metric.sign * ok[metric.val]).sort_values([x, "_signed"]).drop(columns="_signed")


def recommend(front: pd.DataFrame, baseline: dict | None, x: str = "sparsity",
              metric: TaskMetric = TaskMetric()) -> tuple[int, str]:
    """Row index of the front's recommended trial, and how it was chosen (words for the report).

    The knee, where the front has one (three trials or more). Two trials are both ends of the chord, so the
    knee rule could only take the more accurate, however little more accurate and however much less sparse;
    there, the sparsest trial within 1 accuracy point of the dense baseline (``pick --max-drop 1``; accuracy only:
    other metrics have no common unit of a point), else the better by the metric.

    >>> two = pd.DataFrame({"val_accuracy": [0.986, 0.9815], "sparsity": [0.35, 0.82]})
    >>> recommend(two, {"val_accuracy": 0.977})
    (1, 'the sparsest front trial within 1 point of the dense baseline; a front of two has no knee')
    """
    if len(front) >= 3:
        return knee(front, x, metric), "knee of the front"
    if baseline and len(front) == 2 and metric.is_accuracy:
        ok = _sparsest_within(front, baseline[metric.val], 1.0, x, metric)
        if len(ok):
            return int(ok.index[-1]), \
                "the sparsest front trial within 1 point of the dense baseline; a front of two has no knee"
    return int((metric.sign * front[metric.val].to_numpy(float)).argmax()), \
        "the only front trial" if len(front) == 1 else "the most accurate front trial" if metric.is_accuracy else \
        f"the front trial of best {metric.name}"


def pick(study: optuna.Study, max_drop: float | None = None, min_sparsity: float | None = None,
         target: float | None = None) -> pd.Series:
    """The chosen front trial as a row of ``front_table``.

    - ``max_drop``: the sparsest trial whose validation metric is within ``max_drop`` of the dense baseline's (of
      the best trial's when the study has no baseline): points (percent) of accuracy, else the metric's units;
    - ``min_sparsity``: the trial of best metric with at least this sparsity (0-1);
    - ``target``: the trial whose target sparsity (in a lambda study, whose sparsity) lies nearest ``target``, the
      better by the metric of equals;
    - neither: the recommended trial (:func:`recommend`: the knee of the front).
    """
    front = front_table(study)
    metric = task_metric(study)
    signed = metric.sign * front[metric.val]  # larger is better
    if front.empty:
        if study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
            raise PickError(f"no complete trial of study {study.study_name!r} reaches its {metric.name} floor "
                            "(min_accuracy or min_metric in the study file)")
        raise PickError(f"study {study.study_name!r} has no complete trial yet")
    if max_drop is not None:
        unit = "accuracy points" if metric.is_accuracy else metric.name
        if max_drop < 0:
            raise PickError(f"--max-drop must be >= 0 {unit}, got {max_drop}")
        baseline = StudyRecord.read(study).dense_baseline
        best = float(front[metric.val].iloc[int(signed.to_numpy().argmax())])
        reference, what = (baseline[metric.val], "the dense baseline") if baseline else (best, "the best trial")
        ok = _sparsest_within(front, reference, max_drop, trade_off(study), metric)
        if ok.empty:
            points = "points" if metric.is_accuracy else metric.name
            raise PickError(f"no trial is within {max_drop} {points} of {what} ({metric.show(reference)} "
                            f"{metric.label()}); the best reaches {metric.show(best)}")
        return ok.iloc[-1]
    if min_sparsity is not None:
        if not 0 <= min_sparsity <= 1:
            raise PickError(f"--min-sparsity must lie in [0, 1], got {min_sparsity}")
        ok = front[front.sparsity >= min_sparsity]
        if ok.empty:
            raise PickError(f"no trial reaches sparsity {min_sparsity:.2f}; the sparsest has "
                            f"{front.sparsity.max():.3f}")
        return ok.assign(_signed=metric.sign * ok[metric.val]).sort_values(["_signed", "sparsity"]).iloc[-1] \
            .drop("_signed")
    if target is not None:
        if not 0 < target < 1:
            raise PickError(f"--target must lie in (0, 1), got {target}")
        aimed = front.target_sparsity.where(front.target_sparsity.notna(), front.sparsity)
        distance = (aimed - target).abs().round(9)  # equal targets tie, whatever their floating-point noise
        return front.assign(_distance=-distance, _signed=signed).sort_values(["_distance", "_signed"]).iloc[-1] \
            .drop(["_distance", "_signed"])
    return front.iloc[recommend(front, StudyRecord.read(study).dense_baseline, trade_off(study), metric)[0]]


def describe_pick(study: optuna.Study, row: pd.Series, tracking_uri: str | None = None) -> str:
    """What ``l0sweep pick`` prints: the values to reuse, the metrics, and where the model is."""
    trial = study.trials[int(row.trial)]
    metric = task_metric(study)
    record = TrialRecord.read(trial, metric)
    run = row.mlflow_run_id
    lines = [f"trial {int(row.trial)} of study {study.study_name!r}"]
    if pd.notna(row.get("target_sparsity")):
        lines.append(f"  target         {row.target_sparsity:.4g}   (achieved {row.sparsity:.4f})")
        lines.append(f"  lambda         {row.lam:.6g}   (what the target cost: its Lagrangian's effective lambda)")
    else:
        lines.append(f"  lambda         {row.lam:.6g}")
    lines += [f"  droprate_init  {row.droprate_init:.4g}", f"  mode           {row['mode']}",
              f"  {'val ' + metric.name:<14} {row[metric.val]:.4f}   (selects"
              + ("" if metric.direction == "maximize" else "; lower is better") + ")",
              f"  {'test ' + metric.name:<14} {row[metric.test]:.4f}   (reported only)",
              f"  sparsity       {row.sparsity:.4f}   ({int(row.removed_params)} of {int(row.total_params)} parameters removed)",
              f"  FLOPs ratio    {row.flops_ratio:.4f}"]
    if record.gates_decided:
        d = record.gates_decided
        lines.append(f"  gates decided  after epoch {d['after_epoch']}: the top-k of log_alpha closed {d['closed']} and opened "
                     f"{d['opened']} units against the deterministic gates (sparsity {d['sparsity_before']:.4f} -> "
                     f"{d['sparsity_after']:.4f}); the epochs after it trained the weights alone")
    if record.exact_target:
        e = record.exact_target
        lines.append(f"  exact target   the top-k of log_alpha closed {e['closed']} and opened {e['opened']} units against "
                     f"the deterministic gates (sparsity {e['sparsity_before']:.4f} -> {e['sparsity_after']:.4f}, val "
                     f"{metric.name} {e[metric.val + '_before']:.4f} -> {row[metric.val]:.4f})")
    lines += _latency_lines(record)
    lines.append(f"  MLflow run     {run}")
    if record.model_logged:
        # Pasted into a fresh shell it must find the run: the tracking URI goes in the line (a relative MLflow
        # default would also leave an empty ./mlflow.db behind).
        where = f"mlflow.set_tracking_uri({tracking_uri!r}); " if tracking_uri else ""
        lines.append("  load it (an nn.Module, physically smaller, no gates):")
        lines.append(f'    python -c "import mlflow.pytorch; {where}model = '
                     f"mlflow.pytorch.load_model('runs:/{run}/model').eval(); print(model)\"")
        lines.append(f"  or as files (model.pt2, model.onnx, metrics.json): l0sweep export {study.study_name} "
                     f"--trial {int(row.trial)} --to DIR")
    else:
        lines.append("  exported model: not logged for this trial (it was not on the front when it finished); set "
                     "'mlflow: {log_models: all}' in the study file to log every trial's")
    return "\n".join(lines)


def _latency_lines(record: TrialRecord) -> list[str]:
    """The trial's measured latencies (sweeps.latency), one line per runtime and batch size."""
    lines = []
    for runtime, by_batch in (record.latency or {}).items():
        for batch, f in by_batch.items():
            lines.append(f"  latency        {runtime} batch {batch} ({f['device']}): {f['compact_ms']:.3f} ms, dense "
                         f"{f['dense_ms']:.3f} ms: speed-up {f['speedup']:.2f}x (noise {f['noise']:.0%})")
    return lines
