"""The augmentations of :mod:`selfsup.data.transforms`, applied to a whole batch at once on its device.

:class:`BatchedViews` turns a batch of images ``[B, 3, H, W]`` into sample-major views
``[B, V, 3, crop, crop]`` (or, given views the loader already cropped, ``[B, V, 3, crop, crop]``
uint8, applies only the photometric ops). Every random parameter is drawn per (image, view) from one
``torch.Generator``, so a fixed generator state gives bit-identical views (the engine keys it on
``(seed, global_step)`` so resuming is exact). Each op is vectorised over all ``B * V`` samples:

* **RandomResizedCrop + horizontal flip**: one affine sampling grid per sample
  (``F.affine_grid`` + ``F.grid_sample``); the flip is a negated x scale.
* **ColorJitter**: brightness, contrast, saturation, hue with per-sample factors, fixed order.
* **Grayscale**, **Gaussian blur** (per-sample sigma, separable grouped conv), **Solarize**.
* **Normalize**.

Probabilistic ops are applied through a per-sample 0/1 float mask (a ``lerp`` / multiply: on CPU,
``torch.where`` and other consumers of bool tensors are about 10x slower than float arithmetic) or,
for the expensive blur, to the selected subset only (index, compute, write back). ColorJitter skips
masking altogether: a sample that draws "no jitter" gets the identity factors (1, 1, 1, 0). Ops whose
probability (or strength) is 0 are skipped entirely.

Differences from the per-image torchvision path, all deliberate and documented where they happen:
crop boxes are not rounded to whole pixels, the crop resize has no antialiasing (it samples the source
at the output pixel centres, which only matters when a crop is downscaled), and ColorJitter uses the
fixed order b, c, s, h where torchvision draws a random order per call.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from selfsup.data.transforms import Augment, as_pipelines, check_view_count

__all__ = [
    "BatchedViews",
    "adjust_hue",
    "gaussian_blur",
    "hsv_to_rgb",
    "rgb_to_grayscale",
    "rgb_to_hsv",
]

# torchvision's luma weights (ITU-R 601-2, with torchvision's 0.2989 for red), so the batched and
# per-image grayscale agree to float precision.
_GRAY_WEIGHTS = (0.2989, 0.587, 0.114)

# Columns of the per-sample uniform draws (one ``torch.rand(N, _N_DRAWS)`` per pipeline): one column
# per scalar parameter, then ``_CROP_TRIES`` candidate (area, log-ratio) pairs for RandomResizedCrop.
_POSX, _POSY, _FLIP, _JIT, _FB, _FC, _FS, _FH, _GRAY, _BLUR, _SIGMA, _SOL = range(12)
_CROP_TRIES = 10  # as torchvision's RandomResizedCrop
_AREA = slice(12, 12 + _CROP_TRIES)
_LOGR = slice(12 + _CROP_TRIES, 12 + 2 * _CROP_TRIES)
_N_DRAWS = 12 + 2 * _CROP_TRIES


# --------------------------------------------------------------------------------------------------
# Vectorised colour helpers (inputs are float images in [0, 1], shape [..., 3, H, W])
# --------------------------------------------------------------------------------------------------


def rgb_to_grayscale(x: Tensor) -> Tensor:
    """Luma ``0.2989 R + 0.587 G + 0.114 B`` of ``[..., 3, H, W]``, returned as ``[..., 1, H, W]``."""
    r, g, b = x.unbind(dim=-3)
    return r.mul(_GRAY_WEIGHTS[0]).add_(g, alpha=_GRAY_WEIGHTS[1]).add_(b, alpha=_GRAY_WEIGHTS[2]).unsqueeze(-3)


def rgb_to_hsv(x: Tensor) -> Tensor:
    """RGB -> HSV, all channels in ``[0, 1]`` (hue as a fraction of a turn), shape ``[..., 3, H, W]``.

    ``V = max``, ``S = (max - min) / max`` (0 for black), and the hue is the position on the colour
    hexagon: ``(G - B) / delta`` from red, ``2 + (B - R) / delta`` from green, ``4 + (R - G) / delta``
    from blue, divided by 6 and wrapped to ``[0, 1)``; 0 for greys (``delta = 0``).
    """
    r, g, b = x.unbind(dim=-3)
    maxc = torch.maximum(torch.maximum(r, g), b)
    minc = torch.minimum(torch.minimum(r, g), b)
    delta = maxc - minc
    grey = delta == 0
    s = delta / torch.where(maxc > 0, maxc, torch.ones_like(maxc))
    d = torch.where(grey, torch.ones_like(delta), delta)
    h = torch.where(
        maxc == r,
        (g - b) / d,
        torch.where(maxc == g, 2.0 + (b - r) / d, 4.0 + (r - g) / d),
    )
    h = torch.where(grey, torch.zeros_like(h), torch.remainder(h / 6.0, 1.0))
    return torch.stack((h, s, maxc), dim=-3)


_HSV_OFFSETS: dict[tuple[torch.device, torch.dtype], Tensor] = {}


def hsv_to_rgb(x: Tensor) -> Tensor:
    """HSV -> RGB (inverse of :func:`rgb_to_hsv`), shape ``[..., 3, H, W]``.

    Uses the closed form ``c_n = V - V S clamp(min(k_n, 4 - k_n), 0, 1)`` with
    ``k_n = (n + 6 H) mod 6`` and ``n = 5, 3, 1`` for R, G, B: no branches, one broadcast.
    """
    h, s, v = x.unbind(dim=-3)
    key = (x.device, x.dtype)
    n = _HSV_OFFSETS.get(key)
    if n is None:
        n = _HSV_OFFSETS[key] = torch.tensor([5.0, 3.0, 1.0], device=x.device, dtype=x.dtype).view(3, 1, 1)
    k = torch.remainder(n + 6.0 * h.unsqueeze(-3), 6.0)
    w = torch.clamp(torch.minimum(k, 4.0 - k), 0.0, 1.0)
    v = v.unsqueeze(-3)
    return v - v * s.unsqueeze(-3) * w


def adjust_hue(x: Tensor, shift: Tensor) -> Tensor:
    """Rotate the hue of ``x [N, 3, H, W]`` by ``shift [N]`` turns (in ``[-0.5, 0.5]``), as torchvision.

    Equal to ``hsv_to_rgb(rgb_to_hsv(x) + (shift, 0, 0))`` up to float rounding; see :func:`_adjust_hue_`
    for the fused computation. ``x`` is not modified.
    """
    return _adjust_hue_(x.clone(), shift)


def _adjust_hue_(x: Tensor, shift: Tensor) -> Tensor:
    """In-place hue rotation of ``x [N, 3, H, W]`` by ``shift [N]`` turns; returns ``x``.

    Fused so that only one modulo runs, on the one-channel hue, and nothing full-size is allocated.
    With ``max``, ``min``, ``delta = max - min`` (= V S) and the shifted hue in sixths of a turn
    ``h6 in [0, 6)``, channel ``c`` (centred at ``0, 2, 4`` for R, G, B) is
    ``max - delta * clamp(dist_c - 1, 0, 1)``, ``dist_c`` being the circular distance from ``h6`` to the
    channel's centre: a channel within one sixth of the hue sits at the maximum, one two sixths or more
    away at the minimum, linear in between (this is ``hsv_to_rgb``'s closed form). With
    ``a = |h6 - centre| in [0, 6)``, ``dist - 1 = 2 - |a - 3|``. Greys (``delta = 0``) are unchanged.
    """
    r, g, b = x.unbind(dim=-3)
    maxc = torch.maximum(torch.maximum(r, g), b)
    minc = torch.minimum(torch.minimum(r, g), b)
    delta = maxc - minc
    # Which channel holds the maximum (ties: R before G before B), as 0/1 floats (bool-consuming ops
    # such as torch.where are slow on CPU).
    m_r = (maxc == r).to(x.dtype)
    m_g = (maxc == g).to(x.dtype).mul_(1.0 - m_r)
    m_b = 1.0 - m_r - m_g
    # Hue in sixths: (G - B)/delta from red, 2 + (B - R)/delta from green, 4 + (R - G)/delta from blue.
    h6 = m_r * (g - b) + m_g * (b - r) + m_b * (r - g)
    h6.div_(delta.clamp_min(1e-12)).add_(2.0 * m_g + 4.0 * m_b).add_(6.0 * shift.view(-1, 1, 1))
    h6 = torch.remainder(h6, 6.0).unsqueeze(-3)  # [N, 1, H, W] in [0, 6)
    key = (x.device, x.dtype)
    centres = _HUE_CENTRES.get(key)
    if centres is None:
        centres = _HUE_CENTRES[key] = torch.tensor([0.0, 2.0, 4.0], device=x.device, dtype=x.dtype).view(3, 1, 1)
    # x is overwritten from here on: x <- -clamp(2 - ||h6 - c| - 3|, 0, 1) * delta + max.
    torch.sub(h6, centres, out=x)
    x.abs_().sub_(3.0).abs_().sub_(2.0).clamp_(-1.0, 0.0)
    return x.mul_(delta.unsqueeze(-3)).add_(maxc.unsqueeze(-3))


_HUE_CENTRES: dict[tuple[torch.device, torch.dtype], Tensor] = {}


def gaussian_kernels(sigma: Tensor, kernel_size: int) -> Tensor:
    """Normalised 1-D Gaussian kernels ``[N, k]``, one per sigma in ``sigma [N]``, centred on ``k // 2``."""
    t = torch.arange(kernel_size, device=sigma.device, dtype=sigma.dtype) - (kernel_size - 1) / 2.0
    w = torch.exp(-0.5 * (t.view(1, -1) / sigma.view(-1, 1)) ** 2)
    return w / w.sum(dim=1, keepdim=True)


def gaussian_blur(x: Tensor, sigma: Tensor, kernel_size: int) -> Tensor:
    """Blur each image of ``x [N, C, H, W]`` with its own isotropic Gaussian of std ``sigma[n]``.

    Separable: a horizontal then a vertical depthwise conv, as one grouped convolution over the
    ``N * C`` channels of a single "image" (each channel gets its own kernel), after reflect padding
    by ``k // 2`` on every side (torchvision's ``gaussian_blur`` padding).
    """
    n, c, hgt, wid = x.shape
    pad = kernel_size // 2
    if pad >= min(hgt, wid):
        raise ValueError(f"blur kernel {kernel_size} is too large for {hgt}x{wid} images (reflect padding)")
    w = gaussian_kernels(sigma.to(x.dtype), kernel_size).repeat_interleave(c, dim=0)  # [N*C, k]
    y = F.pad(x.reshape(1, n * c, hgt, wid), (pad, pad, pad, pad), mode="reflect")
    y = F.conv2d(y, w.view(n * c, 1, 1, kernel_size), groups=n * c)
    y = F.conv2d(y, w.view(n * c, 1, kernel_size, 1), groups=n * c)
    return y.view(n, c, hgt, wid)


def _uniform(u: Tensor, low: float, high: float) -> Tensor:
    """Map ``U(0, 1)`` draws to ``U(low, high)``."""
    return low + (high - low) * u


def _on_subset_(x: Tensor, mask: Tensor, fn: Callable[..., Tensor], *args: Tensor) -> Tensor:
    """Replace the samples of ``x`` selected by ``mask [N]`` with ``fn(x[sel], *(a[sel] for a in args))``.

    In place on ``x`` (which the caller owns); ``fn`` may modify its (gathered) input. An all-true mask
    calls ``fn`` on ``x`` itself and an all-false one returns ``x``, with no gather or scatter.
    """
    if bool(mask.all()):
        return fn(x, *args)
    sel = mask.nonzero().squeeze(1)
    if sel.numel() == 0:
        return x
    return x.index_copy_(0, sel, fn(x.index_select(0, sel), *(a.index_select(0, sel) for a in args)))


# --------------------------------------------------------------------------------------------------
# The batched view generator
# --------------------------------------------------------------------------------------------------


class BatchedViews(torch.nn.Module):
    """Generate ``V`` augmented views of every image of a batch, vectorised, on the batch's device.

    Args:
        pipelines: one :class:`Augment` (or a preset name / pair); view ``v`` uses
            ``pipelines[v % len(pipelines)]`` (asymmetric pair: even slots A, odd slots B). All pipelines
            must share ``crop_size`` (the views are stacked).
        n_views: views per image, a positive multiple of ``len(pipelines)``.

    ``forward(images, generator)`` takes ``uint8 [B, 3, H, W]`` (or float in ``[0, 1]``) and returns
    normalised ``float32 [B, V, 3, crop, crop]``, sample-major. The module holds no parameters or
    buffers (nothing lands in checkpoints).

    It also takes views whose geometry is already applied, ``uint8`` (or float) ``[B, V, 3, crop, crop]``:
    what the loader yields for images that cannot be stacked at full size (each view cropped and
    flipped from the full image by :func:`~selfsup.data.transforms.crop_flip_transform` of pipeline
    ``v % P``). Then only the photometric ops run (jitter, grayscale, blur, solarize, normalize), with the
    same per-(image, view) draws and pipeline assignment as for 4-D input; the crop and flip draws are
    unused. Deviation: a ``color_first`` pipeline (the STL-10 preset) gets its jitter and grayscale
    *after* the crop on this path.
    """

    def __init__(self, pipelines: Sequence[Augment] | Augment | str, n_views: int) -> None:
        super().__init__()
        pipes = as_pipelines(pipelines)  # type: ignore[arg-type]
        check_view_count(n_views, len(pipes))
        sizes = {p.crop_size for p in pipes}
        if len(sizes) != 1:
            raise ValueError(f"all pipelines must share crop_size to be stacked, got {sorted(sizes)}")
        self.pipelines: list[Augment] = pipes
        self.n_views = int(n_views)
        self.crop_size = pipes[0].crop_size

    def extra_repr(self) -> str:
        return f"n_views={self.n_views}, crop_size={self.crop_size}, pipelines={len(self.pipelines)}"

    @torch.no_grad()
    def forward(self, images: Tensor, generator: torch.Generator | None = None) -> Tensor:
        cropped = images.dim() == 5
        c = self.crop_size
        if cropped:
            if tuple(images.shape[1:]) != (self.n_views, 3, c, c):
                raise ValueError(
                    f"expected cropped views [B, V={self.n_views}, 3, {c}, {c}] or images [B, 3, H, W], "
                    f"got {tuple(images.shape)}"
                )
        elif images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images [B, 3, H, W], got {tuple(images.shape)}")
        if images.dtype == torch.uint8:
            x = images.to(torch.float32).div_(255.0)
        elif images.is_floating_point():
            # the cropped path works in place on its input: never on the caller's tensor
            x = images.to(torch.float32, copy=cropped)
        else:
            raise TypeError(f"images must be uint8 or float in [0, 1], got {images.dtype}")
        b = x.shape[0]
        n_pipes = len(self.pipelines)
        per_pipe = self.n_views // n_pipes
        rng_device = generator.device if generator is not None else x.device
        outs = []
        for p, aug in enumerate(self.pipelines):
            # All random numbers for this pipeline, one row per (image, view), rows sample-major.
            u = torch.rand(b * per_pipe, _N_DRAWS, generator=generator, device=rng_device).to(x.device)
            if cropped:  # this pipeline's views v = p, p + P, ...: rows (image, k) sample-major, as u
                y = self._finish(self._color(x[:, p::n_pipes].reshape(b * per_pipe, 3, c, c), aug, u), aug, u)
            else:
                y = self._pipeline(x, aug, per_pipe, u)
            outs.append(y.view(b, per_pipe, 3, c, c))
        if n_pipes == 1:
            return outs[0]
        # Interleave: view v comes from pipeline v % P, its (v // P)-th view.
        return torch.stack(outs, dim=2).reshape(b, self.n_views, 3, c, c)

    # ------------------------------------------------------------------------------------------------

    def _pipeline(self, x: Tensor, aug: Augment, per_image: int, u: Tensor) -> Tensor:
        """Run one pipeline: ``x [B, 3, H, W]`` -> ``[B * per_image, 3, crop, crop]`` (sample-major).

        ``x`` is never modified; every later op works in place on the freshly resampled crops.
        """
        if aug.color_first:
            # Colour ops at full resolution, on one copy of the image per view.
            y = self._color(x.repeat_interleave(per_image, dim=0), aug, u)
            y = self._crop_flip(y, aug, u, per_image=1)
        else:
            y = self._color(self._crop_flip(x, aug, u, per_image=per_image), aug, u)
        return self._finish(y, aug, u)

    def _finish(self, y: Tensor, aug: Augment, u: Tensor) -> Tensor:
        """Blur, solarize and normalize ``y [N, 3, crop, crop]`` in place (rows of ``u`` per sample)."""
        if aug.blur_p > 0.0:
            sigma = _uniform(u[:, _SIGMA], *aug.blur_sigma)
            k = aug.kernel_size
            y = _on_subset_(y, u[:, _BLUR] < aug.blur_p, lambda img, s: gaussian_blur(img, s, k), sigma)
        if aug.solarize_p > 0.0:
            # Solarize: pixels >= threshold become 1 - x, i.e. x <- |x - s| with s = [x >= threshold].
            t = aug.solarize_threshold
            y = _on_subset_(y, u[:, _SOL] < aug.solarize_p, lambda img: img.sub_((img >= t).to(img.dtype)).abs_())
        # Normalize: (x - mean) / std, in place as x * (1 / std) - mean / std.
        mean = torch.tensor(aug.mean, dtype=torch.float64)
        std = torch.tensor(aug.std, dtype=torch.float64)
        scale = (1.0 / std).to(device=y.device, dtype=y.dtype).view(1, 3, 1, 1)
        shift = (-mean / std).to(device=y.device, dtype=y.dtype).view(1, 3, 1, 1)
        return y.mul_(scale).add_(shift)

    def _crop_flip(self, x: Tensor, aug: Augment, u: Tensor, per_image: int) -> Tensor:
        """RandomResizedCrop + horizontal flip as one affine resampling per sample.

        The crop box follows torchvision's ``RandomResizedCrop`` (without its rounding to whole
        pixels): up to 10 candidates per sample of area fraction ``a ~ U(scale)`` and aspect
        ``r = exp(U(log ratio))``, i.e. ``w = sqrt(a r H W)``, ``h = sqrt(a H W / r)``; the first one that
        fits inside the image is used, its top-left corner uniform over the positions that keep it
        inside. If none fits (rare), the crop is the centred whole image with its aspect clamped to
        ``ratio``. All candidates are drawn up front, so this stays vectorised.

        In ``affine_grid``'s normalised coordinates (``align_corners=False``: the image spans
        ``[-1, 1]`` edge to edge) the crop is ``x_in = sx * x_out + tx`` with ``sx = w / W`` (negated for
        a flip) and ``tx`` the crop centre, likewise for y. ``grid_sample`` then reads the source at the
        output pixel centres (bilinear or bicubic, border padding, no antialiasing).

        ``x`` holds ``B`` images and ``u`` has ``B * per_image`` rows: the ``per_image`` grids of an image
        are stacked vertically into one tall grid, so the source image is never copied per view.
        Returns a new tensor ``[B * per_image, 3, crop, crop]``.
        """
        n = u.shape[0]
        bsz, _, hgt, wid = x.shape
        c = aug.crop_size
        area = _uniform(u[:, _AREA], *aug.scale)  # [N, tries]
        ratio = torch.exp(_uniform(u[:, _LOGR], math.log(aug.ratio[0]), math.log(aug.ratio[1])))
        w_try = torch.sqrt(area * ratio * (hgt / wid))  # w / W
        h_try = torch.sqrt(area / ratio * (wid / hgt))  # h / H
        fits = (w_try <= 1.0) & (h_try <= 1.0)
        first = fits.to(torch.uint8).argmax(dim=1, keepdim=True)  # index of the first fitting candidate
        found = fits.any(dim=1)
        # Fallback: the whole image, aspect clamped to the ratio range, centred.
        in_ratio = wid / hgt
        fb_w, fb_h = 1.0, 1.0
        if in_ratio < aug.ratio[0]:
            fb_h = in_ratio / aug.ratio[0]
        elif in_ratio > aug.ratio[1]:
            fb_w = aug.ratio[1] / in_ratio
        w_frac = torch.where(found, w_try.gather(1, first).squeeze(1), fb_w)
        h_frac = torch.where(found, h_try.gather(1, first).squeeze(1), fb_h)
        pos_x = torch.where(found, u[:, _POSX], 0.5)
        pos_y = torch.where(found, u[:, _POSY], 0.5)
        # Crop centre, normalised to [-1, 1]; the top-left corner is at pos * (1 - frac).
        cx = 2.0 * (pos_x * (1.0 - w_frac) + 0.5 * w_frac) - 1.0
        cy = 2.0 * (pos_y * (1.0 - h_frac) + 0.5 * h_frac) - 1.0
        sx = torch.where(u[:, _FLIP] < aug.flip_p, -w_frac, w_frac)
        zero = torch.zeros_like(sx)
        theta = torch.stack((sx, zero, cx, zero, h_frac, cy), dim=1).view(n, 2, 3).to(x.dtype)
        grid = F.affine_grid(theta, [n, 3, c, c], align_corners=False)  # [N, c, c, 2]
        if per_image > 1:
            grid = grid.view(bsz, per_image * c, c, 2)
        y = F.grid_sample(x, grid, mode=aug.interpolation, padding_mode="border", align_corners=False)
        if per_image > 1:  # [B, 3, P*c, c] -> [B*P, 3, c, c]
            y = y.view(bsz, 3, per_image, c, c).transpose(1, 2).reshape(n, 3, c, c)
        if aug.interpolation == "bicubic":
            y.clamp_(0.0, 1.0)  # cubic overshoot
        return y

    def _color(self, x: Tensor, aug: Augment, u: Tensor) -> Tensor:
        """ColorJitter with probability ``jitter_p``, then Grayscale with probability ``gray_p``; in place.

        Factors are drawn like torchvision's ``ColorJitter``: brightness / contrast / saturation
        ``f ~ U(max(0, 1 - s), 1 + s)``, hue ``f ~ U(-h, h)``. They are applied in the fixed order
        brightness, contrast, saturation, hue (torchvision draws a random order per call), each
        followed by a clamp to ``[0, 1]``:

        * brightness: ``x * f``;
        * contrast: blend with the mean of the image's luma, ``f x + (1 - f) mean``;
        * saturation: blend with the per-pixel luma, ``f x + (1 - f) luma``;
        * hue: rotate H in HSV by ``f`` turns.

        A sample that does not draw the jitter gets the identity factors ``(1, 1, 1, 0)`` instead of a
        mask: exact for b, c, s, and identity up to float rounding (~1e-7) for the hue.

        Grayscale replaces every channel of the chosen samples with the luma
        ``0.2989 R + 0.587 G + 0.114 B`` (torchvision's weights).
        """
        bs, cs, ss, hs = aug.jitter
        if aug.jitter_p > 0.0 and max(bs, cs, ss, hs) > 0.0:
            keep = u[:, _JIT] < aug.jitter_p

            def factor(col: int, low: float, high: float, identity: float) -> Tensor:
                f = torch.where(keep, _uniform(u[:, col], low, high), identity)
                return f.to(x.dtype).view(-1, 1, 1, 1)

            if bs > 0.0:  # brightness
                x.mul_(factor(_FB, max(0.0, 1.0 - bs), 1.0 + bs, 1.0)).clamp_(0.0, 1.0)
            if cs > 0.0:  # contrast; f x + (1 - f) m == x + (1 - f) (m - x) == lerp(x, m, 1 - f)
                mean = rgb_to_grayscale(x).mean(dim=(-3, -2, -1), keepdim=True)
                x.lerp_(mean.expand_as(x), 1.0 - factor(_FC, max(0.0, 1.0 - cs), 1.0 + cs, 1.0)).clamp_(0.0, 1.0)
            if ss > 0.0:  # saturation
                luma = rgb_to_grayscale(x)
                x.lerp_(luma.expand_as(x), 1.0 - factor(_FS, max(0.0, 1.0 - ss), 1.0 + ss, 1.0)).clamp_(0.0, 1.0)
            if hs > 0.0:  # hue (already within [0, 1])
                x = _adjust_hue_(x, factor(_FH, -hs, hs, 0.0).view(-1))
        if aug.gray_p > 0.0:
            x = _on_subset_(x, u[:, _GRAY] < aug.gray_p, lambda img: img.copy_(rgb_to_grayscale(img)))
        return x
