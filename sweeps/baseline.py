"""The dense baseline: one dense model per (data, model, optimisation, seed), trained once (or measured, where it
is the user's checkpoint) and kept as a file that every trial and process shares; fine-tuning trials start from it
and the report draws it as the reference line.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from torch import nn

from .config import TARGET_ONLY_OPTIM, TaskConfig, TrialConfig
from .data import Splits
from .loop import evaluate, load_splits, loaders, metric_function, run_epochs
from .models import build_model
from .runtime import resolve_device
from .settings import file_lock
from .spec import one_line


def baseline_key(cfg: TrialConfig) -> str:
    """Content hash of what determines the dense baseline: data, model, optimisation and seed (and the
    checkpoint file, by size and modification time, where the baseline is the user's)."""
    # Settings that train no dense model (the target's) or came later (checkpoint) are left out when unset, so
    # baselines keep their keys.
    ident = {"data": cfg.data.model_dump(exclude={"data_dir", "download"}),
             "model": cfg.model.model_dump(exclude={"checkpoint"}),
             "optim": cfg.optim.model_dump(exclude=set(TARGET_ONLY_OPTIM)), "seed": cfg.seed}
    if cfg.model.checkpoint:
        stat = Path(cfg.model.checkpoint).stat()
        ident["checkpoint"] = [str(cfg.model.checkpoint), stat.st_size, stat.st_mtime_ns]
    if cfg.amp or cfg.channels_last:  # only then, so existing baselines keep their keys
        ident["precision"] = {"amp": cfg.amp, "channels_last": cfg.channels_last}
    if cfg.task != TaskConfig():  # the loss trains the baseline, the metric measures it; default: keys kept
        ident["task"] = cfg.task.model_dump()
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]


def dense_baseline(cfg: TrialConfig, splits: Splits | None = None) -> Path:
    """Path of the dense baseline's state dict for ``cfg``, training it if no process has yet.

    Concurrent callers serialise on a file lock: exactly one trains, the others wait and load its file.
    """
    directory = Path(cfg.baseline_dir)
    directory.mkdir(parents=True, exist_ok=True)
    key = baseline_key(cfg)
    path = directory / f"{key}.pt"
    with file_lock(directory / f"{key}.lock"):
        if not path.exists():
            device = resolve_device(cfg.device)
            splits = splits or load_splits(cfg)
            torch.manual_seed(cfg.seed)
            dense = build_model(cfg.model.name, splits.input_shape, splits.num_classes, gates=False,
                                **cfg.model.kwargs).to(device)
            metric = metric_function(cfg.task)
            if cfg.model.checkpoint:  # the user's trained model is the baseline: measured, not trained
                load_checkpoint(cfg.model.checkpoint, dense)
                val_metric, source = evaluate(dense, loaders(splits, cfg, device)[1], device, metric), "checkpoint"
            else:
                epochs = cfg.optim.baseline_epochs or cfg.optim.epochs
                history, _ = run_epochs(dense, cfg, splits, device, None, None, None, epochs)
                val_metric, source = history[-1].val_metric, "trained"
            tmp = path.with_suffix(f".tmp{os.getpid()}")
            torch.save({"state_dict": dense.state_dict(), "val_metric": val_metric,
                        "test_metric": evaluate(dense, loaders(splits, cfg, device)[2], device, metric),
                        "source": source, "config": json.loads(cfg.model_dump_json())}, tmp)
            os.replace(tmp, path)  # atomic: a reader never sees half a file
    return path


def load_checkpoint(path: str | Path, model: nn.Module) -> None:
    """Load a trained dense model's weights into ``model`` (built plain, without gates).

    ``path`` holds a state dict, a whole module, or a dict with a ``"state_dict"`` (Lightning's checkpoints);
    keys under a common prefix (Lightning's ``"model."``) are matched. Raises one-line ValueErrors: no such
    file, not a checkpoint, or keys that do not fit (the first missing and the first unexpected named).
    """
    where = f"trial.model.checkpoint {str(path)!r}"
    if not Path(path).is_file():
        raise ValueError(f"{where}: no such file")
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:
        try:  # a whole pickled module needs its classes: the user's own file, so unpickling it is theirs to allow
            saved = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as exc:
            raise ValueError(f"{where}: torch.load cannot read it ({type(exc).__name__})") from None
    state = saved.state_dict() if isinstance(saved, nn.Module) else saved.get("state_dict", saved) \
        if isinstance(saved, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{where} holds {type(saved).__name__}: give a state dict, a whole module, or a dict with "
                         "'state_dict'")
    wanted = list(model.state_dict())
    state = _without_prefix(state, wanted)
    missing, unexpected = [k for k in wanted if k not in state], [k for k in state if k not in set(wanted)]
    if missing or unexpected:
        raise ValueError(f"{where} does not fit trial.model {type(model).__name__}: "
                         + "; ".join(f"{what} key {keys[0]!r} ({len(keys)} in all)" for what, keys in
                                     (("missing", missing), ("unexpected", unexpected)) if keys))
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise ValueError(f"{where} does not fit trial.model: {one_line(exc)}") from None


def _without_prefix(state: dict[str, torch.Tensor], wanted: list[str]) -> dict[str, torch.Tensor]:
    """``state`` with the prefix its keys share before the model's own names removed (``model.conv1.weight`` ->
    ``conv1.weight``), where there is one; other entries under other prefixes (a loss's buffers) dropped."""
    if not wanted or wanted[0] in state:
        return state
    prefix = next((k[: -len(wanted[0])] for k in state if k.endswith("." + wanted[0])), None)
    if prefix is None:
        return state
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
