"""From a sweep to files a user ships: `l0sweep export` after `l0sweep run` of the default study, the files
loaded in fresh processes with a clean environment, pick's load line pasted into a fresh shell, bad input."""
from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import optuna
import pytest
import torch
from mlflow.tracking import MlflowClient

from sweeps.models import build_model
from sweeps.storage import open_storage
from tests.sweep_helpers import TINY, l0sweep, write_study

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]


def _clean_env(home: Path, **extra: str) -> dict[str, str]:
    """What a fresh shell has: a PATH with this Python, a HOME; no tracking URI, no l0sweep settings."""
    return {"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin", "HOME": str(home), **extra}


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    """The default study, three trials (its two starting points and one sampled), on the embedded stores."""
    out = tmp_path_factory.mktemp("sweep") / "out"
    result = l0sweep("run", ROOT / "studies" / "default.yaml", "--trials", "3", "--out", out, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    study = optuna.load_study(study_name="digits-mlp", storage=open_storage(str(out / "optuna.journal")))
    return out, study


def _gated(out: Path, trial: optuna.trial.FrozenTrial) -> torch.nn.Module:
    """The trial's gated model, rebuilt here from its logged state (state dict and shapes)."""
    tracking = f"sqlite:///{out.resolve() / 'mlflow.db'}"
    path = MlflowClient(tracking).download_artifacts(trial.user_attrs["mlflow_run_id"], "gated.pt", str(out.parent))
    saved = torch.load(path, weights_only=True)
    model = build_model("mlp", tuple(saved["input_shape"]), saved["num_classes"], gates=True,
                        droprate_init=trial.user_attrs["droprate_init"])
    model.load_state_dict(saved["state_dict"])
    return model.eval()


def _same(expected: np.ndarray, actual: np.ndarray) -> None:
    scale = max(1.0, float(np.abs(expected).max()))
    assert actual.shape == expected.shape and float(np.abs(expected - actual).max()) <= 1e-5 * scale


LOAD = """
import sys, numpy as np
x = np.load("x.npy")
if sys.argv[1] == "pt2":
    import torch
    out = torch.export.load("model.pt2").module()(torch.from_numpy(x)).detach().numpy()
else:
    import onnxruntime as ort
    out = ort.InferenceSession("model.onnx").run(None, {"input": x})[0]
assert "sweeps" not in sys.modules and "l0core" not in sys.modules
np.save(f"out-{sys.argv[1]}.npy", out)
"""


def test_export_writes_files_that_load_in_a_fresh_process_and_compute_the_gated_models_outputs(swept, tmp_path):
    out, study = swept
    to = tmp_path / "deploy"
    result = l0sweep("export", "digits-mlp", "--out", out, "--to", to)
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(p.name for p in to.iterdir()) == ["README.md", "metrics.json", "model.onnx", "model.pt2"]
    metrics = json.loads((to / "metrics.json").read_text())
    picked = l0sweep("pick", "digits-mlp", "--out", out)
    assert f"trial {metrics['trial']} of study 'digits-mlp'" in picked.stdout  # the recommended trial, as pick says
    trial = study.trials[metrics["trial"]]
    assert metrics["lambda"] == trial.user_attrs["lam"] and metrics["mode"] == trial.user_attrs["mode"]
    assert metrics["val_accuracy"] == trial.values[0] and metrics["sparsity"] == pytest.approx(trial.values[1])
    assert metrics["flops"]["exported"] < metrics["flops"]["dense"]
    assert set(metrics["kept_units"]) == {"1", "3", "5"}
    for runtime in ("torch", "onnxruntime"):
        for batch in ("1", "64"):  # batch 1 and the study's batch size
            f = metrics["latency"][runtime][batch]
            assert f["compact_ms"] > 0 and f["dense_ms"] > 0 and f["speedup"] == pytest.approx(
                f["dense_ms"] / f["compact_ms"])
    # A fresh process, clean environment, nothing of l0sweep importable: each form against the gated model.
    x = torch.rand(7, 1, 8, 8)
    with torch.no_grad():
        expected = _gated(out, trial)(x).numpy()
    np.save(to / "x.npy", x.numpy())
    for form in ("pt2", "onnx"):
        run = subprocess.run([sys.executable, "-c", LOAD, form], cwd=to, env=_clean_env(tmp_path),
                             capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stderr[-2000:]
        _same(expected, np.load(to / f"out-{form}.npy"))
    # The README's three lines run as written, in the folder, in a clean environment.
    lines = [line.strip() for line in (to / "README.md").read_text().splitlines() if line.strip().startswith("python -c")]
    assert len(lines) == 3
    for line in lines:
        run = subprocess.run(shlex.split(line), cwd=to, env=_clean_env(tmp_path), capture_output=True, text=True,
                             timeout=300)
        assert run.returncode == 0, (line, run.stderr[-2000:])

    # --force replaces the files; --round-to 8 keeps the hidden widths multiples of 8, outputs unchanged.
    again = l0sweep("export", "digits-mlp", "--out", out, "--to", to, "--force", "--round-to", "8",
                    "--trial", str(trial.number))
    assert again.returncode == 0, again.stderr[-3000:]
    program = torch.export.load(to / "model.pt2")
    widths = [v.shape[0] for k, v in program.state_dict.items() if k.endswith("weight")][:-1]
    assert widths and all(w % 8 == 0 for w in widths), widths
    assert json.loads((to / "metrics.json").read_text())["round_to"] == 8
    _same(expected, program.module()(x).detach().numpy())


def test_picks_load_line_works_in_a_fresh_shell_and_leaves_no_files(swept, tmp_path):
    out, study = swept
    picked = l0sweep("pick", "digits-mlp", "--out", out)
    assert picked.returncode == 0, picked.stderr
    line = next(line.strip() for line in picked.stdout.splitlines() if "load_model" in line)
    here = tmp_path / "shell"
    here.mkdir()
    # The module is printed and .eval() works on it: an nn.Module, not a torch.export GraphModule.
    run = subprocess.run(["bash", "-c", line], cwd=here, capture_output=True, text=True, timeout=300,
                         env=_clean_env(tmp_path / "home", PYTHONPATH=str(ROOT)))  # the pickled class's package
    assert run.returncode == 0, run.stderr[-2000:]
    assert "Linear(in_features=64" in run.stdout
    assert list(here.iterdir()) == []  # no ./mlflow.db, no downloaded artifacts


def _fails_in_one_line(result: subprocess.CompletedProcess, expected: str) -> None:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode != 0 and len(lines) == 1, result.stderr
    assert expected in lines[0], lines[0]


@pytest.mark.parametrize("case", ["unknown-study", "unknown-trial", "round-to-0", "not-empty"])
def test_bad_export_requests_are_one_line_and_write_nothing(case, swept, tmp_path):
    out, study = swept
    to = tmp_path / "deploy"
    args, expected = {
        "unknown-study": (["no-such-study"], "study 'no-such-study' does not exist"),
        "unknown-trial": (["digits-mlp", "--trial", "99"], "study 'digits-mlp' has no trial 99"),
        "round-to-0": (["digits-mlp", "--round-to", "0"], "--round-to must be at least 1, got 0"),
        "not-empty": (["digits-mlp"], "exists and is not empty (give --force"),
    }[case]
    if case == "not-empty":
        to.mkdir()
        (to / "mine.txt").write_text("keep me")
    result = l0sweep("export", *args, "--out", out, "--to", to)
    _fails_in_one_line(result, expected)
    assert (not to.exists()) if case != "not-empty" else sorted(os.listdir(to)) == ["mine.txt"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".deploy")]  # no temporary folder left


def test_a_trial_short_of_the_floor_or_without_a_logged_model_is_not_exported(tmp_path):
    """Two trials, no models logged: one collapsed (every gate closed, below the accuracy floor), one healthy."""
    trial = {**TINY["trial"], "optim": {**TINY["trial"]["optim"], "gate_lr": 0.2, "epochs": 6}}
    study_file = write_study(tmp_path / "tiny.yaml", trial=trial, trials=2,
                             enqueue=[{"lam": 100.0, "mode": "scratch"}, {"lam": 0.001, "mode": "scratch"}],
                             search={**TINY["search"], "mode": ["scratch"], "droprate_init": 0.5,
                                     "lam": {"low": 1e-3, "high": 1e3, "log": True}},
                             mlflow={"log_models": "none"})
    out = tmp_path / "out"
    assert l0sweep("run", study_file, "--out", out).returncode == 0
    study = optuna.load_study(study_name="tiny", storage=open_storage(str(out / "optuna.journal")))
    by_lam = {t.user_attrs["lam"]: t.number for t in study.trials}
    floor = l0sweep("export", study_file, "--trial", by_lam[100.0], "--out", out, "--to", tmp_path / "deploy")
    _fails_in_one_line(floor, f"trial {by_lam[100.0]} is short of the accuracy floor")
    assert re.search(r"validation accuracy 0\.\d+, floor 0\.\d+", floor.stderr)
    unlogged = l0sweep("export", "tiny", "--out", out, "--to", tmp_path / "deploy")  # the healthy one, as pick chooses
    _fails_in_one_line(unlogged, f"trial {by_lam[0.001]}'s model was not logged")
    assert "set 'mlflow: {log_models: all}' in the study file" in unlogged.stderr
    assert not (tmp_path / "deploy").exists()


def test_latency_as_an_objective_makes_the_front_measured_speed(tmp_path):
    """objectives: [accuracy, latency]: every trial times its compacted model, the second objective is the
    measured speed-up at the study's latency batch size, and the report plots accuracy against it and says how
    noisy the timings were."""
    study_file = write_study(tmp_path / "tiny.yaml", trials=2, objectives=["accuracy", "latency"],
                             latency={"batch_size": 32, "runtime": "torch", "budget_seconds": 0.05})
    out = tmp_path / "out"
    result = l0sweep("run", study_file, "--out", out)
    assert result.returncode == 0, result.stderr[-3000:]
    study = optuna.load_study(study_name="tiny", storage=open_storage(str(out / "optuna.journal")))
    complete = study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    assert study.metric_names == ["val_accuracy", "speedup"]
    for t in complete:
        figures = t.user_attrs["latency"]["torch"]
        assert set(figures) == {"1", "32"}
        assert t.values[1] == pytest.approx(figures["32"]["dense_ms"] / figures["32"]["compact_ms"])
        assert 0 < t.user_attrs["latency_seconds"] < t.duration.total_seconds()
        assert 0 <= t.user_attrs["sparsity"] <= 1
    page = (out / "reports" / "tiny" / "report.html").read_text()
    assert "Validation accuracy against measured speed-up" in page and "Noise (interquartile range / median" in page
    assert "Hypervolume of the (val accuracy, speed-up) front" in page  # of the objectives the study has
    picked = l0sweep("pick", "tiny", "--out", out)
    assert picked.returncode == 0 and "latency        torch batch 32 (cpu)" in picked.stdout, picked.stderr
