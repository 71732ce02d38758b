"""Move the old append-only log (``benchmarks/results.md``, before the history existed) into
``benchmarks/history/NAME.jsonl`` as pre-history entries.

    python -m benchmarks.import_log OLD_RESULTS_MD [--history DIR]
    git show e30bb4b:benchmarks/results.md > /tmp/old.md && python -m benchmarks.import_log /tmp/old.md

The log was one ``## title`` section per run: a ``TIME; MACHINE`` line, ``Reproduce: `COMMAND```, a table, and
notes. Each such section becomes one entry (``commit`` null, ``pre-history`` true, cells kept as the text the log
had), and only if the entry, written back as the log wrote it, gives the section's text exactly; otherwise, and for
sections that were not a run (a hand-written "Notes on the tables above"), the text is kept whole as ``raw``, with
the benchmark it concerns. Goals the log named (a "goal" column, "(goal >= 0.8)" in a header, a goal in the notes)
are copied into ``goals``. Entries are added in the log's order, so the last of each title is the latest run.
"""
from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from typing import Any

from benchmarks.results import HISTORY, machine_line, table

_WHEN = re.compile(r"^(?P<ts>\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d); (?P<cpu>.+?), (?P<cores>\d+) cores, torch (?P<torch>\S+) "
                   r"\((?P<threads>\d+) threads\), python (?P<python>\S+), (?P<gpu>.+)$")
_REPRODUCE = re.compile(r"^Reproduce: `(?P<command>python -m benchmarks\.(?P<name>\w+)[^`]*)`$")
# What a hand-written section talks about, by the titles of the runs it names.
_TOPICS = {"Training step": "training_overhead", "Sweep overhead": "sweep_overhead", "MNIST quality": "mnist_quality"}


def sections(text: str) -> list[str]:
    """The log's ``## `` sections, each as written (heading included, trailing blank lines dropped)."""
    parts = re.split(r"(?m)^(?=## )", text)
    return [p.rstrip("\n") for p in parts if p.startswith("## ")]


def goals(columns: list[str], rows: list[list[str]], notes: str) -> list[dict[str, str]]:
    found = []
    for c in columns:
        m = re.search(r"\((?:goal )?([<>]=? ?[\d.]+)\)", c)
        if m and "goal" in c:
            figure = "memory ratio" if c.startswith("goal met") else re.sub(r"\s*\(goal [^)]*\)", "", c)
            found.append({"figure": figure, "goal": m.group(1)})
    if "goal" in columns:
        at = columns.index("goal")
        found += [{"figure": f"{row[0]}: {columns[2] if len(columns) > 2 else 'value'}", "goal": row[at]}
                  for row in rows if len(row) > at and row[at]]
    m = re.search(r"time goal <= ([\d.]+) per-batch, <= ([\d.]+) per-sample", notes)
    if m:
        found += [{"figure": f"time ratio (median of rounds), {gates} gates, at the model's own batch (128)",
                   "goal": f"<= {limit}"} for gates, limit in zip(("per-batch", "per-sample"), m.groups())]
    m = re.search(r"Goal: epochs ratio (<= [\d.]+) and hypervolume ratio (>= [\d.]+)", notes)
    if m:
        found += [{"figure": "epochs ratio to 0.99 (median over seeds)", "goal": m.group(1)},
                  {"figure": "hypervolume ratio, vs none (median over seeds)", "goal": m.group(2)}]
    m = re.search(r"Goal \(target gap at most half the lambda gap, at equal or better hypervolume\)", notes)
    if m:
        found.append({"figure": "largest sparsity gap, target / lambda (medians over seeds)",
                      "goal": "<= 0.5, at equal or better hypervolume"})
    return found


def parse(section: str) -> dict[str, Any] | None:
    """The section as a run entry, or None where it is not one the log's format gives back exactly."""
    lines = section.split("\n")
    if len(lines) < 7 or lines[1] != "" or lines[4] != "":
        return None
    when, reproduce = _WHEN.match(lines[2]), _REPRODUCE.match(lines[3])
    if not when or not reproduce:
        return None
    end = 5
    while end < len(lines) and lines[end].startswith("|"):
        end += 1
    rows_text = lines[5:end]
    if len(rows_text) < 2:
        return None

    def cells(line: str) -> list[str]:
        return line[2:-2].split(" | ") if line.startswith("| ") and line.endswith(" |") else line.strip("|").split("|")

    columns = cells(rows_text[0])
    rows = [cells(line) for line in rows_text[2:]]
    rest = lines[end:]
    if rest and rest[0] != "":
        return None
    notes = "\n".join(rest[1:])
    entry = {"benchmark": reproduce.group("name"), "title": lines[0][3:], "timestamp": when.group("ts"),
             "commit": None, "dirty": None, "pre-history": True,
             "machine": {"cpu": when.group("cpu"), "cores": int(when.group("cores")),
                         "gpu": None if when.group("gpu") == "no GPU" else when.group("gpu"),
                         "torch_threads": int(when.group("threads"))},
             "versions": {"python": when.group("python"), "torch": when.group("torch")},
             "command": reproduce.group("command"), "argv": None, "settings": None,
             "columns": columns, "rows": rows, "goals": goals(columns, rows, notes), "notes": notes}
    return entry if legacy(entry) == section else None


def legacy(entry: dict[str, Any]) -> str:
    """The entry as the old log wrote it (to check that parsing lost nothing)."""
    lines = [f"## {entry['title']}", "", f"{entry['timestamp']}; {machine_line(entry)}",
             f"Reproduce: `{entry['command']}`", "", *table(entry["columns"], entry["rows"])]
    if entry["notes"]:
        lines += ["", entry["notes"]]
    return "\n".join(lines)


def raw_entries(section: str) -> list[dict[str, Any]]:
    """A section that is not a run as the log wrote them: kept as text. A run (it names its command) whole, under its
    benchmark; a hand-written note once for each benchmark its bullets talk about (each with its own bullets), or
    under ``notes`` where none is recognised."""
    heading, _, body = section.partition("\n")
    date = re.search(r"\d{4}-\d\d-\d\d", heading)
    named = re.search(r"(?m)^Reproduce: `python -m benchmarks\.(\w+)", body)
    if named:  # a run whose table did not parse: whole, under its benchmark
        return [{"benchmark": named.group(1), "title": heading[3:], "timestamp": date.group(0) if date else None,
                 "commit": None, "dirty": None, "pre-history": True, "raw": section}]
    bullets = [b for b in re.split(r"(?m)^(?=- )", body.strip("\n")) if b.strip()]
    out: dict[str, list[str]] = {}
    for bullet in bullets:
        topic = next((name for key, name in _TOPICS.items() if bullet.startswith(f"- {key}")), "notes")
        out.setdefault(topic, []).append(bullet.rstrip("\n"))
    return [{"benchmark": name, "title": heading[3:], "timestamp": date.group(0) if date else None, "commit": None,
             "dirty": None, "pre-history": True, "raw": heading + "\n\n" + "\n".join(parts)}
            for name, parts in out.items()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("log", type=Path)
    parser.add_argument("--history", type=Path, default=HISTORY)
    args = parser.parse_args()
    entries, kept_raw = [], 0
    for section in sections(args.log.read_text()):
        entry = parse(section)
        if entry is None:
            kept_raw += 1
            entries += raw_entries(section)
        else:
            entries.append(entry)
    args.history.mkdir(parents=True, exist_ok=True)
    by_name: dict[str, list[str]] = {}
    for entry in entries:
        by_name.setdefault(entry["benchmark"], []).append(json.dumps(entry, ensure_ascii=False))
    for name, lines in by_name.items():
        path = args.history / f"{name}.jsonl"
        old = path.read_text() if path.exists() else ""
        path.write_text("\n".join(lines) + "\n" + old)  # pre-history first: it is older than any run there
    print(f"{len(entries)} entries ({kept_raw} section(s) kept as text) into {args.history}: "
          + ", ".join(f"{n} {len(v)}" for n, v in sorted(by_name.items())))


if __name__ == "__main__":
    main()
