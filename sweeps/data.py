"""Datasets with a fixed, seeded train/validation/test split (validation carved from the training data).

``digits`` (scikit-learn's bundled 8x8 digits) works offline and trains in seconds; ``synthetic`` is for
tests; ``mnist``, ``fashion-mnist`` and ``cifar10`` come through torchvision (downloaded when online, or
read from ``data_dir``, else ``$L0SWEEP_DATA_DIR``, else ``~/.cache/l0sweep/data``); ``package.module:factory`` is a user's own factory returning ``(train, test)`` or ``(train, val, test)``
datasets, or an object with ``train``, ``val`` and ``test`` datasets (a DataModule's, say).
"""
from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset

from .config import check_dataset
from .imports import import_object
from .settings import file_lock, user_cache


@dataclass
class Splits:
    train: Dataset
    val: Dataset
    test: Dataset
    input_shape: tuple[int, ...]
    # The model's output size, which a model factory receives as num_classes: the classes of integer labels, or the
    # values one target holds where targets are floats (a regression's or multi-label task's; see output_size).
    num_classes: int


class TensorBatches(TensorDataset):
    """A ``TensorDataset`` that a :func:`data_loader` reads a batch at a time (one index per tensor) instead of
    example by example and stacking them: an epoch of the digits data in 1.8 ms instead of 6.2 ms, on a
    trial whose epoch takes about 55 ms. Same batches, same order."""

    def __getitems__(self, indices: list[int]) -> tuple[torch.Tensor, ...]:
        index = torch.as_tensor(indices)
        return tuple(t[index] for t in self.tensors)


def _already_batched(batch: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    return batch


def data_loader(dataset: Dataset, batch_size: int, **kwargs) -> DataLoader:
    """A ``DataLoader`` over ``dataset`` that reads :class:`TensorBatches` (also through a ``Subset``) a batch
    at a time.

    >>> data = TensorBatches(torch.arange(10.0).view(10, 1), torch.arange(10))
    >>> [y.tolist() for _, y in data_loader(Subset(data, [9, 8, 7]), batch_size=2)]
    [[9, 8], [7]]
    """
    base = dataset.dataset if isinstance(dataset, Subset) else dataset
    if isinstance(base, TensorBatches):
        kwargs.setdefault("collate_fn", _already_batched)
    return DataLoader(dataset, batch_size=batch_size, **kwargs)


def labels(dataset: Dataset) -> torch.Tensor:
    """Every label of ``dataset``, in order; read without loading the inputs where the dataset keeps its labels
    apart (tensors, torchvision's ``targets``), else one pass over it.

    >>> labels(Subset(TensorBatches(torch.zeros(4, 2), torch.tensor([3, 1, 2, 1])), [1, 3])).tolist()
    [1, 1]
    """
    if isinstance(dataset, Subset):
        base = _kept_labels(dataset.dataset)
        if base is not None:
            return base[torch.as_tensor(dataset.indices, dtype=torch.long)]
    else:
        kept = _kept_labels(dataset)
        if kept is not None:
            return kept
    return torch.cat([torch.as_tensor(batch[1]).reshape(-1) for batch in data_loader(dataset, 512)])


def _kept_labels(dataset: Dataset) -> torch.Tensor | None:
    if isinstance(dataset, TensorDataset) and len(dataset.tensors) >= 2:
        return dataset.tensors[1]
    targets = getattr(dataset, "targets", None)
    return None if targets is None else torch.as_tensor(targets)


def output_size(target: object, dataset: Dataset) -> int:
    """How many outputs a model needs for ``dataset``, whose first target is ``target``: for float targets (a
    regression, or multi-label scores) the number of values one target holds (1 for a scalar), otherwise the
    class count, the largest label plus one.

    >>> output_size(torch.tensor([0.5, 2.0]), None), output_size(1.5, None)
    (2, 1)
    >>> output_size(0, TensorBatches(torch.zeros(3, 2), torch.tensor([0, 4, 1])))
    5
    """
    value = torch.as_tensor(target)
    if value.is_floating_point():
        return value.numel()
    return int(labels(dataset).max()) + 1


def chance_accuracy(dataset: Dataset) -> float:
    """The accuracy of always answering ``dataset``'s commonest class: what a model that ignores its input
    (every unit of a layer closed) scores at best.

    >>> chance_accuracy(TensorBatches(torch.zeros(4, 2), torch.tensor([3, 1, 2, 1])))
    0.5
    """
    y = labels(dataset).long()
    return float(torch.bincount(y).max()) / len(y) if len(y) else 0.0


def _split_indices(n: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    cut = int(round(n * fraction))
    return perm[cut:], perm[:cut]


def _tensor_splits(x: torch.Tensor, y: torch.Tensor, seed: int, val_fraction: float, num_classes: int) -> Splits:
    """Fixed 20% test split (never moves with the seed), validation carved from the rest with ``seed``."""
    rest, test = _split_indices(len(x), 0.2, seed=10_007)
    train_idx, val_idx = _split_indices(len(rest), val_fraction, seed)
    rest_t = torch.tensor(rest)
    tr, va, te = rest_t[train_idx], rest_t[val_idx], torch.tensor(test)
    return Splits(TensorBatches(x[tr], y[tr]), TensorBatches(x[va], y[va]), TensorBatches(x[te], y[te]),
                  tuple(x.shape[1:]), num_classes)


def digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 1,797 digits as ``load_digits(return_X_y=True)`` gives them (pixels 0-16, labels), read from
    the file scikit-learn ships, without importing it: the import took 1 s of CPU in every worker process.

    >>> x, y = digits_arrays()
    >>> x.shape, y[:5].tolist()
    ((1797, 64), [0, 1, 2, 3, 4])
    """
    sklearn = importlib.util.find_spec("sklearn")
    shipped = Path(sklearn.submodule_search_locations[0], "datasets", "data", "digits.csv.gz") if sklearn else None
    if shipped is None or not shipped.is_file():  # moved by a later scikit-learn: its loader knows where
        from sklearn.datasets import load_digits

        return load_digits(return_X_y=True)
    table = np.loadtxt(shipped, delimiter=",")
    return table[:, :-1], table[:, -1].astype(int)


def _digits(seed: int, val_fraction: float) -> Splits:
    x, y = digits_arrays()
    x = torch.tensor(x, dtype=torch.float32).view(-1, 1, 8, 8) / 16.0
    x = (x - 0.3) / 0.4  # roughly zero mean, unit variance
    return _tensor_splits(x, torch.tensor(y), seed, val_fraction, 10)


def _synthetic(seed: int, val_fraction: float, shape: tuple[int, ...] = (3, 32, 32), n: int = 512,
               num_classes: int = 10) -> Splits:
    g = torch.Generator().manual_seed(1234)
    centers = torch.randn(num_classes, *shape, generator=g)
    y = torch.randint(0, num_classes, (n,), generator=g)
    x = centers[y] + 2.0 * torch.randn(n, *shape, generator=g)
    return _tensor_splits(x, y, seed, val_fraction, num_classes)


_TORCHVISION = {
    # name: (class, mean, std, input shape, augment for training)
    "mnist": ("MNIST", (0.1307,), (0.3081,), (1, 28, 28), False),
    "fashion-mnist": ("FashionMNIST", (0.2860,), (0.3530,), (1, 28, 28), False),
    "cifar10": ("CIFAR10", (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616), (3, 32, 32), True),
}


def _torchvision(name: str, data_dir: str | None, seed: int, val_fraction: float, download: bool) -> Splits:
    from torchvision import datasets, transforms

    cls_name, mean, std, shape, augment = _TORCHVISION[name]
    cls = getattr(datasets, cls_name)
    root = Path(data_dir or os.environ.get("L0SWEEP_DATA_DIR") or user_cache() / "data")
    root = root.expanduser()
    # What a failed download must not leave behind: the folders up to root it makes, the ones it makes inside.
    made = [p for p in (root, *root.parents) if not p.exists()]
    existing = {p for p in root.rglob("*") if p.is_dir()} if root.exists() else set()
    root.mkdir(parents=True, exist_ok=True)
    plain = transforms.Compose([transforms.ToTensor(), transforms.Normalize(mean, std)])
    train_tf = transforms.Compose([transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip(), plain]) \
        if augment else plain
    # Workers sharing a data folder (a compose volume) download one at a time, not into the same files at once.
    with file_lock(root / f".{name}.lock"):
        try:
            train_aug = cls(str(root), train=True, transform=train_tf, download=download)
            train_plain = cls(str(root), train=True, transform=plain, download=False)
            test = cls(str(root), train=False, transform=plain, download=download)
        except (RuntimeError, OSError) as exc:
            _remove_if_unused(root / f".{name}.lock", [*sorted((p for p in root.rglob("*") if p.is_dir() and p
                                                                not in existing), key=lambda p: -len(p.parts)),
                                                        *made])
            raise ValueError(f"dataset {name!r}: no files under {root} and the download failed "
                             f"({type(exc).__name__}); put torchvision's {cls_name} files in {root} (data_dir) or "
                             "run where the internet is reachable") from None
    train_idx, val_idx = _split_indices(len(train_aug), val_fraction, seed)
    return Splits(Subset(train_aug, train_idx), Subset(train_plain, val_idx), test, shape, 10)


def _remove_if_unused(lock: Path, made: list[Path]) -> None:
    """Remove the lock file and the folders this call made (deepest first), where nothing else lies in them
    (another worker downloading into the same folder keeps it)."""
    lock.unlink(missing_ok=True)
    for folder in made:
        try:
            folder.rmdir()
        except OSError:
            pass


def load_data(name: str, data_dir: str | None = None, seed: int = 0, val_fraction: float = 0.15,
              download: bool = True, **kwargs) -> Splits:
    """Load dataset ``name`` as seeded train/validation/test splits.

    >>> s = load_data("digits")
    >>> len(s.train) + len(s.val) + len(s.test), s.input_shape
    (1797, (1, 8, 8))
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    if name == "digits":
        return _digits(seed, val_fraction)
    if name == "synthetic":
        return _synthetic(seed, val_fraction, **kwargs)
    if name in _TORCHVISION:
        return _torchvision(name, data_dir, seed, val_fraction, download)
    check_dataset(name)  # what is left is a user's 'package.module:factory'
    train_full, val, test = _factory_splits(name, import_object(name, "dataset")(**kwargs))
    # In-memory tensors are read a batch at a time (the same tensors, not a copy).
    train_full, val, test = (TensorBatches(*d.tensors) if type(d) is TensorDataset else d for d in (train_full, val, test))
    x0, y0 = train_full[0]
    classes = getattr(train_full, "classes", None)
    num_classes = len(classes) if classes else output_size(y0, train_full)
    if val is not None:
        return Splits(train_full, val, test, tuple(x0.shape), num_classes)
    train_idx, val_idx = _split_indices(len(train_full), val_fraction, seed)
    return Splits(Subset(train_full, train_idx), Subset(train_full, val_idx), test, tuple(x0.shape), num_classes)


_FACTORY_FORMS = ("(train, test) or (train, val, test) datasets, or an object with train, val and test "
                  "(or train_dataset, val_dataset and test_dataset) datasets")


def _factory_splits(name: str, made: object) -> tuple[Dataset, Dataset | None, Dataset]:
    """What a user's data factory returned, as (train, validation or None, test); one clear error otherwise."""
    if isinstance(made, (tuple, list)) and len(made) in (2, 3) and all(isinstance(d, Dataset) for d in made):
        return (made[0], None, made[1]) if len(made) == 2 else tuple(made)  # type: ignore[return-value]
    for names in (("train", "val", "test"), ("train_dataset", "val_dataset", "test_dataset")):
        found = [getattr(made, n, None) for n in names]
        if all(isinstance(d, Dataset) for d in found):
            return found[0], found[1], found[2]
    raise ValueError(f"dataset {name!r} returned {type(made).__name__}: a data factory returns {_FACTORY_FORMS}")
