"""torchvision ResNets as backbones (``resnet10`` ... ``resnet101``).

Each is a torchvision ``ResNet`` whose ``fc`` is ``nn.Identity``, so its state-dict keys are exactly
torchvision's (minus ``fc.*``) and an exported backbone loads into an unmodified torchvision model.
The CIFAR stem (3x3 stride-1 ``conv1``, no max-pool) is an explicit option, never inferred from a
dataset name (the official MMCR code's dataset test was always true, spec §8.1).
"""

from __future__ import annotations

import torch.nn as nn
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet

from selfsup.models.registry import register_backbone

__all__ = ["ResNetTrunk"]


class ResNetTrunk(ResNet):
    """A torchvision ResNet without classifier: ``forward(x) -> [B, num_features]`` (global average)."""

    num_features: int

    def no_weight_decay(self) -> set[str]:
        return set()  # only 1-D parameters (BatchNorm, biases), which the optimiser excludes by rule


def _resnet(
    block: type[nn.Module],
    layers: list[int],
    cifar_stem: bool = False,
    width: int = 64,
    zero_init_residual: bool = False,
) -> ResNetTrunk:
    """Args:
    cifar_stem: replace ``conv1`` by a 3x3 stride-1 convolution without bias and drop the max-pool
        (32x32 / 64x64 inputs).
    width: channels of the first stage (64 = torchvision). Narrower widths keep the torchvision module
        layout, for small CPU experiments; BasicBlock ResNets only.
    zero_init_residual: zero-init the last BN of each residual branch (ImageNet MMCR / MEC).
    """
    model = ResNetTrunk(block, layers, zero_init_residual=zero_init_residual)
    if width != 64:
        if block is not BasicBlock:
            raise ValueError(f"width={width} is only supported for BasicBlock ResNets")
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
    model.num_features = 8 * width * block.expansion
    model.fc = nn.Identity()
    return model


@register_backbone
def resnet10(**kw) -> ResNetTrunk:
    return _resnet(BasicBlock, [1, 1, 1, 1], **kw)


@register_backbone
def resnet18(**kw) -> ResNetTrunk:
    return _resnet(BasicBlock, [2, 2, 2, 2], **kw)


@register_backbone
def resnet34(**kw) -> ResNetTrunk:
    return _resnet(BasicBlock, [3, 4, 6, 3], **kw)


@register_backbone
def resnet50(**kw) -> ResNetTrunk:
    return _resnet(Bottleneck, [3, 4, 6, 3], **kw)


@register_backbone
def resnet101(**kw) -> ResNetTrunk:
    return _resnet(Bottleneck, [3, 4, 23, 3], **kw)
