r"""``selfsup reconstruct``: a PNG grid of what an MAE / CAN / IMLE checkpoint reconstructs.

One row per image of the evaluation split (its first ``num_images``, eval transform), three columns:

* **original**: the image;
* **masked**: the visible patches, the removed ones grey;
* **reconstruction**: the decoder's prediction on the removed patches pasted into the visible ones.

``codes=k`` (IMLE-SSL): ``k`` reconstruction columns, one per random latent code (same image, same mask), which
shows what the codes vary; a model without codes has one.

With ``norm_pix_loss`` the decoder predicts per-patch normalised pixels ``t̂ = (t − μ) / sqrt(σ² + 1e-6)``; they
are shown as ``t̂ · sqrt(σ² + 1e-6) + μ`` with each patch's own ``μ, σ²`` taken from the original (the usual MAE
visualisation: shape and texture come from the model, the patch's mean colour and contrast from the image).
CAN's encoder sees the clean image here and its decoder the noise level 0.

Unlike ``selfsup.eval`` (which reads backbones only), this needs the whole method: it is rebuilt from the
checkpoint's recorded ``method`` config (class path and init args) and its weights are loaded strictly.
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from selfsup.data.build import DataSource
from selfsup.losses.mae import NORM_PIX_EPS
from selfsup.methods.mae import MAE
from selfsup.models.masked_vit import Masking, patchify, random_masking, unpatchify

__all__ = ["load_method", "reconstruct", "reconstruction_panels"]


def load_method(checkpoint: str | os.PathLike) -> tuple[MAE, dict]:
    """Rebuild the MAE-family method of a training checkpoint and load its weights; returns ``(method, meta)``."""
    from selfsup.eval.load import checkpoint_meta

    path = Path(checkpoint)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint '{path}' does not exist (reconstruct needs a training .ckpt)")
    meta = checkpoint_meta(path)
    spec = (meta.get("config") or {}).get("method") or {}
    class_path = spec.get("class_path")
    if not meta or not class_path:
        raise ValueError(f"'{path}' records no method config; reconstruct needs a checkpoint of selfsup pretrain")
    module, _, name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module or "selfsup.methods"), name)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"'{path}' was trained with {class_path}, which cannot be imported: {e}") from e
    if not (isinstance(cls, type) and issubclass(cls, MAE)):
        raise ValueError(
            f"'{path}' holds a {meta.get('method', name)} checkpoint; reconstruct needs MAE, CAN or IMLE "
            "(a method with a pixel decoder)"
        )
    init_args = dict(spec.get("init_args") or {})
    init_args.pop("init_from", None)  # the checkpoint's own weights replace them
    method = cls(**init_args)
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    state = {k[len("method.") :]: v for k, v in ckpt["state_dict"].items() if k.startswith("method.")}
    missing, unexpected = method.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"weights in '{path}' do not match {name}: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return method.eval(), meta


@torch.no_grad()
def reconstruction_panels(
    method: MAE, imgs: Tensor, masking: Masking, pred: Optional[Tensor] = None
) -> tuple[Tensor, Tensor]:
    """``(masked, reconstruction)`` of normalised ``imgs [N, C, H, W]``, both ``[N, C, H, W]`` in the same
    (normalised) units; the masked panel holds ``nan`` where patches were removed. ``pred [N, L, p² C]``: given
    predictions (default: the method's)."""
    p = method.patch_size
    pred = (method.predict(imgs, masking) if pred is None else pred).float()  # [N, L, p² C]
    target = patchify(imgs.float(), p)  # [N, L, p² C]
    if method.norm_pix_loss:
        mean = target.mean(dim=-1, keepdim=True)
        std = (target.var(dim=-1, keepdim=True, unbiased=True) + NORM_PIX_EPS) ** 0.5
        pred = pred * std + mean
    m = masking.mask.float().unsqueeze(-1)  # [N, L, 1], 1 = removed
    masked = unpatchify(torch.where(m.bool(), torch.full_like(target, float("nan")), target), p, imgs.shape[1])
    recon = unpatchify(target * (1 - m) + pred * m, p, imgs.shape[1])
    return masked, recon


def reconstruct(
    checkpoint: str | os.PathLike,
    output: str | os.PathLike,
    data,
    num_images: int = 8,
    mask_ratio: Optional[float] = None,
    seed: int = 0,
    upscale: int = 1,
    device: Optional[torch.device] = None,
    codes: int = 1,
) -> dict[str, Any]:
    """Write the grid of ``num_images`` test images of ``data`` (a ``DataConfig``) to the PNG ``output``.

    Masks come from a generator seeded with ``seed`` (the same grid every time); ``mask_ratio`` defaults to the
    method's. Returns ``{"output", "images", "mask_ratio", "size": [width, height], "loss"}``.
    """
    from torchvision.utils import make_grid, save_image

    out = Path(output)
    if out.suffix.lower() != ".png":
        raise ValueError(f"--output must be a .png file, got '{out}'")
    if out.exists():
        raise FileExistsError(f"--output '{out}' exists; refusing to overwrite it")
    if num_images < 1 or upscale < 1 or codes < 1:
        raise ValueError(f"num_images, upscale and codes must be >= 1, got {num_images}, {upscale}, {codes}")
    method, _ = load_method(checkpoint)
    if codes > 1 and getattr(method, "latent", None) is None:
        raise ValueError(
            f"--codes {codes}: this {type(method).__name__} checkpoint has no latent codes "
            "(IMLE with ignore_codes false has); use --codes 1"
        )
    device = device or torch.device("cpu")
    method = method.to(device)
    source = DataSource(data)
    aug = source.resolve_augment(None)
    ds = source.eval_split(data.test_split)
    n = min(num_images, len(ds))
    imgs = torch.stack([ds[i][0] for i in range(n)]).to(device)
    if imgs.shape[-1] != method.backbone.patch_embed.img_size[-1]:
        raise ValueError(
            f"the eval images are {tuple(imgs.shape[-2:])} but the model takes "
            f"{tuple(method.backbone.patch_embed.img_size)}; pass --data.augment with that crop size"
        )
    ratio = method.mask_ratio if mask_ratio is None else float(mask_ratio)
    gen = torch.Generator(device=device).manual_seed(seed)
    masking = random_masking(n, method.num_patches, ratio, gen)
    if codes > 1:
        preds = method.reconstruct_with_codes(imgs, masking, codes, gen)  # [n, k, L, p² C]
        recons = [reconstruction_panels(method, imgs, masking, preds[:, j])[1] for j in range(codes)]
        masked = reconstruction_panels(method, imgs, masking, preds[:, 0])[0]
    else:
        masked, recon = reconstruction_panels(method, imgs, masking)
        recons = [recon]
    with torch.no_grad():
        loss = float(method.forward_loss(imgs, masking).loss) if ratio > 0 else float("nan")

    mean = torch.tensor(aug.mean, device=device).view(1, -1, 1, 1)
    std = torch.tensor(aug.std, device=device).view(1, -1, 1, 1)
    panels = [(x.float() * std + mean) for x in (imgs, masked, *recons)]
    panels[1] = torch.nan_to_num(panels[1], nan=0.5)  # removed patches in grey
    grid = torch.stack(panels, dim=1).flatten(0, 1).clamp(0, 1)  # [n * (2 + k), C, H, W]: row = image
    if upscale > 1:
        grid = F.interpolate(grid, scale_factor=upscale, mode="nearest")
    out.parent.mkdir(parents=True, exist_ok=True)
    image = make_grid(grid.cpu(), nrow=len(panels), padding=2, pad_value=1.0)
    save_image(image, str(out))
    return {
        "output": str(out),
        "images": n,
        "mask_ratio": ratio,
        "codes": codes,
        "size": [int(image.shape[2]), int(image.shape[1])],
        "loss": loss,
    }
