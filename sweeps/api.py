"""The Python entry to a sweep: what ``l0sweep run`` does, from a notebook or a script (a sweep takes seconds
to minutes, so the example is not a doctest; tests/test_your_model.py runs it)::

    import sweeps
    study = sweeps.run("studies/default.yaml", workers=2)
    table, front = sweeps.load("digits-mlp")
    front[["trial", "lam", "val_accuracy", "sparsity"]]

The one module of sweeps that imports dashboards (pyproject.toml's import contracts hold the rest of sweeps off
it): the CLI's ``run``, ``report``, ``pick`` and ``export`` come here for the report and the choice of a trial.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import optuna
import pandas as pd
import yaml

from dashboards import describe_pick, front_table, pick, trials_table, write_report

from .launcher import run_sweep
from .settings import default_tracking_uri, settings_from
from .spec import StudySpec, load_spec, parse_spec, resolve_study_paths
from .storage import open_storage
from .study import load_existing
from .tracking import log_report


def _study_file(study: str | Path | dict | StudySpec, out: Path) -> Path:
    """A study file for ``study``: the file itself, or one written under ``out/studies`` for a dict or a spec
    (whose relative paths are taken from the current folder, where the caller wrote them)."""
    if isinstance(study, (str, Path)):
        return Path(study)
    data = study.model_dump(mode="json") if isinstance(study, StudySpec) else resolve_study_paths(Path.cwd(), study)
    name = parse_spec(data, "study").name  # one clear error for a bad dict, before anything is written
    path = out / "studies" / f"{name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def _settings(out: str | Path, storage: str | None, tracking_uri: str | None):
    out = Path(out)
    return settings_from(storage or str((out / "optuna.journal").resolve()),
                         tracking_uri or default_tracking_uri(out), out)


def run(study: str | Path | dict[str, Any] | StudySpec, workers: int = 2, trials: int | None = None,
        out: str | Path = "l0sweep-out", storage: str | None = None, tracking_uri: str | None = None) -> optuna.Study:
    """Create or resume ``study`` (a study file, its contents as a dict, or a :class:`StudySpec`), run ``workers``
    local worker processes to its budget and write the report, as ``l0sweep run`` does; returns the Optuna study.

    Raises :class:`~sweeps.spec.SpecError` for a bad study and RuntimeError when the sweep did not finish.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    path = _study_file(study, out)
    spec = load_spec(path)
    settings = _settings(out, storage, tracking_uri)
    status = run_sweep(path, spec, settings, workers, trials, report=report)
    if status != 0:
        raise RuntimeError(f"the sweep of {spec.name!r} ended with status {status}: its workers' logs are in "
                           f"{out / 'logs'}")
    return load_existing(spec.name, open_storage(settings.storage))


def load(name: str, out: str | Path = "l0sweep-out", storage: str | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The trials of study ``name`` as a table, and its Pareto front (the report's tables)."""
    study = load_existing(name, open_storage(_settings(out, storage, None).storage))
    return trials_table(study), front_table(study)


def report(study: optuna.Study, out_dir: str | Path, tracking_uri: str | None = None,
           against: optuna.Study | None = None) -> Path:
    """Write the study's report into ``out_dir`` (``dashboards.write_report``; ``against``: another study whose
    front at an equal budget in epochs it states) and, given ``tracking_uri``, log it to the study's MLflow run;
    returns the HTML page's path."""
    path = write_report(study, out_dir, against)
    if tracking_uri:
        log_report(study, tracking_uri, Path(out_dir))
    return path


def chosen_trial(study: optuna.Study, max_drop: float | None = None, min_sparsity: float | None = None,
                 target: float | None = None) -> int:
    """The number of the front trial ``dashboards.pick`` chooses (the recommended one without a criterion)."""
    return int(pick(study, max_drop=max_drop, min_sparsity=min_sparsity, target=target).trial)


def describe_choice(study: optuna.Study, max_drop: float | None = None, min_sparsity: float | None = None,
                    target: float | None = None, tracking_uri: str | None = None) -> str:
    """What ``l0sweep pick`` prints: the chosen trial's values, metrics and where its model is."""
    choice = pick(study, max_drop=max_drop, min_sparsity=min_sparsity, target=target)
    return describe_pick(study, choice, tracking_uri)
