"""Backbones (by name) and heads."""

from selfsup.models.backbones import available_backbones, build_backbone, register_backbone
from selfsup.models.heads import MLP

__all__ = ["MLP", "available_backbones", "build_backbone", "register_backbone"]
