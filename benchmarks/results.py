"""Append benchmark figures to benchmarks/results.md with the machine, versions, run count and medians."""
from __future__ import annotations

import datetime as _dt
import os
import platform
from pathlib import Path
from typing import Any, Sequence

import torch

# The repo's results file; L0SWEEP_BENCHMARK_RESULTS points elsewhere (the benchmarks' own tests write to a temp file).
RESULTS = Path(os.environ.get("L0SWEEP_BENCHMARK_RESULTS") or Path(__file__).with_name("results.md"))


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


def timed_sweep(study_file: Path, out: Path, *options: str) -> tuple[float, Any]:
    """Run ``l0sweep run STUDY_FILE --out OUT OPTIONS`` as a user would; (wall seconds, the finished study)."""
    import subprocess
    import sys
    import time

    import optuna
    import yaml

    from sweeps.storage import open_storage

    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "sweeps.cli", "run", str(study_file), "--out", str(out), *options],
                   check=True, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - start
    name = yaml.safe_load(Path(study_file).read_text())["name"]
    return wall, optuna.load_study(study_name=name, storage=open_storage(str(out / "optuna.journal")))
