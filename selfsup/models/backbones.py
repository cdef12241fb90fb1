"""Backbones built by name from a small registry.

Every backbone is a plain ``nn.Module`` mapping images ``[B, 3, H, W]`` to features ``[B, F]`` and
carries ``feature_dim``. ResNets are torchvision ``ResNet`` instances with ``fc`` replaced by
``nn.Identity``, so their state-dict keys are exactly torchvision's (minus ``fc.*``) and an exported
backbone loads into an unmodified torchvision model.

The CIFAR stem (3x3 stride-1 ``conv1``, no max-pool) is an explicit option, never inferred from a
dataset name (the official MMCR code's dataset test was always true, spec §8.1).
"""

from __future__ import annotations

from typing import Callable

import torch.nn as nn
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet

_RESNET_LAYERS: dict[str, tuple[type[nn.Module], list[int]]] = {
    "resnet10": (BasicBlock, [1, 1, 1, 1]),
    "resnet18": (BasicBlock, [2, 2, 2, 2]),
    "resnet34": (BasicBlock, [3, 4, 6, 3]),
    "resnet50": (Bottleneck, [3, 4, 6, 3]),
    "resnet101": (Bottleneck, [3, 4, 23, 3]),
}

_BUILDERS: dict[str, Callable[..., nn.Module]] = {}


def register_backbone(name: str):
    """Decorator adding a builder ``fn(**kwargs) -> nn.Module`` to the registry under ``name``."""

    def wrap(fn):
        if name in _BUILDERS:
            raise ValueError(f"backbone '{name}' is already registered")
        _BUILDERS[name] = fn
        return fn

    return wrap


def available_backbones() -> list[str]:
    return sorted(_BUILDERS)


def build_backbone(name: str, **kwargs) -> nn.Module:
    """Build a registered backbone; ``kwargs`` go to its builder (e.g. ``cifar_stem=True``)."""
    if name not in _BUILDERS:
        raise ValueError(f"unknown backbone '{name}'; available: {', '.join(available_backbones())}")
    return _BUILDERS[name](**kwargs)


def _resnet(
    arch: str,
    cifar_stem: bool = False,
    width: int = 64,
    zero_init_residual: bool = False,
) -> nn.Module:
    """A torchvision ResNet trunk (no ``fc``).

    Args:
        arch: key of ``_RESNET_LAYERS``.
        cifar_stem: replace ``conv1`` by a 3x3 stride-1 convolution without bias and drop the
            max-pool (for 32x32 / 64x64 inputs).
        width: channels of the first stage (64 = torchvision). Narrower widths (e.g. 32) keep the
            torchvision module layout, for small CPU experiments; only BasicBlock ResNets.
        zero_init_residual: zero-init the last BN of each residual branch (ImageNet MMCR / MEC).
    """
    block, layers = _RESNET_LAYERS[arch]
    model = ResNet(block, layers, zero_init_residual=zero_init_residual)
    if width != 64:
        if block is not BasicBlock:
            raise ValueError(f"width={width} is only supported for BasicBlock ResNets, not {arch}")
        model.inplanes = width
        model.conv1 = nn.Conv2d(3, width, 7, 2, 3, bias=False)
        model.bn1 = nn.BatchNorm2d(width)
        model.layer1 = model._make_layer(block, width, layers[0])
        model.layer2 = model._make_layer(block, 2 * width, layers[1], stride=2)
        model.layer3 = model._make_layer(block, 4 * width, layers[2], stride=2)
        model.layer4 = model._make_layer(block, 8 * width, layers[3], stride=2)
        for m in model.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        if zero_init_residual:
            for m in model.modules():
                if isinstance(m, BasicBlock):
                    nn.init.zeros_(m.bn2.weight)
    if cifar_stem:
        model.conv1 = nn.Conv2d(3, model.bn1.num_features, kernel_size=3, stride=1, padding=1, bias=False)
        nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")
        model.maxpool = nn.Identity()
    model.feature_dim = model.fc.in_features if width == 64 else 8 * width * block.expansion
    model.fc = nn.Identity()
    return model


for _arch in _RESNET_LAYERS:
    register_backbone(_arch)(lambda _a=_arch, **kw: _resnet(_a, **kw))
