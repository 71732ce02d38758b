"""The search space of a study and its sampler: Optuna suggestions turned into one trial's ``TrialConfig``.

The sampler's parameter names are ``lam`` (or ``target_sparsity``), ``droprate_init``, ``mode`` and the dotted
``search.params`` paths; when a study gives one of the first two a range per mode, the names are ``lam_scratch`` /
``lam_finetune`` so that the sampler models the two ranges separately. Whatever the names, the values a trial
used are kept on the trial as ``user_attrs["lam"]`` (or ``["target_sparsity"]``), ``["droprate_init"]``,
``["mode"]``.
"""
from __future__ import annotations

from typing import Any, Callable

import numpy as np
import optuna
from optuna.distributions import BaseDistribution
from optuna.trial import FrozenTrial, TrialState

from .config import TrialConfig
from .spec import Choices, Param, Range, StudySpec

def _searched(spec: StudySpec) -> tuple[str, str]:
    """The searched fields besides mode: lam or target_sparsity, and droprate_init."""
    return spec.search.size_field, "droprate_init"


def _suggest(trial: optuna.Trial, name: str, param: Param) -> Any:
    if isinstance(param, Range):
        return trial.suggest_float(name, param.low, param.high, log=param.log)
    if isinstance(param, Choices):
        return trial.suggest_categorical(name, param.choices)
    return param  # fixed


def _per_mode(value: Any, mode: str) -> Param:
    return value[mode] if isinstance(value, dict) else value


def _sampler_name(spec: StudySpec, field: str, mode: str) -> str:
    return f"{field}_{mode}" if isinstance(getattr(spec.search, field), dict) else field


def suggest(trial: optuna.Trial, spec: StudySpec) -> tuple[TrialConfig, dict[str, Any]]:
    """Ask the sampler for this trial's values; return its TrialConfig and the values (lam or target_sparsity,
    droprate_init, mode, dotted paths)."""
    modes = spec.search.mode
    mode = trial.suggest_categorical("mode", modes) if len(modes) > 1 else modes[0]
    values: dict[str, Any] = {"mode": mode}
    for field in _searched(spec):
        values[field] = _suggest(trial, _sampler_name(spec, field, mode), _per_mode(getattr(spec.search, field), mode))
    for path, param in spec.search.params.items():
        values[path] = _suggest(trial, path, param)
    return trial_config(spec, values), values


def trial_config(spec: StudySpec, values: dict[str, Any]) -> TrialConfig:
    """The study's fixed trial settings with ``values`` (lam or target_sparsity, droprate_init, mode, dotted
    paths) applied."""
    data = spec.trial.model_dump()
    for key, value in values.items():
        node = data
        *parents, leaf = key.split(".")
        for part in parents:
            node = node[part]
        node[leaf] = value
    return TrialConfig.model_validate(data)


def first_point(spec: StudySpec) -> dict[str, Any]:
    """The values of one trial the study would run: its first starting point, completed with each range's low
    end (or first choice). Enough to check, before a sweep starts, that a trial's model fits its data."""
    point = spec.enqueue[0] if spec.enqueue else {}
    mode = str(point.get("mode", spec.search.mode[0]))

    def example(param: Param) -> Any:
        return param.low if isinstance(param, Range) else param.choices[0] if isinstance(param, Choices) else param

    values: dict[str, Any] = {"mode": mode}
    for field in _searched(spec):
        values[field] = point.get(field, example(_per_mode(getattr(spec.search, field), mode)))
    for path, param in spec.search.params.items():
        values[path] = point.get(path, example(param))
    return values


def starting_point(spec: StudySpec, point: dict[str, Any]) -> dict[str, Any]:
    """A study file's ``enqueue`` entry in the sampler's parameter names (for ``study.enqueue_trial``)."""
    modes = spec.search.mode
    mode = point.get("mode", modes[0])
    params: dict[str, Any] = {"mode": mode} if len(modes) > 1 else {}
    for field in _searched(spec):
        if field in point and not isinstance(_per_mode(getattr(spec.search, field), mode), (int, float)):
            params[_sampler_name(spec, field, mode)] = point[field]
    for path in spec.search.params:
        if path in point:
            params[path] = point[path]
    return params


class SeededPerTrial(optuna.samplers.BaseSampler):
    """An Optuna sampler made afresh for each trial, seeded with (study seed, trial number).

    Trial numbers are unique in a study whichever worker, machine or launch asks for one, so no two trials
    share random draws: parallel workers, and the workers of a resumed sweep, do not propose the trials
    proposed before (per-process seeds replayed them), and trial n's start-up draws are the same in every run
    of a study file. Between trials the wrapped samplers (TPE, NSGA-II) keep no state but their generator.

    >>> sampler = SeededPerTrial(lambda seed: optuna.samplers.RandomSampler(seed=seed), seed=0)
    >>> study = optuna.create_study(sampler=sampler)
    >>> study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=2)
    >>> study.trials[0].params != study.trials[1].params
    True
    """

    def __init__(self, make: Callable[[int], optuna.samplers.BaseSampler], seed: int) -> None:
        self._make, self._seed = make, seed
        self._sampler = make(seed)

    def before_trial(self, study: optuna.Study, trial: FrozenTrial) -> None:
        seed = int(np.random.SeedSequence([self._seed, trial.number]).generate_state(1)[0])
        self._sampler = self._make(seed)
        self._sampler.before_trial(study, trial)

    def infer_relative_search_space(self, study: optuna.Study, trial: FrozenTrial) -> dict[str, BaseDistribution]:
        return self._sampler.infer_relative_search_space(study, trial)

    def sample_relative(self, study: optuna.Study, trial: FrozenTrial,
                        search_space: dict[str, BaseDistribution]) -> dict[str, Any]:
        return self._sampler.sample_relative(study, trial, search_space)

    def sample_independent(self, study: optuna.Study, trial: FrozenTrial, param_name: str,
                           param_distribution: BaseDistribution) -> Any:
        return self._sampler.sample_independent(study, trial, param_name, param_distribution)

    def after_trial(self, study: optuna.Study, trial: FrozenTrial, state: TrialState,
                    values: list[float] | None) -> None:
        self._sampler.after_trial(study, trial, state, values)

    def reseed_rng(self) -> None:
        self._sampler.reseed_rng()


def make_sampler(spec: StudySpec) -> optuna.samplers.BaseSampler:
    """The study file's sampler (TPE or NSGA-II), its draws seeded per trial (:class:`SeededPerTrial`)."""
    s = spec.sampler

    def make(seed: int) -> optuna.samplers.BaseSampler:
        if s.name == "nsgaii":
            return optuna.samplers.NSGAIISampler(population_size=s.population_size, seed=seed)
        return optuna.samplers.TPESampler(n_startup_trials=s.n_startup_trials, seed=seed)

    return SeededPerTrial(make, s.seed)
