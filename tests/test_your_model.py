"""Sweeps for the networks users already have: their model and data factories, their dense checkpoint."""
from __future__ import annotations

import shutil
from pathlib import Path

import optuna
import pytest
import torch
import yaml
from torch import nn
from torch.utils.data import TensorDataset

from examples.your_model import make_checkpoint
from examples.your_model.factories import macro_f1, wine, wine_mlp
from sweeps.data import load_data
from sweeps.models import build_model
from sweeps.storage import open_storage
from sweeps.baseline import load_checkpoint
from tests.sweep_helpers import TINY, l0sweep, write_study

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "your_model"


def test_a_model_factory_gets_the_class_count_and_input_shape_and_kwargs_win():
    net = build_model("examples.your_model.factories:wine_mlp", (13,), 3, hidden=8)
    assert (net[1].in_features, net[1].out_features, net[3].out_features) == (13, 8, 3)
    wide = build_model("examples.your_model.factories:wine_mlp", (13,), 3, num_classes=5, gates=False)
    assert wide[3].out_features == 5  # the study file's model.kwargs set it: no 'multiple values' error
    assert build_model("torchvision:resnet18", (3, 32, 32), 10, num_classes=4, gates=False).fc.out_features == 4


def _tensors(n: int) -> TensorDataset:
    return TensorDataset(torch.randn(n, 4), torch.arange(n) % 3)


class DataModule:
    def __init__(self):
        self.train, self.val, self.test = _tensors(30), _tensors(10), _tensors(10)


def three_splits():
    return _tensors(30), _tensors(10), _tensors(10)


def not_datasets():
    return {"train": [1, 2, 3]}


def test_a_data_factory_may_give_its_own_validation_split():
    splits = load_data("examples.your_model.factories:wine")
    assert (len(splits.train), len(splits.val), len(splits.test), splits.input_shape, splits.num_classes) == \
        (120, 29, 29, (13,), 3)
    for name in ("tests.test_your_model:three_splits", "tests.test_your_model:DataModule"):
        assert [len(s) for s in (load_data(name).train, load_data(name).val)] == [30, 10]
    with pytest.raises(ValueError, match=r"returned dict: a data factory returns \(train, test\) or \(train, val, "
                                         r"test\) datasets, or an object with train, val and test"):
        load_data("tests.test_your_model:not_datasets")


def test_checkpoints_load_as_state_dicts_modules_or_lightning_dicts(tmp_path):
    source = wine_mlp(3, (13,))
    forms = {"state.pt": source.state_dict(), "module.pt": source,
             "lightning.ckpt": {"epoch": 3, "state_dict": {f"model.{k}": v for k, v in source.state_dict().items()}}}
    for name, saved in forms.items():
        torch.save(saved, tmp_path / name)
        target = wine_mlp(3, (13,))
        load_checkpoint(tmp_path / name, target)
        assert all(torch.equal(a, b) for a, b in zip(target.state_dict().values(), source.state_dict().values()))
    with pytest.raises(ValueError, match=r"does not fit trial.model Sequential: missing key '3.weight' \(2 in all\); "
                                         r"unexpected key '9.weight' \(2 in all\)"):
        bad = {k.replace("3.", "9."): v for k, v in source.state_dict().items()}
        torch.save(bad, tmp_path / "bad.pt")
        load_checkpoint(tmp_path / "bad.pt", wine_mlp(3, (13,)))
    with pytest.raises(ValueError, match=r"^trial.model.checkpoint '.*nope.pt': no such file$"):
        load_checkpoint(tmp_path / "nope.pt", nn.Linear(2, 2))


@pytest.mark.parametrize("case", ["missing", "mismatched"])
def test_a_checkpoint_that_cannot_be_the_baseline_is_one_line_and_no_study(case, tmp_path):
    if case == "mismatched":
        torch.save(nn.Linear(3, 3).state_dict(), tmp_path / "dense.pt")
    trial = {**TINY["trial"], "model": {"name": "mlp", "kwargs": {"hidden": [32, 16]}, "checkpoint": "dense.pt"}}
    path = write_study(tmp_path / "study.yaml", trial=trial)
    result = l0sweep("create", path, "--out", tmp_path / "out", timeout=120)
    expected = {"missing": "no such file",
                "mismatched": "does not fit trial.model LeNet300100: missing key '1.weight' (6 in all); "
                              "unexpected key 'weight' (2 in all)"}[case]
    assert result.returncode == 1 and "Traceback" not in result.stderr
    line = result.stderr.strip()
    assert line.startswith(f"l0sweep create: error: trial.model.checkpoint '{tmp_path / 'dense.pt'}'")  # the file's folder
    assert line.endswith(expected) and len(line.splitlines()) == 1
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_the_example_fine_tunes_from_the_users_checkpoint_from_python(tmp_path, monkeypatch):
    """The example project as a user runs it from a notebook (``sweeps.run`` with the study as a dict): its
    checkpoint becomes the dense baseline (measured, not trained), fine-tuning trials start from it, the report
    names it, and ``sweeps.load`` reads the trials back."""
    import sweeps

    checkpoint = make_checkpoint.main(tmp_path / "dense.pt")
    data = yaml.safe_load((EXAMPLE / "study.yaml").read_text())
    data["trials"] = 4
    monkeypatch.chdir(tmp_path)  # the dict's relative checkpoint path is the caller's folder's
    monkeypatch.setenv("PYTHONPATH", str(ROOT))  # the workers import the example's factories, as from the root
    study = sweeps.run(data, workers=2, out="out")
    assert len([t for t in study.trials if t.state.name == "COMPLETE"]) >= 4
    assert (tmp_path / "out" / "studies" / "your-model.yaml").is_file()
    baseline = study.user_attrs["dense_baseline"]
    assert baseline["source"] == "checkpoint" and baseline["epochs_trained"] == 0  # measured, not trained
    assert isinstance(baseline["seconds"], float)  # how long measuring it took is recorded
    logs = "".join(log.read_text() for log in (tmp_path / "out" / "logs").glob("*/worker-*.log"))
    assert "l0sweep worker: dense baseline measured from" in logs and "dense baseline trained" not in logs
    # The baseline is the checkpoint itself, unchanged: nothing trained it further.
    saved = torch.load(next((tmp_path / "out" / "baselines").glob("*.pt")), map_location="cpu")
    assert all(torch.equal(saved["state_dict"][k], v) for k, v in torch.load(checkpoint).items())
    model = wine_mlp(3, (13,))
    model.load_state_dict(torch.load(checkpoint))
    _, val, _ = wine()
    with torch.no_grad():
        expected = macro_f1(model(val.tensors[0]), val.tensors[1])
    assert baseline["val_macro_f1"] == pytest.approx(expected)  # the example's own metric, over the whole set
    page = (tmp_path / "out" / "reports" / "your-model" / "report.html").read_text()
    assert "dense baseline (your checkpoint)" in page.lower() and "scratch trials do not" in page
    table, front = sweeps.load("your-model", out="out")
    assert len(table) >= 4 and 1 <= len(front) and set(front.trial) <= set(table.trial)
    with pytest.raises(sweeps.spec.SpecError, match="search.lam"):
        sweeps.run({**data, "name": "bad", "search": {"lam": {"low": 2.0, "high": 1.0}}}, out="out")
    assert not (tmp_path / "out" / "studies" / "bad.yaml").exists()


def test_torchvision_pretrained_weights_come_from_the_hub_cache_with_a_head_for_the_data(tmp_path, monkeypatch):
    import torchvision

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    file = Path(torchvision.models.ResNet18_Weights.DEFAULT.url).name
    with pytest.raises(ValueError, match=rf"could not be downloaded .*; put {file} .* at {tmp_path}/hub/checkpoints/{file}$"):
        build_model("torchvision:resnet18", (3, 32, 32), 10, weights="DEFAULT", gates=False)
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True, exist_ok=True)  # the failed download made it
    trained = torchvision.models.resnet18()  # stands in for the downloaded ImageNet weights
    torch.save(trained.state_dict(), tmp_path / "hub" / "checkpoints" / file)
    model = build_model("torchvision:resnet18", (3, 32, 32), 10, weights="DEFAULT", gates=False)
    assert torch.equal(model.conv1.weight, trained.conv1.weight) and model.fc.out_features == 10
    with pytest.raises(ValueError, match="no weights 'NOPE'; torchvision has DEFAULT, IMAGENET1K_V1"):
        build_model("torchvision:resnet18", (3, 32, 32), 10, weights="NOPE", gates=False)


def test_a_failed_download_leaves_nothing_behind(tmp_path):
    data_dir = tmp_path / "data" / "mnist"
    with pytest.raises(ValueError, match="no files under .* and the download failed"):
        load_data("mnist", str(data_dir))
    assert list(tmp_path.iterdir()) == []
