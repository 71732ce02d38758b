"""docker-compose.yml checked as a file: these machines have no container engine, so the stack's wiring is
asserted here (services, health checks, start order, published ports, secrets, commands that the programs
accept) and the same topology runs as processes in test_service.py.
"""
from __future__ import annotations

import os
import re
import shlex
import subprocess
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
SERVICES = {"postgres", "mlflow", "create", "worker", "dashboard", "report"}
_VAR = re.compile(r"\$\$|\$\{(?P<name>\w+)(?:(?P<op>:?[-?+])(?P<arg>[^}]*))?\}|\$(?P<bare>\w+)")


class Unset(ValueError):
    """A required variable (``${X:?message}``) is missing: compose refuses to start."""


def interpolate(text: str, env: dict[str, str]) -> str:
    """Compose's variable substitution: ${X}, ${X:-default}, ${X-default}, ${X:?err}, ${X?err}, ${X:+alt}, $$."""
    def sub(m: re.Match) -> str:
        if m.group(0) == "$$":
            return "$"
        name = m.group("name") or m.group("bare")
        op, arg, value = m.group("op"), m.group("arg") or "", env.get(name)
        empty = value is None or (value == "" and op and op.startswith(":"))
        if op in (":-", "-"):
            return arg if empty else value
        if op in (":?", "?"):
            if empty:
                raise Unset(f"{name}: {arg}")
            return value
        if op in (":+", "+"):
            return "" if empty else arg
        return value or ""
    return _VAR.sub(sub, text)


def resolve(node, env):
    if isinstance(node, str):
        return interpolate(node, env)
    if isinstance(node, list):
        return [resolve(x, env) for x in node]
    if isinstance(node, dict):
        return {k: resolve(v, env) for k, v in node.items()}
    return node


def dotenv(path: Path) -> dict[str, str]:
    pairs = (line.split("=", 1) for line in path.read_text().splitlines() if line.strip() and not line.startswith("#"))
    return {k.strip(): v.strip() for k, v in pairs}


def _load(name: str) -> dict:
    return yaml.safe_load((ROOT / name).read_text())  # PyYAML resolves the x-l0sweep anchor's merge keys


@pytest.fixture(scope="module")
def raw() -> dict:
    return _load("docker-compose.yml")


@pytest.fixture(scope="module")
def env() -> dict[str, str]:
    # .env.example as a user fills it in: only the required password added.
    return {**dotenv(ROOT / ".env.example"), "POSTGRES_PASSWORD": "pw-from-env-file"}


@pytest.fixture(scope="module")
def compose(raw, env) -> dict:
    return resolve(raw, env)


def test_the_stack_has_every_part_and_nothing_unknown(compose):
    assert set(compose["services"]) == SERVICES
    assert set(compose["volumes"]) >= {"pgdata", "mlartifacts"}
    for name, svc in compose["services"].items():
        for volume in svc.get("volumes", []):
            source = volume.split(":")[0]
            assert source.startswith(".") or source in compose["volumes"], (name, volume)
            if source.startswith("."):
                assert (ROOT / source).exists(), f"{name} mounts {source}, which is not in the repository"


def test_health_checks_and_start_order(compose):
    svcs = compose["services"]
    assert "pg_isready" in " ".join(svcs["postgres"]["healthcheck"]["test"])
    assert "/health" in " ".join(svcs["mlflow"]["healthcheck"]["test"])
    expected = {
        "mlflow": {"postgres": "service_healthy"},
        "create": {"postgres": "service_healthy", "mlflow": "service_healthy"},
        "worker": {"create": "service_completed_successfully", "mlflow": "service_healthy"},
        "dashboard": {"create": "service_completed_successfully"},
        "report": {"worker": "service_completed_successfully"},
    }
    for name, deps in expected.items():
        assert {d: c["condition"] for d, c in svcs[name]["depends_on"].items()} == deps, name
    for name, svc in svcs.items():  # a health condition needs a health check to wait on
        for dep, cond in svc.get("depends_on", {}).items():
            if cond["condition"] == "service_healthy":
                assert "healthcheck" in svcs[dep], f"{name} waits for {dep} to be healthy; {dep} has no check"
            if cond["condition"] == "service_completed_successfully":
                assert svcs[dep].get("restart", "no") in ("no", "on-failure:5"), (name, dep)


def test_workers_are_replicas_that_restart_on_failure(compose):
    worker = compose["services"]["worker"]
    assert "container_name" not in worker
    assert int(worker["deploy"]["replicas"]) == 2
    assert worker["restart"].startswith("on-failure")
    assert compose["services"]["create"]["restart"] == "no"


@pytest.mark.parametrize("with_env", [True, False], ids=["env-file", "defaults"])
def test_published_ports_are_loopback_by_default(raw, env, with_env):
    values = env if with_env else {"POSTGRES_PASSWORD": "x"}
    published = {name: resolve(svc.get("ports", []), values) for name, svc in raw["services"].items()}
    assert published["mlflow"] and published["dashboard"]
    for name, ports in published.items():
        for port in ports:
            assert port.startswith("127.0.0.1:"), f"{name} publishes {port} beyond this machine"


def _walk(node, path=""):
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _walk(v, f"{path}.{k}")
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _walk(v, f"{path}[{i}]")
    elif isinstance(node, str):
        yield path, node


@pytest.mark.parametrize("name", ["docker-compose.yml", "docker-compose.auth.yml", "docker-compose.gpu.yml"])
def test_no_credential_is_written_in_the_compose_files(name):
    # Every secret-looking variable gets a marker value; then every secret-looking setting, and every
    # password inside a URL, must be exactly such a marker (or empty, where auth is off): from the env file.
    secretish = re.compile(r"PASSWORD|SECRET|TOKEN|_KEY$")
    raw_text = (ROOT / name).read_text()
    markers = {v: f"<{v}>" for v in re.findall(r"\$\{(\w+)", raw_text) if secretish.search(v)}
    filled = {v: "user" for v in re.findall(r"\$\{(\w+)", raw_text)}  # the rest as a user fills them in
    resolved = resolve(_load(name), {**filled, **{k: v for k, v in dotenv(ROOT / ".env.example").items() if v},
                                     **markers})
    for path, value in _walk(resolved):
        if secretish.search(path.rsplit(".", 1)[-1]):
            assert value in {*markers.values(), ""}, f"{name}{path}: {value!r} is written in the file"
        for url in re.findall(r"\w[\w+.-]*://\S+", value):
            password = urlsplit(url).password
            assert password is None or password in markers.values(), f"{name}{path}: literal password in {url}"
    # A missing password stops compose with a message, rather than starting with an empty or default one.
    with pytest.raises(Unset, match="POSTGRES_PASSWORD"):
        resolve(_load("docker-compose.yml"), {})


def test_env_example_holds_no_credential_and_env_is_ignored():
    example = dotenv(ROOT / ".env.example")
    for key, value in example.items():
        if re.search(r"PASSWORD|SECRET", key):
            assert value == "", f".env.example: {key} must be left for the user to fill in"
    assert ".env" in (ROOT / ".gitignore").read_text().split()


def test_two_databases_and_the_names_mlflow_answers(compose, env):
    svcs = compose["services"]
    optuna_url = svcs["worker"]["environment"]["L0SWEEP_STORAGE"]
    mlflow_url = svcs["mlflow"]["environment"]["MLFLOW_BACKEND_STORE_URI"]
    assert optuna_url.rsplit("/", 1)[1] != mlflow_url.rsplit("/", 1)[1]  # each keeps its own alembic_version
    # The form users write (README, remote workers): the image's driver must serve it (psycopg 3 on SQLAlchemy 2.1).
    assert urlsplit(optuna_url).scheme == urlsplit(mlflow_url).scheme == "postgresql"
    assert mlflow_url.rsplit("/", 1)[1] == svcs["postgres"]["environment"]["MLFLOW_DB"]
    assert any("docker-entrypoint-initdb.d" in v for v in svcs["postgres"]["volumes"])
    tracking = svcs["worker"]["environment"]["MLFLOW_TRACKING_URI"]
    host = tracking.split("://", 1)[1].rstrip("/")
    allowed = svcs["mlflow"]["environment"]["MLFLOW_SERVER_ALLOWED_HOSTS"].split(",")
    assert host in allowed, f"workers call MLflow as {host}, which the server would answer 403"
    assert f"127.0.0.1:{env['MLFLOW_PORT']}" in allowed  # the published UI


def test_the_mlflow_server_runs_without_the_genai_job_runner(compose, monkeypatch):
    """MLflow 3's server starts a job runner of seven huey consumers for GenAI scorers and evaluations, which
    l0sweep never asks for; compose turns it off as `l0sweep ui` does (test_sweep_local checks the processes)."""
    from sweeps.ui import mlflow_server_env

    monkeypatch.delenv("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", raising=False)
    off = mlflow_server_env()["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"]
    assert compose["services"]["mlflow"]["environment"]["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] == off == "false"
    monkeypatch.setenv("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "true")  # a user who wants it keeps it
    assert mlflow_server_env()["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] == "true"


def test_every_command_is_one_the_programs_accept(compose):
    from sweeps.cli import build_parser

    parser = build_parser()
    for name in ("create", "worker", "dashboard", "report"):
        svc = compose["services"][name]
        args = parser.parse_args(svc["command"])  # argparse exits (SystemExit) on an unknown option
        assert args.command == svc["command"][0]
        if hasattr(args, "study_file"):
            assert (ROOT / args.study_file).is_file(), f"{name}: no study file {args.study_file}"
    from mlflow.cli import server

    auth = resolve(_load("docker-compose.auth.yml"), {"MLFLOW_TRACKING_USERNAME": "u", "MLFLOW_TRACKING_PASSWORD": "p",
                                                      "MLFLOW_FLASK_SERVER_SECRET_KEY": "k"})
    for mlflow in (compose["services"]["mlflow"], auth["services"]["mlflow"]):
        server.make_context("server", list(mlflow["command"]))  # click raises on an unknown option
    assert compose["services"]["mlflow"]["entrypoint"] == ["mlflow", "server"]
    assert auth["services"]["mlflow"]["command"][-2:] == ["--app-name", "basic-auth"]


def test_overlays_name_only_real_services():
    for name in ("docker-compose.auth.yml", "docker-compose.gpu.yml"):
        assert set(_load(name)["services"]) <= SERVICES, name
    devices = _load("docker-compose.gpu.yml")["services"]["worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["capabilities"] == ["gpu"]


def test_the_image_runs_l0sweep_as_a_user_with_the_service_extras():
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert 'ENTRYPOINT ["l0sweep"]' in dockerfile
    assert re.search(r"^USER (?!root)\w+", dockerfile, re.M)
    assert 'pip install ".[service]"' in dockerfile
    assert re.search(r"apt-get install .*\bg\+\+", dockerfile)  # for studies with trial.compile: true
    import tomllib

    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert any(dep.lower().startswith("flask-wtf") for dep in extras["service"])  # MLflow basic auth needs it


@pytest.mark.slow
def test_the_init_script_creates_the_mlflow_database(postgres):
    from tests.postgres import _bin

    # Names of this test's own on the session's cluster (the shared MLflow server has the database "mlflow").
    postgres.create_database("optuna_init")
    env = {**os.environ, "POSTGRES_USER": "postgres", "POSTGRES_DB": "optuna_init", "MLFLOW_DB": "mlflow_init",
           "PGHOST": "127.0.0.1", "PGPORT": str(postgres.port),
           "PATH": f"{Path(_bin('psql')).parent}:{os.environ['PATH']}"}
    listed = [_bin("psql"), "-At", "-U", "postgres", "-c", "select datname from pg_database"]
    assert "mlflow_init" not in subprocess.run(listed, env=env, capture_output=True, text=True, timeout=60,
                                               check=True).stdout.split()
    subprocess.run(["sh", str(ROOT / "docker" / "postgres-init.sh")], env=env, check=True, timeout=60,
                   capture_output=True)
    assert "mlflow_init" in subprocess.run(listed, env=env, capture_output=True, text=True, timeout=60,
                                           check=True).stdout.split()


def test_interpolation_follows_compose_rules():
    env = {"A": "1", "E": ""}
    assert interpolate("${A:-2}/${B:-2}/${E:-3}/${E-4}/$$A/${A:+on}/${B:+on}", env) == "1/2/3//$A/on/"
    with pytest.raises(Unset, match="B: needed"):
        interpolate("${B:?needed}", env)
    assert shlex.split(interpolate("x ${A}", env)) == ["x", "1"]
