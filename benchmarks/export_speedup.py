"""CPU latency of a dense model vs its exported (compacted) form, against the FLOPs reduction.

    python -m benchmarks.export_speedup [--budget 0.5] [--closed 0.5]        # eager and ONNX Runtime, round_to 1 and 8
    python -m benchmarks.export_speedup --breakdown [--runs 30] [--channels-last] [--compile]

The default table times, for each model at batch 1 and 64, eager PyTorch and ONNX Runtime (CPU), the exported
model with and without ``round_to: 8`` against the dense one, as ``l0sweep export`` does (sweeps.latency: medians
of alternating calls), and sets speed-up / FLOPs reduction beside Torch-Pruning's published 0.57-0.73
(its README: ResNet-50 at 2x-3.9x fewer FLOPs ran 1.35x-2.19x faster, GPU, batch 64). ``--breakdown`` is the
earlier eager-only table with the profiler's conv/matmul share:

For each model, a random half of every gate's units is closed, the rest open; "dense" is the same network
with every gate open and folded (a plain model of the original size). The figure of merit is
speed-up / FLOPs reduction: how much of the arithmetic saved turns into time saved. It is no goal: at batch 1
these networks are bound by per-operator cost, so what counts is the latency measured at the user's batch size
(``l0sweep export``, the latency objective); the ratio says where the time went.
Both models are timed interleaved in one process, so machine noise hits them alike.

Where the ratio falls short, the time breakdown says why: the share of the dense model's time spent in the
operations FLOPs count (convolutions and matrix products, from the torch profiler), and how much faster
those alone became, per FLOPs saved. Pooling, normalisation, activations and concatenation count no FLOPs,
and shrink only with the channel count (2x for half the channels, where a convolution's FLOPs shrink 4x).

``--compile`` times both models as deployed with ``torch.compile`` (inductor, with freezing: BatchNorm folded
into the convolutions, weights pre-packed), which removes most per-operator overhead.
"""
from __future__ import annotations

import argparse
import re
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


COMPILED_NOTE = (" Compiled: dense and exported each compiled for the batch size (inductor, freezing); the "
                 "conv/matmul kernels then carry the BatchNorm and activations fused into them, so those two "
                 "columns do not compare with eager runs.")
_COUNTED = re.compile(r"conv|addmm|^aten::mm$|^aten::bmm$|matmul|linear")


def _counted_share(model: torch.nn.Module, x: torch.Tensor, runs: int = 5) -> tuple[float, float]:
    """(seconds per forward in FLOP-counted operations, seconds per forward in all), from the profiler."""
    from torch.profiler import ProfilerActivity, profile

    with torch.inference_mode(), profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(runs):
            model(x)
    events = prof.key_averages()
    counted = sum(e.self_cpu_time_total for e in events if _COUNTED.search(e.key))
    total = sum(e.self_cpu_time_total for e in events)
    return counted / runs / 1e6, total / runs / 1e6


TORCH_PRUNING = "0.57-0.73"  # Torch-Pruning's README: speed-up / FLOPs reduction of its pruned ResNet-50s


def deploy_table(budget: float, closed: float) -> None:
    """Eager and ONNX Runtime, round_to 1 and 8, batch 1 and 64: speed-up, FLOPs reduction, their ratio."""
    from sweeps import formats, latency

    rows = []
    for name, shape in MODELS:
        gated = build_model(name, shape, 10).eval()
        _close_fraction(gated, closed, seed=0)
        example = torch.randn(1, *shape)
        dense = build_model(name, shape, 10, gates=False).eval()
        onnx_dense = formats.onnx_bytes(dense, example)
        for k in (1, 8):
            small = l0core.compact(gated, example, round_to=k).eval()
            onnx = {"dense": onnx_dense, "compact": formats.onnx_bytes(small, example)}
            reduction = l0core.count_flops(dense, example) / l0core.count_flops(small, example)
            for c in latency.compare(dense, small, shape, (1, 64), ("torch", "onnxruntime"), "cpu", budget, onnx):
                rows.append([name, c.batch_size, c.runtime, k, c.dense.median_ms, c.compact.median_ms, c.speedup,
                             reduction, c.speedup / reduction, TORCH_PRUNING,
                             f"{max(c.dense.noise, c.compact.noise):.0%}"])
                print(" | ".join(str(v) if not isinstance(v, float) else f"{v:.3g}" for v in rows[-1]), flush=True)
    append("Export: measured speed-up vs FLOPs reduction, eager and ONNX Runtime, round_to 1 and 8 (CPU)",
           f"python -m benchmarks.export_speedup --budget {budget} --closed {closed}",
           ["model", "batch", "runtime", "round_to", "dense ms", "exported ms", "speed-up", "FLOPs reduction",
            "speed-up / FLOPs reduction", "Torch-Pruning published", "noise (IQR/median)"], rows,
           notes=f"{closed:.0%} of every gate's units closed at random (the same units for both round_to); dense: the "
                 "model without gates. Latency as sweeps.latency defines it: one forward in eval mode (eager: "
                 "torch.inference_mode; ONNX Runtime: CPU provider, torch's thread count), median of alternating "
                 f"dense/exported calls filling {budget} s after 3 warm-up rounds (5-200 calls). FLOPs are per "
                 "example (torch.utils.flop_counter). Torch-Pruning's 0.57-0.73 is its README's ResNet-50 table "
                 "(GPU, batch 64), the only published figure to compare with, not the same hardware.",
           settings={"budget": budget, "closed": closed})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--budget", type=float, default=0.5, help="timed seconds per comparison (default table)")
    parser.add_argument("--closed", type=float, default=0.5)
    parser.add_argument("--breakdown", action="store_true", help="the eager table with the conv/matmul breakdown")
    parser.add_argument("--channels-last", action="store_true", help="both models and inputs in channels_last")
    parser.add_argument("--compile", action="store_true", help="time both models compiled (torch.compile, freezing)")
    args = parser.parse_args()
    if not (args.breakdown or args.channels_last or args.compile):
        deploy_table(args.budget, args.closed)
        return
    if args.compile:
        import torch._inductor.config

        torch._inductor.config.freezing = True  # inference: fold BatchNorm and constants into the compiled graph
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
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
        layout = fmt if len(shape) == 3 else torch.contiguous_format  # channels_last needs (N, C, H, W)
        dense, small = dense.to(memory_format=layout), small.to(memory_format=layout)
        for batch in (1, 64):
            x = torch.randn(batch, *shape).contiguous(memory_format=layout)
            flops_dense, flops_small = l0core.count_flops(dense, x), l0core.count_flops(small, x)
            if args.compile:
                torch._dynamo.reset()  # compile for this batch size only, not a dynamic-shape graph
                run_dense, run_small = torch.compile(dense), torch.compile(small)
            else:
                run_dense, run_small = dense, small
            for m in (run_dense, run_small):  # warm-up (and compilation)
                _median_ms(m, x, 3)
            t_dense, t_small = [], []
            for _ in range(args.runs):  # interleaved
                t_dense += _median_ms(run_dense, x, 1)
                t_small += _median_ms(run_small, x, 1)
            md, ms = statistics.median(t_dense), statistics.median(t_small)
            speedup, reduction = md / ms, flops_dense / flops_small
            (cd, td), (cs, _) = _counted_share(run_dense, x), _counted_share(run_small, x)
            rows.append([name, batch, md, ms, speedup, reduction, speedup / reduction, f"{cd / td:.0%}",
                         (cd / cs) / reduction])
            print(f"{name:28s} batch {batch:3d}: dense {md:8.2f} ms, exported {ms:8.2f} ms, "
                  f"speed-up {speedup:.2f}x, FLOPs /{reduction:.2f}, ratio {speedup / reduction:.2f}; "
                  f"conv/matmul {cd / td:.0%} of dense time, their ratio {(cd / cs) / reduction:.2f}", flush=True)
    flag = (" --channels-last" if args.channels_last else "") + (" --compile" if args.compile else "")
    how = ", ".join(["CPU"] + ["channels_last"] * args.channels_last + ["torch.compile"] * args.compile)
    append(f"Export: latency speed-up vs FLOPs reduction ({how})",
           f"python -m benchmarks.export_speedup --runs {args.runs} --closed {args.closed}{flag}",
           ["model", "batch", "dense ms (median)", "exported ms (median)", "speed-up", "FLOPs reduction",
            "speed-up / FLOPs reduction", "dense time in conv/matmul",
            "conv/matmul alone: speed-up / FLOPs reduction"], rows,
           notes=f"{args.closed:.0%} of every gate's units closed at random; {args.runs} interleaved runs each. "
                 "Conv/matmul: self CPU time of convolution and matrix-product operators (torch profiler, "
                 "5 forwards each), the only operators the FLOPs count." + (COMPILED_NOTE if args.compile else ""),
           settings=vars(args))


if __name__ == "__main__":
    main()
