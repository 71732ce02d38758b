"""The Pareto report in a real browser (headless Chromium), and `pick` on a study whose answer is known."""
from __future__ import annotations

import json
import re
import shutil
import subprocess

import optuna
import pytest
from optuna.distributions import FloatDistribution

from dashboards import PickError, front_table, hypervolume_history, knee, pick, trials_table, write_report

# (val_accuracy, sparsity, lam, mode, test_accuracy, flops_ratio); trials 0-3 are the front.
TRIALS = [(0.990, 0.10, 0.01, "scratch", 0.985, 0.92), (0.985, 0.50, 0.1, "finetune", 0.980, 0.55),
          (0.970, 0.80, 1.0, "finetune", 0.962, 0.25), (0.900, 0.95, 3.0, "scratch", 0.890, 0.08),
          (0.950, 0.40, 0.05, "scratch", 0.940, 0.70), (0.960, 0.05, 0.02, "finetune", 0.955, 0.97)]


def hand_built_study() -> optuna.Study:
    study = optuna.create_study(study_name="known", directions=["maximize", "maximize"])
    study.set_metric_names(["val_accuracy", "sparsity"])
    study.set_user_attr("spec", json.dumps({"description": "hand-built", "trial": {"model": {"name": "mlp"},
                                                                               "data": {"name": "digits"}}}))
    study.set_user_attr("dense_baseline", {"val_accuracy": 0.988, "test_accuracy": 0.984})
    for i, (acc, sp, lam, mode, test, flops) in enumerate(TRIALS):
        study.add_trial(optuna.trial.create_trial(
            params={"lam": lam}, distributions={"lam": FloatDistribution(1e-3, 10, log=True)}, values=[acc, sp],
            user_attrs={"lam": lam, "droprate_init": 0.5, "mode": mode, "test_accuracy": test, "flops_ratio": flops,
                        "total_params": 1000, "removed_params": int(sp * 1000), "mlflow_run_id": f"run{i}",
                        "kept_units": {"1.l0_gate": [40, 64], "3.l0_gate": [10, 32]},
                        "log_alpha_hist": {"edges": [-2, 0, 2], "counts": {"1": [3, 5], "3": [7, 1]}},
                        "history": [[1, acc - 0.1, sp / 2], [2, acc, sp]]}))
    return study


def add_collapsed_trial(study: optuna.Study) -> int:
    """A trial that removed every unit (chance accuracy, sparsity ~1), marked short of the accuracy floor as the
    worker marks it (an Optuna constraint > 0). Without the floor it would be on the front: nothing is sparser."""
    trial = study.ask({"lam": FloatDistribution(1e-3, 10, log=True)})
    for key, value in {"lam": 7.5, "droprate_init": 0.5, "mode": "scratch", "test_accuracy": 0.1, "flops_ratio": 0.0,
                       "total_params": 1000, "removed_params": 999, "mlflow_run_id": "collapsed",
                       "accuracy_floor": 0.125}.items():
        trial.set_user_attr(key, value)
    trial.set_constraint("min_accuracy", 0.125 - 0.09)
    study.tell(trial, [0.09, 0.999])
    return trial.number


def test_trials_short_of_the_accuracy_floor_stay_off_the_front(tmp_path, capsys):
    from sweeps.status import print_status

    study = hand_built_study()
    hypervolume = hypervolume_history(study).hypervolume.iloc[-1]
    collapsed = add_collapsed_trial(study)
    table = trials_table(study)
    assert not table.set_index("trial").feasible[collapsed] and table.feasible.sum() == len(TRIALS)
    assert list(front_table(study).trial) == [0, 1, 2, 3]
    # It adds nothing to the hypervolume (it would add a strip 0.09 high from sparsity 0.95 to 0.999).
    assert hypervolume_history(study).hypervolume.iloc[-1] == pytest.approx(hypervolume)
    assert pick(study).trial == 2 and pick(study, min_sparsity=0.9).trial == 3
    with pytest.raises(PickError, match="no trial reaches sparsity 0.99"):
        pick(study, min_sparsity=0.99)
    print_status(study)
    assert f"short of the accuracy floor (min_accuracy), kept off the front: trial(s) {collapsed}\n" in \
        capsys.readouterr().out
    page = write_report(study, tmp_path).read_text()
    assert "1 no better than chance (kept off the front); 4 on the front." in page
    assert '"name":"no better than chance"' in page  # its own legend entry, grey crosses
    study.set_user_attr("spec", json.dumps({**json.loads(study.user_attrs["spec"]), "min_accuracy": 0.95}))
    page = write_report(study, tmp_path).read_text()
    assert "1 below the accuracy floor (95.00%) (kept off the front)" in page and "accuracy floor 0.9500" in page

    # A study whose complete trials all fall short: pick says so, not that nothing completed.
    alone = optuna.create_study(study_name="all-short", directions=["maximize", "maximize"])
    add_collapsed_trial(alone)
    with pytest.raises(PickError, match="no complete trial of study 'all-short' reaches its accuracy floor"):
        pick(alone)


def test_front_table_and_pick_known_answers():
    study = hand_built_study()
    front = front_table(study)
    assert list(front.trial) == [0, 1, 2, 3]  # sorted by sparsity
    assert pick(study, max_drop=0.5).trial == 1  # within 0.5 points of the dense 98.8%: 98.5% is, 97.0% is not
    assert pick(study, max_drop=2.0).trial == 2
    assert pick(study, min_sparsity=0.6).trial == 2
    assert pick(study, min_sparsity=0.9).trial == 3
    assert pick(study).trial == 2  # the knee: 97% at 0.8 sparsity
    with pytest.raises(PickError, match="no trial reaches sparsity 0.99"):
        pick(study, min_sparsity=0.99)
    study.set_user_attr("dense_baseline", {"val_accuracy": 0.999, "test_accuracy": 0.998})
    with pytest.raises(PickError, match=r"no trial is within 0.5 points of the dense baseline \(99.90%"):
        pick(study, max_drop=0.5)
    assert knee(front.iloc[:2]) == 0


def test_a_front_of_two_has_no_knee_so_the_recommendation_takes_the_sparsest_within_1_point(tmp_path):
    """Two trials are both ends of the knee's chord: the knee rule took the more accurate, even 0.5 points more
    accurate at 0.35 sparsity against 0.82 (as the default study's front of two read)."""
    study = optuna.create_study(study_name="two", directions=["maximize", "maximize"])
    study.set_metric_names(["val_accuracy", "sparsity"])
    for acc, sp in ((0.986, 0.35), (0.9815, 0.82)):
        study.add_trial(optuna.trial.create_trial(values=[acc, sp], user_attrs={
            "lam": sp, "droprate_init": 0.05, "mode": "finetune", "test_accuracy": acc, "flops_ratio": 1 - sp,
            "total_params": 100, "removed_params": int(sp * 100)}))
    assert pick(study).sparsity == 0.35  # no baseline: the more accurate
    study.set_user_attr("dense_baseline", {"val_accuracy": 0.977, "test_accuracy": 0.96})
    assert pick(study).sparsity == 0.82
    page = write_report(study, tmp_path).read_text()
    assert "Recommended (the sparsest front trial within 1 point of the dense baseline; a front of two has no " \
           "knee): trial 1" in page
    study.set_user_attr("dense_baseline", {"val_accuracy": 0.997, "test_accuracy": 0.99})
    assert pick(study).sparsity == 0.35  # neither within 1 point: the more accurate
    assert "Recommended (the most accurate front trial): trial 0" in write_report(study, tmp_path).read_text()
    assert "Recommended (knee of the front): trial 2" in write_report(hand_built_study(), tmp_path).read_text()


def test_a_study_whose_trials_all_failed_still_reports(tmp_path, capsys):
    # What a user meets when every trial of a new study crashes: status, report and pick say so, none crash.
    from sweeps.status import print_status

    study = optuna.create_study(study_name="broken", directions=["maximize", "maximize"])
    study.set_metric_names(["val_accuracy", "sparsity"])
    for _ in range(3):
        study.add_trial(optuna.trial.create_trial(state=optuna.trial.TrialState.FAIL))
    assert front_table(study).empty
    print_status(study)
    assert "study broken: 0/? complete trials; 3 failed\n" in capsys.readouterr().out
    page = write_report(study, tmp_path).read_text()
    assert "0 complete trials, 0 stopped early (0 epochs trained), 3 failed" in page and "No complete trial yet." in page
    with pytest.raises(PickError, match="no complete trial"):
        pick(study)


def _chromium() -> str:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        pytest.fail("chromium is not installed: `make test` installs it (apt-get install -y chromium)")
    return exe


def _browser(args: list[str], url: str) -> subprocess.CompletedProcess:
    return subprocess.run([_chromium(), "--headless=new", "--no-sandbox", "--disable-gpu", "--enable-logging=stderr",
                           "--v=0", "--virtual-time-budget=5000", *args, url], capture_output=True, text=True,
                          timeout=120)


PROBE = """<script>window.addEventListener('load', () => setTimeout(() => {
  const plots = [...document.querySelectorAll('.js-plotly-plot')];
  const out = {plots: plots.length, rendered: document.querySelectorAll('.main-svg').length,
    customdata: plots.flatMap(p => p.data.filter(t => t.customdata).map(t => t.customdata)),
    names: plots.flatMap(p => p.data.map(t => t.name)),
    rows: [...document.querySelectorAll('#front-table tbody tr')].map(r => r.cells[0].textContent.trim())};
  const pre = document.createElement('pre'); pre.id = 'probe'; pre.textContent = JSON.stringify(out);
  document.body.appendChild(pre);
}, 500));</script></body>"""


@pytest.mark.slow
def test_report_in_headless_chromium(tmp_path):
    from PIL import Image

    study = hand_built_study()
    add_collapsed_trial(study)
    page = write_report(study, tmp_path / "report")
    assert (tmp_path / "report" / "front.csv").read_text().count("\n") == 5  # header + 4 front trials
    assert "| 97.00%" in (tmp_path / "report" / "front.md").read_text()

    shot = tmp_path / "shot.png"
    result = _browser([f"--screenshot={shot}", "--window-size=1200,2400"], page.as_uri())
    console = [line for line in result.stderr.splitlines() if ":CONSOLE" in line]
    assert console == [], console  # no errors (nor anything else) on the console
    image = Image.open(shot).convert("RGB")
    colours = image.getcolors(maxcolors=1_000_000)
    white = sum(n for n, c in colours if c == (255, 255, 255)) / (image.width * image.height)
    assert len(colours) > 200 and white < 0.97, "the screenshot is blank"

    probe = tmp_path / "probe.html"
    probe.write_text(page.read_text().replace("</body>", PROBE))
    dom = _browser(["--dump-dom"], probe.as_uri()).stdout
    found = json.loads(re.search(r'<pre id="probe">(.*?)</pre>', dom, re.S).group(1).replace("&quot;", '"'))
    assert found["plots"] >= 4 and found["rendered"] >= 4  # both scatters, hypervolume, recommended detail
    assert found["rows"][:4] == ["0", "1", "2 ★", "3"]  # the table is the front, the knee starred
    hover_lams = {row[1] for trace in found["customdata"] for row in trace}
    assert {t[2] for t in TRIALS} <= hover_lams  # every trial's lambda is in the hover data
    assert 7.5 in hover_lams and found["names"].count("no better than chance") == 2  # the collapsed trial, both plots


def _budget_study(name: str, trials: list[tuple[str, list[float] | None, int, bool]],
                  storage: optuna.storages.BaseStorage | None = None) -> optuna.Study:
    """A study of (state, values, epochs trained, feasible) trials, in that order; each epoch in its history."""
    study = optuna.create_study(study_name=name, directions=["maximize", "maximize"], storage=storage)
    study.set_metric_names(["val_accuracy", "sparsity"])
    study.set_user_attr("spec", json.dumps({"name": name, "description": "hand-built",
                                            "trial": {"model": {"name": "mlp"}, "data": {"name": "digits"}}}))
    for state, values, epochs, ok in trials:
        history = [[e + 1, 0.5, 0.1] for e in range(epochs)]
        study.add_trial(optuna.trial.create_trial(
            state=getattr(optuna.trial.TrialState, state), values=values,
            user_attrs={"history": history, "lam": 0.1, "droprate_init": 0.5, "mode": "scratch",
                        "total_params": 1000, "removed_params": int((values or [0, 0])[1] * 1000)},
            system_attrs={"constraints": [-0.1 if ok else 0.2]}))
    return study


# With early stopping: 9 epochs, 2 complete trials. Front (0.9, 0.5), (0.8, 0.8): hypervolume 0.45 + 0.8 x 0.3.
STOPPED = [("COMPLETE", [0.9, 0.5], 4, True), ("PRUNED", None, 1, True), ("COMPLETE", [0.8, 0.8], 4, True)]
# Without, 13 epochs: within 9 it has trials 0-2 (8 epochs; trial 1 short of the floor, on no front). Trial 3 would
# pass 9, so it and every later trial are left out, trial 4 too though 8 + 1 would fit.
FULL = [("COMPLETE", [0.85, 0.5], 4, True), ("COMPLETE", [0.1, 0.99], 1, False), ("COMPLETE", [0.7, 0.9], 3, True),
        ("COMPLETE", [0.95, 0.95], 4, True), ("COMPLETE", [0.99, 0.99], 1, True)]


def test_two_studies_compared_within_the_smaller_of_their_epochs():
    from dashboards import at_equal_epochs
    from dashboards.budget import describe

    stopped, full = _budget_study("stopped", STOPPED), _budget_study("full", FULL)
    budget = at_equal_epochs(stopped, full)
    assert budget.budget == 9 and budget.reference == 0
    ours, theirs = budget.study, budget.against
    assert (ours.epochs_in_all, ours.epochs, ours.complete, ours.front) == (9, 9, 2, 2)
    assert ours.hypervolume == pytest.approx(0.45 + 0.8 * 0.3)
    assert (theirs.epochs_in_all, theirs.epochs, theirs.complete, theirs.front) == (13, 8, 3, 2)
    assert theirs.hypervolume == pytest.approx(0.85 * 0.5 + 0.7 * 0.4)
    assert budget.against_epochs_to_match == 8  # 0.705 >= 0.69 once its trial 2 ended
    assert describe(budget, stopped) == (
        "At an equal budget of 9 epochs (full's trials counted in the order they started until the next would pass "
        "it; it trained 13 in all): stopped trained 9 epochs for 2 complete trials, (val_accuracy, sparsity) front "
        "hypervolume 0.69 (2 on that front); full trained 8 epochs for 3 complete trials, (val_accuracy, sparsity) "
        "front hypervolume 0.705 (2 on that front). full reached stopped's front hypervolume after 8 epochs.")
    # The other way round: the same budget, and the stopped study never reaches the full one's 0.705.
    reverse = at_equal_epochs(full, stopped)
    assert (reverse.budget, reverse.study.epochs, reverse.against.epochs) == (9, 8, 9)
    assert reverse.against_epochs_to_match is None
    assert describe(reverse, full).endswith("stopped did not reach full's front hypervolume in the 9 epochs it trained.")


def test_a_pair_that_cannot_be_compared_is_refused():
    from dashboards import at_equal_epochs

    stopped = _budget_study("stopped", STOPPED)
    with pytest.raises(ValueError, match="stopped is the study itself"):
        at_equal_epochs(stopped, _budget_study("stopped", FULL))
    other = optuna.create_study(study_name="latency", directions=["maximize", "minimize"])
    other.set_metric_names(["val_accuracy", "latency_ms"])
    with pytest.raises(ValueError, match=r"^latency has the objectives val_accuracy \(maximize\), latency_ms "
                                         r"\(minimize\); give a study of the objectives of stopped: val_accuracy "
                                         r"\(maximize\), sparsity \(maximize\)$"):
        at_equal_epochs(stopped, other)
    old = _budget_study("old", FULL)
    old.add_trial(optuna.trial.create_trial(values=[0.9, 0.9]))  # no history: made before histories were kept
    with pytest.raises(ValueError, match="1 complete trial.s. of old have no epoch history"):
        at_equal_epochs(stopped, old)


def test_report_against_another_study_through_the_cli(tmp_path):
    """``l0sweep report STUDY --against OTHER`` states both fronts at the equal budget; a study it cannot compare
    with, or none of that name, is one line and writes no report."""
    from sweeps.storage import open_storage
    from tests.sweep_helpers import l0sweep

    out = tmp_path / "out"
    out.mkdir()
    storage = open_storage(str(out / "optuna.journal"))
    _budget_study("stopped", STOPPED, storage)
    _budget_study("full", FULL, storage)
    other = optuna.create_study(study_name="latency", directions=["maximize", "minimize"], storage=storage)
    other.set_metric_names(["val_accuracy", "latency_ms"])
    other.set_user_attr("spec", json.dumps({"name": "latency"}))
    result = l0sweep("report", "stopped", "--against", "full", "--out", out)
    assert result.returncode == 0, result.stderr
    page = (out / "reports" / "stopped" / "report.html").read_text()
    assert "At an equal budget of 9 epochs (full&#x27;s trials counted" in page
    assert "full reached stopped&#x27;s front hypervolume after 8 epochs." in page
    missing = l0sweep("report", "full", "--against", "nowhere", "--out", out)
    assert (missing.returncode, missing.stderr.strip()) == (1, (
        "l0sweep report: error: --against 'nowhere': no such study in this storage; its other studies: latency, "
        "stopped"))
    mismatched = l0sweep("report", "full", "--against", "latency", "--out", out)
    assert mismatched.returncode == 1
    assert mismatched.stderr.strip().startswith("l0sweep report: error: --against latency: latency has the objectives")
    assert len(mismatched.stderr.strip().splitlines()) == 1
    assert not (out / "reports" / "full").exists()
