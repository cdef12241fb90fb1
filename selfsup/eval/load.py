"""Read a backbone from what training wrote (a ``.ckpt``) or from an export; write exports.

Evaluation never imports a method: a selfsup checkpoint carries ``checkpoint["selfsup"]`` with the
backbone spec ``{name, kwargs}`` and the state-dict prefix of each backbone it holds (``online`` and every
declared teacher), which is all that is needed to rebuild one with ``selfsup.models.build_backbone``.
Checkpoints of every format version load (``selfsup.engine.checkpoint.upgrade_checkpoint``). Loads are strict: a key mismatch is an error naming the keys,
never a silently random backbone (the official ImageNet probe loaded non-strictly, spec §8.7).

An export is three files in one directory:

* ``backbone.pt``: a plain torchvision (ResNet: ``conv1.weight``, ...; no ``fc``) or timm (ViT) state dict;
* ``backbone.safetensors``: the same tensors, with the backbone spec in the header metadata;
* ``backbone.json``: the backbone spec and how to load it into torchvision / timm.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from selfsup.engine.checkpoint import CHECKPOINT_KEY, upgrade_checkpoint
from selfsup.models import backbone_spec, build_backbone

EXPORT_FILES = ("backbone.pt", "backbone.safetensors", "backbone.json")


def _load_torch(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(
            f"cannot read '{path}' as a PyTorch checkpoint ({type(e).__name__}: {str(e)[:200]}); "
            "expected a selfsup .ckpt, an export directory, backbone.pt or backbone.safetensors"
        ) from e


def read_backbone_state(path: str | os.PathLike, which: str = "online") -> tuple[dict[str, torch.Tensor], dict]:
    """``(state_dict with the backbone's own keys, backbone spec {name, kwargs})`` from a checkpoint or an export.

    Args:
        path: a selfsup ``.ckpt`` (any format version), an export directory, ``backbone.pt`` or
            ``backbone.safetensors``.
        which: ``online`` (the trained backbone) or the name of a teacher the method declared (``teacher``;
            ``momentum`` is accepted for format-1 MMCR checkpoints). Exports hold one backbone.
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

        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                state = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not iterable)
        except Exception as e:
            raise ValueError(f"cannot read '{path}' as safetensors: {e}") from e
        if "backbone_config" not in meta:
            raise ValueError(f"'{path}' has no selfsup backbone_config in its metadata; was it exported by selfsup?")
        return state, backbone_spec(json.loads(meta["backbone_config"]))
    ckpt = _load_torch(path)
    if not isinstance(ckpt, dict):
        raise ValueError(f"'{path}' holds a {type(ckpt).__name__}, not a checkpoint dictionary")
    if CHECKPOINT_KEY in ckpt:  # a training checkpoint
        meta = upgrade_checkpoint(ckpt)[CHECKPOINT_KEY]
        prefixes = meta["backbones"]
        if which == "momentum" and "momentum" not in prefixes and "teacher" in prefixes:
            which = "teacher"  # format-1 name of MMCR's EMA branch
        if which not in prefixes:
            raise ValueError(f"'{path}' has no '{which}' backbone; it holds: {', '.join(prefixes)}")
        prefix = prefixes[which]
        state = {k[len(prefix) :]: v for k, v in ckpt["state_dict"].items() if k.startswith(prefix)}
        if not state:
            raise ValueError(f"'{path}' has no '{prefix}*' weights (no {which} backbone in this checkpoint)")
        return state, dict(meta["backbone"])
    sidecar = path.with_name("backbone.json")
    if sidecar.is_file():
        return ckpt, backbone_spec(json.loads(sidecar.read_text())["backbone_config"])
    keys = ", ".join(list(ckpt)[:5])
    raise ValueError(
        f"'{path}' is neither a selfsup training checkpoint (no 'selfsup' entry) nor an export "
        f"(no backbone.json beside it); top-level keys: {keys}"
    )


def load_backbone(path: str | os.PathLike, which: str = "online") -> tuple[nn.Module, dict]:
    """Rebuild the backbone and load its weights strictly; returns ``(backbone, spec)``."""
    state, spec = read_backbone_state(path, which)
    model = build_backbone(spec)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(
            f"weights in '{path}' do not match backbone {spec}: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    return model, spec


def export_backbone(
    checkpoint: str | os.PathLike, out_dir: str | os.PathLike, overwrite: bool = False, which: str = "online"
) -> dict[str, str]:
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
    info = {
        "backbone_config": cfg,
        "num_features": int(model.num_features),
        "source": str(checkpoint),
        "which": which,
        "load": _load_instructions(cfg, model),
    }
    tmp_json = targets["backbone.json"].with_suffix(".json.tmp")
    tmp_json.write_text(json.dumps(info, indent=2))
    os.replace(tmp_json, targets["backbone.json"])
    return {k: str(v) for k, v in targets.items()}


def _load_instructions(spec: dict, model: nn.Module) -> str:
    """How to load ``backbone.pt`` into the plain torchvision / timm model."""
    name, kw = spec["name"], spec["kwargs"]
    if name.startswith("vit_"):
        from selfsup.models.vit import timm_vit_name

        args = "".join(f", {k}={v!r}" for k, v in sorted(kw.items()))
        return (
            f"model = timm.create_model({timm_vit_name(name)!r}, num_classes=0{args}); "
            "model.load_state_dict(torch.load('backbone.pt'))"
        )
    if name.startswith("resnet") and kw.get("width", 64) == 64 and name != "resnet10":
        stem = ""
        if kw.get("cifar_stem"):
            stem = (
                f"model.conv1 = torch.nn.Conv2d(3, {model.conv1.out_channels}, 3, 1, 1, bias=False); "
                "model.maxpool = torch.nn.Identity(); "
            )
        return (
            f"model = torchvision.models.{name}(); {stem}"
            "missing, unexpected = model.load_state_dict(torch.load('backbone.pt'), strict=False)  # missing == fc.*"
        )
    return "selfsup.eval.load.load_backbone('<this directory>')"


def checkpoint_meta(path: str | os.PathLike) -> dict:
    """The ``selfsup`` facts of a training checkpoint (dataset, augment, config...); ``{}`` for an export."""
    path = Path(path)
    if path.is_file() and path.suffix not in (".safetensors",) and path.name != "backbone.pt":
        ckpt = _load_torch(path)
        if isinstance(ckpt, dict) and CHECKPOINT_KEY in ckpt:
            meta = dict(upgrade_checkpoint(ckpt)[CHECKPOINT_KEY])
            meta.pop("rng", None)
            return meta
    return {}
