"""The ``l0sweep`` command line: run, create, worker, status, report, pick, export, dashboard, ui.

Every command takes ``--out DIR`` (default ``l0sweep-out``); without ``--storage``/``--tracking-uri`` (or
``$L0SWEEP_STORAGE``/``$MLFLOW_TRACKING_URI``) it uses the embedded stores there: a journal file
``DIR/optuna.journal`` and ``sqlite:///DIR/mlflow.db``.
Errors are one line on stderr and a non-zero exit.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from importlib.metadata import version
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the CLI imports what a command needs when it runs: `l0sweep --help` stays instant
    import optuna

DEFAULT_OUT = "l0sweep-out"


def _common(p: argparse.ArgumentParser) -> None:
    # Environment defaults let a container (or a shell profile) set the shared stores once, and keep the
    # database password off the command line.
    p.add_argument("--storage", metavar="URL", default=os.environ.get("L0SWEEP_STORAGE") or None,
                   help="Optuna storage: postgresql://user:pass@host/db, or a journal file path "
                        "(default: $L0SWEEP_STORAGE, else OUT/optuna.journal)")
    p.add_argument("--tracking-uri", metavar="URI", default=os.environ.get("MLFLOW_TRACKING_URI") or None,
                   help="MLflow tracking URI, e.g. http://mlflow:5000 "
                        "(default: $MLFLOW_TRACKING_URI, else sqlite:///OUT/mlflow.db)")
    p.add_argument("--out", default=os.environ.get("L0SWEEP_OUT") or DEFAULT_OUT, metavar="DIR",
                   help=f"folder for embedded stores, baselines, logs and reports "
                        f"(default: $L0SWEEP_OUT, else {DEFAULT_OUT})")
    p.add_argument("--verbose", action="store_true",
                   help="also show other libraries' INFO lines (Optuna, MLflow, its database migrations)")


def _selection(p: argparse.ArgumentParser, trial_flag: bool = False) -> None:
    """pick's ways of choosing a front trial (export shares them)."""
    how = p.add_mutually_exclusive_group()
    how.add_argument("--max-drop", type=float, metavar="PTS",
                     help="the sparsest trial within PTS accuracy points of the dense baseline's validation "
                          "accuracy (of the best trial's, without a baseline)")
    how.add_argument("--min-sparsity", type=float, metavar="S",
                     help="the most accurate trial with sparsity >= S (0-1)")
    how.add_argument("--target", type=float, metavar="S",
                     help="the trial whose target sparsity (in a lambda study, whose sparsity) is nearest S (0-1)")
    how.add_argument("--knee", action="store_true",
                     help="the report's recommendation (default): the front's knee; on a front of two, which has no "
                          "knee, the sparsest within 1 point of the dense baseline")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="l0sweep", description="Sparsity/accuracy sweeps with L0 gates.")
    parser.add_argument("--version", action="version", version=f"l0sweep {version('l0sweep')}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("run", help="create or resume a study and run local workers to its budget, then report")
    p.add_argument("study_file", type=Path)
    p.add_argument("--trials", type=int, metavar="N", help="complete trials wanted in total (default: the file's)")
    p.add_argument("--workers", type=int, default=1, metavar="K", help="local worker processes (default 1)")
    p.add_argument("--threads", type=int, metavar="T", help="torch threads per worker (default: cores / K)")
    _common(p)

    p = sub.add_parser("create", help="create the study (budget, starting points, MLflow run) without running it")
    p.add_argument("study_file", type=Path)
    p.add_argument("--trials", type=int, metavar="N",
                   help="complete trials wanted in total, by all workers together (default: the file's)")
    _common(p)

    p = sub.add_parser("worker", help="join an existing study and run trials until its budget is reached")
    p.add_argument("study_file", type=Path)
    p.add_argument("--threads", type=int, metavar="T",
                   help="torch threads for this worker's trials (default: the file's trial.threads, else torch's)")
    # Set by `l0sweep run` for its workers: wait for this file while this parent (the launcher, or its zygote) lives.
    p.add_argument("--start-after", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--launcher-pid", type=int, help=argparse.SUPPRESS)
    _common(p)

    p = sub.add_parser("status", help="trials by state and the current Pareto front")
    p.add_argument("study", help="a study file or a study name")
    _common(p)

    p = sub.add_parser("report", help="write the Pareto report (HTML, Markdown, CSV)")
    p.add_argument("study", help="a study file or a study name")
    p.add_argument("--report-dir", type=Path, metavar="DIR", help="default: OUT/reports/NAME")
    p.add_argument("--against", metavar="OTHER",
                   help="another study in the same storage (a study file or name; the same search without early "
                        "stopping, say): also state the front it had bought within the epochs this study trained")
    _common(p)

    p = sub.add_parser("pick", help="choose a trial (a lambda) from the front")
    p.add_argument("study", help="a study file or a study name")
    _selection(p)
    _common(p)

    p = sub.add_parser("export", help="write a trial's compacted model (model.pt2, model.onnx), its metrics and "
                                      "measured latency into a folder")
    p.add_argument("study", help="a study file or a study name")
    p.add_argument("--trial", type=int, metavar="N", help="this trial (default: the one pick chooses)")
    p.add_argument("--to", type=Path, required=True, metavar="DIR", help="the folder to write (new, or empty)")
    p.add_argument("--force", action="store_true", help="write into a --to that is not empty (replacing our files)")
    p.add_argument("--round-to", type=int, metavar="K",
                   help="keep each layer's width a multiple of K (default: the study file's export.round_to, else 1)")
    _selection(p, trial_flag=True)
    _common(p)

    p = sub.add_parser("dashboard", help="serve optuna-dashboard on the study storage (rides out database restarts)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; 0.0.0.0 in a container)")
    p.add_argument("--port", type=int, default=8080, help="default 8080")
    _common(p)

    p = sub.add_parser("ui", help="serve the MLflow UI and optuna-dashboard on the embedded stores (127.0.0.1)")
    p.add_argument("--port", type=int, default=5000, help="MLflow UI port (default 5000)")
    p.add_argument("--dashboard-port", type=int, default=8080, help="optuna-dashboard port (default 8080)")
    _common(p)
    return parser


def _settings(args: argparse.Namespace):
    from .settings import default_tracking_uri, settings_from

    out = Path(args.out)
    storage = args.storage or str((out / "optuna.journal").resolve())
    tracking = args.tracking_uri or default_tracking_uri(out)
    return settings_from(storage, tracking, out, threads=getattr(args, "threads", None), verbose=args.verbose)


def _study_name(ref: str) -> str:
    from .spec import load_spec

    path = Path(ref)
    return load_spec(path).name if path.suffix in (".yaml", ".yml") or path.is_file() else ref


def _open_study(args: argparse.Namespace, study: str | None = None):
    """The study ``args.study`` names (or ``study``: another in the same storage), and the settings."""
    from .storage import open_storage
    from .study import load_existing

    settings = _settings(args)
    if not args.storage and not Path(settings.storage).exists():
        raise FileNotFoundError(f"no study storage at {settings.storage}: give --storage or the sweep's --out")
    return load_existing(_study_name(args.study if study is None else study), open_storage(settings.storage)), settings


def _against(args: argparse.Namespace, study: optuna.Study) -> optuna.Study:
    """The study ``report --against`` names, in the storage of ``study``; one line naming the others there if none."""
    import optuna

    from .storage import open_storage

    try:
        return _open_study(args, args.against)[0]
    except ValueError as exc:  # no such study, one l0sweep did not make (SpecError), a study file that does not load
        names = optuna.get_all_study_names(open_storage(_settings(args).storage))
        if args.against in names or Path(args.against).suffix in (".yaml", ".yml") or Path(args.against).is_file():
            raise ValueError(f"--against {args.against}: {exc}") from None
        others = sorted(set(names) - {study.study_name})
        raise ValueError(f"--against {args.against!r}: no such study in this storage; its other studies: "
                         f"{', '.join(others) or 'none'}") from None


def _positive(name: str, value: int | None) -> None:
    if value is not None and value < 1:
        raise ValueError(f"{name} must be at least 1, got {value}")


def _make_out(args: argparse.Namespace) -> None:
    """Everything a sweep writes goes under --out: say at once if it cannot be made."""
    try:
        Path(args.out).mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ValueError(f"--out {args.out}: cannot create it ({exc.strerror})") from None


def _report(study: optuna.Study, out_dir: Path, tracking_uri: str) -> Path:
    """The report ``l0sweep run`` writes once its sweep is over (sweeps.api.report)."""
    from .api import report  # here, not before the sweep: plotly and pandas would delay its workers' start

    return report(study, out_dir, tracking_uri)


def dispatch(args: argparse.Namespace) -> int:
    from .spec import load_spec

    if args.command in ("run", "create", "worker"):
        for name in ("trials", "workers", "threads"):
            _positive(f"--{name}", getattr(args, name, None))
        spec = load_spec(args.study_file)
    if args.command == "run":
        from .launcher import run_sweep

        _make_out(args)
        return run_sweep(args.study_file, spec, _settings(args), args.workers, args.trials, report=_report)
    if args.command == "create":
        from .search import first_point, trial_config
        from .study import create_or_resume
        from .preflight import check_fits

        check_fits(trial_config(spec, first_point(spec)))  # a study whose trials cannot run is not created
        _make_out(args)
        from .records import StudyRecord
        from .tracking import runs_link

        settings = _settings(args)
        study, _ = create_or_resume(spec, settings, args.trials)
        print(f"study {study.study_name!r} ready: budget {StudyRecord.read(study).budget} complete trials"
              + runs_link(study, settings.tracking_uri, "; runs: "))
        return 0
    if args.command == "worker":
        from .worker import run_worker

        _make_out(args)
        return run_worker(spec, _settings(args),
                          start_after=(args.start_after, args.launcher_pid) if args.start_after else None)
    if args.command == "status":
        from .status import print_status

        study, _ = _open_study(args)
        print_status(study)
        return 0
    if args.command == "report":
        from .api import report

        study, settings = _open_study(args)
        against = None if args.against is None else _against(args, study)
        try:
            path = report(study, args.report_dir or settings.out / "reports" / study.study_name,
                          settings.tracking_uri, against)
        except ValueError as exc:  # dashboards.at_equal_epochs refuses the pair before anything is written
            if against is None:
                raise
            raise ValueError(f"--against {args.against}: {exc}") from None
        print(path)
        return 0
    if args.command == "pick":
        from .api import describe_choice

        study, settings = _open_study(args)
        print(describe_choice(study, args.max_drop, args.min_sparsity, args.target, settings.tracking_uri))
        return 0
    if args.command == "export":
        from .api import chosen_trial
        from .deploy import ExportError, describe_export, export_trial

        if args.round_to is not None and args.round_to < 1:
            raise ExportError(f"--round-to must be at least 1, got {args.round_to}")
        if args.trial is not None and (args.max_drop, args.min_sparsity, args.target) != (None, None, None):
            raise ExportError("--trial names the trial: give it without --max-drop, --min-sparsity or --target")
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # stderr is for the one-line errors
        study, settings = _open_study(args)
        number = chosen_trial(study, args.max_drop, args.min_sparsity, args.target) if args.trial is None \
            else args.trial
        metrics = export_trial(study, settings.tracking_uri, args.to, number, args.force, args.round_to)
        print(describe_export(metrics, args.to))
        return 0
    if args.command == "dashboard":
        from .ui import serve_dashboard

        return serve_dashboard(_settings(args).storage, args.host, args.port)
    if args.command == "ui":
        from .ui import serve

        settings = _settings(args)
        return serve(settings, args.port, args.dashboard_port)
    raise AssertionError(args.command)


def _quiet_libraries(args: argparse.Namespace) -> None:
    """Other libraries' INFO lines ("A new study created in Journal", "Creating initial MLflow database tables")
    only with --verbose; their warnings and errors always."""
    if args.verbose:
        return
    # MLflow sets its loggers' level from this variable when first imported (alembic's to WARNING at least);
    # `run`'s workers inherit it. A level the user set is kept.
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    # Its "View run ... at" lines, printed on stdout as each run ends on a server: l0sweep prints the study's link.
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    if "mlflow" in sys.modules:
        logging.getLogger("mlflow").setLevel(os.environ["MLFLOW_LOGGING_LEVEL"].upper())
    import optuna

    # A worker keeps Optuna's one line per finished trial: in its log (or `docker compose logs`) it is the
    # record of what the worker ran.
    optuna.logging.set_verbosity(optuna.logging.INFO if args.command == "worker" else optuna.logging.WARNING)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    # Our own handler: an imported library sets the root logger to ERROR, which would hide reconnect warnings.
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    ours = logging.getLogger("sweeps")
    ours.addHandler(handler)
    ours.setLevel(logging.INFO if args.command == "worker" or args.verbose else logging.WARNING)
    ours.propagate = False
    _quiet_libraries(args)
    import warnings

    from optuna.exceptions import ExperimentalWarning

    # Heartbeat retry and metric names are marked experimental in Optuna 5 but are the documented way.
    warnings.filterwarnings("ignore", category=ExperimentalWarning)
    try:
        return dispatch(args)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # every expected failure carries a one-line message; keep it one line
        if os.environ.get("L0SWEEP_DEBUG"):
            raise
        from .spec import one_line

        print(f"l0sweep {args.command}: error: {one_line(exc)}", file=sys.stderr)
        return 1


def entry(argv: list[str] | None = None) -> None:
    """The ``l0sweep`` program (``argv``: its arguments, else the command line's): :func:`main`, then a quick exit.

    With torch and MLflow loaded, the interpreter's own teardown (a last garbage collection over the whole
    heap) took 1.3-1.5 s per process, paid by every worker (the launcher waits for them) and by the launcher.
    Exit hooks still run and output is flushed; only freeing memory is left to the operating system.
    """
    import atexit

    status = main(argv)
    atexit._run_exitfuncs()  # log handlers, MLflow, tqdm, torch: what a normal exit would run
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


if __name__ == "__main__":
    entry()
