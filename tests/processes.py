"""The live processes of this machine (Linux /proc), for the tests that check what a command left running."""
from __future__ import annotations

from pathlib import Path


def live_processes() -> list[tuple[int, str]]:
    """(process group, command line) of each live process; zombies, and processes gone while read, left out."""
    found = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            state, _, group = (proc / "stat").read_text().rsplit(")", 1)[1].split()[:3]  # after "pid (name)"
            if state != "Z":
                cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                found.append((int(group), cmdline))
        except (OSError, ValueError):
            continue
    return found


def processes_naming(text: str) -> list[str]:
    """Command lines of live processes that mention ``text``."""
    return [cmdline for _, cmdline in live_processes() if text in cmdline]


def process_group(pgid: int) -> list[str]:
    """Command lines of the live processes in process group ``pgid``."""
    return [cmdline for group, cmdline in live_processes() if group == pgid]
