"""The backbone registry: one decorated builder per backbone, built from ``{name, kwargs}``.

In the manner of timm's ``register_model``: a builder is a function ``fn(**kwargs) -> nn.Module``
registered under a name. Whatever it returns honours the backbone contract:

* ``forward(x [B, 3, H, W]) -> [B, num_features]``: the **pooled** features that the kNN monitor,
  probes, fine-tuning and export use (a ViT's class token or mean token, a ResNet's global average);
* ``num_features``: the width of those features;
* ``no_weight_decay() -> set[str]``: parameter names (relative to the backbone) that the optimiser
  keeps out of weight decay, besides every 1-D parameter (position embeddings, class tokens).

A backbone is recorded everywhere (checkpoints, resume checks, exports) as the spec
``{"name": str, "kwargs": dict}``: :func:`backbone_spec` turns any accepted spelling into it, including
the flat ``{"name": ..., "cifar_stem": ..., "width": ...}`` of format-1 checkpoints.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch.nn as nn

__all__ = ["BackboneSpec", "available_backbones", "backbone_spec", "build_backbone", "register_backbone"]


@dataclass
class BackboneSpec:
    """A backbone by name with open arguments (the typed form recipes and the command line use).

    Attributes:
        name: a registered backbone (``selfsup.models.available_backbones()``): ``resnet18``, ``vit_tiny``, ...
        kwargs: arguments of its builder, e.g. ``{cifar_stem: true, width: 32}`` for a ResNet or
            ``{img_size: 32, patch_size: 4}`` for a ViT.
    """

    name: str = "resnet18"
    kwargs: dict[str, Any] = field(default_factory=dict)


_BUILDERS: dict[str, Callable[..., nn.Module]] = {}


def register_backbone(fn: Callable[..., nn.Module] | None = None, *, name: str | None = None):
    """Register ``fn`` under ``name`` (default: the function's name). Usable as ``@register_backbone``
    or ``@register_backbone(name="...")``."""

    def wrap(f: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        key = name or f.__name__
        if key in _BUILDERS:
            raise ValueError(f"backbone '{key}' is already registered")
        _BUILDERS[key] = f
        return f

    return wrap(fn) if fn is not None else wrap


def available_backbones() -> list[str]:
    """The registered backbone names, sorted (``resnet10`` ... ``resnet101``, ``vit_tiny`` ... ``vit_large``, and any
    added with :func:`register_backbone`)."""
    return sorted(_BUILDERS)


def backbone_spec(spec: BackboneSpec | Mapping[str, Any] | str | None = None, **kwargs: Any) -> dict[str, Any]:
    """Normalise a backbone description to ``{"name": str, "kwargs": dict}`` (a fresh, JSON-able dict).

    Accepts a name (``"resnet18"``), ``{"name", "kwargs"}``, or the flat form
    ``{"name": "resnet18", "cifar_stem": true}`` (format-1 checkpoints and short recipes); ``kwargs``
    are merged on top. An unknown name is an error listing the registered ones.
    """
    if spec is None:
        spec = {"name": "resnet18"}
    if isinstance(spec, BackboneSpec):
        spec = dataclasses.asdict(spec)
    if isinstance(spec, str):
        spec = {"name": spec}
    spec = dict(spec)
    if "name" not in spec:
        raise ValueError(f"a backbone needs a 'name'; got {spec}")
    name = str(spec.pop("name"))
    args = dict(spec.pop("kwargs", None) or {})
    args.update(spec)  # flat keys
    args.update(kwargs)
    if name not in _BUILDERS:
        raise ValueError(f"unknown backbone '{name}'; available: {', '.join(available_backbones())}")
    return {"name": name, "kwargs": args}


def build_backbone(spec: BackboneSpec | Mapping[str, Any] | str | None = None, **kwargs: Any) -> nn.Module:
    """Build a registered backbone from a spec (see :func:`backbone_spec`).

    The module gets ``num_features`` and ``no_weight_decay()`` checked, so a new builder that forgets
    either fails here, not in an evaluation an hour later.
    """
    s = backbone_spec(spec, **kwargs)
    try:
        model = _BUILDERS[s["name"]](**s["kwargs"])
    except TypeError as e:
        raise ValueError(f"backbone '{s['name']}' rejected its arguments {s['kwargs']}: {e}") from e
    if not isinstance(getattr(model, "num_features", None), int) or not callable(
        getattr(model, "no_weight_decay", None)
    ):
        raise TypeError(f"backbone '{s['name']}' must define an int num_features and no_weight_decay()")
    return model


#: The smallest backbones of each family (tests, smoke runs, a method's ``tiny`` configuration): a ResNet-10 of
#: width 8 with the CIFAR stem, and a one-block ViT of width 32 on 32 px images in 8 px patches.
TINY_RESNET: dict[str, Any] = {"name": "resnet10", "kwargs": {"cifar_stem": True, "width": 8}}
TINY_VIT: dict[str, Any] = {
    "name": "vit_tiny",
    "kwargs": {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 1, "num_heads": 2},
}
