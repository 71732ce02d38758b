"""Runtime setup of a process that trains: the device, glibc's allocator, torch.compile and the compiler it needs.

Each is decided once per process or per model, apart from what a trial trains (sweeps.loop, sweeps.training).
"""
from __future__ import annotations

import ctypes
import functools
import platform

import torch
from torch import nn

from .spec import SpecError


def resolve_device(device: str) -> torch.device:
    """``device`` as torch names it: ``"auto"`` is CUDA where there is a GPU, else the CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)


@functools.cache
def keep_freed_memory() -> bool:
    """Have glibc's malloc keep freed blocks for reuse instead of giving them back to the system; True if it took.

    By default every tensor bigger than glibc's mmap threshold (at most 32 MiB, and 128 KiB until it adapts)
    gets fresh pages from the kernel, and a heap with more free memory at its top than the trim threshold gives
    it back. A CPU training step frees and allocates the same tensors every step, so it paid for the same pages
    again each time: about 2,700 page faults a step of LeNet-5 at batch 128, 65,000 of GoogleNet's (9 and 700
    with this; ``python -m benchmarks.cpu_allocator``). With both thresholds raised, the memory a worker holds
    stays at the peak its steps reach anyway (peak resident memory unchanged). Once per process; without glibc
    it does nothing.

    >>> keep_freed_memory() in (True, False)  # True on Linux with glibc
    True
    """
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, 1 << 30) and mallopt(_M_TRIM_THRESHOLD, 1 << 30))


def compiled(model: nn.Module) -> nn.Module:
    """``model`` with its forward through ``torch.compile``, traced afresh for this model.

    Dynamo does not guard on module hooks (``torch._dynamo.config.skip_nnmodule_hook_guards``), and neuron gates
    and per-example channel gates act through hooks: such a model passes the guards of a graph compiled earlier
    in the process for its dense twin (a fine-tuning trial's baseline), which would then run with no gates.
    So dynamo's caches are reset first; that also keeps a worker's earlier trials from counting against its
    recompile limit. Inductor's disk cache still spares rebuilding kernels it has seen.

    >>> net = compiled(nn.Linear(2, 1))
    >>> net(torch.ones(3, 2)).shape
    torch.Size([3, 1])
    """
    torch._dynamo.reset()
    return torch.compile(model)


def check_compiler() -> None:
    """Raise :class:`SpecError` (one line) unless this machine has the C++ compiler ``trial.compile`` needs.

    torch.compile's inductor builds its CPU kernels with it (and Triton its GPU launcher with the C compiler
    that comes with it); without one, every trial would fail at its first step with a long backend error.
    """
    from torch._inductor.cpp_builder import get_cpp_compiler

    try:
        get_cpp_compiler()
    except Exception:
        raise SpecError("trial.compile: true needs a C++ compiler on this machine (torch.compile builds its "
                        "kernels with it): install g++ or set CXX to one, or set trial.compile: false") from None
