import os
import sys

import pytest
import torch

# A user's shell may point l0sweep at shared stores; the tests make their own, in temp dirs.
for _var in ("L0SWEEP_STORAGE", "L0SWEEP_OUT", "L0SWEEP_DATA_DIR", "L0SWEEP_CACHE_DIR", "MLFLOW_TRACKING_URI"):
    os.environ.pop(_var, None)


def _share_the_cores() -> None:
    """Under ``pytest -n N`` (``make test``), each test process and what it starts gets its share of the cores:
    two processes each running torch on every core spin against each other."""
    processes = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if processes > 1:
        threads = max(1, (os.cpu_count() or 1) // processes)
        torch.set_num_threads(threads)
        os.environ.setdefault("OMP_NUM_THREADS", str(threads))


_share_the_cores()


def pytest_collection_modifyitems(items):
    """Files whose tests are all slow (``pytestmark = pytest.mark.slow``) first: ``make test`` hands whole files to
    its test processes in this order, and a long file handed out last keeps one process busy after the other ends."""
    def whole_file_slow(item) -> bool:
        marks = getattr(getattr(item, "module", None), "pytestmark", [])
        return any(mark.name == "slow" for mark in (marks if isinstance(marks, list) else [marks]))

    items.sort(key=lambda item: not whole_file_slow(item))


@pytest.fixture(scope="session", autouse=True)
def _cache_dir(tmp_path_factory):
    """What l0sweep makes once per machine (the migrated empty MLflow store) made once per test run, in a temp dir
    rather than the user's ~/.cache; every l0sweep subprocess inherits it."""
    os.environ["L0SWEEP_CACHE_DIR"] = str(tmp_path_factory.mktemp("l0sweep-cache"))
    yield
    os.environ.pop("L0SWEEP_CACHE_DIR", None)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(autouse=True)
def _no_leaked_tracking_uri():
    """mlflow.set_tracking_uri also exports MLFLOW_TRACKING_URI, which the CLI (and so every later test's
    subprocess) would take as its default: undo it after each test."""
    yield
    if "mlflow" in sys.modules:
        sys.modules["mlflow"].set_tracking_uri(None)
    os.environ.pop("MLFLOW_TRACKING_URI", None)


# Expensive parts, made once per session and shared: each costs seconds to start on a 2-core machine, and the
# tests using them keep apart by name (their own databases, studies and MLflow experiments).
@pytest.fixture(scope="session")
def postgres():
    """One throwaway PostgreSQL cluster; tests create databases of their own on it."""
    from tests.postgres import PostgresServer

    server = PostgresServer().start()
    yield server
    server.cleanup()


@pytest.fixture(scope="session")
def mlflow_server(postgres, tmp_path_factory):
    """``mlflow server`` on the cluster (its database ``mlflow``) serving artifacts, as docker-compose.yml runs it,
    without psycopg2 to lean on."""
    from tests.postgres import without_psycopg2
    from tests.servers import MlflowServer

    folder = tmp_path_factory.mktemp("mlflow-server")
    server = MlflowServer(postgres.create_database("mlflow"), folder / "artifacts", folder / "mlflow.log",
                          env=without_psycopg2(folder / "hide"))
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def default_sweep(tmp_path_factory):
    """The README's first command, ``l0sweep run studies/default.yaml --workers 2``, run once in a terminal:
    (exit status, what the terminal showed, the --out folder). Tests only read it."""
    from pathlib import Path

    from tests.sweep_helpers import l0sweep_in_terminal

    out = tmp_path_factory.mktemp("default-sweep") / "out"
    study = Path(__file__).resolve().parents[1] / "studies" / "default.yaml"
    # A new interpreter: what it shows is checked to the last line, what libraries print as they import included.
    code, shown = l0sweep_in_terminal("run", study, "--workers", "2", "--out", out, new_interpreter=True)
    return code, shown, out
