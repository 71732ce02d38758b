"""Optuna sweeps of L0 training: study specs, workers, trial training, MLflow logging, the l0sweep CLI."""
