"""MLflow logging: one experiment and one parent run per study, one child run per trial.

The parent run's id is kept in the study's user attrs (``mlflow_parent_run_id``) and each trial's run id in
its own (``mlflow_run_id``), so the report links trials to runs and a crashed trial's run can be closed by
whoever notices the crash. Runs end FINISHED, FAILED (an error) or KILLED (stopped early or its worker died),
never left RUNNING.
"""
from __future__ import annotations

import functools
import io
import json
import os
import socket
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import mlflow
import optuna
from mlflow.entities import RunStatus
from mlflow.tracking import MlflowClient

from .mlflow_store import prepare_store
from .records import StudyRecord, TrialRecord

if TYPE_CHECKING:  # torch stays out of the launcher, which creates the study's run while its workers import it
    import torch

    from .config import TrialConfig
    from .loop import EpochMetrics
    from .training import TrialResult

# MLflow 3 marks an experiment's kind with this tag (its UI's experiment-type setting writes it); untagged, the
# study's experiment opened on the GenAI overview (traces, an assistant), the training runs one click away.
# MLflow 3.17's UI itself goes by its GenAI / Model training switch: experiment_page() links set that.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"


class TrackingError(RuntimeError):
    """An MLflow tracking URI that cannot be used; one line."""


def check_tracking(tracking_uri: str, timeout: float = 5.0) -> None:
    """Fail fast on an unreachable tracking server, or one that refuses our login (MLflow's own client
    retries for minutes, and reports a refused login deep inside a stack trace)."""
    if not tracking_uri.startswith(("http://", "https://")):
        return
    import urllib.error
    import urllib.request

    try:
        urllib.request.urlopen(tracking_uri.rstrip("/") + "/health", timeout=timeout).read()
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise TrackingError(f"--tracking-uri {tracking_uri}: the MLflow server does not answer ({reason})") from None
    try:
        MlflowClient(tracking_uri).search_experiments(max_results=1)
    except mlflow.exceptions.MlflowException as exc:
        code = exc.get_http_status_code()
        if code == 401:
            raise TrackingError(f"--tracking-uri {tracking_uri}: the MLflow server wants a login (HTTP 401); set "
                                "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD") from None
        if code == 403:
            host = tracking_uri.split("://", 1)[1].split("/", 1)[0]
            why = (f"its --allowed-hosts does not list {host!r}" if "Host header" in str(exc)
                   else "the login lacks permission")
            raise TrackingError(f"--tracking-uri {tracking_uri}: the MLflow server refused the request (HTTP "
                                f"403): {why}") from None
        raise


def _is_local(tracking_uri: str) -> bool:
    return tracking_uri.startswith("sqlite:") or tracking_uri.startswith("file:")


def ensure_study_run(study: optuna.Study, tracking_uri: str, experiment: str, artifact_root: Path | None,
                     spec_json: str) -> str:
    """The study's experiment and parent run, created on first call; returns the parent run's id.

    Call it from one launcher (``l0sweep run`` or ``l0sweep create``): workers only read the id.
    """
    stored = StudyRecord.read(study)
    prepare_store(tracking_uri)
    client = MlflowClient(tracking_uri)
    if stored.mlflow_parent_run_id is not None:
        if stored.mlflow_experiment_id is not None:
            _mark_model_development(client, client.get_experiment(stored.mlflow_experiment_id))
        client.update_run(stored.mlflow_parent_run_id, status="RUNNING")
        return stored.mlflow_parent_run_id
    found = client.get_experiment_by_name(experiment)
    if found is not None:
        experiment_id = found.experiment_id
        _mark_model_development(client, found)
    else:
        location = (artifact_root / experiment).resolve().as_uri() if artifact_root and _is_local(tracking_uri) \
            else None
        experiment_id = client.create_experiment(experiment, artifact_location=location,
                                                 tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})
    run = client.create_run(experiment_id, run_name=study.study_name,
                            tags={"l0sweep.study": study.study_name, "l0sweep.role": "study"})
    client.log_text(run.info.run_id, spec_json, "study.json")
    StudyRecord.write(study, mlflow_experiment_id=experiment_id, mlflow_parent_run_id=run.info.run_id)
    return run.info.run_id


def experiment_page(ui_url: str, experiment_id: str) -> str:
    """The MLflow UI's page of an experiment, opened on its runs table.

    MLflow 3.17's UI picks an experiment's first page by its GenAI / Model training switch (GenAI until a user
    flips it), not by the experiment's kind tag: the link sets the switch, which the UI then remembers."""
    return f"{ui_url.rstrip('/')}/#/experiments/{experiment_id}?workflowType=machine_learning"


def runs_link(study: optuna.Study, tracking_uri: str, prefix: str) -> str:
    """``prefix`` and the UI page of the study's runs where the tracking URI is a server's, else ""."""
    experiment_id = StudyRecord.read(study).mlflow_experiment_id
    if not experiment_id or not tracking_uri.startswith(("http://", "https://")):
        return ""
    return prefix + experiment_page(tracking_uri, experiment_id)


def _mark_model_development(client: MlflowClient, experiment: mlflow.entities.Experiment) -> None:
    """Tag an experiment made by an earlier version (or by hand) as model development; a kind set stays."""
    if EXPERIMENT_KIND_TAG not in experiment.tags:
        client.set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)


def end_study_run(study: optuna.Study, tracking_uri: str, status: str = "FINISHED") -> None:
    run_id = StudyRecord.read(study).mlflow_parent_run_id
    if run_id:
        MlflowClient(tracking_uri).set_terminated(run_id, status)


def delete_study_run(study: optuna.Study, tracking_uri: str) -> None:
    """End the study's run FAILED and delete it: for a study discarded before any trial ran."""
    run_id = StudyRecord.read(study).mlflow_parent_run_id
    if run_id:
        client = MlflowClient(tracking_uri)
        client.set_terminated(run_id, "FAILED")
        client.delete_run(run_id)


def log_report(study: optuna.Study, tracking_uri: str, report_dir: Path) -> None:
    """Log a written report's files (``report_dir``) to the study's MLflow run, under ``report/``."""
    run_id = StudyRecord.read(study).mlflow_parent_run_id
    if run_id:
        MlflowClient(tracking_uri).log_artifacts(run_id, str(report_dir), "report")


def _flatten(prefix: str, data: Any, out: dict[str, Any]) -> dict[str, Any]:
    if isinstance(data, dict):
        for k, v in data.items():
            _flatten(f"{prefix}.{k}" if prefix else k, v, out)
    else:
        out[prefix] = data
    return out


class TrialRun:
    """The child run of one trial. Create it when the trial starts; call ``finish`` or ``end``."""

    def __init__(self, trial: optuna.Trial, tracking_uri: str, values: dict[str, Any], cfg: TrialConfig) -> None:
        stored = StudyRecord.read(trial.study)
        self.client = MlflowClient(tracking_uri)
        self.tracking_uri = tracking_uri
        self.metric = cfg.task.task_metric  # logged as val_<name> and test_<name> (val_accuracy by default)
        tags = {"mlflow.parentRunId": stored.mlflow_parent_run_id, "l0sweep.study": trial.study.study_name,
                "l0sweep.trial": str(trial.number), "l0sweep.host": socket.gethostname(), "l0sweep.mode": values["mode"]}
        if gpu := os.environ.get("CUDA_VISIBLE_DEVICES"):
            tags["l0sweep.gpu"] = gpu  # which of the host's GPUs it could use
        run = self.client.create_run(stored.mlflow_experiment_id, run_name=f"trial-{trial.number}", tags=tags)
        self.run_id = run.info.run_id
        self._pending: list[mlflow.entities.Metric] = []
        self._last_epoch: tuple[int | None, dict[str, float]] = (None, {})  # (its step, the metrics it logged)
        self._flushed = time.monotonic()
        TrialRecord.write(trial, mlflow_run_id=self.run_id)
        params = _flatten("", json.loads(cfg.model_dump_json()), {})
        params.update(values)
        self.client.log_batch(self.run_id, params=[mlflow.entities.Param(k, str(v)[:6000])
                                                   for k, v in sorted(params.items())])

    # Epoch metrics go out at most this often (and when the run ends): one request per epoch cost 15 ms on
    # SQLite, 10-15% of a short epoch; every few seconds keeps the MLflow UI live at a fraction of that.
    FLUSH_SECONDS = 5.0

    def log_epoch(self, m: EpochMetrics) -> None:
        metrics = {self.metric.val: m.val_metric, "sparsity": m.sparsity, "flops_ratio": m.flops_ratio,
                   "expected_density": m.expected_density, "train_task_loss": m.train_task_loss,
                   "train_penalty": m.train_penalty}
        if m.target_sparsity is not None:  # a target study: where the target stood, and the lambda it acted as
            metrics.update(target_sparsity=m.target_sparsity, effective_lambda=m.effective_lambda)
        self._pending += [mlflow.entities.Metric(k, float(v), _now_ms(), m.epoch) for k, v in metrics.items()]
        self._last_epoch = (m.epoch, {k: float(v) for k, v in metrics.items()})
        if time.monotonic() - self._flushed >= self.FLUSH_SECONDS:
            self.flush()

    def flush(self) -> None:
        """Send the buffered epoch metrics (log_batch takes at most 1000 metrics a call)."""
        while self._pending:
            self.client.log_batch(self.run_id, metrics=self._pending[:1000])
            self._pending = self._pending[1000:]
        self._flushed = time.monotonic()

    def finish(self, result: TrialResult, small: torch.nn.Module | None, alphas: dict[str, list[float]], hist: dict,
               latency: dict | None = None) -> None:
        """Final metrics, the log_alpha values (``alphas``: gate -> values) and their histogram (``hist``, from
        :func:`log_alpha_histogram`), the kept units, the measured latencies (``latency``: sweeps.latency.figures)
        and, given ``small`` (the compacted model), the model: ``model`` (an nn.Module for
        ``mlflow.pytorch.load_model``) and the gated state ``l0sweep export`` rebuilds it from."""
        self.flush()
        step = result.epochs[-1].epoch if result.epochs else 0
        # The last epoch evaluated the final model (train_trial takes its figures from it): a final figure equal to
        # what that epoch logged is not logged again at its step, which made every such history end [..., 10, 10].
        last = self._last_epoch[1] if self._last_epoch[0] == step else {}
        final = {self.metric.val: result.val_metric, self.metric.test: result.test_metric,
                 "sparsity": result.sparsity, "flops_ratio": result.flops_ratio,
                 "total_params": result.total_params, "removed_params": result.removed_params}
        if result.chance_accuracy is not None:  # classification accuracy only
            final["chance_accuracy"] = result.chance_accuracy
        if result.target_sparsity is not None:
            final.update(target_sparsity=result.target_sparsity, effective_lambda=result.effective_lambda,
                         target_miss=result.sparsity - result.target_sparsity)
            if result.exact_target is not None:
                final.update({f"exact_{k}": v for k, v in result.exact_target.items()})
            if result.gates_decided is not None:
                final.update({f"decided_{k}": v for k, v in result.gates_decided.items()})
        for runtime, by_batch in (latency or {}).items():
            for batch, f in by_batch.items():
                final.update({f"latency_{runtime}_b{batch}_{k}": f[k] for k in ("compact_ms", "dense_ms", "speedup")})
        self.client.log_batch(self.run_id, metrics=[
            mlflow.entities.Metric(k, float(v), _now_ms(), step) for k, v in final.items() if last.get(k) != float(v)])
        self.client.log_dict(self.run_id, result.kept_units, "kept_units.json")
        if latency:
            self.client.log_dict(self.run_id, latency, "latency.json")
        if result.model is not None:
            self.client.log_dict(self.run_id, {k: [round(x, 3) for x in v] for k, v in alphas.items()},
                                 "log_alpha.json")
            png = log_alpha_histogram_png(hist)
            if png is not None:
                self.client.log_image(self.run_id, png, "log_alpha_hist.png")
            if small is not None:
                self._log_model(result, small)
        self.end("FINISHED")

    def _log_model(self, result: TrialResult, small: torch.nn.Module) -> None:
        import tempfile

        import torch

        from .deploy import GATED_ARTIFACT, gated_state  # torch and the models load only where a model is logged

        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / GATED_ARTIFACT
            torch.save(gated_state(result.model, result.example_inputs), path)
            self.client.log_artifact(self.run_id, str(path))
        mlflow.set_tracking_uri(self.tracking_uri)
        with mlflow.start_run(run_id=self.run_id):
            # Pickled, not MLflow's default pt2: load_model then returns the nn.Module itself, whose eval() and
            # train() work (a torch.export program's module() raises on them). The package pins keep inference of
            # requirements off; compact() has already checked the small model against the gated one.
            mlflow.pytorch.log_model(small.cpu().eval(), name="model", serialization_format="pickle",
                                     pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"])

    def end(self, status: str) -> None:
        try:
            self.flush()  # a stopped or failed trial keeps the epochs it trained
        finally:
            self.client.set_terminated(self.run_id, status)


def _now_ms() -> int:
    return int(time.time() * 1000)


def log_alpha_by_gate(model: torch.nn.Module) -> dict[str, list[float]]:
    """Every gate's log_alpha values, by gate name."""
    import l0core

    return {name: gate.log_alpha.detach().flatten().cpu().tolist() for name, gate in l0core.gates(model)}


def log_alpha_histogram(alphas: dict[str, list[float]],
                        edges: Sequence[float] = tuple(x / 2 for x in range(-20, 21))) -> dict:
    """Counts of each gate's log_alpha on fixed bins (values beyond the edges go to the end bins)."""
    import numpy as np

    counts_by_gate = {}
    for name, values in alphas.items():
        clipped = np.clip(values, edges[0], edges[-1])
        counts_by_gate[name.removesuffix(".l0_gate")] = np.histogram(clipped, bins=edges)[0].tolist()
    return {"edges": list(edges), "counts": counts_by_gate}


@functools.cache  # one figure per process, redrawn for each trial: building the axes and ticks was half the time
def _histogram_canvas() -> tuple[Any, Any]:
    from matplotlib.figure import Figure  # no pyplot: no global figure registry, no GUI backend

    fig = Figure(figsize=(6, 3.5), dpi=80)
    ax = fig.add_subplot()
    ax.axvline(0.0, color="k", lw=0.5)
    ax.set_xlabel("log_alpha")
    ax.set_ylabel("units")
    fig.subplots_adjust(left=0.11, right=0.98, top=0.96, bottom=0.15)
    return fig, ax


def log_alpha_histogram_png(hist: dict) -> Any:
    """A PIL image of a :func:`log_alpha_histogram` (None without matplotlib, or with no gates)."""
    try:
        from PIL import Image

        fig, ax = _histogram_canvas()
    except ImportError:
        return None
    if not hist["counts"]:
        return None
    ax.set_prop_cycle(None)  # the same colours for the same gates, trial after trial
    # Counts drawn as stairs, with a fixed layout: a third of the time of ax.hist + tight_layout.
    drawn = [ax.stairs(counts, hist["edges"], fill=True, alpha=0.5, label=name)
             for name, counts in hist["counts"].items()]
    if len(hist["counts"]) <= 12:
        drawn.append(ax.legend(fontsize=6))
    ax.relim()
    ax.autoscale_view()
    buf = io.BytesIO()
    try:
        fig.savefig(buf, format="png")
    finally:
        for artist in drawn:
            artist.remove()
    buf.seek(0)
    return Image.open(buf)


def end_run_of(trial: optuna.trial.FrozenTrial, tracking_uri: str, status: str = "KILLED") -> None:
    """Close the MLflow run of a trial whose worker died (it was left RUNNING)."""
    run_id = TrialRecord.read(trial).mlflow_run_id
    if run_id:
        client = MlflowClient(tracking_uri)
        if client.get_run(run_id).info.status == RunStatus.to_string(RunStatus.RUNNING):
            client.set_terminated(run_id, status)


def worker_tag() -> str:
    """The worker running a trial, as its record names it: ``host:pid``."""
    return f"{socket.gethostname()}:{os.getpid()}"


@functools.cache  # fixed for the process's life; orphan checks ask once per RUNNING trial, every poll
def pid_space() -> str:
    """Where this process's pid is valid: ``BOOT_ID/pid:[NAMESPACE]`` on Linux, "" elsewhere. Containers that share
    a host name (host networking) have pid namespaces of their own, and a reboot starts the pids over."""
    try:
        return f"{Path('/proc/sys/kernel/random/boot_id').read_text().strip()}/{os.readlink('/proc/self/ns/pid')}"
    except OSError:
        return ""
