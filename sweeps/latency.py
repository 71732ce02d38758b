"""Measured inference latency of a compacted model against its dense twin, and the ONNX form both run in.

What is timed (one definition, used by the sweep, ``l0sweep export`` and the report): one forward pass of the
model in eval mode under ``torch.inference_mode`` on a fixed random input of shape ``(batch, *input_shape)`` that
is already on the device (eager PyTorch; CUDA is synchronised before the clock stops), or one
``InferenceSession.run`` of the ONNX model on the CPU (ONNX Runtime's CPU provider, as many threads as torch
uses). Each figure is the median over ``runs`` timed calls after ``warmup`` untimed ones; the dense and the
compacted model are timed alternately, call by call, so that the machine's drift hits both alike. The noise is
the interquartile range of the timed calls over their median (0.1: the middle half of the calls spread over
10% of the median).
"""
from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Sequence

import torch
from torch import nn

from .formats import onnx_bytes, onnx_session

# Repetitions scale with the model's speed: enough calls to fill the time budget, within these bounds.
MIN_RUNS, MAX_RUNS, WARMUP = 5, 200, 3


@dataclass
class Timing:
    """One model at one batch size and runtime: median milliseconds per call and the noise (IQR / median)."""

    median_ms: float
    noise: float
    runs: int


@dataclass
class Comparison:
    """Dense against compacted, timed alternately at one batch size and runtime."""

    runtime: str  # "torch" | "onnxruntime"
    device: str
    batch_size: int
    dense: Timing
    compact: Timing

    @property
    def speedup(self) -> float:
        """Dense median over compacted median (> 1: the compacted model is faster)."""
        return self.dense.median_ms / self.compact.median_ms

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "speedup": self.speedup}


def _timing(samples: list[float]) -> Timing:
    q = statistics.quantiles(samples, n=4) if len(samples) >= 2 else [samples[0]] * 3
    median = statistics.median(samples)
    return Timing(median_ms=median * 1e3, noise=(q[2] - q[0]) / median if median > 0 else 0.0, runs=len(samples))


def time_alternately(calls: Sequence[Callable[[], Any]], budget_s: float, sync: Callable[[], None] = lambda: None,
                     ) -> list[Timing]:
    """Time each of ``calls`` (no arguments) alternately: ``WARMUP`` untimed rounds, then as many timed rounds as
    fit ``budget_s`` (by the warm-up's pace), at least ``MIN_RUNS`` and at most ``MAX_RUNS``."""
    start = time.perf_counter()
    for _ in range(WARMUP):
        for call in calls:
            call()
        sync()
    per_round = (time.perf_counter() - start) / WARMUP
    runs = int(min(MAX_RUNS, max(MIN_RUNS, budget_s / max(per_round, 1e-9))))
    samples: list[list[float]] = [[] for _ in calls]
    for _ in range(runs):
        for i, call in enumerate(calls):
            t = time.perf_counter()
            call()
            sync()
            samples[i].append(time.perf_counter() - t)
    return [_timing(s) for s in samples]


def _torch_call(model: nn.Module, x: torch.Tensor) -> Callable[[], Any]:
    def call() -> Any:
        with torch.inference_mode():
            return model(x)
    return call


def compare(dense: nn.Module, small: nn.Module, input_shape: Sequence[int], batch_sizes: Sequence[int],
            runtimes: Sequence[str] = ("torch",), device: str | torch.device = "cpu", budget_s: float = 0.1,
            onnx: dict[str, bytes] | None = None) -> list[Comparison]:
    """Time ``dense`` against ``small`` (both eval-mode modules) at each batch size and runtime; ``budget_s`` is
    the timed seconds per (batch size, runtime). ONNX Runtime runs on the CPU; ``onnx`` may hold both models'
    ONNX bytes (keys ``dense``, ``compact``), else they are converted here."""
    device = torch.device(device)
    out = []
    dense, small = dense.eval(), small.eval()
    if "torch" in runtimes:
        d, s = dense.to(device), small.to(device)
        sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        for b in batch_sizes:
            x = torch.randn(b, *input_shape, device=device)
            td, ts = time_alternately([_torch_call(d, x), _torch_call(s, x)], budget_s, sync)
            out.append(Comparison("torch", str(device), b, td, ts))
    if "onnxruntime" in runtimes:
        dense, small = dense.cpu(), small.cpu()
        example = torch.randn(2, *input_shape)
        onnx = onnx or {"dense": onnx_bytes(dense, example), "compact": onnx_bytes(small, example)}
        sessions = [onnx_session(onnx["dense"]), onnx_session(onnx["compact"])]
        for b in batch_sizes:
            feed = {"input": torch.randn(b, *input_shape).numpy()}
            td, ts = time_alternately([lambda s=s: s.run(None, feed) for s in sessions], budget_s)
            out.append(Comparison("onnxruntime", "cpu", b, td, ts))
    return out


def figures(comparisons: Sequence[Comparison]) -> dict[str, dict[str, dict[str, Any]]]:
    """Comparisons as JSON-ready figures: ``{runtime: {batch: {dense_ms, compact_ms, speedup, noise, ...}}}``,
    what trials keep (user attr ``latency``), ``metrics.json`` and the report read."""
    result: dict[str, dict[str, dict[str, Any]]] = {}
    for c in comparisons:
        result.setdefault(c.runtime, {})[str(c.batch_size)] = {
            "device": c.device, "dense_ms": c.dense.median_ms, "compact_ms": c.compact.median_ms,
            "speedup": c.speedup, "noise": max(c.dense.noise, c.compact.noise), "runs": c.compact.runs}
    return result
