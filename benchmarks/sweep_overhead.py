"""The sweep's own cost: wall time of a small sweep against the bare training of its trials, and the
throughput of two workers against one.

    python -m benchmarks.sweep_overhead [--study studies/default.yaml] [--trials 8] [--epochs 40]

1. ``l0sweep run --workers 1 --threads 1`` (everything a user waits for: process start, study creation, the
   dense baseline, every trial with its MLflow logging and model export, the report). Then the same trials'
   bare training, in this process with one thread: the dense baseline once plus ``train_trial`` for each
   complete trial's configuration. Goal: sweep wall / bare sum <= 1.05.
2. The same study with ``--workers 2 --threads 1``: complete trials per second, two workers / one.
   Goal >= 1.7.
Early stopping is off, so both runs train the same number of epochs per trial.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import optuna
import torch
import yaml
from optuna.trial import TrialState

from benchmarks.results import append
from sweeps.search import trial_config
from sweeps.spec import load_spec
from sweeps.storage import open_storage
from sweeps.training import dense_baseline, train_trial


def _sweep(study_file: Path, trials: int, workers: int, out: Path) -> tuple[float, list]:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "sweeps.cli", "run", str(study_file), "--trials", str(trials),
                    "--workers", str(workers), "--threads", "1", "--out", str(out)], check=True,
                   stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - start
    name = yaml.safe_load(study_file.read_text())["name"]
    study = optuna.load_study(study_name=name, storage=open_storage(str(out / "optuna.journal")))
    return wall, study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))


def _bare(study_file: Path, complete: list, tmp: Path) -> tuple[float, float]:
    """Seconds of (dense baseline, sum of the trials' training), one thread, nothing logged."""
    torch.set_num_threads(1)
    spec = load_spec(study_file)
    configs = [trial_config(spec, {k: t.user_attrs[k] for k in ("lam", "droprate_init", "mode")}).model_copy(
        update={"baseline_dir": str(tmp / "bare-baselines"), "threads": 1}) for t in complete]
    start = time.perf_counter()
    dense_baseline(configs[0])
    baseline = time.perf_counter() - start
    start = time.perf_counter()
    for cfg in configs:
        train_trial(cfg)
    return baseline, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--study", type=Path, default=Path("studies/default.yaml"))
    parser.add_argument("--trials", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=40, help="epochs per trial (longer trials, smaller fixed costs)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        data = yaml.safe_load(args.study.read_text())
        data["early_stopping"] = {**data.get("early_stopping", {}), "enabled": False}
        data["trial"]["optim"]["epochs"] = args.epochs
        study_file = tmp / "study.yaml"
        study_file.write_text(yaml.safe_dump(data))
        wall1, complete1 = _sweep(study_file, args.trials, 1, tmp / "one")
        wall2, complete2 = _sweep(study_file, args.trials, 2, tmp / "two")
        baseline, trials = _bare(study_file, complete1, tmp)
    bare = baseline + trials
    tput1, tput2 = len(complete1) / wall1, len(complete2) / wall2
    rows = [["1 worker sweep / bare training", f"{wall1:.1f} s / {bare:.1f} s", wall1 / bare, "<= 1.05",
             "yes" if wall1 / bare <= 1.05 else "no"],
            ["throughput 2 workers / 1", f"{tput2 * 60:.2f} / {tput1 * 60:.2f} trials/min", tput2 / tput1, ">= 1.7",
             "yes" if tput2 / tput1 >= 1.7 else "no"]]
    notes = (f"{len(complete1)} and {len(complete2)} complete trials of {args.study.name} at {args.epochs} epochs, "
             f"early stopping off, one thread per worker. Bare: dense baseline {baseline:.1f} s + "
             f"{len(complete1)} trials {trials:.1f} s (mean {trials / len(complete1):.1f} s). "
             f"Sweep overhead {wall1 - bare:.1f} s in all: process start-up, storage, MLflow logging, model export, "
             "report.")
    print(append(f"Sweep overhead ({args.study.name})", f"python -m benchmarks.sweep_overhead --study {args.study} "
                 f"--trials {args.trials} --epochs {args.epochs}",
                 ["measure", "values", "ratio", "goal", "goal met"], rows, notes))


if __name__ == "__main__":
    main()
