"""Append benchmark figures to benchmarks/results.md with the machine, versions, run count and medians."""
from __future__ import annotations

import datetime as _dt
import os
import platform
from pathlib import Path
from typing import Sequence

import torch

RESULTS = Path(__file__).with_name("results.md")


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads), "
            f"python {platform.python_version()}, {gpu}")


def append(title: str, command: str, headers: Sequence[str], rows: Sequence[Sequence[object]], notes: str = "") -> str:
    """Write one table of results (and return it as Markdown)."""
    def cell(v: object) -> str:
        return f"{v:.3g}" if isinstance(v, float) else str(v)

    lines = [f"## {title}", "", f"{_dt.datetime.now().isoformat(timespec='seconds')}; {machine()}",
             f"Reproduce: `{command}`", "", "| " + " | ".join(headers) + " |",
             "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    if notes:
        lines += ["", notes]
    text = "\n".join(lines) + "\n\n"
    if not RESULTS.exists():
        RESULTS.write_text("# Benchmark results\n\nAppended by the scripts in this folder; newest last.\n\n")
    with RESULTS.open("a") as fh:
        fh.write(text)
    return text
