"""Pareto-aware early stopping: epochs trained and final-front hypervolume, with and without.

Runs the same study (same sampler seed, same budget of complete trials) twice through ``l0sweep run``, once
with ``early_stopping.enabled`` false and once true, and compares the epochs trained over all trials and the
hypervolume of the final (val accuracy, sparsity) front (reference point (0, 0)).

    python -m benchmarks.early_stopping [--study studies/default.yaml] [--trials 16] [--workers 1]
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import yaml
from optuna.trial import TrialState

from benchmarks.results import append, timed_sweep
from dashboards import hypervolume_history


def one(study_file: Path, enabled: bool, trials: int, workers: int, tmp: Path) -> dict:
    data = yaml.safe_load(study_file.read_text())
    data["early_stopping"] = {**data.get("early_stopping", {}), "enabled": enabled}
    path = tmp / f"es-{enabled}.yaml"
    path.write_text(yaml.safe_dump(data))
    wall, study = timed_sweep(path, tmp / f"out-{enabled}", "--trials", str(trials), "--workers", str(workers))
    finished = study.get_trials(states=(TrialState.COMPLETE, TrialState.PRUNED))
    epochs = sum(len(t.user_attrs.get("history", [])) for t in finished)
    pruned = sum(t.state == TrialState.PRUNED for t in finished)
    hv = hypervolume_history(study).hypervolume.iloc[-1]
    return {"enabled": enabled, "epochs": epochs, "pruned": pruned, "hv": float(hv), "wall": wall,
            "complete": len(finished) - pruned}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--study", type=Path, default=Path("studies/default.yaml"))
    parser.add_argument("--trials", type=int, default=16)
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        results = [one(args.study, enabled, args.trials, args.workers, Path(tmp)) for enabled in (False, True)]
    off, on = results
    rows = [["off", off["complete"], off["pruned"], off["epochs"], off["hv"], off["wall"]],
            ["on", on["complete"], on["pruned"], on["epochs"], on["hv"], on["wall"]]]
    notes = (f"Epochs saved per complete trial: {(off['epochs'] / off['complete'] - on['epochs'] / on['complete']):.2f}; "
             f"total epochs on/off {on['epochs'] / off['epochs']:.2f}; hypervolume on/off {on['hv'] / off['hv']:.3f}. "
             "Pruned trials do not count towards the budget, so 'on' trains extra trials to reach it.")
    print(append(f"Pareto-aware early stopping ({args.study.name}, {args.trials} complete trials, "
                 f"{args.workers} worker(s))",
                 f"python -m benchmarks.early_stopping --study {args.study} --trials {args.trials} "
                 f"--workers {args.workers}",
                 ["early stopping", "complete", "stopped early", "epochs trained", "final hypervolume", "wall s"],
                 rows, notes))


if __name__ == "__main__":
    main()
