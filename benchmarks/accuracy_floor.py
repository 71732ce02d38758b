"""The accuracy floor: trials whose gates all closed, in sweeps with and without ``min_accuracy: chance``.

A trial that removed every unit answers one class to everything: chance accuracy at sparsity ~1, which nothing
beats on sparsity. For each sampler seed this runs the same study twice through ``l0sweep run`` (same budget of
complete trials): with ``min_accuracy: 0`` (no floor, as sweeps ran before it existed) and with ``chance``. It
counts the collapsed trials (validation accuracy no better than always answering the commonest validation
class), those on the front, the front's size, and the sparsest trial within 1 accuracy point of the dense
baseline: what the floor saves is trials the sampler would spend on the collapsed corner.

    python -m benchmarks.accuracy_floor [--study studies/default.yaml] [--seeds 1 2 3 4] [--trials 20] [--workers 2]
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import yaml
from optuna.trial import TrialState

from benchmarks.results import append, timed_sweep
from sweeps.data import chance_accuracy
from sweeps.records import StudyRecord
from sweeps.search import first_point, trial_config
from sweeps.spec import load_spec
from sweeps.loop import load_splits
from sweeps.worker import metric_floor


def chance_floor(study_file: Path) -> float:
    """The ``chance`` floor of the study's trials (their validation split does not move with the searched values)."""
    spec = load_spec(study_file)
    val = load_splits(trial_config(spec, first_point(spec))).val
    return metric_floor("chance", chance_accuracy(val), len(val))


def one(study_file: Path, floor: str, seed: int, trials: int, workers: int, tmp: Path, chance: float) -> dict:
    data = yaml.safe_load(study_file.read_text())
    data["min_accuracy"] = 0 if floor == "none" else "chance"
    data["sampler"] = {**data.get("sampler", {}), "seed": seed}
    path = tmp / f"floor-{floor}-{seed}.yaml"
    path.write_text(yaml.safe_dump(data))
    wall, study = timed_sweep(path, tmp / f"out-{floor}-{seed}", "--trials", str(trials), "--workers", str(workers))
    complete = study.get_trials(states=(TrialState.COMPLETE,))
    front = study.best_trials
    dense = (StudyRecord.read(study).dense_baseline or {}).get("val_accuracy")
    within = [t.values[1] for t in complete if dense is not None and t.values[0] >= dense - 0.01]
    return {"floor": floor, "seed": seed, "complete": len(complete),
            "collapsed": sum(t.values[0] < chance for t in complete),
            "collapsed_on_front": sum(t.values[0] < chance for t in front), "front": len(front),
            "sparsest_within_1pt": max(within, default=float("nan")), "wall": wall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--study", type=Path, default=Path("studies/default.yaml"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3, 4])
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    chance = chance_floor(args.study)
    with tempfile.TemporaryDirectory() as tmp:
        results = [one(args.study, floor, seed, args.trials, args.workers, Path(tmp), chance)
                   for seed in args.seeds for floor in ("none", "chance")]
    rows = [[{"none": "0", "chance": "chance"}[r["floor"]], r["seed"], r["complete"], r["collapsed"], r["collapsed_on_front"], r["front"],
             r["sparsest_within_1pt"], r["wall"]] for r in results]

    def total(floor: str, key: str) -> int:
        return sum(r[key] for r in results if r["floor"] == floor)

    def median(floor: str, key: str) -> float:
        return statistics.median(r[key] for r in results if r["floor"] == floor)

    notes = (f"Over {len(args.seeds)} sampler seeds: collapsed trials (validation accuracy below {chance:.4f}, the "
             f"chance floor) {total('none', 'collapsed')} without a floor, {total('chance', 'collapsed')} with it; "
             f"on the front {total('none', 'collapsed_on_front')} and {total('chance', 'collapsed_on_front')}. "
             f"Median sparsest trial within 1 point of the dense baseline: {median('none', 'sparsest_within_1pt'):.3f} "
             f"without, {median('chance', 'sparsest_within_1pt'):.3f} with the floor. Same seed, same start-up "
             "trials: the runs part where the sampler's model takes over.")
    seeds = " ".join(map(str, args.seeds))
    print(append(f"Accuracy floor ({args.study.name}, {args.trials} complete trials, {args.workers} worker(s))",
                 f"python -m benchmarks.accuracy_floor --study {args.study} --seeds {seeds} --trials {args.trials} "
                 f"--workers {args.workers}",
                 ["min_accuracy", "sampler seed", "complete", "collapsed", "collapsed on the front", "front size",
                  "sparsest within 1 pt of dense", "wall s"], rows, notes, settings=vars(args)))


if __name__ == "__main__":
    main()
