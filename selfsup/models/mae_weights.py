r"""Copy pretrained MAE weights (encoder + decoder) into an :class:`~selfsup.methods.mae.MAE` or a subclass.

Sources (spec §3.1, §3.7):

* a selfsup ``.ckpt`` (``state_dict`` + ``checkpoint["selfsup"]``) of an MAE / CAN / IMLE run: the online
  backbone (``method.backbone.*``) and ``method.decoder.*``; any other key is skipped;
* the official MAE release with decoder (``mae_pretrain_vit_base_full.pth``): ``{"model": state_dict, ...}`` in
  the layout of ``models_mae.MaskedAutoencoderViT``;
* a plain state dict (``.pth`` / ``.safetensors``, bare or under ``"model"`` / ``"state_dict"``) in either layout.

Official key -> ours (``D`` encoder width, ``E`` decoder width, ``L`` patches, ``P = p² C``)::

    cls_token [1, 1, D], pos_embed [1, 1+L, D], patch_embed.*, blocks.{i}.*, norm.*  -> backbone.<same>
    mask_token [1, 1, E]                                  -> decoder.mask_token
    decoder_embed.weight [E, D] / .bias [E]               -> decoder.embed.*
    decoder_pos_embed [1, 1+L, E]                         -> decoder.pos_embed
    decoder_blocks.{i}.* (timm Block)                     -> decoder.blocks.{i}.*
    decoder_norm.* [E]                                    -> decoder.norm.*
    decoder_pred.weight [P, E] / .bias [P]                -> decoder.pred.*
    head.* (fine-tuned classifiers)                       -> skipped

Both position tables are fixed 2-D sin-cos here: the file's table is copied when its shape matches, kept as
ours when only its token count differs (another resolution), and the report says whether the copy equals ours.
Everything is checked before anything is copied, so a failed load leaves ``method`` unchanged. Method modules
outside ``backbone`` / ``decoder`` (a projector, ``latent.*``) are never touched and are reported as ``kept``.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from torch import Tensor

__all__ = ["load_mae_weights"]

_OFFICIAL_DECODER = (
    ("decoder_embed.", "decoder.embed."),
    ("decoder_pos_embed", "decoder.pos_embed"),
    ("decoder_blocks.", "decoder.blocks."),
    ("decoder_norm.", "decoder.norm."),
    ("decoder_pred.", "decoder.pred."),
    ("mask_token", "decoder.mask_token"),
)
_POS = ("backbone.pos_embed", "decoder.pos_embed")  # fixed sin-cos tables [1, 1 + L, D|E]: optional in the file


def _read(path: Path) -> Any:
    if not path.is_file():
        raise FileNotFoundError(f"MAE weights '{path}' do not exist (or are not a file)")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        if isinstance(e, pickle.UnpicklingError) or "weights only" in str(e).lower():
            raise ValueError(
                f"'{path}' holds pickled Python objects besides tensors (e.g. an argparse 'args' Namespace or an "
                f"optimizer/scheduler object), which selfsup will not unpickle (torch.load(weights_only=True) "
                f"refused: {str(e).splitlines()[0][:160]}). If you trust the file, strip it once to its weights: "
                f"python -c \"import torch; c = torch.load('{path}', map_location='cpu', weights_only=False); "
                f"torch.save({{'model': c['model']}}, 'mae_weights_only.pth')\" and pass that file instead"
            ) from e
        raise ValueError(f"cannot read '{path}' as a PyTorch checkpoint ({type(e).__name__}: {str(e)[:200]})") from e


def _official_target(key: str) -> str | None:
    for old, new in _OFFICIAL_DECODER:
        if key == old or (old.endswith(".") and key.startswith(old)):
            return new + key[len(old) :]
    return None if key.startswith("head.") else "backbone." + key


def _targets(ckpt: Any, path: Path) -> tuple[str, dict[str, tuple[str, Tensor]], list[str]]:
    """``(source, {our key: (file key, tensor)}, skipped file keys)``."""
    if not isinstance(ckpt, dict):
        raise ValueError(f"'{path}' holds a {type(ckpt).__name__}, not a checkpoint or state dictionary")
    backbone_prefix = "backbone."
    if "selfsup" in ckpt:  # our Lightning checkpoint
        from selfsup.engine.checkpoint import upgrade_checkpoint

        meta = upgrade_checkpoint(ckpt)["selfsup"]
        source, sd = "selfsup", ckpt.get("state_dict", {})
        backbone_prefix = meta.get("backbones", {}).get("online", "method.backbone.")[len("method.") :]
    elif isinstance(ckpt.get("model"), dict):
        source, sd = "official-mae", ckpt["model"]
    elif isinstance(ckpt.get("state_dict"), dict):
        source, sd = "state-dict", ckpt["state_dict"]
    else:
        source, sd = "state-dict", ckpt
    sd = {k: v for k, v in sd.items() if isinstance(v, Tensor)}
    ours_layout = any(k.startswith(("method.backbone.", "backbone.", "method.decoder.", "decoder.")) for k in sd)
    official = not ours_layout and any(
        k in ("cls_token", "patch_embed.proj.weight") or k.startswith("blocks.") for k in sd
    )
    if source == "official-mae" and not official:
        source = "state-dict"  # a "model" wrapper around our own layout
    if not (ours_layout or official):
        raise ValueError(
            f"'{path}' holds no MAE encoder weights in a known layout (neither selfsup 'method.backbone.*'"
            f" nor official MAE 'blocks.*', 'cls_token'); first keys: {list(sd)[:5]}"
        )
    out: dict[str, tuple[str, Tensor]] = {}
    skipped: list[str] = []
    for k, v in sd.items():
        if official:
            t = _official_target(k)
        else:
            name = k[len("method.") :] if k.startswith("method.") else k
            t = (
                "backbone." + name[len(backbone_prefix) :]
                if name.startswith(backbone_prefix)
                else name
                if name.startswith("decoder.")
                else None
            )
        if t is None:
            skipped.append(k)
        else:
            out[t] = (k, v)
    return source, out, skipped


@torch.no_grad()
def load_mae_weights(method: nn.Module, path: str | os.PathLike, *, strict_decoder: bool = True) -> dict:
    """Copy pretrained MAE encoder + decoder weights from ``path`` into ``method`` (an ``MAE`` or subclass).

    Args:
        method: the method to fill in place (its ``backbone`` is a timm ViT, its ``decoder`` an ``MAEDecoder``).
        path: a selfsup ``.ckpt``, the official ``mae_pretrain_vit_*_full.pth``, or a plain state dict file.
        strict_decoder: missing decoder weights are an error (default); ``False`` loads what is there and keeps
            the rest of the decoder as initialised (e.g. from the encoder-only ``mae_pretrain_vit_base.pth``).

    Returns:
        ``{"source": "selfsup" | "official-mae" | "state-dict", "loaded": n tensors copied, "skipped": file
        keys not used, "kept": method keys left untouched, "pos_embed": {our table: what happened}}``.

    Raises:
        FileNotFoundError: no such file.
        ValueError: unreadable / pickled file, a shape mismatch (key, both shapes, file), missing encoder (or,
            with ``strict_decoder``, decoder) weights, or file weights this method has no place for (a deeper
            encoder or decoder).
    """
    path = Path(path)
    source, targets, skipped = _targets(_read(path), path)
    ours = method.state_dict()  # detached tensors sharing storage with the parameters
    if "backbone.norm.weight" not in ours and "backbone.fc_norm.weight" in ours:  # global_pool="avg" ViT:
        targets = {
            ("backbone.fc_norm." + t[len("backbone.norm.") :] if t.startswith("backbone.norm.") else t): v
            for t, v in targets.items()
        }  # MAE's token norm is timm's fc_norm there
    extra = [f"{fk} (ours: {t})" for t, (fk, _) in targets.items() if t not in ours]
    if extra:
        raise ValueError(
            f"'{path}' holds weights that {type(method).__name__} has no place for (a different encoder "
            f"or decoder architecture, e.g. depth): {extra[:5]}{' ...' if len(extra) > 5 else ''}"
        )
    missing_enc = [k for k in ours if k.startswith("backbone.") and k not in targets and k not in _POS]
    if missing_enc:
        raise ValueError(
            f"'{path}' lacks encoder weights {missing_enc[:5]}{' ...' if len(missing_enc) > 5 else ''}"
            f" ({len(missing_enc)} missing); is it an MAE checkpoint for this ViT?"
        )
    dec = [k for k in ours if k.startswith("decoder.") and k not in _POS]
    missing_dec = [k for k in dec if k not in targets]
    if missing_dec and strict_decoder:
        if len(missing_dec) == len(dec):
            raise ValueError(
                f"'{path}' has no MAE decoder weights (no decoder_* / mask_token or decoder.* keys): it is an "
                "encoder-only release such as mae_pretrain_vit_base.pth. IMLE (and any method that starts from MAE "
                "reconstructions) needs the full checkpoint with decoder, mae_pretrain_vit_base_full.pth (MAE issue "
                "#8); pass strict_decoder=False to load the encoder only"
            )
        raise ValueError(
            f"'{path}' lacks decoder weights {missing_dec[:5]}{' ...' if len(missing_dec) > 5 else ''} "
            f"({len(missing_dec)} of {len(dec)} missing); pass strict_decoder=False to keep them as "
            "initialised"
        )
    pos: dict[str, str] = {}
    for t in _POS:
        if t in ours and t not in targets:
            pos[t] = "not in the file: kept our sin-cos table"
        elif t in targets:
            fk, v = targets[t]
            if v.shape != ours[t].shape and v.dim() == 3 and v.shape[-1] == ours[t].shape[-1]:  # [1, 1+L', D]
                del targets[t]
                pos[t] = f"kept our sin-cos table: file's {fk} is {list(v.shape)}, ours {list(ours[t].shape)}"
    for t, (fk, v) in targets.items():
        if v.shape != ours[t].shape:
            raise ValueError(
                f"shape mismatch in '{path}': {fk} is {list(v.shape)} but {type(method).__name__}'s "
                f"{t} is {list(ours[t].shape)}"
            )
    for t in _POS:
        if t in targets:
            diff = (targets[t][1].float() - ours[t].float().cpu()).abs().max().item()
            pos[t] = (
                "copied; equals our sin-cos table within 1e-5"
                if diff <= 1e-5
                else f"copied; differs from our sin-cos table (max |diff| {diff:.3g})"
            )
    for t, (_, v) in targets.items():
        ours[t].copy_(v)
    kept = [k for k in ours if k not in targets]
    return {"source": source, "loaded": len(targets), "skipped": skipped, "kept": kept, "pos_embed": pos}
