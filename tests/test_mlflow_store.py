"""The embedded MLflow store made from a migrated empty copy: MLflow opens it as one it migrated itself."""
from __future__ import annotations

import sqlite3

from mlflow.tracking import MlflowClient

from sweeps.mlflow_store import prepare_store


def test_a_new_store_is_a_copy_of_the_migrated_empty_store_that_mlflow_opens_as_its_own(tmp_path, monkeypatch):
    monkeypatch.setenv("L0SWEEP_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    first, second = tmp_path / "a" / "mlflow.db", tmp_path / "b" / "mlflow.db"
    prepare_store(f"sqlite:///{first}")
    [template] = (tmp_path / "cache" / "mlflow-store").iterdir()
    made = template.stat().st_mtime_ns
    prepare_store(f"sqlite:///{second}")
    assert template.stat().st_mtime_ns == made  # made once, copied after
    assert sorted(p.name for p in tmp_path.glob("*/*mlflow.db*")) == ["mlflow.db", "mlflow.db"]  # no partial copy
    with sqlite3.connect(template) as db:
        assert db.execute("SELECT count(*) FROM experiments").fetchone() == (0,)
    for path in (first, second):
        client = MlflowClient(f"sqlite:///{path}")
        # MLflow adds its Default experiment where it would in a store it made itself (its default root, ./mlruns).
        [default] = client.search_experiments()
        assert (default.experiment_id, default.name) == ("0", "Default")
        assert default.artifact_location == str(tmp_path / "mlruns" / "0")
        experiment = client.create_experiment("study", artifact_location=(tmp_path / "art").as_uri())
        assert experiment == "1"
        run = client.create_run(experiment, run_name="trial")
        client.log_metric(run.info.run_id, "val_accuracy", 0.5, step=1)
        client.set_terminated(run.info.run_id)
        assert client.get_run(run.info.run_id).data.metrics == {"val_accuracy": 0.5}


def test_an_existing_store_and_other_uris_are_left_to_mlflow(tmp_path, monkeypatch):
    monkeypatch.setenv("L0SWEEP_CACHE_DIR", str(tmp_path / "cache"))
    existing = tmp_path / "mlflow.db"
    existing.write_bytes(b"")
    prepare_store(f"sqlite:///{existing}")
    prepare_store("http://127.0.0.1:5000")
    prepare_store(f"sqlite:///{tmp_path / 'other.db'}?timeout=5")
    assert existing.read_bytes() == b"" and not (tmp_path / "cache").exists() and not (tmp_path / "other.db").exists()
