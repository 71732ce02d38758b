"""A lambda study against a target study at equal budgets: does asking for a size fill the front's gaps?

For each sampler seed this runs ``studies/default.yaml`` (lambda searched) and ``studies/default-target.yaml``
(target sparsity searched, gates decided at the target) through ``l0sweep run``, with the same budget of complete trials.
Per sweep: the largest gap along the sparsity axis of the front (between neighbouring front trials, which are
above the accuracy floor, and from sparsity 0 to the first and from the last to 1: a front bunched at one end has
a large gap), the same gap over all feasible trials (those above the study's accuracy floor: the models a user can
pick, front or not), its hypervolume, the collapsed trials (validation accuracy no better than chance), and the best
validation accuracy at sparsity >= 0.8.

    python -m benchmarks.target_vs_lambda [--seeds 1 2 3 4] [--trials 20] [--workers 2] [--epochs N]
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import yaml
from optuna.trial import TrialState

from benchmarks.accuracy_floor import chance_floor
from benchmarks.results import append, timed_sweep
from dashboards import hypervolume_history
from sweeps.records import feasible

STUDIES = {"lambda": Path("studies/default.yaml"), "target": Path("studies/default-target.yaml")}


def largest_gap(sparsities: list[float]) -> float:
    """The largest step along the sparsity axis between neighbouring front trials, counting the ends 0 and 1
    (an empty front: 1).

    >>> largest_gap([0.2, 0.9, 0.5])
    0.4
    >>> largest_gap([0.85, 0.9])  # bunched at the sparse end: the gap is from 0
    0.85
    """
    ordered = [0.0, *sorted(sparsities), 1.0]
    return round(max((b - a for a, b in zip(ordered, ordered[1:])), default=0.0), 12)


def one(kind: str, study_file: Path, seed: int, trials: int, workers: int, epochs: int | None, tmp: Path,
        chance: float) -> dict:
    data = yaml.safe_load(study_file.read_text())
    data["sampler"] = {**data.get("sampler", {}), "seed": seed}
    if epochs:
        data["trial"]["optim"]["epochs"] = epochs
    path = tmp / f"{kind}-{seed}.yaml"
    path.write_text(yaml.safe_dump(data))
    wall, study = timed_sweep(path, tmp / f"out-{kind}-{seed}", "--trials", str(trials), "--workers", str(workers))
    complete = study.get_trials(states=(TrialState.COMPLETE,))
    front = study.best_trials
    hv = hypervolume_history(study)
    sparse = [t.values[0] for t in front if t.values[1] >= 0.8]
    return {"kind": kind, "seed": seed, "complete": len(complete), "front": len(front),
            "gap": largest_gap([t.values[1] for t in front]),
            "feasible_gap": largest_gap([t.values[1] for t in complete if feasible(t)]),
            "hypervolume": float(hv.hypervolume.iloc[-1]) if len(hv) else 0.0,
            "collapsed": sum(t.values[0] < chance for t in complete),
            "best_at_08": max(sparse, default=float("nan")), "wall": wall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3, 4])
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--epochs", type=int, help="epochs a trial (default: the study files')")
    parser.add_argument("--lambda-study", type=Path, default=STUDIES["lambda"])
    parser.add_argument("--target-study", type=Path, default=STUDIES["target"])
    args = parser.parse_args()
    files = {"lambda": args.lambda_study, "target": args.target_study}
    chance = chance_floor(files["lambda"])
    with tempfile.TemporaryDirectory() as tmp:
        results = [one(kind, files[kind], seed, args.trials, args.workers, args.epochs, Path(tmp), chance)
                   for seed in args.seeds for kind in ("lambda", "target")]
    rows = [[r["kind"], r["seed"], r["complete"], r["front"], r["gap"], r["feasible_gap"], r["hypervolume"],
             r["collapsed"], r["best_at_08"], r["wall"]] for r in results]

    def median(kind: str, key: str) -> float:
        return statistics.median(r[key] for r in results if r["kind"] == kind)

    gap_l, gap_t = median("lambda", "gap"), median("target", "gap")
    choice_l, choice_t = median("lambda", "feasible_gap"), median("target", "feasible_gap")
    hv_l, hv_t = median("lambda", "hypervolume"), median("target", "hypervolume")
    goal = gap_t <= gap_l / 2 and hv_t >= hv_l
    notes = (f"Medians over {len(args.seeds)} sampler seeds: largest sparsity gap along the front {gap_l:.3f} (lambda) "
             f"against {gap_t:.3f} (target); hypervolume {hv_l:.4f} against {hv_t:.4f}; collapsed trials in all "
             f"{sum(r['collapsed'] for r in results if r['kind'] == 'lambda')} against "
             f"{sum(r['collapsed'] for r in results if r['kind'] == 'target')}. Goal (target gap at most half the "
             f"lambda gap, at equal or better hypervolume): {'met' if goal else 'not met'}. Over all feasible trials (the "
             f"choices a user has, front or not), the largest gap is {choice_l:.3f} (lambda) against {choice_t:.3f} "
             f"(target): the target study's is {'at most' if choice_t <= choice_l / 2 else 'more than'} half.")
    seeds = " ".join(map(str, args.seeds))
    epochs = f" --epochs {args.epochs}" if args.epochs else ""
    print(append(f"Target sparsity against lambda ({files['lambda'].name} vs {files['target'].name}, {args.trials} "
                 f"complete trials, {args.workers} worker(s))",
                 f"python -m benchmarks.target_vs_lambda --seeds {seeds} --trials {args.trials} --workers "
                 f"{args.workers}{epochs}",
                 ["searched", "sampler seed", "complete", "front size", "largest sparsity gap",
                  "largest gap, feasible trials", "hypervolume",
                  "collapsed", "best val acc at sparsity >= 0.8", "wall s"], rows, notes, settings=vars(args),
                 goals=[{"figure": "largest sparsity gap, target / lambda (medians over seeds)",
                         "goal": "<= 0.5, at equal or better hypervolume"}]))


if __name__ == "__main__":
    main()
