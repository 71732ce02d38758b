"""Every shell command in README.md and docs/*.md names things that exist, and the README's Python example runs.

The fenced ``bash``/``sh``/``console`` blocks are read command by command (comments and ``$ `` prompts dropped,
``\\`` continuations joined). An ``l0sweep`` command (or ``python -m sweeps.cli``) must name a subcommand the
program has, and every ``--flag`` it uses must appear in that subcommand's ``--help``; a command that only asks for
help or the version is run. ``make T`` needs the Makefile target, ``docker compose`` its compose files and
services, ``python -m benchmarks.NAME`` the module and its options, ``cp`` its source file, ``pip install`` the
extras it names. A command of any other kind fails the test, so a new one gets a check here. Nothing here trains,
starts a server or touches the network."""
from __future__ import annotations

import re
import shlex
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache
from pathlib import Path

import pytest
import yaml

import sweeps

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
CLI = [sys.executable, "-m", "sweeps.cli"]


def blocks(text: str, *languages: str) -> list[str]:
    pattern = r"^```(?:" + "|".join(languages) + r")[ \t]*\n(.*?)^```"
    return re.findall(pattern, text, re.S | re.M)


def commands(path: Path) -> list[str]:
    """The shell commands of a document's shell blocks, one string each."""
    out = []
    for language, block in [(lang, b) for lang in ("bash", "sh", "console") for b in blocks(path.read_text(), lang)]:
        lines = block.splitlines()
        if language == "console":  # only the prompted lines are commands; the rest is output
            lines = [line[2:] for line in lines if line.startswith("$ ")]
        joined = re.sub(r"\\\n\s*", " ", "\n".join(lines))
        for line in joined.splitlines():
            line = re.sub(r"(^|\s)#.*$", "", line).strip()  # a comment, not a '#' inside a word or URL
            if line:
                out.append(line)
    return out


def words(command: str) -> list[str]:
    """The command's words, with the README's option notation ([--a X | --b Y], A|B) taken apart."""
    return [w for w in shlex.split(command.replace("[", " ").replace("]", " ").replace(" | ", " ")) if w]


def flags(ws: list[str]) -> set[str]:
    return {w.split("=", 1)[0] for w in ws if w.startswith("--")}


@lru_cache(maxsize=None)
def help_text(*subcommand: str) -> str:
    proc = subprocess.run([*CLI, *subcommand, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, (subcommand, proc.stderr[-2000:])
    return proc.stdout


def subcommands() -> set[str]:
    listed = help_text().split("positional arguments:", 1)[1].split("options:", 1)[0]
    return set(re.findall(r"^ {4}(\w+)", listed, re.M))


def in_help(flag: str, text: str) -> bool:
    return re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", text) is not None


def check_l0sweep(ws: list[str]) -> None:
    if flags(ws) & {"--help", "-h", "--version"} or ws[1:] in ([], ["-h"]):
        proc = subprocess.run([*CLI, *ws[1:]], cwd=ROOT, capture_output=True, text=True, timeout=120,
                              stdin=subprocess.DEVNULL)
        assert proc.returncode == 0, (ws, proc.stderr[-2000:])
        if len(ws) > 1 and not ws[1].startswith("-"):
            assert ws[1] in subcommands(), f"l0sweep has no subcommand {ws[1]!r}"
        return
    assert len(ws) > 1 and ws[1] in subcommands(), f"l0sweep has no subcommand {ws[1:2]}: {' '.join(ws)}"
    text = help_text(ws[1])
    unknown = sorted(f for f in flags(ws) if not in_help(f, text))
    assert not unknown, f"l0sweep {ws[1]} has no option {unknown}: {' '.join(ws)}"


def check_make(ws: list[str]) -> None:
    targets = set(re.findall(r"^([\w.-]+):", (ROOT / "Makefile").read_text(), re.M))
    missing = [t for t in ws[1:] if not t.startswith("-") and "=" not in t and t not in targets]
    assert not missing, f"the Makefile has no target {missing}"


def check_compose(ws: list[str]) -> None:
    args = ws[2:]
    files = [args[i + 1] for i, w in enumerate(args) if w == "-f"] or ["docker-compose.yml"]
    services: set[str] = set()
    for name in files:
        assert (ROOT / name).is_file(), f"no compose file {name}"
        services |= set(yaml.safe_load((ROOT / name).read_text()).get("services", {}))
    rest = [w for i, w in enumerate(args) if w != "-f" and (i == 0 or args[i - 1] != "-f")]
    assert rest and rest[0] in {"up", "run", "down", "logs", "ps", "build", "exec", "stop", "restart"}, ws
    named = [w for w in rest[1:] if not w.startswith("-") and "=" not in w]
    if rest[0] == "run":
        named = named[:1]  # the service; what follows is its command
    missing = [s for s in named if s not in services]
    assert not missing, f"no service {missing} in {files}"
    scaled = [w.split("=")[0] for i, w in enumerate(rest) if i and rest[i - 1] == "--scale"]
    assert all(s in services for s in scaled), scaled


def check_benchmark(ws: list[str]) -> None:
    module = ws[2].split(".", 1)[1]
    source = ROOT / "benchmarks" / f"{module}.py"
    assert source.is_file(), f"no benchmark {module}"
    known = set(re.findall(r"""["'](--[\w-]+)["']""", source.read_text()))
    unknown = sorted(flags(ws) - known - {"--help"})
    assert not unknown, f"benchmarks.{module} has no option {unknown}"


def check_pip(ws: list[str]) -> None:
    text = (ROOT / "pyproject.toml").read_text()
    extras = set(re.findall(r"^(\w+) = \[", text.split("[project.optional-dependencies]", 1)[1].split("\n[", 1)[0],
                            re.M))
    for w in ws:
        for wanted in re.findall(r"\[([\w,]+)\]", w):
            assert set(wanted.split(",")) <= extras, (w, extras)


def check(command: str) -> None:
    ws = words(command)
    if ws[:1] == ["l0sweep"]:
        return check_l0sweep(ws)
    if ws[:3] in (["python", "-m", "sweeps.cli"], ["python3", "-m", "sweeps.cli"]):
        return check_l0sweep(["l0sweep", *ws[3:]])
    if ws[:2] == ["python", "-m"] and ws[2].startswith("benchmarks."):
        return check_benchmark(ws)
    if ws[0] == "make":
        return check_make(ws)
    if ws[:2] == ["docker", "compose"]:
        return check_compose(ws)
    if ws[0] == "cp":
        assert (ROOT / ws[1]).is_file(), f"no file {ws[1]} to copy"
        return None
    if ws[:2] == ["pip", "install"] or ws[1:4] == ["-m", "pip", "install"]:
        return check_pip(ws)
    if ws[0] == "export" and re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", ws[1]):
        return None  # setting a variable a later command reads
    raise AssertionError(f"no check for this command (add one to tests/test_readme.py): {command}")


COMMANDS = [(path.relative_to(ROOT).as_posix(), command) for path in DOCS for command in commands(path)]


def test_the_readme_and_docs_have_shell_commands():
    assert any(p == "README.md" for p, _ in COMMANDS) and any(p.startswith("docs/") for p, _ in COMMANDS)
    assert ("README.md", "make sweep") in COMMANDS and ("README.md", "make test") in COMMANDS


def test_every_shell_command_in_the_readme_and_docs_names_what_exists():
    with ThreadPoolExecutor(8) as pool:  # the --help of each subcommand once, side by side
        list(pool.map(lambda sub: help_text(sub), sorted(subcommands())))
    failures = []
    for where, command in COMMANDS:
        try:
            check(command)
        except AssertionError as error:
            failures.append(f"{where}: {command}\n    {error}")
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("command, problem", [
    ("l0sweep run studies/default.yaml --wrokers 2", "no option ['--wrokers']"),
    ("l0sweep launch studies/default.yaml", "no subcommand"),
    ("make sweeep", "no target"),
    ("docker compose up -d --scale worker=2 workers", "no service"),
    ("python -m benchmarks.sweep_overhead --trails 3", "no option"),
    ("rm -rf l0sweep-out", "no check"),
])
def test_a_command_naming_what_does_not_exist_fails(command, problem):
    with pytest.raises(AssertionError, match=re.escape(problem)):
        check(command)


def test_the_readme_python_example_runs():
    """The first example runs (in seconds); the others, whole sweeps, must at least compile and name what the
    package exports (sweeps.run and sweeps.load run end to end in tests/test_your_model.py)."""
    example, *sweeping = blocks((ROOT / "README.md").read_text(), "python")
    for block in sweeping:
        compile(block, "README.md", "exec")
        for name in re.findall(r"\bsweeps\.(\w+)\(", block):
            assert name in sweeps.__all__, name
    proc = subprocess.run([sys.executable, "-c", example], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert re.fullmatch(r"\d+% of the parameters removed, [\d.]+ of the FLOPs left\n", proc.stdout), proc.stdout


def anchor(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces as hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_every_relative_link_in_the_readme_and_docs_resolves():
    documents = [*DOCS, ROOT / "studies" / "README.md"]
    broken = []
    for path in documents:
        text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+:", target):
                continue  # a URL
            file, _, fragment = target.partition("#")
            linked = (path.parent / file).resolve() if file else path
            if not linked.exists():
                broken.append(f"{path.relative_to(ROOT)}: {target} (no such file)")
            elif fragment and linked.suffix == ".md":
                headings = {anchor(h) for h in re.findall(r"^#+ (.+)$", linked.read_text(), re.M)}
                if fragment not in headings:
                    broken.append(f"{path.relative_to(ROOT)}: {target} (no such heading)")
    assert not broken, "\n".join(broken)
