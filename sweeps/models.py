"""The model zoo: each model built plain, then gated with ``l0core.attach`` (gates where the paper puts them).

- ``mlp``: LeNet-300-100, neuron gates on every dense layer's inputs (the paper's L0Dense).
- ``lenet5``: LeNet-5-Caffe 20-50-800-500, channel gates on the convs, neuron gates on the dense inputs.
- ``googlenet``: the CIFAR-10 GoogleNet of the UvA Deep Learning tutorial 4, channel gates on every branch conv.
- ``torchvision:NAME``: any torchvision classification model, channel gates on every conv.
- ``package.module:factory``: a user's own model, called with the spec's kwargs (and ``num_classes`` and
  ``input_shape`` from the data, where its signature takes them and the kwargs do not set them), gated with
  ``attach``.
"""
from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import torch
from torch import nn

import l0core

from .config import check_model
from .imports import import_object


class LeNet300100(nn.Sequential):
    def __init__(self, in_features: int = 784, num_classes: int = 10, hidden: tuple[int, ...] = (300, 100)) -> None:
        layers: list[nn.Module] = [nn.Flatten()]
        width = in_features
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        layers.append(nn.Linear(width, num_classes))
        super().__init__(*layers)


class LeNet5(nn.Sequential):
    """LeNet-5-Caffe: conv 20 (5x5) - pool - conv 50 (5x5) - pool - dense 800->500 - dense 500->classes."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, image_size: int = 28) -> None:
        flat = ((image_size - 4) // 2 - 4) // 2
        if flat < 1:
            raise ValueError(f"lenet5 needs images of at least 16x16 pixels, got {image_size}x{image_size}")
        super().__init__(
            nn.Conv2d(in_channels, 20, 5), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(20, 50, 5), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(50 * flat * flat, 500), nn.ReLU(), nn.Linear(500, num_classes))


class InceptionBlock(nn.Module):
    """The inception block of the UvA Deep Learning tutorial 4 GoogleNet: 1x1, 3x3, 5x5 and pool branches."""

    def __init__(self, c_in: int, c_red: dict[str, int], c_out: dict[str, int]) -> None:
        super().__init__()

        def conv(i: int, o: int, k: int) -> list[nn.Module]:
            return [nn.Conv2d(i, o, k, padding=k // 2), nn.BatchNorm2d(o), nn.ReLU()]

        self.conv_1x1 = nn.Sequential(*conv(c_in, c_out["1x1"], 1))
        self.conv_3x3 = nn.Sequential(*conv(c_in, c_red["3x3"], 1), *conv(c_red["3x3"], c_out["3x3"], 3))
        self.conv_5x5 = nn.Sequential(*conv(c_in, c_red["5x5"], 1), *conv(c_red["5x5"], c_out["5x5"], 5))
        self.max_pool = nn.Sequential(nn.MaxPool2d(3, stride=1, padding=1), *conv(c_in, c_out["max"], 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.conv_1x1(x), self.conv_3x3(x), self.conv_5x5(x), self.max_pool(x)], dim=1)


class GoogleNet(nn.Module):
    """The CIFAR-10 GoogleNet of the UvA Deep Learning tutorial 4 (about 0.26 M parameters)."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3) -> None:
        super().__init__()
        red_a, red_b = {"3x3": 32, "5x5": 16}, {"3x3": 48, "5x5": 16}
        self.input_net = nn.Sequential(nn.Conv2d(in_channels, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU())
        self.inception_blocks = nn.Sequential(
            InceptionBlock(64, red_a, {"1x1": 16, "3x3": 32, "5x5": 8, "max": 8}),
            InceptionBlock(64, red_a, {"1x1": 24, "3x3": 48, "5x5": 12, "max": 12}),
            nn.MaxPool2d(3, stride=2, padding=1),
            InceptionBlock(96, red_a, {"1x1": 24, "3x3": 48, "5x5": 12, "max": 12}),
            InceptionBlock(96, red_a, {"1x1": 16, "3x3": 48, "5x5": 16, "max": 16}),
            InceptionBlock(96, red_a, {"1x1": 16, "3x3": 48, "5x5": 16, "max": 16}),
            InceptionBlock(96, red_a, {"1x1": 32, "3x3": 48, "5x5": 24, "max": 24}),
            nn.MaxPool2d(3, stride=2, padding=1),
            InceptionBlock(128, red_b, {"1x1": 32, "3x3": 64, "5x5": 16, "max": 16}),
            InceptionBlock(128, red_b, {"1x1": 32, "3x3": 64, "5x5": 16, "max": 16}),
        )
        self.output_net = nn.Sequential(nn.AdaptiveAvgPool2d((1, 1)), nn.Flatten(), nn.Linear(128, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.output_net(self.inception_blocks(self.input_net(x)))


def _gate_mlp(model: nn.Module, droprate_init: float, per_sample: bool) -> None:
    l0core.attach(model, "neuron", droprate_init=droprate_init, per_sample=per_sample)


def _gate_convnet(model: nn.Module, droprate_init: float, per_sample: bool) -> None:
    l0core.attach(model, "channel", droprate_init=droprate_init, per_sample=per_sample)


def _gate_lenet5(model: nn.Module, droprate_init: float, per_sample: bool) -> None:
    """The paper's L0LeNet5: conv output channels and dense-layer inputs."""
    _gate_convnet(model, droprate_init, per_sample)
    _gate_mlp(model, droprate_init, per_sample)


def _with_data_facts(factory: Any, kwargs: dict[str, Any], **facts: Any) -> dict[str, Any]:
    """``kwargs`` plus each of ``facts`` (the data's class count and input shape) that ``factory``'s signature
    takes and ``kwargs`` does not already give: the study file's value wins, nothing is passed twice.

    >>> def net(num_classes, width=8): ...
    >>> _with_data_facts(net, {"width": 4}, num_classes=3, input_shape=(1, 8, 8))
    {'num_classes': 3, 'width': 4}
    """
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):  # a builtin or C extension: nothing to read, pass what the file says
        return dict(kwargs)
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    given = {k: v for k, v in facts.items() if k not in kwargs and (k in params or takes_any)}
    return {**given, **kwargs}


def _pretrained(arch: str, num_classes: int, weights: str, **kwargs: Any) -> nn.Module:
    """torchvision's ``arch`` with its pretrained ``weights`` ("DEFAULT" or a name such as "IMAGENET1K_V1"), its
    last classifier layer replaced by a fresh one for ``num_classes`` where the weights know another count.
    Offline, one line naming the file to put in torch's hub cache."""
    import torchvision

    try:
        chosen = torchvision.models.get_model_weights(arch).verify(weights)
    except (ValueError, KeyError):
        known = ", ".join(["DEFAULT", *(w.name for w in torchvision.models.get_model_weights(arch))])
        raise ValueError(f"model 'torchvision:{arch}': no weights {weights!r}; torchvision has {known}") from None
    try:
        model = torchvision.models.get_model(arch, weights=chosen, **kwargs)
    except (OSError, RuntimeError) as exc:  # urllib's URLError is an OSError
        cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(chosen.url).name
        raise ValueError(f"model 'torchvision:{arch}': its {chosen} weights could not be downloaded "
                         f"({type(exc).__name__}); put {Path(chosen.url).name} (from {chosen.url}) at {cached}") from None
    head = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if head and head[-1][1].out_features != num_classes:
        parent_name, _, leaf = head[-1][0].rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, leaf, nn.Linear(head[-1][1].in_features, num_classes))
    return model


def build_model(name: str, input_shape: tuple[int, ...], num_classes: int, /, gates: bool = True,
                droprate_init: float = 0.5, per_sample: bool = False, state_dict: dict | None = None,
                **kwargs: Any) -> nn.Module:
    """Build zoo model ``name`` for inputs of ``input_shape`` (C, H, W) and gate it (unless ``gates=False``).

    ``state_dict`` (a dense model's, e.g. the baseline to fine-tune) is loaded before the gates go on, so its
    keys are the plain model's whatever the gates change.

    >>> net = build_model("mlp", (1, 8, 8), 10)
    >>> [g for g, _ in l0core.gates(net)]
    ['1.l0_gate', '3.l0_gate', '5.l0_gate']
    """
    # The study file's model.kwargs may set the class count and input shape; they win over the data's.
    num_classes = kwargs.pop("num_classes", num_classes)
    input_shape = tuple(kwargs.pop("input_shape", input_shape))
    c, h, w = input_shape if len(input_shape) == 3 else (1, 1, *input_shape) if len(input_shape) == 1 else \
        (1, *input_shape)
    if name == "mlp":
        model: nn.Module = LeNet300100(c * h * w, num_classes, **kwargs)
        gate = _gate_mlp
    elif name == "lenet5":
        model = LeNet5(c, num_classes, h, **kwargs)
        gate = _gate_lenet5
    elif name == "googlenet":
        model = GoogleNet(num_classes, c, **kwargs)
        gate = _gate_convnet
    elif name.startswith("torchvision:"):
        import torchvision

        check_model(name)
        arch = name.split(":", 1)[1]
        if kwargs.get("weights") is not None:
            model = _pretrained(arch, num_classes, **kwargs)
        else:
            model = torchvision.models.get_model(arch, **{"weights": None, "num_classes": num_classes, **kwargs})
        gate = _gate_convnet
    else:
        check_model(name)
        factory = import_object(name, "model")
        model = factory(**_with_data_facts(factory, kwargs, num_classes=num_classes, input_shape=tuple(input_shape)))
        gate = _gate_convnet if any(isinstance(m, nn.Conv2d) for m in model.modules()) else _gate_mlp
    if state_dict is not None:
        model.load_state_dict(state_dict)
    if gates:
        gate(model, droprate_init, per_sample)
    return model
