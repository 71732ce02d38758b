"""Benchmark results: one JSON line per run in ``benchmarks/history/NAME.jsonl``, and ``benchmarks/RESULTS.md``
made from them.

Each benchmark calls :func:`append` once per run. The line it adds to its history file holds:

- ``benchmark``: NAME (the module, ``python -m benchmarks.NAME``); ``title``: what the table measures;
- ``timestamp``: local ISO time of the run; ``commit``: the checkout's ``git rev-parse HEAD`` and ``dirty``: whether
  tracked files (other than the history and RESULTS.md) differed from it, both null where there is no git;
- ``machine``: ``cpu``, ``cores``, ``gpu`` (null: none) and ``torch_threads``; ``versions``: ``python``, ``torch``;
- ``command``: the line that reproduces the run; ``argv``: the arguments it was given; ``settings``: the parsed
  options;
- ``columns`` and ``rows``: the figures (numbers as numbers, full precision; the table rounds floats to 3
  significant digits); ``goals``: a list of ``{"figure", "goal"}``, the goal each figure is held against where one
  exists; ``notes``: the text printed under the table;
- ``pre-history``: true only for the entries moved from the old append-only ``results.md`` log, which named no
  commit (``commit`` null, cells kept as the text the log had; a section that was not a table is kept whole as
  ``raw``).

``python -m benchmarks.results`` writes ``benchmarks/RESULTS.md`` from the history: per benchmark, the latest run of
each table (title) on each machine, with its commit and goals. ``--check`` exits 1 where RESULTS.md is not what the
history gives (a test runs it). ``L0SWEEP_BENCHMARK_HISTORY`` points the benchmarks at another folder (the
benchmarks' own tests write to a temporary one); RESULTS.md for such a folder is written inside it.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

ROOT = Path(__file__).resolve().parents[1]
HISTORY = Path(__file__).with_name("history")
RESULTS = Path(__file__).with_name("RESULTS.md")
HISTORY_ENV = "L0SWEEP_BENCHMARK_HISTORY"


def history_dir() -> Path:
    """Where runs are appended: ``$L0SWEEP_BENCHMARK_HISTORY``, else the repository's ``benchmarks/history``."""
    return Path(os.environ.get(HISTORY_ENV) or HISTORY)


def results_file(history: Path) -> Path:
    """The repository's RESULTS.md for its own history; a RESULTS.md inside any other history folder."""
    return RESULTS if history.resolve() == HISTORY.resolve() else history / "RESULTS.md"


def machine_info() -> dict[str, Any]:
    import torch

    return {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "torch_threads": torch.get_num_threads()}


def versions() -> dict[str, str]:
    import torch

    return {"python": platform.python_version(), "torch": torch.__version__}


def git_state(root: Path = ROOT) -> tuple[str | None, bool | None]:
    """(commit, dirty) of the checkout; (None, None) without git. The history and RESULTS.md do not count as
    changes: each run writes them."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, check=True,
                              timeout=30).stdout.strip()
    try:
        commit = git("rev-parse", "HEAD")
        status = git("status", "--porcelain", "--untracked-files=no", "--", ".",
                     ":(exclude)benchmarks/history", ":(exclude)benchmarks/RESULTS.md")
    except (OSError, subprocess.SubprocessError):
        return None, None
    return commit, bool(status)


def machine_key(entry: Mapping[str, Any]) -> str:
    """The machine a run is grouped under in RESULTS.md: CPU, cores, GPU (not thread counts or versions)."""
    m = entry.get("machine") or {}
    return f"{m.get('cpu', '?')}, {m.get('cores', '?')} cores, {m.get('gpu') or 'no GPU'}"


def machine_line(entry: Mapping[str, Any]) -> str:
    m, v = entry.get("machine") or {}, entry.get("versions") or {}
    return (f"{m.get('cpu', '?')}, {m.get('cores', '?')} cores, torch {v.get('torch', '?')} "
            f"({m.get('torch_threads', '?')} threads), python {v.get('python', '?')}, {m.get('gpu') or 'no GPU'}")


def _jsonable(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if value == value and abs(value) != float("inf") else str(value)  # JSON has no nan/inf
    return str(value)


def cell(v: object) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def table(columns: Sequence[str], rows: Iterable[Sequence[object]]) -> list[str]:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    return lines + ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]


def render(entry: Mapping[str, Any], *, heading: str = "##", commit: bool = False) -> str:
    """One run as Markdown: title, when and where, how to reproduce it, its table, its notes (and, with
    ``commit``, the commit and the goals)."""
    if "raw" in entry:
        return entry["raw"].rstrip() + "\n"
    lines = [f"{heading} {entry['title']}", "", f"{entry['timestamp']}; {machine_line(entry)}"]
    if commit:
        lines.append("Commit: " + (f"`{entry['commit'][:12]}`" + (" (with uncommitted changes)" if entry.get("dirty")
                                                                   else "") if entry.get("commit")
                                   else "none recorded (pre-history: moved from the old results.md log)"))
    lines += [f"Reproduce: `{entry['command']}`", "", *table(entry["columns"], entry["rows"])]
    if commit and entry.get("goals"):
        lines += ["", "Goals: " + "; ".join(f"{g['figure']} {g['goal']}" for g in entry["goals"]) + "."]
    if entry.get("notes"):
        lines += ["", entry["notes"]]
    return "\n".join(lines) + "\n"


def append(title: str, command: str, headers: Sequence[str], rows: Sequence[Sequence[object]], notes: str = "", *,
           settings: Mapping[str, Any] | None = None, goals: Sequence[Mapping[str, str]] = (),
           name: str | None = None) -> str:
    """Record one run (a line in ``history/NAME.jsonl``, RESULTS.md rewritten) and return its table as Markdown.

    ``name`` defaults to the module in ``command`` (``python -m benchmarks.NAME ...``); ``goals`` are
    ``{"figure": ..., "goal": ...}`` pairs, e.g. ``{"figure": "memory ratio", "goal": "<= 1.10"}``."""
    if name is None:
        name = command.split("benchmarks.", 1)[1].split()[0] if "benchmarks." in command else "misc"
    commit, dirty = git_state()
    entry = {"benchmark": name, "title": title, "timestamp": _dt.datetime.now().isoformat(timespec="seconds"),
             "commit": commit, "dirty": dirty, "pre-history": False, "machine": machine_info(),
             "versions": versions(), "command": command, "argv": sys.argv[1:],
             "settings": _jsonable(dict(settings or {})), "columns": list(headers), "rows": _jsonable(rows),
             "goals": [dict(g) for g in goals], "notes": notes}
    history = history_dir()
    history.mkdir(parents=True, exist_ok=True)
    with (history / f"{name}.jsonl").open("a") as fh:
        fh.write(json.dumps(entry, ensure_ascii=False) + "\n")
    results_file(history).write_text(generate(history))
    return render(entry)


def load(history: Path | None = None) -> dict[str, list[dict[str, Any]]]:
    """Every entry, per benchmark, in the order appended (oldest first)."""
    history = history or history_dir()
    return {path.stem: [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
            for path in sorted(history.glob("*.jsonl"))}


def latest(entries: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """The runs RESULTS.md shows: the last of each (title, machine) and, in a table per model (first column
    ``model``), also the last that measured each model a later run left out (a ``--models lenet5`` run does not
    hide the GoogleNet figures before it). Sorted by machine and title, newest first; entries kept as raw text (not
    runs) are left out."""
    shown: list[tuple[int, Mapping[str, Any]]] = []
    covered: dict[tuple[str, str], set[str] | None] = {}
    for at in range(len(entries) - 1, -1, -1):
        entry = entries[at]
        if "raw" in entry:
            continue
        key = (entry["title"], machine_key(entry))
        models = ({str(row[0]) for row in entry["rows"]} if entry["columns"][:1] == ["model"] and entry["rows"]
                  else None)
        if key not in covered:
            covered[key] = models
        elif models is None or covered[key] is None or models <= covered[key]:
            continue
        else:
            covered[key] |= models
        shown.append((at, entry))
    return [e for _, e in sorted(shown, key=lambda p: (machine_key(p[1]), p[1]["title"], -p[0]))]


def generate(history: Path | None = None) -> str:
    """RESULTS.md's text for a history folder."""
    history = history or history_dir()
    runs = load(history)
    out = ["# Benchmark results", "",
           "Generated by `python -m benchmarks.results` from `benchmarks/history/*.jsonl` (do not edit): for each",
           "benchmark, the latest run of each table on each machine, with the commit it measured and the goals its",
           "figures are held against. Every run, older ones included, is a line in its benchmark's history file;",
           "entries marked pre-history were moved from the old append-only log and name no commit.", ""]
    for name, entries in runs.items():
        shown = latest(entries)
        kept = sum("raw" in e for e in entries)
        out += [f"## {name}", "",
                f"`python -m benchmarks.{name}`: {len(entries) - kept} run(s) in "
                f"[`history/{name}.jsonl`](history/{name}.jsonl)"
                + (f", and {kept} note(s) kept as text" if kept else "") + ".", ""]
        for entry in shown:
            out += [render(entry, heading="###", commit=True)]
    return "\n".join(out).rstrip() + "\n"


def timed_sweep(study_file: Path, out: Path, *options: str) -> tuple[float, Any]:
    """Run ``l0sweep run STUDY_FILE --out OUT OPTIONS`` as a user would; (wall seconds, the finished study)."""
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


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.results",
                                     description="Write benchmarks/RESULTS.md from benchmarks/history/*.jsonl.")
    parser.add_argument("--history", type=Path, help="history folder (default: $L0SWEEP_BENCHMARK_HISTORY, else "
                                                      "benchmarks/history)")
    parser.add_argument("--out", type=Path, help="the file to write (default: benchmarks/RESULTS.md for the "
                                                  "repository's history, else RESULTS.md in the history folder)")
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 if the file is not current")
    args = parser.parse_args(argv)
    history = args.history or history_dir()
    out = args.out or results_file(history)
    text = generate(history)
    if args.check:
        if not out.exists() or out.read_text() != text:
            print(f"{out} is not current with {history}: run python -m benchmarks.results", file=sys.stderr)
            return 1
        return 0
    out.write_text(text)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

