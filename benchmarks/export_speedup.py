"""CPU latency of a dense model vs its exported (compacted) form, against the FLOPs reduction.

    python -m benchmarks.export_speedup [--runs 30] [--closed 0.5]

For each model, a random half of every gate's units is closed, the rest open; "dense" is the same network
with every gate open and folded (a plain model of the original size). The figure of merit is
speed-up / FLOPs reduction (goal >= 0.8): how much of the arithmetic saved turns into time saved.
Both models are timed interleaved in one process, so machine noise hits them alike.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

import l0core
from benchmarks.results import append
from sweeps.models import build_model

MODELS = [("lenet5", (1, 28, 28)), ("googlenet", (3, 32, 32)), ("torchvision:resnet18", (3, 64, 64)),
          ("torchvision:mobilenet_v2", (3, 64, 64))]


def _close_fraction(model: torch.nn.Module, fraction: float, seed: int) -> None:
    rng = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, gate in l0core.gates(model):
            closed = torch.rand(gate.n, generator=rng) < fraction
            gate.log_alpha.copy_(torch.where(closed, -6.0, 6.0))


def _median_ms(model: torch.nn.Module, x: torch.Tensor, runs: int) -> list[float]:
    times = []
    with torch.inference_mode():
        for _ in range(runs):
            t = time.perf_counter()
            model(x)
            times.append((time.perf_counter() - t) * 1e3)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--closed", type=float, default=0.5)
    args = parser.parse_args()
    torch.manual_seed(0)
    rows = []
    for name, shape in MODELS:
        gated = build_model(name, shape, 10).eval()
        _close_fraction(gated, args.closed, seed=0)
        example = torch.randn(1, *shape)
        small = l0core.compact(gated, example)
        opened = build_model(name, shape, 10).eval()
        opened.load_state_dict(gated.state_dict())
        _close_fraction(opened, 0.0, seed=0)
        dense = l0core.fold(opened)[0]
        for batch in (1, 64):
            x = torch.randn(batch, *shape)
            flops_dense, flops_small = l0core.count_flops(dense, x), l0core.count_flops(small, x)
            for m in (dense, small):  # warm-up
                _median_ms(m, x, 3)
            t_dense, t_small = [], []
            for _ in range(args.runs):  # interleaved
                t_dense += _median_ms(dense, x, 1)
                t_small += _median_ms(small, x, 1)
            md, ms = statistics.median(t_dense), statistics.median(t_small)
            speedup, reduction = md / ms, flops_dense / flops_small
            rows.append([name, batch, md, ms, speedup, reduction, speedup / reduction])
            print(f"{name:28s} batch {batch:3d}: dense {md:8.2f} ms, exported {ms:8.2f} ms, "
                  f"speed-up {speedup:.2f}x, FLOPs /{reduction:.2f}, ratio {speedup / reduction:.2f}", flush=True)
    append("Export: latency speed-up vs FLOPs reduction (CPU)",
           f"python -m benchmarks.export_speedup --runs {args.runs} --closed {args.closed}",
           ["model", "batch", "dense ms (median)", "exported ms (median)", "speed-up", "FLOPs reduction",
            "speed-up / FLOPs reduction (goal >= 0.8)"], rows,
           notes=f"{args.closed:.0%} of every gate's units closed at random; {args.runs} interleaved runs each.")


if __name__ == "__main__":
    main()
