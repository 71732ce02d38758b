"""The sweep's own cost: wall time of a small sweep against the bare training of its trials, and the
throughput of two workers against one.

    python -m benchmarks.sweep_overhead [--study studies/default.yaml] [--trials 8] [--epochs 40]

1. ``l0sweep run --workers 1 --threads 1`` (everything a user waits for: process start, study creation, the
   dense baseline, every trial with its MLflow logging and model export, the report). Then the same trials'
   bare training, in this process with one thread: the dense baseline once plus ``train_trial`` for each
   complete trial's configuration. Goal: sweep wall / bare sum <= 1.05.
2. The same study with ``--workers 2 --threads 1``: complete trials per second, two workers / one.
   Goal >= 1.7. Against it, the machine's own ceiling: the same bare training run twice at once, in two
   processes (two bare runs in the time of one would be 2.0; shared cores, caches and memory bandwidth,
   or a noisy neighbour, make it less).
Early stopping is off, so both runs train the same number of epochs per trial.
"""
from __future__ import annotations

import argparse
import json
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
from sweeps.search import trial_config
from sweeps.spec import load_spec
from sweeps.training import dense_baseline, train_trial


def _break_even(fixed: float, per_trial: float, trial: float) -> str:
    """How long a sweep of such trials must train for its wall time to be within 5% of the bare training."""
    if per_trial >= 0.05 * trial:
        return "The per-trial overhead alone exceeds 5% of a trial of this length."
    n = fixed / (0.05 * trial - per_trial)
    return f"With trials of this length the ratio reaches 1.05 at about {n:.0f} trials ({n * trial / 60:.0f} min of training)."


def _phase(trials: list) -> float:
    """Seconds from the first trial's start to the last trial's end."""
    return (max(t.datetime_complete for t in trials) - min(t.datetime_start for t in trials)).total_seconds()


def _sweep(study_file: Path, trials: int, workers: int, out: Path) -> tuple[float, list]:
    wall, study = timed_sweep(study_file, out, "--trials", str(trials), "--workers", str(workers), "--threads", "1")
    return wall, study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))


def _bare_process(study_file: Path, complete: list, tmp: Path) -> subprocess.Popen:
    values = [{k: t.user_attrs[k] for k in ("lam", "droprate_init", "mode")} for t in complete]
    return subprocess.Popen([sys.executable, "-m", "benchmarks.sweep_overhead", "--bare", str(study_file),
                             json.dumps(values), str(tmp / f"bare-{time.monotonic_ns()}")],
                            stdout=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL)


def _result(proc: subprocess.Popen) -> tuple[float, float]:
    out, _ = proc.communicate()
    if proc.returncode:
        raise RuntimeError(f"bare training exited with status {proc.returncode}")
    baseline, trials = json.loads(out.strip().splitlines()[-1])
    return baseline, trials


def _bare(study_file: Path, complete: list, tmp: Path) -> tuple[float, float]:
    """Seconds of (dense baseline, sum of the trials' training), one thread, nothing logged: in a fresh
    process, as a worker is, so the two start alike."""
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
    start = time.perf_counter()
    for cfg in configs:
        train_trial(cfg)
    print(json.dumps([baseline, time.perf_counter() - start]))


def _round(study_file: Path, trials: int, tmp: Path) -> dict:
    """One round: 1-worker sweep, bare training, 2-worker sweep, bare training again (drift shows as the
    difference of the two bare runs, and is averaged out)."""
    wall1, complete1 = _sweep(study_file, trials, 1, tmp / "one")
    before = _bare(study_file, complete1, tmp)
    wall2, complete2 = _sweep(study_file, trials, 2, tmp / "two")
    after = _bare(study_file, complete1, tmp)
    baseline, trained = (before[0] + after[0]) / 2, (before[1] + after[1]) / 2
    bare = baseline + trained
    ceiling = 2 * (sum(before) + sum(after)) / 2 / _bare_twice_at_once(study_file, complete1, tmp)
    phase1, phase2 = _phase(complete1), _phase(complete2)
    n1, n2 = len(complete1), len(complete2)
    return {"wall1": wall1, "wall2": wall2, "bare": bare, "bare_runs": (sum(before), sum(after)),
            "baseline": baseline, "trial": trained / n1, "phase1": phase1, "phase2": phase2,
            "ratio": wall1 / bare, "phase_ratio": phase1 / bare, "tput": (n2 / wall2) / (n1 / wall1),
            "phase_tput": (n2 / phase2) / (n1 / phase1), "ceiling": ceiling, "fixed": wall1 - phase1, "per_trial": (phase1 - bare) / n1}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--study", type=Path, default=Path("studies/default.yaml"))
    parser.add_argument("--trials", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=40, help="epochs per trial (longer trials, smaller fixed costs)")
    parser.add_argument("--rounds", type=int, default=3, help="repeat everything; medians are reported")
    parser.add_argument("--bare", nargs=3, help=argparse.SUPPRESS)  # internal: the bare-training child
    args = parser.parse_args()
    if args.bare:
        return _bare_child(*args.bare)
    rounds = []
    for r in range(args.rounds):
        with tempfile.TemporaryDirectory() as tmp_name:
            tmp = Path(tmp_name)
            data = yaml.safe_load(args.study.read_text())
            data["early_stopping"] = {**data.get("early_stopping", {}), "enabled": False}
            data["trial"]["optim"]["epochs"] = args.epochs
            study_file = tmp / "study.yaml"
            study_file.write_text(yaml.safe_dump(data))
            rounds.append(_round(study_file, args.trials, tmp))
            print(f"round {r + 1}: " + json.dumps({k: v for k, v in rounds[-1].items()}, default=str), flush=True)

    def med(key: str) -> float:
        return statistics.median(x[key] for x in rounds)

    def each(key: str) -> str:
        return ", ".join(f"{x[key]:.2f}" for x in rounds)

    rows = [["1 worker: sweep wall / bare training", f"{med('wall1'):.1f} s / {med('bare'):.1f} s", f"{med('ratio'):.2f}",
             each("ratio"), "<= 1.05", "yes" if med("ratio") <= 1.05 else "no"],
            ["1 worker: trial phase / bare training", f"{med('phase1'):.1f} s / {med('bare'):.1f} s",
             f"{med('phase_ratio'):.2f}", each("phase_ratio"), "", ""],
            ["2 workers / 1: throughput, whole sweep", f"{med('wall1'):.1f} s / {med('wall2'):.1f} s",
             f"{med('tput'):.2f}", each("tput"), ">= 1.7", "yes" if med("tput") >= 1.7 else "no"],
            ["2 workers / 1: throughput, trial phase", f"{med('phase1'):.1f} s / {med('phase2'):.1f} s",
             f"{med('phase_tput'):.2f}", each("phase_tput"), ">= 1.7", "yes" if med("phase_tput") >= 1.7 else "no"],
            ["the machine's ceiling: 2 bare trainings at once / 1", "", f"{med('ceiling'):.2f}", each("ceiling"),
             "", ""]]
    notes = (f"{args.rounds} rounds of {args.trials} complete trials of {args.study.name} at {args.epochs} epochs, "
             f"early stopping off, one thread per worker; medians, and each round's ratio. Bare training (in a fresh "
             f"process, twice a round: {', '.join(f'{a:.1f}/{b:.1f} s' for a, b in (x['bare_runs'] for x in rounds))}): "
             f"dense baseline {med('baseline'):.1f} s + trials of {med('trial'):.1f} s. Overhead of the 1-worker sweep: "
             f"{med('fixed'):.1f} s fixed (process start-up and imports, study and MLflow store creation, the report) "
             f"and {med('per_trial'):.2f} s per trial (MLflow run and logging, the exported model of front trials). "
             f"{_break_even(med('fixed'), med('per_trial'), med('trial'))}")
    print(append(f"Sweep overhead ({args.study.name})", f"python -m benchmarks.sweep_overhead --study {args.study} "
                 f"--trials {args.trials} --epochs {args.epochs} --rounds {args.rounds}",
                 ["measure", "values (median)", "ratio (median)", "each round", "goal", "goal met"], rows, notes))


if __name__ == "__main__":
    main()
