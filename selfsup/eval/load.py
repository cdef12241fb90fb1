"""Read a backbone from what training wrote (a ``.ckpt``) or from an export; write exports.

Evaluation never imports a method: a selfsup checkpoint carries ``checkpoint["selfsup"]`` with the
backbone config and the state-dict prefix of the backbone, which is all that is needed to rebuild it
with ``selfsup.models.build_backbone``. Loads are strict: a key mismatch is an error naming the keys,
never a silently random backbone (the official ImageNet probe loaded non-strictly, spec §8.7).

An export is three files in one directory:

* ``backbone.pt``: a plain torchvision state dict (``conv1.weight``, ``layer1.0.conv1.weight``, ...; no ``fc``);
* ``backbone.safetensors``: the same tensors, with the backbone config in the header metadata;
* ``backbone.json``: the backbone config and how to load it into torchvision.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from selfsup.models import build_backbone

EXPORT_FILES = ("backbone.pt", "backbone.safetensors", "backbone.json")


def _load_torch(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - report which file, then the cause
        raise ValueError(f"cannot read '{path}' as a PyTorch checkpoint: {e}") from e


def read_backbone_state(path: str | os.PathLike, which: str = "online") -> tuple[dict[str, torch.Tensor], dict]:
    """``(state_dict with torchvision keys, backbone_config)`` from a checkpoint or an export.

    Args:
        path: a selfsup ``.ckpt``, an export directory, ``backbone.pt`` or ``backbone.safetensors``.
        which: ``online`` (the trained backbone) or ``momentum`` (the EMA copy, when the method has one).
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint or backbone '{path}' does not exist")
    if path.is_dir():
        for name in ("backbone.safetensors", "backbone.pt"):
            if (path / name).is_file():
                return read_backbone_state(path / name, which)
        raise FileNotFoundError(f"'{path}' is a directory without backbone.safetensors or backbone.pt")
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()}
        if "backbone_config" not in meta:
            raise ValueError(f"'{path}' has no selfsup backbone_config in its metadata; was it exported by selfsup?")
        return state, json.loads(meta["backbone_config"])
    ckpt = _load_torch(path)
    if not isinstance(ckpt, dict):
        raise ValueError(f"'{path}' holds a {type(ckpt).__name__}, not a checkpoint dictionary")
    if "selfsup" in ckpt:  # a training checkpoint
        meta = ckpt["selfsup"]
        prefix = meta["backbone_prefix"]
        if which == "momentum":
            prefix = "method.momentum.copies.0."
        elif which != "online":
            raise ValueError(f"which must be 'online' or 'momentum', got '{which}'")
        state = {k[len(prefix):]: v for k, v in ckpt["state_dict"].items() if k.startswith(prefix)}
        if not state:
            raise ValueError(f"'{path}' has no '{prefix}*' weights (no {which} backbone in this checkpoint)")
        return state, dict(meta["backbone_config"])
    sidecar = path.with_name("backbone.json")
    if sidecar.is_file():
        return ckpt, json.loads(sidecar.read_text())["backbone_config"]
    keys = ", ".join(list(ckpt)[:5])
    raise ValueError(
        f"'{path}' is neither a selfsup training checkpoint (no 'selfsup' entry) nor an export "
        f"(no backbone.json beside it); top-level keys: {keys}"
    )


def load_backbone(path: str | os.PathLike, which: str = "online") -> tuple[nn.Module, dict]:
    """Rebuild the backbone and load its weights strictly; returns ``(backbone, backbone_config)``."""
    state, cfg = read_backbone_state(path, which)
    model = build_backbone(**cfg)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(
            f"weights in '{path}' do not match backbone {cfg}: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    return model, cfg


def export_backbone(checkpoint: str | os.PathLike, out_dir: str | os.PathLike, overwrite: bool = False,
                    which: str = "online") -> dict[str, str]:
    """Write ``backbone.pt``, ``backbone.safetensors`` and ``backbone.json`` into ``out_dir``.

    Existing files are never replaced unless ``overwrite``; each file is written atomically.
    """
    from safetensors.torch import save_file

    from selfsup.engine.checkpoint import atomic_torch_save

    model, cfg = load_backbone(checkpoint, which)  # validates the weights before anything is written
    out = Path(out_dir)
    targets = {name: out / name for name in EXPORT_FILES}
    clash = [str(p) for p in targets.values() if p.exists()]
    if clash and not overwrite:
        raise FileExistsError(f"refusing to overwrite {', '.join(clash)}; pass --overwrite true or another --out")
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    atomic_torch_save(state, targets["backbone.pt"])
    tmp = targets["backbone.safetensors"].with_suffix(".safetensors.tmp")
    save_file(state, str(tmp), metadata={"backbone_config": json.dumps(cfg), "format": "torchvision"})
    os.replace(tmp, targets["backbone.safetensors"])
    stem = ""
    if cfg.get("cifar_stem"):
        stem = (f"model.conv1 = torch.nn.Conv2d(3, {model.conv1.out_channels}, 3, 1, 1, bias=False); "
                "model.maxpool = torch.nn.Identity(); ")
    info = {
        "backbone_config": cfg,
        "feature_dim": int(model.feature_dim),
        "source": str(checkpoint),
        "which": which,
        "torchvision_load": (
            f"model = torchvision.models.{cfg['name']}(); {stem}"
            "missing, unexpected = model.load_state_dict(torch.load('backbone.pt'), strict=False)  # missing == fc.*"
        ) if cfg.get("width", 64) == 64 and cfg["name"] in ("resnet18", "resnet34", "resnet50", "resnet101") else
        "selfsup.eval.load.load_backbone('<this directory>')",
    }
    tmp_json = targets["backbone.json"].with_suffix(".json.tmp")
    tmp_json.write_text(json.dumps(info, indent=2))
    os.replace(tmp_json, targets["backbone.json"])
    return {k: str(v) for k, v in targets.items()}


def checkpoint_meta(path: str | os.PathLike) -> dict:
    """The ``selfsup`` facts of a training checkpoint (dataset, augment, config...); ``{}`` for an export."""
    path = Path(path)
    if path.is_file() and path.suffix not in (".safetensors",) and path.name != "backbone.pt":
        ckpt = _load_torch(path)
        if isinstance(ckpt, dict) and "selfsup" in ckpt:
            meta = dict(ckpt["selfsup"])
            meta.pop("rng", None)
            return meta
    return {}
