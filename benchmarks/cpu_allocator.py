"""What keeping freed memory (``sweeps.runtime.keep_freed_memory``) saves a CPU training step.

    python -m benchmarks.cpu_allocator [--rounds 5] [--models lenet5 googlenet]

glibc's malloc can only be set up for a whole process, so each measurement is a fresh process: one with
glibc's defaults, one with freed memory kept, as every trial's training sets it. Each round runs one of each,
in turn (the order alternates), and the median over rounds is reported. A process times dense training steps
(``sweeps.loop.train_step``, as in ``benchmarks.training_overhead``) after three of warm-up, and counts the
page faults they take (``getrusage``: pages the kernel had to hand out again) and its peak resident memory.
Under glibc's defaults the faults differ from process to process (its thresholds adapt to the order in which
blocks are freed): a LeNet-5 process may settle at none, or take 2,000-4,000 a step throughout.
"""
from __future__ import annotations

import argparse
import json
import math
import resource
import statistics
import subprocess
import sys

import torch

from benchmarks.results import append
from benchmarks.training_overhead import MODELS, Setup
from sweeps.runtime import keep_freed_memory

VARIANTS = ("glibc defaults", "freed memory kept")
SHAPE_AND_BATCH = {name: (shape, batch) for name, shape, batch in MODELS}


def _child(name: str, variant: str, seconds: float) -> None:
    kept = keep_freed_memory() if variant == VARIANTS[1] else False
    shape, batch = SHAPE_AND_BATCH[name]
    setup = Setup(name, shape, batch, "dense", torch.device("cpu"), False, False)
    first = setup.timed(3)  # warm-up (a kept heap takes two steps to reach its size), and the measurement's size
    steps = max(3, math.ceil(seconds / first))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    ms = setup.timed(steps) * 1e3
    faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / steps
    print(json.dumps({"ms": ms, "faults": faults, "steps": steps, "kept": kept,
                      "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def _run(name: str, variant: str, seconds: float) -> dict:
    out = subprocess.run([sys.executable, "-m", "benchmarks.cpu_allocator", "--child", name, variant, str(seconds)],
                         check=True, capture_output=True, text=True, stdin=subprocess.DEVNULL).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=3.0, help="timed steps per process (at least 3)")
    parser.add_argument("--models", nargs="*", default=[m[0] for m in MODELS])
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(args.child[0], args.child[1], float(args.child[2]))
        return
    rows = []
    for name in args.models:
        runs = {v: [] for v in VARIANTS}
        for r in range(args.rounds):
            for v in VARIANTS if r % 2 == 0 else VARIANTS[::-1]:
                runs[v].append(_run(name, v, args.seconds))
        if not all(run["kept"] for run in runs[VARIANTS[1]]):
            raise SystemExit("keep_freed_memory() did not take on this machine (glibc's mallopt refused it)")
        med = {v: {k: statistics.median(run[k] for run in runs[v]) for k in ("ms", "faults", "rss_mb", "steps")}
               for v in VARIANTS}
        spread = {v: f"{min(run['ms'] for run in runs[v]):.1f}-{max(run['ms'] for run in runs[v]):.1f}" for v in VARIANTS}
        for v in VARIANTS:
            rows.append([name, SHAPE_AND_BATCH[name][1], v, f"{med[v]['ms']:.1f}", spread[v],
                         f"{med[VARIANTS[0]]['ms'] / med[v]['ms']:.3f}", f"{med[v]['faults']:.0f}",
                         f"{med[v]['rss_mb']:.0f}", int(med[v]["steps"])])
        print(name, json.dumps(runs), flush=True)
    models = "" if args.models == [m[0] for m in MODELS] else " --models " + " ".join(args.models)
    print(append("CPU training step: glibc's malloc defaults vs freed memory kept (dense step, one process each)",
                 f"python -m benchmarks.cpu_allocator --rounds {args.rounds} --seconds {args.seconds:g}{models}",
                 ["model", "batch", "malloc", "ms a step (median of processes)", "min-max", "speed-up (defaults / this)",
                  "page faults a step", "peak RSS MB", "steps a process"], rows,
                 f"{args.rounds} processes per setting, alternating. Freed memory kept: mmap threshold and trim "
                 "threshold 1 GiB (sweeps.runtime.keep_freed_memory, which every trial's training calls on a CPU).",
                 settings=vars(args)))


if __name__ == "__main__":
    main()
