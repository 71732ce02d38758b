"""Which architectures export: channel gates on torchvision models, a fraction closed at random, then
``l0core.compact`` and ``l0core.sparsity``. Not a speed figure: whether the exported model computes what the
gated one does, and how much of it channel gates can remove.

    python -m benchmarks.architectures [--models resnet18 regnet_x_400mf ...] [--closed 0.5]

Convnets run on 64x64 inputs, transformers (which fix their input size) on 224x224. A model torch-pruning
cannot trace is listed with the one-line error a user gets.
"""
from __future__ import annotations

import argparse
import time

import torch
import torchvision

import l0core
from benchmarks.export_speedup import _close_fraction
from benchmarks.results import append
from sweeps.spec import one_line
from tests.helpers import randomize_batchnorm  # non-trivial BatchNorm, so folding mistakes would show

MODELS = ["alexnet", "vgg11_bn", "resnet18", "resnet50", "resnext50_32x4d", "wide_resnet50_2", "densenet121",
          "squeezenet1_1", "mobilenet_v2", "mobilenet_v3_small", "mnasnet0_5", "shufflenet_v2_x0_5",
          "efficientnet_b0", "efficientnet_v2_s", "regnet_x_400mf", "regnet_y_400mf", "convnext_tiny", "googlenet",
          "vit_b_16", "swin_t"]
FIXED_SIZE = {"alexnet", "vit_b_16", "swin_t"}  # the classifier or the patch grid expects 224x224


def one(name: str, closed: float) -> list[object]:
    start = time.perf_counter()
    kwargs = {"aux_logits": False, "init_weights": True} if name == "googlenet" else {}
    model = torchvision.models.get_model(name, weights=None, num_classes=10, **kwargs)
    size = 224 if name in FIXED_SIZE else 64
    x = torch.randn(1, 3, size, size)
    randomize_batchnorm(model)
    try:
        l0core.attach(model, "channel", example_inputs=x)
        _close_fraction(model, closed, seed=0)
        model.eval()
        small = l0core.compact(model, x)
        report = l0core.sparsity(model, x)
    except ValueError as exc:  # the one-line error a user gets
        return [name, size, "no", "", "", "", one_line(exc), f"{time.perf_counter() - start:.0f}"]
    with torch.no_grad():
        expected, got = model(x), small(x)
    diff = float((expected - got).abs().max() / expected.abs().max().clamp_min(1.0))
    return [name, size, "yes" if diff <= 1e-5 else "outputs differ", f"{diff:.1e}", f"{report.sparsity:.3f}",
            f"{report.flops_ratio:.3f}", "", f"{time.perf_counter() - start:.0f}"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=MODELS, help="torchvision model names")
    parser.add_argument("--closed", type=float, default=0.5, help="fraction of each gate's units closed")
    args = parser.parse_args()
    rows = []
    for name in args.models:
        rows.append(one(name, args.closed))
        print(" | ".join(map(str, rows[-1])), flush=True)
    print(append(f"Which architectures export (channel gates, {args.closed:.0%} closed)",
                 f"python -m benchmarks.architectures --closed {args.closed}"
                 + ("" if args.models == MODELS else f" --models {' '.join(args.models)}"),
                 ["model", "input", "exports", "max diff / output scale", "sparsity", "FLOPs ratio", "error",
                  "seconds"], rows,
                 f"{args.closed:.0%} of every channel gate's units closed at random (seed 0), BatchNorm statistics "
                 "randomised; sparsity and FLOPs ratio from l0core.sparsity, which counts the exported model.",
                 settings=vars(args)))


if __name__ == "__main__":
    main()
