r"""``selfsup reconstruct``: a PNG grid of what an MAE / CAN / IMLE checkpoint reconstructs.

One row per image of the evaluation split (its first ``num_images``, eval transform), three columns:

* **original**: the image;
* **masked**: the visible patches, the removed ones grey;
* **reconstruction**: the decoder's prediction on the removed patches pasted into the visible ones.

``codes=k`` (IMLE-SSL): ``k`` reconstruction columns, one per random latent code (same image, same mask), which
shows what the codes vary; a model without codes has one.

With ``norm_pix_loss`` the decoder predicts per-patch normalised pixels ``t̂ = (t − μ) / s``, ``s = sqrt(σ² + 1e-6)``,
where ``μ, σ²`` (unbiased, as the loss: :func:`selfsup.losses.mae.norm_pix_targets`) are taken over **all** ``p² C``
values of the patch in normalised units, channels mixed. How a prediction ``ŷ`` is put back into pixels
(``display``):

* ``"patch"`` (default, MAE's visualisation, comparable with the papers' figures): ``x̂ = ŷ · s + μ``, the patch
  at its own (single) mean ``μ`` and scale ``s``: the patch's mean colour is the model's prediction;
* ``"channel"`` (``--display channel``): ``x̂_c = s · (ŷ_c − mean ŷ_c) + mean t_c``, each channel ``c`` of the patch
  at its own mean ``mean t_c`` (from the original) and the patch's scale ``s``: the patch's mean **colour** and
  contrast come from the image, the shape, texture and colour variation inside the patch from the model.

Both give the image back exactly when ``ŷ`` is the norm-pix target. They differ on colour: the images are
normalised per channel (different means and stds) before patchify, so a uniform grey or black patch is **not**
uniform in normalised units (black in CIFAR-10 units is ``(−2.43, −2.42, −2.22)``): its norm-pix target is a pure
channel pattern (``R, G ≈ −0.7, B ≈ +1.4``) and its ``σ`` is the spread between channels, while on a textured patch
the same channel offsets are a small part of a large ``σ``. The model cannot know the ``σ`` of a removed patch, so a
briefly trained one predicts an average channel offset in units of ``1/σ``; ``"patch"`` multiplies it by the true
``σ`` and shows colour the image does not have: too blue on high-contrast patches (the edge of a dark object on a
light background, a bright object on black), slightly yellow on flat ones, even on a grayscale dataset. Measured on
grayscale CIFAR-10 (1,000 test images, masked pixels) after 400 steps of can-cpu-small / mae-cpu-small: mean
``|R − B|`` 0.043 / 0.038 with ``"patch"`` (``B − R`` +0.16 / +0.14 on patches of pixel std > 0.2, −0.02 on flat
ones), 0.001 / 0.002 with ``"channel"``; both 0 for the target itself. This is the norm-pix target at work, not a
fault of CAN's noise branch (its decoder's noise-level conditioning moves the predictions by < 0.5 %) and it fades
only slowly with training. ``"channel"`` cannot invent a patch colour the image does not have (a prediction that is
any gray patch's target is shown gray, R = G = B); the colour it shows inside a patch is the model's, but it hides
the model's error on each patch's mean colour, which is why it is not the default. Predictions of a model without
``norm_pix_loss`` are raw normalised pixels and are shown as they are.

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

__all__ = ["DISPLAYS", "display_patches", "load_method", "reconstruct", "reconstruction_panels"]

DISPLAYS = ("patch", "channel")


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


def display_patches(
    pred: Tensor, target: Tensor, channels: int, norm_pix: bool = True, display: str = "patch"
) -> Tensor:
    """Predictions ``pred [N, L, p² C]`` as patches in normalised image units, ``target [N, L, p² C]`` the original's
    patches (:func:`~selfsup.models.masked_vit.patchify`, channel fastest), see the module docstring.

    ``norm_pix`` false: ``pred`` itself. Otherwise ``"channel"``: ``s (ŷ_c − mean ŷ_c) + mean t_c`` per channel
    ``c``; ``"patch"``: ``ŷ s + μ``; ``μ``, ``s = sqrt(σ² + NORM_PIX_EPS)`` (unbiased ``σ²``) over the patch's ``p² C``
    values, as the loss normalises them. Either is ``target`` exactly for ``pred = norm_pix_targets(target)``.
    """
    if display not in DISPLAYS:
        raise ValueError(f"display must be one of {DISPLAYS}, got {display!r}")
    if pred.shape != target.shape or pred.dim() != 3 or pred.shape[-1] % int(channels):
        raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} must both be [N, L, p² C]")
    if not norm_pix:
        return pred
    mean = target.mean(dim=-1, keepdim=True)  # [N, L, 1]
    std = (target.var(dim=-1, keepdim=True, unbiased=True) + NORM_PIX_EPS) ** 0.5  # as norm_pix_targets
    if display == "patch":
        return pred * std + mean
    n, length, d = pred.shape
    pc = pred.reshape(n, length, d // channels, channels)  # [N, L, p², C]
    tc = target.reshape(n, length, d // channels, channels)
    shown = std.unsqueeze(-1) * (pc - pc.mean(dim=2, keepdim=True)) + tc.mean(dim=2, keepdim=True)
    return shown.reshape(n, length, d)


@torch.no_grad()
def reconstruction_panels(
    method: MAE, imgs: Tensor, masking: Masking, pred: Optional[Tensor] = None, display: str = "patch"
) -> tuple[Tensor, Tensor]:
    """``(masked, reconstruction)`` of normalised ``imgs [N, C, H, W]``, both ``[N, C, H, W]`` in the same
    (normalised) units; the masked panel holds ``nan`` where patches were removed. ``pred [N, L, p² C]``: given
    predictions (default: the method's); ``display``: how norm-pix predictions are shown (:func:`display_patches`)."""
    p, c = method.patch_size, imgs.shape[1]
    pred = (method.predict(imgs, masking) if pred is None else pred).float()  # [N, L, p² C]
    target = patchify(imgs.float(), p)  # [N, L, p² C]
    pred = display_patches(pred, target, c, method.norm_pix_loss, display)
    m = masking.mask.float().unsqueeze(-1)  # [N, L, 1], 1 = removed
    masked = unpatchify(torch.where(m.bool(), torch.full_like(target, float("nan")), target), p, c)
    recon = unpatchify(target * (1 - m) + pred * m, p, c)
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
    display: str = "patch",
) -> dict[str, Any]:
    """Write the grid of ``num_images`` test images of ``data`` (a ``DataConfig``) to the PNG ``output``.

    Masks come from a generator seeded with ``seed`` (the same grid every time); ``mask_ratio`` defaults to the
    method's; ``display``: how norm-pix predictions are shown (``"patch"``, MAE's, or ``"channel"``, see the module docstring).
    Returns ``{"output", "images", "mask_ratio", "codes", "display", "size": [width, height], "loss"}``.
    """
    from torchvision.utils import make_grid, save_image

    out = Path(output)
    if out.suffix.lower() != ".png":
        raise ValueError(f"--output must be a .png file, got '{out}'")
    if out.exists():
        raise FileExistsError(f"--output '{out}' exists; refusing to overwrite it")
    if display not in DISPLAYS:
        raise ValueError(f"display must be one of {DISPLAYS}, got {display!r}")
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
        recons = [reconstruction_panels(method, imgs, masking, preds[:, j], display)[1] for j in range(codes)]
        masked = reconstruction_panels(method, imgs, masking, preds[:, 0], display)[0]
    else:
        masked, recon = reconstruction_panels(method, imgs, masking, display=display)
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
        "display": display,
        "size": [int(image.shape[2]), int(image.shape[1])],
        "loss": loss,
    }
