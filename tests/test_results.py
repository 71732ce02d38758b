"""Benchmark results: the history files, RESULTS.md generated from them, and the old log moved into them.

benchmarks/RESULTS.md must be what ``python -m benchmarks.results`` makes of benchmarks/history (regenerated here in
memory and compared); appending a run writes only to the history folder it is pointed at."""
from __future__ import annotations

import json
import subprocess
import sys

from benchmarks import import_log, results

ROOT = results.ROOT


def test_results_md_is_current_with_the_history():
    assert results.RESULTS.read_text() == results.generate(results.HISTORY), (
        "benchmarks/RESULTS.md is stale: run python -m benchmarks.results")


def test_every_history_line_is_a_run_or_a_kept_note_of_its_benchmark():
    runs = results.load(results.HISTORY)
    assert {"training_overhead", "sweep_overhead", "export_speedup", "early_stopping"} <= set(runs)
    for name, entries in runs.items():
        for entry in entries:
            assert entry["benchmark"] == name and "commit" in entry and "pre-history" in entry
            if entry["pre-history"]:
                assert entry["commit"] is None
            if "raw" in entry:
                assert entry["pre-history"] and entry["raw"].startswith("## ")
                continue
            assert entry["command"].startswith(f"python -m benchmarks.{name}")
            assert entry["columns"] and all(len(row) == len(entry["columns"]) for row in entry["rows"])
            assert {"cpu", "cores", "gpu", "torch_threads"} <= set(entry["machine"])
            assert {"python", "torch"} <= set(entry["versions"])
            assert all(set(goal) == {"figure", "goal"} for goal in entry["goals"])


def test_append_writes_a_line_and_results_md_in_the_folder_it_is_pointed_at(tmp_path, monkeypatch):
    before = {p.name: p.read_bytes() for p in results.HISTORY.glob("*")}
    monkeypatch.setenv(results.HISTORY_ENV, str(tmp_path))
    text = results.append("Toy (cpu)", "python -m benchmarks.toy --n 2", ["model", "ms"], [["a", 1.23456], ["b", 2]],
                          "a note", settings={"n": 2, "path": tmp_path}, goals=[{"figure": "ms", "goal": "<= 2"}])
    [entry] = [json.loads(line) for line in (tmp_path / "toy.jsonl").read_text().splitlines()]
    assert entry["rows"] == [["a", 1.23456], ["b", 2]] and entry["settings"] == {"n": 2, "path": str(tmp_path)}
    assert entry["columns"] == ["model", "ms"] and entry["goals"] == [{"figure": "ms", "goal": "<= 2"}]
    assert len(entry["commit"]) == 40 and isinstance(entry["dirty"], bool) and entry["pre-history"] is False
    assert "| a | 1.23 |" in text and "Reproduce: `python -m benchmarks.toy --n 2`" in text
    md = (tmp_path / "RESULTS.md").read_text()
    assert "### Toy (cpu)" in md and f"Commit: `{entry['commit'][:12]}`" in md and "Goals: ms <= 2." in md
    assert {p.name: p.read_bytes() for p in results.HISTORY.glob("*")} == before  # the repository's untouched


def _run(title, models, ts, cpu="x86_64"):
    return {"benchmark": "b", "title": title, "timestamp": ts, "commit": None, "pre-history": True,
            "machine": {"cpu": cpu, "cores": 2, "gpu": None, "torch_threads": 2}, "versions": {},
            "command": "python -m benchmarks.b", "columns": ["model", "ms"], "rows": [[m, 1.0] for m in models]}


def test_results_show_the_latest_run_per_table_and_machine_and_of_each_model():
    old_both = _run("T", ["googlenet", "lenet5"], "1")
    older_both = _run("T", ["googlenet", "lenet5"], "0")
    lenet_only = _run("T", ["lenet5"], "2")
    other_machine = _run("T", ["lenet5"], "0", cpu="arm64")
    other_title = _run("U", ["lenet5"], "0")
    shown = results.latest([older_both, other_machine, old_both, other_title, lenet_only])
    assert shown == [other_machine, lenet_only, old_both, other_title]


def test_the_check_command_fails_on_a_stale_results_md(tmp_path):
    (tmp_path / "b.jsonl").write_text(json.dumps(_run("T", ["lenet5"], "0")) + "\n")
    command = [sys.executable, "-m", "benchmarks.results", "--history", str(tmp_path)]
    assert subprocess.run([*command, "--check"], cwd=ROOT, capture_output=True).returncode == 1
    assert subprocess.run(command, cwd=ROOT, capture_output=True).returncode == 0
    assert subprocess.run([*command, "--check"], cwd=ROOT, capture_output=True).returncode == 0


LOG = """# Benchmark results

Appended by the scripts in this folder; newest last.

## Sweep overhead (default.yaml)

2026-11-21T14:28:24; x86_64, 2 cores, torch 2.15.0+cu132 (2 threads), python 3.11.7, no GPU
Reproduce: `python -m benchmarks.sweep_overhead --study studies/default.yaml --trials 8`

| measure | values (median) | ratio (median) | each round | goal | goal met |
|---|---|---|---|---|---|
| 1 worker: sweep wall / bare training | 45.8 s / 24.9 s | 1.84 | 1.98, 1.84 | <= 1.05 | no |
| 1 worker: trial phase / bare training | 32.0 s / 24.9 s | 1.29 | 1.38, 1.29 |  |  |

3 rounds.

Hand note: by hand.

## Notes on the tables above (2026-11-21, session 3)

- Training step: the first table.
- Sweep overhead: the first
  table, continued.
## Sweep overhead (default.yaml)

2026-11-21T14:54:44; x86_64, 2 cores, torch 2.15.0+cu132 (2 threads), python 3.11.7, no GPU
Reproduce: `python -m benchmarks.sweep_overhead`

a table that is not one
"""


def test_the_old_log_moves_into_the_history_without_losing_a_figure(tmp_path):
    (tmp_path / "old.md").write_text(LOG)
    subprocess.run([sys.executable, "-m", "benchmarks.import_log", str(tmp_path / "old.md"), "--history",
                    str(tmp_path)], cwd=ROOT, check=True, capture_output=True)
    runs = results.load(tmp_path)
    assert set(runs) == {"sweep_overhead", "training_overhead"}
    table, note, broken = runs["sweep_overhead"]
    assert table["rows"][1] == ["1 worker: trial phase / bare training", "32.0 s / 24.9 s", "1.29", "1.38, 1.29",
                                "", ""]
    assert table["notes"] == "3 rounds.\n\nHand note: by hand." and table["commit"] is None and table["pre-history"]
    assert table["goals"] == [{"figure": "1 worker: sweep wall / bare training: ratio (median)", "goal": "<= 1.05"}]
    assert table["machine"] == {"cpu": "x86_64", "cores": 2, "gpu": None, "torch_threads": 2}
    assert import_log.legacy(table) in LOG
    assert note["raw"] == ("## Notes on the tables above (2026-11-21, session 3)\n\n- Sweep overhead: the first\n"
                           "  table, continued.")
    assert runs["training_overhead"][0]["raw"].endswith("\n\n- Training step: the first table.")
    assert broken["raw"] in LOG and "a table that is not one" in broken["raw"]
