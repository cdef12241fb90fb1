"""Backbones built by name from a registry (torchvision ResNets, timm ViTs) and MLP heads."""

from selfsup.models import resnet, vit  # noqa: F401  (registers the builders)
from selfsup.models.heads import MLP
from selfsup.models.registry import (
    TINY_RESNET,
    TINY_VIT,
    BackboneSpec,
    available_backbones,
    backbone_spec,
    build_backbone,
    register_backbone,
)

__all__ = [
    "MLP",
    "TINY_RESNET",
    "TINY_VIT",
    "BackboneSpec",
    "available_backbones",
    "backbone_spec",
    "build_backbone",
    "register_backbone",
]
