import os
import sys

import pytest
import torch

# A user's shell may point l0sweep at shared stores; the tests make their own, in temp dirs.
for _var in ("L0SWEEP_STORAGE", "L0SWEEP_OUT", "L0SWEEP_DATA_DIR", "MLFLOW_TRACKING_URI"):
    os.environ.pop(_var, None)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(autouse=True)
def _no_leaked_tracking_uri():
    """mlflow.set_tracking_uri also exports MLFLOW_TRACKING_URI, which the CLI (and so every later test's
    subprocess) would take as its default: undo it after each test."""
    yield
    if "mlflow" in sys.modules:
        sys.modules["mlflow"].set_tracking_uri(None)
    os.environ.pop("MLFLOW_TRACKING_URI", None)
