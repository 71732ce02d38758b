"""The Pareto report: one self-contained HTML page (plotly inlined, works offline) plus the front as MD and CSV.

>>> # write_report(study, "l0sweep-out/reports/digits-mlp")   # -> .../report.html, front.md, front.csv
"""
from __future__ import annotations

import html
from pathlib import Path

import numpy as np

import optuna
import pandas as pd
import plotly.graph_objects as go
from plotly.offline import get_plotlyjs
from plotly.subplots import make_subplots

from sweeps.records import StudyRecord, TaskMetric, TrialRecord, epochs_trained, metric_names, task_metric

from .budget import at_equal_epochs, describe
from .pick import recommend, trade_off
from .table import (TARGET_TOLERANCE, failed_and_interrupted, front_table, hypervolume_history, latency_setting,
                    missed_target, spec_of, trials_table)

MODE_COLOURS = {"scratch": "#1f77b4", "finetune": "#d62728"}


def _short_name(metric: TaskMetric) -> str:
    """The metric in the table's and hover's few letters: "acc" for accuracy, else its name."""
    return "acc" if metric.is_accuracy else metric.name


def _table_columns(metric: TaskMetric) -> dict[str, str]:
    """The front table's columns and their headers (``val acc``, ``test acc`` for accuracy)."""
    short = _short_name(metric)
    return {"trial": "trial", metric.val: f"val {short}", metric.test: f"test {short}", "sparsity": "sparsity",
            "flops_ratio": "FLOPs ratio", "latency_ms": "latency ms", "speedup": "speed-up", "lam": "lambda",
            "droprate_init": "droprate_init", "mode": "mode"}


def _hover(metric: TaskMetric) -> str:
    short = _short_name(metric)
    return ("trial %{customdata[0]} (%{customdata[3]})<br>lambda %{customdata[1]:.4g}, "
            f"droprate_init %{{customdata[2]:.3g}}<br>val {short} %{{customdata[4]:.4f}}, test {short} "
            "%{customdata[5]:.4f}<br>sparsity %{customdata[6]:.4f}, FLOPs ratio %{customdata[7]:.4f}<br>MLflow run "
            "%{customdata[8]}<extra></extra>")


def _customdata(rows: pd.DataFrame, metric: TaskMetric) -> list[list]:
    return rows[["trial", "lam", "droprate_init", "mode", metric.val, metric.test, "sparsity",
                 "flops_ratio", "mlflow_run_id"]].fillna("").values.tolist()


def _floor(spec: dict, metric: TaskMetric) -> tuple[str, float | None]:
    """How the report names trials short of the study's floor on its metric, and the floor when it is a number."""
    floor = spec.get("min_accuracy", "chance" if metric.is_accuracy else None)
    if floor == "chance":
        return "no better than chance", None
    if floor is None:
        return f"below the {metric.name} floor", None
    return f"below the {metric.name} floor ({metric.show(floor)})", float(floor)


def _baseline_name(baseline: dict) -> str:
    """What the reference line is: the user's checkpoint (``trial.model.checkpoint``) or a dense model trained."""
    return "dense baseline (your checkpoint)" if baseline.get("source") == "checkpoint" else "dense baseline"


def _scatter(table: pd.DataFrame, x: str, x_title: str, baseline: dict | None, chosen: pd.Series | None,
             title: str, floor: tuple[str, float | None], metric: TaskMetric = TaskMetric()) -> go.Figure:
    """The validation metric against ``x``: front trials solid and joined, dominated ones faded, trials short of
    the floor (``floor``: see :func:`_floor`) crossed out in grey; colour by mode."""
    y, hover = metric.val, _hover(metric)
    fig = go.Figure()
    short = table[~table.feasible]
    for mode, colour in MODE_COLOURS.items():
        for on_front in (True, False):
            rows = table[table.feasible & (table["mode"] == mode) & (table.on_front == on_front)]
            if rows.empty:
                continue
            fig.add_trace(go.Scatter(
                x=rows[x], y=rows[y], mode="markers", customdata=_customdata(rows, metric), hovertemplate=hover,
                name=f"{mode} ({'front' if on_front else 'dominated'})",
                marker={"color": colour, "size": 11 if on_front else 8, "opacity": 1.0 if on_front else 0.3,
                        "symbol": "circle" if on_front else "circle-open",
                        "line": {"width": 1, "color": "white" if on_front else colour}}))
    if len(short):
        fig.add_trace(go.Scatter(
            x=short[x], y=short[y], mode="markers", customdata=_customdata(short, metric), hovertemplate=hover,
            name=floor[0], marker={"color": "#999", "size": 8, "symbol": "x"}))
    front = table[table.on_front].sort_values(x)
    if len(front) > 1:
        fig.add_trace(go.Scatter(x=front[x], y=front[y], mode="lines", name="Pareto front",
                                 line={"color": "#555", "dash": "dot", "shape": "hv" if x == "sparsity" else "linear"},
                                 hoverinfo="skip"))
    if baseline:
        fig.add_hline(y=baseline[y], line={"color": "#2ca02c", "dash": "dash"},
                      annotation_text=f"{_baseline_name(baseline)} {baseline[y]:.4f}",
                      annotation_position="bottom left")
    if chosen is not None:
        fig.add_trace(go.Scatter(x=[chosen[x]], y=[chosen[y]], mode="markers", name="recommended",
                                 customdata=_customdata(chosen.to_frame().T, metric), hovertemplate=hover,
                                 marker={"symbol": "star", "size": 22, "color": "gold",
                                         "line": {"width": 1.5, "color": "black"}}))
    fig.update_layout(title=title, xaxis_title=x_title, yaxis_title=metric.label(), template="plotly_white",
                      height=460, legend={"orientation": "h", "y": -0.2}, margin={"t": 50, "b": 20})
    if not metric.is_accuracy:  # no common scale to crop to: the whole range, the floor where there is one
        if floor[1] is not None:
            fig.add_hline(y=floor[1], line={"color": "#999", "dash": "dot"},
                          annotation_text=f"{metric.name} floor {floor[1]:.4g}", annotation_position="top left")
        return fig
    # Collapsed trials (accuracy near chance) would squash the interesting band into a line: show the band,
    # and say how many lie below it.
    top = max(table[y].max(), baseline[y] if baseline else 0.0)
    useful = table[y][table[y] >= 0.5 * top]
    low = max(0.0, min(useful.min(), top - 0.02) - 0.02) if len(useful) else 0.0
    below = int((table[y] < low).sum())
    if floor[1] is not None and floor[1] >= low:
        fig.add_hline(y=floor[1], line={"color": "#999", "dash": "dot"},
                      annotation_text=f"accuracy floor {floor[1]:.4f}", annotation_position="top left")
    fig.update_yaxes(range=[low, top + 0.01])
    if below:
        fig.add_annotation(text=f"{below} trial(s) below {low:.2f} (collapsed) not shown", xref="paper", yref="paper",
                           x=1, y=0, xanchor="right", yanchor="bottom", showarrow=False, font={"color": "#888"})
    return fig


# The second objective as the hypervolume's title names it (the first is the task's metric).
SECOND_OBJECTIVE = {"sparsity": "sparsity", "flops_reduction": "FLOPs reduction", "speedup": "speed-up"}


def _hypervolume(study: optuna.Study, metric: TaskMetric) -> go.Figure:
    hv = hypervolume_history(study)
    fig = go.Figure(go.Scatter(x=hv.trial, y=hv.hypervolume, mode="lines+markers", name="hypervolume"))
    second = metric_names(study)[1]
    second = SECOND_OBJECTIVE.get(second, second)
    reference = "ref. 0, 0" if metric.direction == "maximize" else f"ref. worst {metric.name}, {second} 0"
    fig.update_layout(title=f"Hypervolume of the (val {metric.name}, {second}) front after each complete trial",
                      xaxis_title="trial", yaxis_title=f"hypervolume ({reference})", template="plotly_white",
                      height=320,
                      margin={"t": 50, "b": 20})
    return fig


def _target_scatter(table: pd.DataFrame, chosen: pd.Series | None, metric: TaskMetric) -> go.Figure:
    """Achieved against target sparsity, the diagonal and its tolerance band; trials that missed their target by
    more than the tolerance crossed in red, the recommended trial starred with the lambda its target cost."""
    rows = table[table.target_sparsity.notna()]
    missed = missed_target(rows)
    fig = go.Figure()
    lo, hi = float(min(rows.target_sparsity.min(), rows.sparsity.min())), 1.0
    for offset, dash in ((0.0, "solid"), (TARGET_TOLERANCE, "dot"), (-TARGET_TOLERANCE, "dot")):
        fig.add_trace(go.Scatter(x=[lo, hi], y=[lo + offset, hi + offset], mode="lines", hoverinfo="skip",
                                 line={"color": "#999", "dash": dash}, showlegend=offset == 0.0,
                                 name=f"on target (dotted: +-{TARGET_TOLERANCE * 100:g} points)"))
    for label, part, marker in (("within tolerance", rows[~missed], {"color": "#1f77b4", "size": 9}),
                                (f"missed by more than {TARGET_TOLERANCE * 100:g} points", rows[missed],
                                 {"color": "#d62728", "size": 11, "symbol": "x"})):
        if len(part):
            fig.add_trace(go.Scatter(
                x=part.target_sparsity, y=part.sparsity, mode="markers", name=label, marker=marker,
                text=[f"trial {int(r.trial)} ({r['mode']}): effective lambda {r.effective_lambda:.4g}, val "
                      f"{_short_name(metric)} {r[metric.val]:.4f}" for _, r in part.iterrows()],
                hovertemplate="%{text}<extra></extra>"))
    if chosen is not None and pd.notna(chosen.get("target_sparsity")):
        fig.add_trace(go.Scatter(x=[chosen.target_sparsity], y=[chosen.sparsity], mode="markers+text",
                                 name="recommended", text=[f"effective lambda {chosen.effective_lambda:.4g}"],
                                 textposition="middle left", hoverinfo="skip",
                                 marker={"symbol": "star", "size": 20, "color": "gold",
                                         "line": {"width": 1.5, "color": "black"}}))
    fig.update_layout(title="Achieved sparsity against each trial's target", xaxis_title="target sparsity",
                      yaxis_title="achieved sparsity (deterministic gates)", template="plotly_white", height=420,
                      legend={"orientation": "h", "y": -0.2}, margin={"t": 50, "b": 20})
    return fig


def _recommended_detail(trial: optuna.trial.FrozenTrial) -> go.Figure | None:
    record = TrialRecord.read(trial)
    kept = record.kept_units or {}
    hist = record.log_alpha_hist
    if not kept and not hist:
        return None
    fig = make_subplots(rows=1, cols=2, subplot_titles=("kept units per gated layer", "log_alpha per gate"))
    names = [k.removesuffix(".l0_gate") for k in kept]
    fig.add_trace(go.Bar(x=names, y=[v[0] for v in kept.values()], name="kept", marker_color="#1f77b4"), 1, 1)
    fig.add_trace(go.Bar(x=names, y=[v[1] - v[0] for v in kept.values()], name="removed", marker_color="#cccccc"),
                  1, 1)
    if hist:
        edges = hist["edges"]
        centres = [(a + b) / 2 for a, b in zip(edges[:-1], edges[1:])]
        for gate, counts in hist["counts"].items():
            fig.add_trace(go.Scatter(x=centres, y=counts, name=f"gate {gate}", mode="lines",
                                     line={"shape": "hvh"}), 1, 2)
        fig.add_vline(x=-2.4, line={"color": "#888", "dash": "dot"}, row=1, col=2)
    fig.update_layout(barmode="stack", template="plotly_white", height=380, margin={"t": 60, "b": 20},
                      title=f"Recommended trial {trial.number}: what it keeps")
    fig.update_xaxes(title_text="log_alpha (gate closes when < about -2.4)", row=1, col=2)
    return fig


def _format_table(front: pd.DataFrame, metric: TaskMetric = TaskMetric()) -> pd.DataFrame:
    columns = _table_columns(metric)
    targets = front.target_sparsity.notna().any()
    if targets:  # a target study: its lambda column is what each target cost
        columns = {**columns, "target_sparsity": "target"}
    shown = front[list(columns)].rename(columns=columns).copy()
    if targets:
        shown["target"] = [f"{t:.3f}" + (" (missed)" if m else "") for t, m in zip(front.target_sparsity,
                                                                                 missed_target(front))]
    for col in (columns[metric.val], columns[metric.test]):
        shown[col] = shown[col].map(metric.show)
    for col in ("sparsity", "FLOPs ratio"):
        shown[col] = shown[col].map(lambda v: f"{v:.3f}")
    # Trials measure latency on the front (or every trial, where it is an objective): blank where none was taken.
    shown["latency ms"] = shown["latency ms"].map(lambda v: "" if pd.isna(v) else f"{v:.3g}")
    shown["speed-up"] = shown["speed-up"].map(lambda v: "" if pd.isna(v) else f"{v:.2f}x")
    shown["lambda"] = shown["lambda"].map(lambda v: f"{v:.4g}")
    shown["droprate_init"] = shown["droprate_init"].map(lambda v: f"{v:.3g}")
    return shown


def _short_of_floor(table: pd.DataFrame, floor: tuple[str, float | None]) -> str:
    """The summary's words for trials short of the accuracy floor (study file: ``min_accuracy``)."""
    short = int((~table.feasible).sum())
    return f", {short} {floor[0]} (kept off the front)" if short else ""


def _missed(table: pd.DataFrame) -> str:
    """The summary's words for trials farther from their target sparsity than the tolerance (flagged, kept)."""
    missed = int(missed_target(table).sum())
    return (f", {missed} missed their target sparsity by more than {TARGET_TOLERANCE * 100:g} points (flagged, "
            "not hidden)") if missed else ""


def _latency_note(study: optuna.Study, runtime: str, batch: int) -> str:
    """What the latency columns are, the dense model's time, and how noisy the measurements were."""
    timed = [lat for lat in (TrialRecord.read(t).latency for t in study.get_trials(deepcopy=False)) if lat]
    if not timed:
        return ""
    noise = [f["noise"] for lat in timed for by in lat.values() for f in by.values()]
    runs = [f["runs"] for lat in timed for by in lat.values() for f in by.values()]
    dense = (StudyRecord.read(study).dense_latency or {}).get(runtime, {}).get(str(batch))
    return (f"<p class='latency'>Latency ({runtime}, batch {batch}{', ' + dense['device'] if dense else ''}): one "
            f"forward in eval mode, the median of {min(runs)}-{max(runs)} timed calls after 3 warm-up calls, the "
            f"dense model and the compacted one timed alternately; speed-up = dense ms / compacted ms, from the same "
            f"trial's alternating runs. " + (f"Dense model: {dense['dense_ms']:.3g} ms. " if dense else "")
            + f"Noise (interquartile range / median of the timed calls) over {len(timed)} measured trial(s): median "
            f"{np.median(noise):.0%}, worst {max(noise):.0%}; speed-ups closer to 1 than that are not telling.</p>")


_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{name}: L0 sparsity report</title>
<script type="text/javascript">{plotly}</script>
<style>
body {{ font-family: system-ui, sans-serif; margin: 24px auto; max-width: 1100px; color: #222; }}
.rec {{ background: #fff8dc; border-left: 4px solid gold; padding: 8px 12px; }}
table.front {{ border-collapse: collapse; margin: 12px 0; }}
table.front th, table.front td {{ padding: 4px 10px; text-align: right; border-bottom: 1px solid #ddd; }}
td.chosen {{ background: gold; font-weight: bold; }}
.fig {{ margin: 18px 0; }}
</style></head><body>
<h1>{name}</h1>
<p>{description} Model <code>{model}</code>
on <code>{data}</code>. {summary}
Selection uses {label}; test {metric} is reported only.</p>
{base}
{rec}
<h2>Pareto front</h2>
{table}
{plots}
</body></html>
"""


def write_report(study: optuna.Study, out_dir: str | Path, against: optuna.Study | None = None) -> Path:
    """Write ``report.html``, ``front.md`` and ``front.csv`` into ``out_dir`` (the sweep logs them to the study's
    MLflow run: sweeps.tracking.log_report). Returns the HTML page's path. With ``against`` (another study of the
    same objectives: the same search without early stopping, say), the summary also gives the front that study had
    bought within the epochs this one trained (:func:`dashboards.budget.at_equal_epochs`).
    """
    budget = None if against is None else at_equal_epochs(study, against)  # before writing: it may refuse
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    table = trials_table(study)
    front = front_table(study)
    baseline = StudyRecord.read(study).dense_baseline
    spec = spec_of(study)
    metric = task_metric(study)
    chosen, how = None, ""
    if not front.empty:
        row, how = recommend(front, baseline, trade_off(spec), metric)
        chosen = front.iloc[row]
    shown = _format_table(front, metric)
    front.to_csv(out / "front.csv", index=False)
    (out / "front.md").write_text(f"# {study.study_name}: Pareto front\n\n{shown.to_markdown(index=False)}\n")
    floor = _floor(spec, metric)
    plots = "\n".join(f'<div class="fig">{f.to_html(full_html=False, include_plotlyjs=False)}</div>'
                      for f in _figures(study, table, spec, baseline, chosen, floor, metric))
    model, data = ((spec.get("trial", {}).get(part, {}).get("name", "?")) for part in ("model", "data"))
    page = _PAGE.format(
        name=html.escape(study.study_name), plotly=get_plotlyjs(), description=html.escape(spec.get("description", "")),
        model=html.escape(str(model)), data=html.escape(str(data)), summary=_summary(study, table, front, floor)
        + ("" if budget is None else " " + html.escape(describe(budget, study))),
        label=html.escape(metric.label()), metric=html.escape(metric.name),
        base=_baseline_note(baseline, metric) + _latency_note(study, *latency_setting(spec)),
        rec=_recommendation(study.study_name, chosen, how, metric), table=_front_html(shown, chosen), plots=plots)
    path = out / "report.html"
    path.write_text(page)
    return path


def _figures(study: optuna.Study, table: pd.DataFrame, spec: dict, baseline: dict | None, chosen: pd.Series | None,
             floor: tuple[str, float | None], metric: TaskMetric) -> list[go.Figure]:
    """The page's figures, in order: the metric against sparsity (against speed-up first, where latency is the
    objective), achieved against target sparsity, against FLOPs reduction, against speed-up, the hypervolume,
    what the recommended trial keeps; each where the study has what it draws."""
    y_name = f"Validation {metric.name}"
    figures = [
        _scatter(table, "sparsity", "sparsity (parameters removed / all)", baseline, chosen,
                 f"{y_name} against sparsity", floor, metric),
        _scatter(table.assign(flops_reduction=1 - table.flops_ratio), "flops_reduction",
                 "FLOPs reduction (1 - exported FLOPs / dense FLOPs)", baseline,
                 None if chosen is None else
                 pd.concat([chosen, pd.Series({"flops_reduction": 1 - chosen.flops_ratio})]),
                 f"{y_name} against FLOPs reduction", floor, metric),
    ]
    runtime, batch = latency_setting(spec)
    if table.speedup.notna().any():
        figures.insert(0 if trade_off(spec) == "speedup" else 2, _scatter(
            table, "speedup", f"measured speed-up over dense ({runtime}, batch {batch}; dense ms / compacted ms)",
            baseline, chosen, f"{y_name} against measured speed-up", floor, metric))
    if len(table[table.state == "COMPLETE"]):
        figures.append(_hypervolume(study, metric))
    if table.target_sparsity.notna().any():
        figures.insert(1, _target_scatter(table, chosen, metric))
    if chosen is not None:
        detail = _recommended_detail(study.trials[int(chosen.trial)])
        if detail is not None:
            figures.append(detail)
    return figures


def _front_html(shown: pd.DataFrame, chosen: pd.Series | None) -> str:
    """The front table as HTML, the recommended trial's cell starred."""
    table_html = shown.to_html(index=False, classes="front", border=0, table_id="front-table")
    if chosen is not None:
        table_html = table_html.replace(f"<td>{int(chosen.trial)}</td>",
                                        f'<td class="chosen">{int(chosen.trial)} &#9733;</td>', 1)
    return table_html


def _summary(study: optuna.Study, table: pd.DataFrame, front: pd.DataFrame, floor: tuple[str, float | None]) -> str:
    """The trials by state, the epochs they trained (against the epoch budget, if any), those short of the floor or
    off their target, and the front's size, in words."""
    counts = table.state.value_counts().to_dict()
    failed, interrupted = failed_and_interrupted(study)
    epoch_budget = StudyRecord.read(study).epoch_budget
    return (f"{counts.get('COMPLETE', 0)} complete trials, {counts.get('PRUNED', 0)} stopped early"
            + f" ({epochs_trained(study)} epochs trained" + (f" of a budget of {epoch_budget}" if epoch_budget else "")
            + ")"
            + (f", {failed} failed (their errors are in the workers' logs and the FAILED MLflow runs)"
               if failed else "")
            + (f", {interrupted} interrupted and run again (their workers were stopped or died)"
               if interrupted else "") + _short_of_floor(table, floor) + _missed(table)
            + f"; {len(front)} on the front.")


def _recommendation(study_name: str, chosen: pd.Series | None, how: str, metric: TaskMetric) -> str:
    """The recommended trial (chosen ``how``), its values and figures, and the other ways to choose."""
    if chosen is None:
        return "<p>No complete trial yet.</p>"
    target = "" if pd.isna(chosen.target_sparsity) else \
        f"target sparsity {chosen.target_sparsity:.3f} (it cost lambda {chosen.effective_lambda:.4g}), "
    return (
        f"<p class='rec'><b>Recommended ({how}): trial {int(chosen.trial)}</b>: "
        f"{target or f'lambda {chosen.lam:.4g}, '}droprate_init {chosen.droprate_init:.3g}, "
        f"mode {html.escape(str(chosen['mode']))}"
        f" &mdash; val {_short_name(metric)} {metric.show(chosen[metric.val])}, test {_short_name(metric)} "
        f"{metric.show(chosen[metric.test])}, sparsity "
        f"{chosen.sparsity:.3f}, FLOPs ratio {chosen.flops_ratio:.3f}, MLflow run "
        f"<code>{html.escape(str(chosen.mlflow_run_id))}</code>. Other choices: "
        f"<code>l0sweep pick {html.escape(study_name)} --max-drop 1</code> or <code>--min-sparsity 0.8</code>.</p>")


def _baseline_note(baseline: dict | None, metric: TaskMetric) -> str:
    """The dense baseline's figures, and whether fine-tuning trials start from it ("" without one)."""
    if not baseline:
        return ""
    return (f"<p>{_baseline_name(baseline).capitalize()}: val {_short_name(metric)} "
            f"{metric.show(baseline[metric.val])}, test {_short_name(metric)} {metric.show(baseline[metric.test])}."
            + (" Fine-tuning trials start from it; scratch trials do not." if baseline.get("source") == "checkpoint"
               else "") + "</p>")
