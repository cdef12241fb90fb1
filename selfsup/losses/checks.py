"""What every loss checks first, in one place: tensor layout, floating dtype, finite values, equal shapes, and the
dtype the maths runs in.

A loss calls :func:`check_floating` on each input (the layout string names the axes, e.g. ``"[rows, features]"``
or ``"[B, V, D]"``, and gives the expected number of dimensions), :func:`same_shapes` on inputs that must match,
and computes in :func:`compute_dtype` with autocast off. Non-finite values raise :class:`FloatingPointError` naming
the input and how many rows hold them: a loss never drops rows silently.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["NORM_EPS", "check_floating", "check_positive", "check_rows", "compute_dtype", "same_shapes"]

#: The eps of every L2 normalisation in the losses (``F.normalize(x, eps=NORM_EPS)``).
NORM_EPS = 1e-12


def check_floating(x: Tensor, name: str, loss: str, layout: str = "[rows, features]") -> None:
    """Check that ``x`` is a non-empty floating tensor of ``layout``'s rank with finite values.

    Args:
        x: the input.
        name: its name in the error messages (the loss's argument name).
        loss: the loss's name (``"mec_loss"``), said in the NaN message.
        layout: the axes, e.g. ``"[rows, features]"`` or ``"[B, V, D]"``; its comma count gives the rank.

    Raises:
        TypeError: not a tensor, or not floating point.
        ValueError: wrong rank or an empty axis.
        FloatingPointError: NaN or Inf anywhere (the message counts the rows, i.e. the first axis, holding them).
    """
    ndim = layout.count(",") + 1
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != ndim:
        raise ValueError(f"{name} must have shape {layout}; got a {x.dim()}-D tensor of shape {tuple(x.shape)}")
    if min(x.shape) == 0:
        raise ValueError(f"{name} has an empty dimension: shape {tuple(x.shape)} {layout}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
    if not bool(torch.isfinite(x).all()):
        n_bad = int((~torch.isfinite(x)).reshape(x.shape[0], -1).any(dim=1).sum())
        raise FloatingPointError(
            f"{name} contains NaN or Inf values (in {n_bad} of {x.shape[0]} rows, shape {tuple(x.shape)}); "
            f"{loss} refuses to drop rows silently. Check the learning rate, the precision settings and the inputs."
        )


def check_rows(x: Tensor, name: str, loss: str) -> None:
    """:func:`check_floating` for a ``[rows, features]`` matrix."""
    check_floating(x, name, loss, "[rows, features]")


def same_shapes(named: dict[str, Tensor]) -> None:
    """Raise ``ValueError`` naming every input and its shape unless all shapes are equal."""
    shapes = {n: tuple(t.shape) for n, t in named.items()}
    if len(set(shapes.values())) != 1:
        desc = ", ".join(f"{n} {s}" for n, s in shapes.items())
        raise ValueError(f"{', '.join(shapes)} must all have the same shape; got {desc}")


def check_positive(value: float, name: str) -> None:
    """Raise ``ValueError`` naming ``name`` unless ``value`` is a finite real number > 0 (temperatures, epsilons)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be finite and > 0, got {value!r}")


def compute_dtype(*xs: Tensor) -> torch.dtype:
    """The dtype a loss computes in: float64 if any input is float64, else float32 (half precision is upcast)."""
    return torch.float64 if any(x.dtype == torch.float64 for x in xs) else torch.float32
