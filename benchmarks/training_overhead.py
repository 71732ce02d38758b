"""The cost of L0 training: time and peak memory of one training step, gated / dense, same model and batch.

    python -m benchmarks.training_overhead [--rounds 10] [--steps 3] [--instances 3] [--min-seconds 0.5] [--device auto] [--amp] [--channels-last] [--compile [--cold]] [--batch N]

Variants of each model: dense (no gates, no penalty), gated with one gate draw per batch, gated with one
draw per example, and a second, identical dense model ("dense again": its ratio to the first is the noise
floor, what a ratio of two equal steps reads on this machine). Each takes the real training step
(``sweeps.loop.train_step``: forward, cross-entropy, the L0 penalty, backward, Adam as trials build it).
Timing is interleaved: every round runs ``--steps`` steps of each variant in turn (more for a model whose
steps fill less than ``--min-seconds``), starting one variant later each round (a fixed order favours some positions by a few percent), so machine noise hits them alike; the ratio
is taken per round, and the median over rounds is reported. A gated variant's ratio is to the mean of the two
dense models: identical models run at speeds 2-10% apart in one process (where their tensors lie), and one
dense model alone would pass its own speed on to every ratio. For the same reason each variant is built
``--instances`` times (separately allocated, identical models): round r times instance r mod K of every
variant, so no single allocation's luck sets a variant's median. Goals: time ratio <= 1.05 per-batch, <= 1.15
per-sample; peak memory <= 1.10. "Extra ms" is the median over rounds of gated minus dense time a step: at
``--batch 1`` it is the gates' fixed cost (Python, dispatch and autograd bookkeeping for their operators),
which a bigger batch spreads thinner.

Operators a step runs (forward, backward, optimizer; views excluded), counted by a dispatch mode: a figure
that no noise moves, and on a GPU about one kernel launch each, which is what bounds a small model's step there.

``--compile`` times every variant with its forward compiled, as a trial with ``compile: true`` trains
(``torch.compile``: inductor, the gates' draw and products traced into the graph; the penalty, backward's
bookkeeping and Adam as eager). It asks whether compiling takes the gates' per-operator cost out of a step.
Operators are then not counted (compiled kernels bypass the dispatcher), and the first steps of each variant,
which compile, are outside the step times: their wall time is the last column, without inductor's disk caches
with ``--cold`` (a fresh machine's first trial).

Peak memory of a step: ``torch.cuda.max_memory_allocated`` on a GPU; on the CPU, the peak of the torch
profiler's memory timeline (every tensor the step allocates: activations, gradients, optimizer state).
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import torch

import l0core
from benchmarks.results import append
from sweeps.models import build_model
from sweeps.config import OptimConfig
from sweeps.loop import build_optimizer, train_step
from sweeps.runtime import keep_freed_memory, resolve_device

MODELS = [("googlenet", (3, 32, 32), 128), ("lenet5", (1, 28, 28), 128)]
VARIANTS = ("dense", "dense again", "per-batch", "per-sample")


class Setup:
    """One variant: a model, its optimizer, a fixed batch and the step's arguments."""

    def __init__(self, name: str, shape: tuple[int, ...], batch: int, variant: str, device: torch.device,
                 amp: bool, channels_last: bool, compiled: bool = False) -> None:
        torch.manual_seed(0)
        self.model = build_model(name, shape, 10, gates=not variant.startswith("dense"),
                                 per_sample=variant == "per-sample").to(device).train()
        self.x = torch.randn(batch, *shape, device=device)
        self.y = torch.randint(0, 10, (batch,), device=device)
        if not variant.startswith("dense"):
            l0core.measure_couplings(self.model, self.x[:1])  # as a trial does: the count's coupled groups
        if channels_last and self.x.dim() == 4:
            self.model = self.model.to(memory_format=torch.channels_last)
            self.x = self.x.contiguous(memory_format=torch.channels_last)
        self.opt = build_optimizer(self.model, OptimConfig(name="adam", lr=1e-3))[0]  # as a trial's
        # As a trial with compile: true trains: the forward through torch.compile, on the same module and parameters.
        self.forward = torch.compile(self.model) if compiled else self.model
        self.lam = None if variant.startswith("dense") else 0.1
        self.device = device
        # As a trial with amp: true runs: bfloat16 on CPU, float16 with a gradient scaler on CUDA.
        cuda = device.type == "cuda"
        self.autocast = (torch.float16 if cuda else torch.bfloat16) if amp else None
        self.scaler = torch.amp.GradScaler("cuda") if amp and cuda else None

    def step(self) -> None:
        train_step(self.forward, self.opt, self.x, self.y, self.lam, autocast=self.autocast, scaler=self.scaler)

    def timed(self, steps: int) -> float:
        """Seconds per step over ``steps`` steps (the device synchronised at both ends)."""
        sync = torch.cuda.synchronize if self.device.type == "cuda" else (lambda: None)
        sync()
        start = time.perf_counter()
        for _ in range(steps):
            self.step()
        sync()
        return (time.perf_counter() - start) / steps

    def ops(self) -> int | None:
        """Operators one step dispatches, views and detaches left out (they launch no kernel); None compiled."""
        if self.forward is not self.model:  # compiled
            return None
        from torch.utils._python_dispatch import TorchDispatchMode

        class Count(TorchDispatchMode):
            n = 0

            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                if not func.is_view and func is not torch.ops.aten.detach.default:
                    Count.n += 1
                return func(*args, **(kwargs or {}))

        with Count():
            self.step()
        return Count.n

    def peak_bytes(self) -> int:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.step()
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated()  # the whole footprint (weights included), as on the CPU
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True,
                     with_stack=True) as prof:
            self.step()
        with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
            # Deprecated in favour of a CUDA-only recorder; it is still the one CPU memory timeline torch has.
            warnings.simplefilter("ignore", FutureWarning)
            path = Path(tmp) / "timeline.json"
            prof.export_memory_timeline(str(path), device="cpu")
            _, sizes = json.loads(path.read_text())
        return int(max(sum(s) for s in sizes))


def measure(name: str, shape: tuple[int, ...], batch: int, args: argparse.Namespace) -> dict:
    device = resolve_device(args.device)
    if device.type == "cpu":
        keep_freed_memory()  # as a trial's training does (benchmarks/cpu_allocator.py measures what it saves)
    instances = {v: [Setup(name, shape, batch, v, device, args.amp, args.channels_last, args.compile)
                     for _ in range(args.instances)] for v in VARIANTS}
    first_s = {}  # each variant's first two steps: lazy init, and with --compile the compilation
    for v, each in instances.items():  # warm-up: lazy init, optimizer state, allocator caches
        for setup in each:
            first_s.setdefault(v, setup.timed(2) * 2)
    setups = {v: each[0] for v, each in instances.items()}  # the instance that ops and memory are measured on
    # A short step gets more of them a round: a few 40 ms steps are one noisy window, half a second is not.
    steps = max(args.steps, math.ceil(args.min_seconds / setups["dense"].timed(2)))
    per_step = {v: [] for v in VARIANTS}
    for r in range(args.rounds):
        for v in VARIANTS[r % len(VARIANTS):] + VARIANTS[:r % len(VARIANTS)]:
            per_step[v].append(instances[v][r % args.instances].timed(steps))
    # The noise floor: one dense model against the other. Gated variants: against the two dense models' mean.
    reference = {"dense again": per_step["dense"],
                 **{v: [(a + b) / 2 for a, b in zip(per_step["dense"], per_step["dense again"])] for v in VARIANTS[2:]}}
    ratios = {v: statistics.median(a / d for a, d in zip(per_step[v], reference[v])) for v in VARIANTS[1:]}
    extra_ms = {v: statistics.median(a - d for a, d in zip(per_step[v], reference[v])) * 1e3 for v in VARIANTS[1:]}
    # The first profiled step of a model reads up to 7% high on the CPU (blocks allocated before the profiler
    # started show up in its timeline); the second is exact and repeats to the byte, so take the lower of two.
    peaks = {v: min(s.peak_bytes(), s.peak_bytes()) for v, s in setups.items()}
    return {"steps": steps, "ms": {v: statistics.median(t) * 1e3 for v, t in per_step.items()}, "ratio": ratios,
            "extra_ms": extra_ms, "reference_ms": {v: statistics.median(t) * 1e3 for v, t in reference.items()},
            "ops": {v: s.ops() for v, s in setups.items()},
            "peak_mb": {v: b / 2**20 for v, b in peaks.items()},
            "mem_ratio": {v: peaks[v] / peaks["dense"] for v in VARIANTS[1:]}, "first_s": first_s}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--steps", type=int, default=3, help="steps per variant per round (at least)")
    parser.add_argument("--instances", type=int, default=3,
                        help="identical models built per variant, taking the rounds in turn (memory placement evened out)")
    parser.add_argument("--min-seconds", type=float, default=0.5,
                        help="more steps a round for a model whose steps take less than this together")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda")
    parser.add_argument("--amp", action="store_true", help="autocast (bfloat16 on CPU, float16 on CUDA)")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--compile", action="store_true", help="compile each model's forward (torch.compile), as trial.compile does")
    parser.add_argument("--cold", action="store_true",
                        help="with --compile: compile without inductor's caches, as the first trial on a fresh machine")
    parser.add_argument("--models", nargs="*", default=[m[0] for m in MODELS])
    parser.add_argument("--batch", type=int, default=None,
                        help="batch size for every model (default: each model's own, 128; the goals are set there)")
    args = parser.parse_args()
    if args.instances < 1:
        parser.error(f"--instances must be at least 1, got {args.instances}")
    if args.cold and not args.compile:
        parser.error("--cold goes with --compile (it is about compiling)")
    if args.compile:
        # Several models of one architecture compile in this process, and per-example gates act through hooks,
        # which dynamo does not guard on by default: without this, the per-sample models reused the dense
        # model's graph (no gates). Trials reset dynamo instead (sweeps.runtime.compiled); here that would
        # drop the other variants' graphs.
        torch._dynamo.config.skip_nnmodule_hook_guards = False
    if args.cold:
        import torch._inductor.config as inductor_config  # binds only the alias: `torch` stays the global

        inductor_config.force_disable_caches = True
    rows, steps = [], {}
    for name, shape, own_batch in MODELS:
        if name not in args.models:
            continue
        batch = args.batch or own_batch
        r = measure(name, shape, batch, args)
        steps[name] = r["steps"]
        for v in VARIANTS[1:]:
            goal = {"dense again": None, "per-batch": 1.05, "per-sample": 1.15}[v]
            met = "(noise floor)" if goal is None else f"(goal at batch {own_batch})" if batch != own_batch \
                else "yes" if r["ratio"][v] <= goal else "no"
            rows.append([name, batch, v, f"{r['reference_ms'][v]:.1f}", f"{r['ms'][v]:.1f}", f"{r['extra_ms'][v]:.2f}",
                         f"{r['ratio'][v]:.3f}", met, f"{r['ops']['dense']} / {r['ops'][v]}" if not args.compile else "-", f"{r['peak_mb']['dense']:.1f}",
                         f"{r['peak_mb'][v]:.1f}", f"{r['mem_ratio'][v]:.3f}",
                         "yes" if r["mem_ratio"][v] <= 1.10 else "no", f"{r['first_s']['dense']:.2f} / {r['first_s'][v]:.2f}"])
        print(name, json.dumps(r, indent=1), flush=True)
    flags = " ".join(f for f, on in (("--amp", args.amp), ("--channels-last", args.channels_last),
                                      ("--compile", args.compile), ("--cold", args.cold)) if on)
    models = "" if args.models == [m[0] for m in MODELS] else " --models " + " ".join(args.models)
    models += f" --batch {args.batch}" if args.batch else ""
    command = f"python -m benchmarks.training_overhead --rounds {args.rounds} --steps {args.steps} " \
              f"--instances {args.instances} --min-seconds {args.min_seconds:g} --device {args.device}{models} {flags}".strip()
    print(append(f"Training step: gated / dense ({resolve_device(args.device).type}"
                 f"{', ' + flags if flags else ''})", command,
                 ["model", "batch", "gates", "dense ms (the reference)", "gated ms", "extra ms", "time ratio (median of rounds)", "goal met",
                  "ops a step (dense / gated)", "dense peak MB", "gated peak MB", "memory ratio", "goal met (<= 1.10)",
                  "first 2 steps s (dense / gated)"], rows,
                 f"{args.rounds} rounds x ({', '.join(f'{n} {k}' for n, k in steps.items())}) steps per variant (at least "
                 f"{args.steps}, and {args.min_seconds:g} s a round), interleaved, over {args.instances} identical instances "
                 "of each variant in turn; time goal <= 1.05 per-batch, "
                 "<= 1.15 per-sample; the order rotates each round. 'dense again': a second dense model timed as the others, "
                 "its ratio the noise floor; gated ratios are to the mean of the two dense models. Step = forward, cross-entropy, L0 penalty (gated), backward, Adam. Ops: operators "
                 "dispatched, views excluded (on a GPU about one kernel launch each)."
                 + (" Compiled: each model's forward compiled (torch.compile, inductor), its first steps (the "
                    "compilation) left out of the step times; penalty, backward and Adam run as eager; ops not counted. "
                    "First 2 steps: the compilation, " + ("without inductor's caches (--cold)" if args.cold else
                    "with inductor's caches as earlier runs left them") + "; 'dense again' reuses the dense model's "
                    "graphs." if args.compile else ""), settings=vars(args), goals=[
                     {"figure": "time ratio (median of rounds), per-batch gates, at the model's own batch (128)",
                      "goal": "<= 1.05"},
                     {"figure": "time ratio (median of rounds), per-sample gates, at the model's own batch (128)",
                      "goal": "<= 1.15"},
                     {"figure": "memory ratio", "goal": "<= 1.10"}]))


if __name__ == "__main__":
    main()
