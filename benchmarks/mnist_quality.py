"""Result quality on real MNIST digits: the dense network against the front a sweep finds.

    python -m benchmarks.mnist_quality --data ../shared/data/mnist-t10k [--models mlp lenet5] [--trials 8]
        [--objectives sparsity latency]

The data are the 10,000 MNIST test images (the IDX files ``t10k-images-idx3-ubyte.gz`` and
``t10k-labels-idx1-ubyte.gz`` in ``--data``), shuffled once and split 8,000 train / 1,000 validation / 1,000
test. Each model gets a real ``l0sweep run`` (two workers). Selection uses validation accuracy only; the
figures reported are the final models' test accuracies. For each model: the dense baseline, the front, and
the trial with the most parameters removed whose validation accuracy is within 1 point of the dense
baseline's, with its kept units per layer beside the paper's (trained on all 60,000 images for 200 epochs,
so a smaller sweep on 8,000 images is not expected to match it).

``--objectives sparsity latency`` runs each model twice at the same budget, with ``objectives: [accuracy,
sparsity]`` and ``[accuracy, latency]`` (measured speed-up of the compacted model, torch, batch 64; front trials of
the sparsity sweep are timed the same way), and reports each sweep's fastest trial within 1 point of dense.
"""
from __future__ import annotations

import argparse
import gzip
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
import yaml
from optuna.trial import TrialState
from torch.utils.data import TensorDataset

from benchmarks.results import append, timed_sweep
from sweeps.records import StudyRecord, TrialRecord

PAPER = {  # Louizos et al. 2018, table 1 (kept units per layer, test error on full MNIST)
    "mlp": ("784-300-100 dense; L0 (lambda/N=0.1/N): 219-214-100, 1.4% error; L0-sep: 266-88-33, 1.8% error"),
    "lenet5": ("20-50-800-500 dense; L0 (lambda/N=0.1/N): 20-25-45-462, 0.9% error; L0-sep: 9-18-65-25, 1.0% error"),
}
STUDIES = {
    "mlp": {"model": {"name": "mlp"}, "optim": {"name": "adam", "lr": 0.002, "gate_lr": 0.05, "epochs": 30},
            "lam": {"scratch": {"low": 0.02, "high": 2.0, "log": True},
                    "finetune": {"low": 0.1, "high": 6.0, "log": True}}},
    "lenet5": {"model": {"name": "lenet5"}, "optim": {"name": "adam", "lr": 0.002, "gate_lr": 0.05, "epochs": 12},
               "lam": {"scratch": {"low": 0.03, "high": 3.0, "log": True},
                       "finetune": {"low": 0.15, "high": 9.0, "log": True}}},
}


def _idx(path: Path, offset: int) -> np.ndarray:
    with gzip.open(path, "rb") as fh:
        return np.frombuffer(fh.read(), dtype=np.uint8, offset=offset)


def mnist_t10k(path: str, seed: int = 0) -> tuple[TensorDataset, TensorDataset]:
    """(train 9,000, test 1,000) from the MNIST test-set files; the sweep carves 1,000 of train for validation."""
    root = Path(path)
    images = _idx(root / "t10k-images-idx3-ubyte.gz", 16).reshape(-1, 1, 28, 28)
    labels = _idx(root / "t10k-labels-idx1-ubyte.gz", 8)
    x = (torch.from_numpy(images.astype(np.float32) / 255.0) - 0.1307) / 0.3081
    y = torch.from_numpy(labels.astype(np.int64))
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    train, test = order[:9000], order[9000:]
    return TensorDataset(x[train], y[train]), TensorDataset(x[test], y[test])


LATENCY_BATCH = 64


def _study_file(model: str, data: Path, trials: int, tmp: Path, second: str = "sparsity") -> Path:
    s = STUDIES[model]
    study = {
        "name": f"mnist10k-{model}" + ("" if second == "sparsity" else f"-{second}"),
        "objectives": ["accuracy", second],
        "latency": {"batch_size": LATENCY_BATCH, "runtime": "torch"},
        "trial": {"data": {"name": "benchmarks.mnist_quality:mnist_t10k", "batch_size": 100,
                           "val_fraction": 1000 / 9000, "kwargs": {"path": str(data.resolve())}},
                  "model": s["model"], "optim": s["optim"], "seed": 0},
        "search": {"lam": s["lam"], "droprate_init": {"scratch": {"low": 0.2, "high": 0.7}, "finetune": 0.05},
                   "mode": ["scratch", "finetune"]},
        "trials": trials,
        "sampler": {"name": "tpe", "seed": 0, "n_startup_trials": max(2, trials // 2)},
        # Starting points at the same place in each model's range (lambda's scale is per model only in how much
        # of it a trial can remove and stay accurate).
        "enqueue": [{"mode": "finetune", "lam": s["lam"]["finetune"]["low"] * 6},
                    {"mode": "scratch", "lam": s["lam"]["scratch"]["low"] * 5, "droprate_init": 0.5}],
        "early_stopping": {"enabled": False},
    }
    path = tmp / f"{model}-{second}.yaml"
    path.write_text(yaml.safe_dump(study))
    return path


def _speedup(record: TrialRecord) -> float:
    """A trial's measured speed-up over dense at the latency batch size (torch)."""
    return float(record.latency["torch"][str(LATENCY_BATCH)]["speedup"])


def _arch(kept: dict) -> str:
    return "-".join(str(v[0] if isinstance(v, (list, tuple)) else v) for v in kept.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="folder with the MNIST t10k IDX files")
    parser.add_argument("--models", nargs="*", default=["mlp", "lenet5"], choices=sorted(STUDIES))
    parser.add_argument("--trials", type=int, default=8)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--objectives", nargs="+", default=["sparsity"], choices=["sparsity", "latency"],
                        help="the second objective of each model's sweep; both: one sweep each, compared")
    args = parser.parse_args()
    for name in ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        if not (args.data / name).is_file():
            sys.exit(f"mnist_quality: error: --data {args.data}: no {name} there")
    rows, notes = [], []
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        for model, second in [(m, o) for m in args.models for o in args.objectives]:
            study_file = _study_file(model, args.data, args.trials, tmp, second)
            wall, study = timed_sweep(study_file, tmp / f"{model}-{second}", "--workers", str(args.workers))
            dense = StudyRecord.read(study).dense_baseline
            complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
            front = {t.number for t in study.best_trials}
            within = [t for t in complete if t.values[0] >= dense["val_accuracy"] - 0.01]
            records = {t.number: TrialRecord.read(t) for t in complete}
            sparsity = {n: r.sparsity for n, r in records.items()}
            best = max(within, key=lambda t: sparsity[t.number]) if within else None
            timed = [t for t in within if records[t.number].latency]
            fastest = max(timed, key=lambda t: _speedup(records[t.number])) if timed else None
            label = model if second == "sparsity" else f"{model} (latency)"
            rows.append([label, "dense", "", "", f"{dense['val_accuracy']:.4f}", f"{dense['test_accuracy']:.4f}",
                         0.0, 1.0, 1.0, "", ""])
            for t in sorted(complete, key=lambda t: sparsity[t.number]):
                if t.number not in front and t is not best and t is not fastest:
                    continue
                a = records[t.number]
                role = ", ".join(r for r, chosen in (("most removed within 1 pt (val)", t is best),
                                                     ("fastest within 1 pt (val)", t is fastest)) if chosen)
                rows.append([label, t.number, a.mode, f"{a.lam:.3g}", f"{t.values[0]:.4f}",
                             f"{a.test_metric:.4f}", sparsity[t.number], a.flops_ratio,
                             f"{_speedup(a):.2f}" if a.latency else "", _arch(a.kept_units), role or "front"])
            best_record = records[best.number] if best else None
            if fastest is not None:
                notes.append(f"**{label}**: fastest within 1 point of the dense validation accuracy: trial "
                             f"{fastest.number}, {_speedup(records[fastest.number]):.2f}x the dense model's speed "
                             f"(torch, batch {LATENCY_BATCH}), {sparsity[fastest.number]:.1%} of the parameters removed, test "
                             f"accuracy {records[fastest.number].test_metric:.2%}.")
            notes.append(f"**{label}**: {len(complete)} trials in {wall:.0f} s. " + (
                f"Most removed within 1 point of the dense validation accuracy: trial {best.number}, "
                f"{sparsity[best.number]:.1%} of the parameters removed, test accuracy {best_record.test_metric:.2%} "
                f"(dense {dense['test_accuracy']:.2%}), kept {_arch(best_record.kept_units)} "
                f"({json.dumps(best_record.kept_units)}). Paper: {PAPER[model]}." if best else
                "No trial within 1 point of the dense validation accuracy."))
    print(append("Quality on real MNIST digits (t10k: 8,000 / 1,000 / 1,000)",
                 f"python -m benchmarks.mnist_quality --data {args.data} --models {' '.join(args.models)} "
                 f"--trials {args.trials} --workers {args.workers} --objectives {' '.join(args.objectives)}",
                 ["model", "trial", "mode", "lambda", "val acc", "test acc", "sparsity", "FLOPs ratio",
                  f"speed-up (torch, batch {LATENCY_BATCH})", "kept units", "role"], rows, "\n\n".join(notes), settings=vars(args)))


if __name__ == "__main__":
    main()
