"""Small helpers around ``torch.distributed``, safe to call without a process group.

The one piece that matters for correctness is :func:`gather`, an autograd-aware
all-gather. Batch-level losses (MMCR, MEC, SimCLR, ...) need every rank to see
the whole global batch, and the gradient has to flow back to the rank that
produced each row.

Why the backward pass sums and then slices
------------------------------------------
Every rank computes the **same** global loss ``L(z_1, ..., z_W)`` from the
gathered tensor and back-propagates it. On rank ``r`` the autograd graph gives
``∂L/∂Z`` for the whole gathered tensor, but only the slice ``z_r`` connects to
this rank's parameters. The backward of :func:`gather` all-reduces (SUM) the
incoming gradient over ranks and returns this rank's slice, so rank ``r`` gets
``W · ∂L/∂z_r`` (all ``W`` ranks contribute the same value). The rank's
parameter gradient is then ``W · ∂L/∂θ|_(via z_r)``. DDP averages over ranks:
``(1/W) Σ_r W · ∂L/∂θ|_(via z_r) = Σ_r ∂L/∂θ|_(via z_r) = ∂L/∂θ``, which is
exactly the single-process gradient at the same global batch.

The official MMCR code used a plain (gradient-free) all-gather and put the
local tensor back in its slot. Each rank then back-propagates only
``∂L/∂z_r`` and DDP's averaging shrinks the result to ``(1/W) · ∂L/∂θ``.
``gather(x, grad="local")`` is that gather, kept for parity with such seeds
(``MMCR(gather_grad="local")``).

Every rank must call :func:`gather` (and run the backward pass) the same number
of times in the same order, as with any collective.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["all_gather_variable", "all_reduce_", "gather", "is_dist", "rank", "world_size"]

_MAX_DIMS = 15  # shapes are exchanged in a fixed-width vector so ranks never mismatch


def is_dist() -> bool:
    """True when ``torch.distributed`` is available and a process group is initialised."""
    return dist.is_available() and dist.is_initialized()


def world_size(group: Any = None) -> int:
    """Number of ranks in ``group`` (1 when not distributed)."""
    return dist.get_world_size(group) if is_dist() else 1


def rank(group: Any = None) -> int:
    """This process's rank in ``group`` (0 when not distributed)."""
    return dist.get_rank(group) if is_dist() else 0


def _all_shapes(x: Tensor, group: Any) -> list[tuple[int, ...]]:
    """Every rank's ``x.shape``, exchanged through one fixed-width all-gather."""
    if x.dim() > _MAX_DIMS:
        raise ValueError(f"gather supports tensors of at most {_MAX_DIMS} dims, got {x.dim()}")
    info = torch.full((_MAX_DIMS + 1,), -1, dtype=torch.long, device=x.device)
    info[0] = x.dim()
    if x.dim():
        info[1 : x.dim() + 1] = torch.tensor(x.shape, dtype=torch.long, device=x.device)
    out = [torch.empty_like(info) for _ in range(world_size(group))]
    dist.all_gather(out, info, group=group)
    shapes = []
    for t in out:
        vals = t.tolist()
        shapes.append(tuple(int(s) for s in vals[1 : vals[0] + 1]))
    return shapes


class _GatherWithGrad(torch.autograd.Function):
    """All-gather along dim 0; backward = all-reduce(SUM) then take this rank's slice."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, group: Any) -> Tensor:  # type: ignore[override]
        ctx.group = group
        ctx.local_rows = x.shape[0]
        ctx.rank = rank(group)
        x = x.contiguous()
        out = [torch.empty_like(x) for _ in range(world_size(group))]
        dist.all_gather(out, x, group=group)
        return torch.cat(out, dim=0)

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        grad = grad_out.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        start = ctx.rank * ctx.local_rows
        return grad[start : start + ctx.local_rows], None


class _GatherLocalGrad(_GatherWithGrad):
    """All-gather along dim 0; backward = this rank's slice of its own gradient (other ranks' rows are constants)."""

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        start = ctx.rank * ctx.local_rows
        return grad_out[start : start + ctx.local_rows], None


def gather(x: Tensor, group: Any = None, grad: Literal["all", "local"] = "all") -> Tensor:
    """Autograd-aware all-gather: concatenate ``x`` from every rank along dim 0.

    Identity when not distributed (or with a single rank). All ranks must hold
    tensors of the same shape, dtype and device type; the shapes are exchanged
    first and a mismatch raises ``ValueError`` on every rank (no hang). For
    rows that differ across ranks without gradients use :func:`all_gather_variable`.

    The backward pass sums the incoming gradient over ranks and returns this
    rank's slice; combined with DDP's gradient averaging, parameters get the
    exact single-process gradient of the global loss (see the module docstring).
    ``grad="local"`` drops the other ranks' share instead (the gradient-free
    all-gather of official codes: ``1/W`` of the exact gradient after DDP's
    averaging); the forward value is the same.
    """
    if grad not in ("all", "local"):
        raise ValueError(f"gather: grad must be 'all' or 'local', got {grad!r}")
    if not is_dist() or world_size(group) == 1:
        return x
    shapes = _all_shapes(x, group)
    if any(s != shapes[0] for s in shapes):
        raise ValueError(
            "selfsup.distributed.gather needs the same tensor shape on every rank "
            f"(equal local batch sizes; use drop_last=True); got shapes by rank: {shapes}"
        )
    return (_GatherWithGrad if grad == "all" else _GatherLocalGrad).apply(x, group)


@torch.no_grad()
def all_reduce_(x: Tensor, op: Literal["sum", "max", "min"] = "sum", group: Any = None) -> Tensor:
    """In-place all-reduce of ``x`` (no gradient) over ``group``; ``x`` unchanged when not distributed. Returns ``x``.
    A collective: every rank must call it (e.g. Sinkhorn-Knopp's sums, DINO's center)."""
    ops = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}
    if op not in ops:
        raise ValueError(f"all_reduce_: op must be one of {sorted(ops)}, got {op!r}")
    if is_dist() and world_size(group) > 1:
        dist.all_reduce(x, op=ops[op], group=group)
    return x


@torch.no_grad()
def all_gather_variable(x: Tensor, group: Any = None) -> Tensor:
    """All-gather (no gradient) of tensors whose first dimension differs across ranks.

    Pads every rank's tensor to the largest first dimension, all-gathers, trims
    the padding and concatenates in rank order. Trailing dimensions must match.
    Returns ``x.detach()`` when not distributed. Used e.g. for kNN feature banks
    where the last batch of each rank has a different size.
    """
    if not is_dist() or world_size(group) == 1:
        return x.detach()
    shapes = _all_shapes(x, group)
    tails = {s[1:] for s in shapes}
    if any(len(s) == 0 for s in shapes) or len(tails) != 1:
        raise ValueError(
            "all_gather_variable needs tensors of >= 1 dims with equal trailing "
            f"dimensions on every rank; got shapes by rank: {shapes}"
        )
    rows = [s[0] for s in shapes]
    max_rows = max(rows)
    padded = x.new_zeros((max_rows, *x.shape[1:]))
    padded[: x.shape[0]] = x
    out = [torch.empty_like(padded) for _ in rows]
    dist.all_gather(out, padded.contiguous(), group=group)
    return torch.cat([t[:n] for t, n in zip(out, rows)], dim=0)
