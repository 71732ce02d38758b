"""Early stopping at an equal epoch budget: no stopping, ``dominance`` and MO-ASHA, over sampler seeds.

Every sweep of a setting gets the same budget in epochs (``budget.epochs`` = trials x epochs per trial; the
budget of complete trials set out of reach), so stopping can only spend what it saves on more trials. Per
method and seed, against the sweep without stopping of the same seed:

- epochs ratio: the epochs (stopped trials included) each sweep trained until its front's hypervolume first
  reached 0.99 of the lower of the two final hypervolumes, with stopping over without (below 1: stopping found
  as good a front sooner);
- final hypervolume of the (validation accuracy, sparsity) front, reference point (0, 0), at that equal budget;
- wall time, trials stopped, trials complete;
- how many stopped trials would have reached the front: each is trained again to its last epoch, in this process,
  with the values and seed it had (so as it would have gone on), and counts when its final (validation metric,
  second objective) is above its floor and dominated by no trial of the sweep's final front. At most ``--rerun``
  of them a sweep, a seeded random sample where more were stopped: MO-ASHA at 30 epochs stops hundreds of
  trials at its first rung, and training each to the end took longer than the sweeps.

    python -m benchmarks.early_stopping [--study studies/default.yaml] [--epochs E] [--trials 16] [--seeds 1 2 3 4]
        [--methods none dominance asha-3 asha-4] [--workers 1] [--rerun 24]
"""
from __future__ import annotations

import argparse
import random
import statistics
import tempfile
from pathlib import Path

import yaml
from optuna.trial import TrialState

from benchmarks.results import append, timed_sweep
from dashboards import hypervolume_history
from sweeps.deploy import trial_values
from sweeps.records import TrialRecord, dominated
from sweeps.search import trial_config
from sweeps.spec import load_spec
from sweeps.training import train_trial
from sweeps.worker import objective_points

METHODS = ("none", "dominance", "asha-3", "asha-4")


def _curve(study) -> list[tuple[int, float]]:
    """(epochs trained so far, front hypervolume so far) after each finished trial, in trial order (with
    one worker, the order they finished in)."""
    hv_after = dict(zip(*(hypervolume_history(study)[c] for c in ("trial", "hypervolume"))))
    finished = sorted(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)),
                      key=lambda t: t.number)
    curve, epochs, hv = [], 0, 0.0
    for t in finished:
        epochs += len(TrialRecord.read_history(t))
        hv = hv_after.get(t.number, hv)
        curve.append((epochs, hv))
    return curve


def _epochs_to(curve: list[tuple[int, float]], hv: float) -> int | None:
    """Epochs trained until the hypervolume first reached ``hv`` (None: never)."""
    return next((e for e, h in curve if h >= hv - 1e-12), None)


def _stopping(method: str, base: dict) -> dict:
    if method == "none":
        return {**base, "enabled": False}
    if method == "dominance":
        return {**base, "enabled": True, "method": "dominance"}
    return {**base, "enabled": True, "method": "asha", "eta": int(method.split("-")[1]), "min_epochs": 1}


def would_reach_front(study, study_file: Path, out: Path, most: int) -> tuple[int, int]:
    """(how many, of how many rerun) of ``study``'s stopped trials, trained to the end as they would have gone on,
    land on its final front (above their floor, dominated by none of its trials). At most ``most`` are rerun: a
    random sample, seeded, where more were stopped."""
    spec = load_spec(study_file)
    front, directions = study.best_trials, [d.name.lower() for d in study.directions]
    stopped = study.get_trials(deepcopy=False, states=(TrialState.PRUNED,))
    if len(stopped) > most:
        stopped = random.Random(0).sample(stopped, most)
    reached = 0
    for t in stopped:
        record = TrialRecord.read(t, spec.metric)
        searched = trial_values(t, spec.model_dump_json())  # the dotted paths too, as export rebuilds a trial
        cfg = trial_config(spec, searched).model_copy(update={"baseline_dir": str(out / "baselines")})
        result = train_trial(cfg)
        point = objective_points(spec, result)
        values = [point[name] for name in spec.metric_names]
        floor = record.metric_floor
        above = floor is None or spec.metric.sign * (result.val_metric - floor) >= 0
        reached += above and not dominated(values, front, directions)
    return reached, len(stopped)


def one(study_file: Path, method: str, seed: int, trials: int, workers: int, tmp: Path, epochs: int | None,
        rerun_most: int) -> dict:
    data = yaml.safe_load(study_file.read_text())
    if epochs:
        data["trial"]["optim"]["epochs"] = epochs
    per_trial = data["trial"]["optim"]["epochs"]
    data["early_stopping"] = _stopping(method, data.get("early_stopping", {}))
    data["sampler"] = {**data.get("sampler", {}), "seed": seed}
    data["budget"] = {"epochs": trials * per_trial}
    data["trials"] = 100 * trials  # out of reach: the epoch budget ends every sweep
    path = tmp / f"{method}-{seed}.yaml"
    path.write_text(yaml.safe_dump(data))
    wall, study = timed_sweep(path, tmp / f"out-{method}-{seed}", "--workers", str(workers))
    finished = study.get_trials(states=(TrialState.COMPLETE, TrialState.PRUNED))
    pruned = sum(t.state == TrialState.PRUNED for t in finished)
    history = hypervolume_history(study)
    reached, rerun = would_reach_front(study, path, tmp / f"out-{method}-{seed}", rerun_most)
    return {"method": method, "seed": seed, "epochs": sum(len(TrialRecord.read_history(t)) for t in finished),
            "pruned": pruned, "rerun": rerun, "reached": reached, "complete": len(finished) - pruned, "wall": wall,
            "curve": _curve(study), "hv": float(history.hypervolume.iloc[-1]) if len(history) else 0.0}


def compare(run: dict, base: dict) -> tuple[float | None, float]:
    """(epochs ratio to 0.99 of the lower final hypervolume, final hypervolume ratio) of ``run`` against the
    sweep without stopping of its seed."""
    target = 0.99 * min(run["hv"], base["hv"])
    mine, theirs = _epochs_to(run["curve"], target), _epochs_to(base["curve"], target)
    ratio = mine / theirs if mine is not None and theirs else None
    return ratio, (run["hv"] / base["hv"] if base["hv"] else float("nan"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--study", type=Path, default=Path("studies/default.yaml"))
    parser.add_argument("--epochs", type=int, default=None, help="epochs per trial (default: the study's)")
    parser.add_argument("--trials", type=int, default=16, help="the epoch budget, in trials' worth of epochs")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3, 4])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--rerun", type=int, default=24, help="stopped trials a sweep trained again to the end, at most")
    args = parser.parse_args()
    methods = ["none", *[m for m in args.methods if m != "none"]]
    with tempfile.TemporaryDirectory() as tmp:
        runs = {(m, s): one(args.study, m, s, args.trials, args.workers, Path(tmp), args.epochs, args.rerun)
                for s in args.seeds for m in methods}
    rows, medians = [], []
    for m in methods:
        ratios, hvs = [], []
        for s in args.seeds:
            r = runs[(m, s)]
            ratio, hv_ratio = compare(r, runs[("none", s)])
            ratios.append(ratio)
            hvs.append(hv_ratio)
            rows.append([m, s, r["complete"], r["pruned"], r["rerun"], r["reached"], r["epochs"], f"{r['hv']:.4f}", f"{hv_ratio:.3f}",
                         "never" if ratio is None else f"{ratio:.2f}", f"{r['wall']:.1f}"])
        known = [x for x in ratios if x is not None]
        medians.append(f"{m}: epochs ratio {statistics.median(known):.2f}" if known else f"{m}: epochs ratio n/a")
        medians[-1] += (f", hypervolume ratio {statistics.median(hvs):.3f} (median over seeds), "
                        f"{sum(runs[(m, x)]['reached'] for x in args.seeds)} of "
                        f"{sum(runs[(m, x)]['rerun'] for x in args.seeds)} stopped trials rerun (of "
                        f"{sum(runs[(m, x)]['pruned'] for x in args.seeds)} stopped) would have reached the front")
    per_trial = args.epochs or yaml.safe_load(args.study.read_text())["trial"]["optim"]["epochs"]
    notes = ("Every sweep: the same budget of " + f"{args.trials * per_trial} epochs. " + "; ".join(medians) +
             ". Goal: epochs ratio <= 0.5 and hypervolume ratio >= 1. A stopped trial 'would have reached the "
             "front' when, trained to the end as it would have gone on, no trial of the final front dominates it.")
    epochs = f" --epochs {args.epochs}" if args.epochs else ""
    print(append(f"Early stopping at an equal epoch budget ({args.study.name}, {per_trial} epochs a trial, "
                 f"{args.trials} trials' worth, {args.workers} worker(s))",
                 f"python -m benchmarks.early_stopping --study {args.study}{epochs} --trials {args.trials} "
                 f"--seeds {' '.join(map(str, args.seeds))} --methods {' '.join(methods)} --workers {args.workers} "
                 f"--rerun {args.rerun}",
                 ["method", "seed", "complete", "stopped", "stopped rerun", "of those, would reach the front",
                  "epochs trained", "final hypervolume", "vs none",
                  "epochs ratio to 0.99", "wall s"], rows, notes, settings=vars(args),
                 goals=[{"figure": "epochs ratio to 0.99 (median over seeds)", "goal": "<= 0.5"},
                        {"figure": "hypervolume ratio, vs none (median over seeds)", "goal": ">= 1"}]))


if __name__ == "__main__":
    main()
