"""The sweep's own cost: wall time of a small sweep against the bare training of its trials, and the
throughput of two workers against one.

    python -m benchmarks.sweep_overhead [--study benchmarks/sweep_study.yaml] [--trials N] [--epochs E] [--rounds 1]

The default study (benchmarks/sweep_study.yaml) is a small sweep of the shape users run: the default study's
budget of 12 trials, LeNet-5 on MNIST-shaped data, trials of 20-25 s made of epochs of about 1.5 s. What a
sweep pays once is seconds (process start-up and imports, the stores, the report), so no sweep of one-second
trials (studies/default.yaml) can come near 5%; the results say where the ratio would cross 1.05.

1. ``l0sweep run --workers 1 --threads 1`` (everything a user waits for: process start, study creation, the
   dense baseline, every trial with its MLflow logging and model export, the report), against its trials'
   training timed inside the sweep (each worker records a trial's training seconds, its epoch hook's logging
   and early-stopping checks left out). Goal: sweep wall / that sum <= 1.05. Both come from the same run, so
   the machine's speed drifting between runs (5% within minutes here) does not enter the ratio. As a cross-check,
   the same trials' bare training in a fresh process with one thread (the dense baseline once, then
   ``train_trial`` for each complete trial's configuration). The overhead is split into what a sweep pays once
   and what each trial pays, which says how long trials must be for the goal to hold.
2. The same study with ``--workers 2 --threads 1``: complete trials per second, two workers / one.
   Goal >= 1.7. Against it, the machine's own ceiling: the same bare training run twice at once, in two
   processes (two bare runs in the time of one would be 2.0; shared cores, caches and memory bandwidth,
   or a noisy neighbour, make it less). The two sweeps run minutes apart, so the machine's drift enters this
   ratio; the training seconds each sweep delivers per wall second, 2 workers / 1, cancel it (and with it any
   slowing of two trainings side by side, which the ceiling shows), as a cross-check.
Early stopping is off, so both runs train the same number of epochs per trial.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml
from optuna.trial import TrialState

from benchmarks.results import append, timed_sweep
from sweeps.records import TrialRecord
from sweeps.search import trial_config
from sweeps.spec import load_spec
from sweeps.baseline import dense_baseline
from sweeps.training import train_trial


def _break_even(rest: float, per_trial: float, trial: float, n: int) -> str:
    """Where the 1-worker ratio reaches 1.05 under the measured costs: ``rest`` seconds once per sweep and
    ``per_trial`` seconds a trial (the dense baseline, which only helps, is left out). A per-trial figure below
    zero is the machine's drift, not a saving: it counts as none."""
    noise = f" (each later trial read {per_trial:.2f} s: below this machine's noise, counted as 0)" if per_trial < 0 else ""
    per_trial = max(per_trial, 0.0)
    # n trials of length T: (rest + n * per_trial) / (n * T) <= 0.05  <=>  T >= (rest / n + per_trial) / 0.05
    needed = (rest / n + per_trial) / 0.05
    at_this_length = ("never, at any number of them (the per-trial overhead alone exceeds 5%)"
                      if per_trial >= 0.05 * trial else f"at about {rest / (0.05 * trial - per_trial):.0f} trials")
    return (f"At 1.05{noise}: with trials of {trial:.1f} s, {at_this_length}; with {n} trials, once they train "
            f"{needed:.0f} s each.")


def _phase(trials: list) -> float:
    """Seconds from the first trial's start to the last trial's end."""
    return (max(t.datetime_complete for t in trials) - min(t.datetime_start for t in trials)).total_seconds()


def _trained(trials: list) -> list[float]:
    """Each complete trial's training seconds, as its worker timed them in the sweep."""
    return [TrialRecord.read(t).train_seconds for t in trials]


def _sweep(study_file: Path, trials: int, workers: int, out: Path) -> tuple[float, list]:
    wall, study = timed_sweep(study_file, out, "--trials", str(trials), "--workers", str(workers), "--threads", "1")
    return wall, study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))


def _bare_process(study_file: Path, complete: list, tmp: Path) -> subprocess.Popen:
    values = [TrialRecord.read(t).values for t in complete]
    return subprocess.Popen([sys.executable, "-m", "benchmarks.sweep_overhead", "--bare", str(study_file),
                             json.dumps(values), str(tmp / f"bare-{time.monotonic_ns()}")],
                            stdout=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL)


def _result(proc: subprocess.Popen) -> tuple[float, list[float]]:
    out, _ = proc.communicate()
    if proc.returncode:
        raise RuntimeError(f"bare training exited with status {proc.returncode}")
    baseline, trials = json.loads(out.strip().splitlines()[-1])
    return baseline, trials


def _bare(study_file: Path, complete: list, tmp: Path) -> tuple[float, list[float]]:
    """Seconds of (dense baseline, each trial's training), one thread, nothing logged: in a fresh process, as
    a worker is, so the two start alike."""
    return _result(_bare_process(study_file, complete, tmp))


def _bare_twice_at_once(study_file: Path, complete: list, tmp: Path) -> float:
    """Wall seconds for two processes each doing the same bare training at the same time."""
    start = time.perf_counter()
    procs = [_bare_process(study_file, complete, tmp) for _ in range(2)]
    for proc in procs:
        _result(proc)
    return time.perf_counter() - start


def _bare_child(study_file: str, values_json: str, baseline_dir: str) -> None:
    torch.set_num_threads(1)
    spec = load_spec(Path(study_file))
    configs = [trial_config(spec, v).model_copy(update={"baseline_dir": baseline_dir, "threads": 1})
               for v in json.loads(values_json)]
    start = time.perf_counter()
    dense_baseline(configs[0])
    baseline = time.perf_counter() - start
    trials = []
    for cfg in configs:
        start = time.perf_counter()
        train_trial(cfg)
        trials.append(time.perf_counter() - start)
    print(json.dumps([baseline, trials]))


def _round(study_file: Path, trials: int, tmp: Path) -> dict:
    """One round: 1-worker sweep, bare training, 2-worker sweep, bare training again (drift shows as the
    difference of the two bare runs, and is averaged out).

    The 1-worker sweep's overhead (its wall time less its trials' training, as the worker timed it in the sweep)
    is split by where it falls: before the first trial and after the last (``fixed``); the first trial's own
    (``first``: a worker's first MLflow run and model export, the imports they need); every later trial's
    (``per_trial``: its duration in the sweep less its training); and the time between trials (``between``:
    Optuna's ask and tell, the sampler, the budget check). The bare runs give the ceiling and a cross-check."""
    wall1, complete1 = _sweep(study_file, trials, 1, tmp / "one")
    before = _bare(study_file, complete1, tmp)
    wall2, complete2 = _sweep(study_file, trials, 2, tmp / "two")
    after = _bare(study_file, complete1, tmp)
    baseline = (before[0] + after[0]) / 2
    each = [(a + b) / 2 for a, b in zip(before[1], after[1])]  # bare seconds of trial i (the sweep's order)
    bare = baseline + sum(each)
    bare_runs = (before[0] + sum(before[1]), after[0] + sum(after[1]))
    ceiling = 2 * bare / _bare_twice_at_once(study_file, complete1, tmp)
    phase1, phase2 = _phase(complete1), _phase(complete2)
    n1, n2 = len(complete1), len(complete2)
    took = [(t.datetime_complete - t.datetime_start).total_seconds() for t in complete1]
    trained = _trained(complete1)
    in_sweep = sum(trained)
    return {"wall1": wall1, "wall2": wall2, "bare": bare, "bare_runs": bare_runs, "in_sweep": in_sweep,
            "baseline": baseline, "trial": statistics.median(trained[1:] or trained), "phase1": phase1, "phase2": phase2,
            "ratio": wall1 / in_sweep, "bare_ratio": wall1 / bare, "phase_ratio": phase1 / in_sweep,
            "tput": (n2 / wall2) / (n1 / wall1),
            "phase_tput": (n2 / phase2) / (n1 / phase1),
            # Training seconds delivered per wall second, 2 workers / 1: the machine's speed in each sweep cancels
            # (it moved 14% between two sweeps minutes apart), and with it any slowing of two trainings side by side.
            "work_tput": (sum(_trained(complete2)) / wall2) / (in_sweep / wall1),
            "ceiling": ceiling, "fixed": wall1 - phase1,
            "first": took[0] - trained[0],
            "per_trial": sum(d - b for d, b in zip(took[1:], trained[1:])) / max(1, n1 - 1),
            "between": phase1 - sum(took),
            # Same work, twice: how far this machine's speed moved within the round (minutes apart).
            "drift": abs(bare_runs[0] - bare_runs[1])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--study", type=Path, default=Path(__file__).with_name("sweep_study.yaml"))
    parser.add_argument("--trials", type=int, help="complete trials (default: the study's budget)")
    parser.add_argument("--epochs", type=int, help="epochs per trial (default: the study's)")
    parser.add_argument("--rounds", type=int, default=1, help="repeat everything; medians are reported")
    parser.add_argument("--bare", nargs=3, help=argparse.SUPPRESS)  # internal: the bare-training child
    args = parser.parse_args()
    if args.bare:
        return _bare_child(*args.bare)
    data = yaml.safe_load(args.study.read_text())
    args.trials = args.trials or data["trials"]
    args.epochs = args.epochs or data["trial"]["optim"]["epochs"]
    data["early_stopping"] = {**data.get("early_stopping", {}), "enabled": False}
    data["trial"]["optim"]["epochs"] = args.epochs
    rounds = []
    for r in range(args.rounds):
        with tempfile.TemporaryDirectory() as tmp_name:
            tmp = Path(tmp_name)
            study_file = tmp / "study.yaml"
            study_file.write_text(yaml.safe_dump(data))
            rounds.append(_round(study_file, args.trials, tmp))
            print(f"round {r + 1}: " + json.dumps({k: v for k, v in rounds[-1].items()}, default=str), flush=True)

    def med(key: str) -> float:
        return statistics.median(x[key] for x in rounds)

    def each(key: str) -> str:
        return ", ".join(f"{x[key]:.2f}" for x in rounds)

    rows = [["1 worker: sweep wall / its trials' training, timed in the sweep",
             f"{med('wall1'):.1f} s / {med('in_sweep'):.1f} s", f"{med('ratio'):.3f}", each("ratio"), "<= 1.05",
             "yes" if med("ratio") <= 1.05 else "no"],
            ["1 worker: trial phase / its trials' training, timed in the sweep",
             f"{med('phase1'):.1f} s / {med('in_sweep'):.1f} s", f"{med('phase_ratio'):.3f}", each("phase_ratio"), "", ""],
            ["1 worker: sweep wall / bare training in separate runs (cross-check)",
             f"{med('wall1'):.1f} s / {med('bare'):.1f} s", f"{med('bare_ratio'):.2f}", each("bare_ratio"), "", ""],
            ["2 workers / 1: throughput, whole sweep", f"{med('wall1'):.1f} s / {med('wall2'):.1f} s",
             f"{med('tput'):.2f}", each("tput"), ">= 1.7", "yes" if med("tput") >= 1.7 else "no"],
            ["2 workers / 1: throughput, trial phase", f"{med('phase1'):.1f} s / {med('phase2'):.1f} s",
             f"{med('phase_tput'):.2f}", each("phase_tput"), ">= 1.7", "yes" if med("phase_tput") >= 1.7 else "no"],
            ["2 workers / 1: training seconds a wall second (drift-free cross-check)", "",
             f"{med('work_tput'):.2f}", each("work_tput"), "", ""],
            ["the machine's ceiling: 2 bare trainings at once / 1", "", f"{med('ceiling'):.2f}", each("ceiling"),
             "", ""]]
    rest = med("fixed") + med("first") + med("between")  # what a sweep pays once, however many trials it has
    notes = (f"{args.rounds} rounds of {args.trials} complete trials of {args.study.name} at {args.epochs} epochs, "
             f"early stopping off, one thread per worker; medians, and each round's ratio. Bare training (in a fresh "
             f"process, twice a round: {', '.join(f'{a:.1f}/{b:.1f} s' for a, b in (x['bare_runs'] for x in rounds))}, "
             f"differing by {med('drift'):.1f} s, the machine's drift): dense baseline {med('baseline'):.1f} s, {med('bare'):.1f} s "
             f"in all. In the sweep, a later trial trained {med('trial'):.1f} s (median). Overhead of the 1-worker sweep (against its own timing): "
             f"{med('fixed'):.1f} s before the first trial and after the last (process start-up and imports, study and "
             f"MLflow store creation, the report); {med('first'):.1f} s more in the first trial (the worker's first MLflow "
             f"run and model export); {med('between'):.1f} s between trials in all; {med('per_trial'):.2f} s in each later "
             f"trial (its MLflow run, metrics and artifacts, the exported model of front trials). "
             + _break_even(rest, med('per_trial'), med('trial'), args.trials))
    print(append(f"Sweep overhead ({args.study.name})", f"python -m benchmarks.sweep_overhead --study {os.path.relpath(args.study)} "
                 f"--trials {args.trials} --epochs {args.epochs} --rounds {args.rounds}",
                 ["measure", "values (median)", "ratio (median)", "each round", "goal", "goal met"], rows, notes,
                 settings=vars(args), goals=[{"figure": f"{row[0]}: ratio (median)", "goal": row[4]} for row in rows if row[4]]))


if __name__ == "__main__":
    main()
