"""Optuna sweeps of L0 training: study specs, workers, trial training, MLflow logging, the l0sweep CLI.

``sweeps.run(study, workers=2)`` runs a sweep from Python as ``l0sweep run`` does; ``sweeps.load(name)`` reads
its trials and front back. Importing ``sweeps`` alone stays light: the API loads on first use.
"""
from typing import Any

__all__ = ["run", "load"]


def __getattr__(name: str) -> Any:
    # Workers and the CLI import sweeps.* submodules; the API pulls in the launcher, MLflow and plotly,
    # which only a caller of run/load needs.
    if name in ("run", "load"):
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'sweeps' has no attribute {name!r}")
