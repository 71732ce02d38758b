"""Pareto-aware early stopping: epochs trained and final-front hypervolume, with and without.

Runs the same study (same sampler seed, same budget of complete trials) twice through ``l0sweep run``, once
with ``early_stopping.enabled`` false and once true, and compares the epochs trained over all trials and the
hypervolume of the final (val accuracy, sparsity) front (reference point (0, 0)).

Stopped trials do not count towards the budget, so the 'on' run trains extra trials and may train more epochs
in all. The fair comparisons are therefore also printed: the 'on' run's hypervolume once it had trained as
many epochs as the whole 'off' run, and the epochs it took to reach the 'off' run's final hypervolume.

    python -m benchmarks.early_stopping [--study studies/default.yaml] [--epochs E] [--trials 16] [--workers 1]
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import yaml
from optuna.trial import TrialState

from benchmarks.results import append, timed_sweep
from dashboards import hypervolume_history


def _curve(study) -> list[tuple[int, float]]:
    """(epochs trained so far, front hypervolume so far) after each finished trial, in trial order (with
    one worker, the order they finished in)."""
    hv_after = dict(zip(*(hypervolume_history(study)[c] for c in ("trial", "hypervolume"))))
    finished = sorted(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)),
                      key=lambda t: t.number)
    curve, epochs, hv = [], 0, 0.0
    for t in finished:
        epochs += len(t.user_attrs.get("history", []))
        hv = hv_after.get(t.number, hv)
        curve.append((epochs, hv))
    return curve


def _hv_at(curve: list[tuple[int, float]], epochs: int) -> float:
    """Hypervolume reached within ``epochs`` epochs of training."""
    return max([hv for e, hv in curve if e <= epochs], default=0.0)


def _epochs_to(curve: list[tuple[int, float]], hv: float) -> int | None:
    """Epochs trained until the hypervolume first reached ``hv`` (None: never)."""
    return next((e for e, h in curve if h >= hv - 1e-12), None)


def one(study_file: Path, enabled: bool, trials: int, workers: int, tmp: Path, epochs: int | None) -> dict:
    data = yaml.safe_load(study_file.read_text())
    data["early_stopping"] = {**data.get("early_stopping", {}), "enabled": enabled}
    if epochs:
        data["trial"]["optim"]["epochs"] = epochs
    path = tmp / f"es-{enabled}.yaml"
    path.write_text(yaml.safe_dump(data))
    wall, study = timed_sweep(path, tmp / f"out-{enabled}", "--trials", str(trials), "--workers", str(workers))
    finished = study.get_trials(states=(TrialState.COMPLETE, TrialState.PRUNED))
    epochs = sum(len(t.user_attrs.get("history", [])) for t in finished)
    pruned = sum(t.state == TrialState.PRUNED for t in finished)
    hv = hypervolume_history(study).hypervolume.iloc[-1]
    return {"enabled": enabled, "epochs": epochs, "pruned": pruned, "hv": float(hv), "wall": wall,
            "complete": len(finished) - pruned, "curve": _curve(study)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--study", type=Path, default=Path("studies/default.yaml"))
    parser.add_argument("--epochs", type=int, default=None,
                        help="epochs per trial (default: the study's); stopping can save at most epochs - warmup")
    parser.add_argument("--trials", type=int, default=16)
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        results = [one(args.study, enabled, args.trials, args.workers, Path(tmp), args.epochs)
                   for enabled in (False, True)]
    off, on = results
    rows = [["off", off["complete"], off["pruned"], off["epochs"], off["hv"], off["wall"]],
            ["on", on["complete"], on["pruned"], on["epochs"], on["hv"], on["wall"]]]
    reached = _epochs_to(on["curve"], off["hv"])
    notes = (f"Epochs saved per complete trial: {(off['epochs'] / off['complete'] - on['epochs'] / on['complete']):.2f}; "
             f"total epochs on/off {on['epochs'] / off['epochs']:.2f}; hypervolume on/off {on['hv'] / off['hv']:.3f}. "
             "Stopped trials do not count towards the budget, so 'on' trains extra trials to reach it. "
             f"At equal training ({off['epochs']} epochs, the whole 'off' run) 'on' had reached hypervolume "
             f"{_hv_at(on['curve'], off['epochs']):.3f} (off: {off['hv']:.3f}); it reached the 'off' run's final "
             "hypervolume " + (f"after {reached} epochs ({reached / off['epochs']:.2f} of 'off')." if reached
                               else "never."))
    epochs = f" --epochs {args.epochs}" if args.epochs else ""
    print(append(f"Pareto-aware early stopping ({args.study.name}{f', {args.epochs} epochs' if args.epochs else ''}, "
                 f"{args.trials} complete trials, {args.workers} worker(s))",
                 f"python -m benchmarks.early_stopping --study {args.study}{epochs} --trials {args.trials} "
                 f"--workers {args.workers}",
                 ["early stopping", "complete", "stopped early", "epochs trained", "final hypervolume", "wall s"],
                 rows, notes))


if __name__ == "__main__":
    main()
