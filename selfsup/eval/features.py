"""Frozen-backbone feature extraction.

Everything evaluation does with a pretrained backbone (kNN monitor, cached linear probe, export
checks) starts from :func:`extract_features`: run the backbone **in eval mode** (BatchNorm uses
its running statistics and never updates them, dropout is off) under ``torch.no_grad()`` over a
loader of ``(image, label)`` batches, and return the flattened features and the labels on the CPU.

The module's train/eval flags are restored afterwards *per submodule* (see :func:`eval_mode`),
so calling the extractor from inside a training loop (e.g. a kNN monitor callback) leaves the
model exactly as it was.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["check_labels", "eval_mode", "extract_features", "split_batch"]


@contextlib.contextmanager
def eval_mode(module: nn.Module) -> Iterator[nn.Module]:
    """Context manager: put ``module`` (and all its submodules) in eval mode, then restore.

    The previous ``training`` flag of **every** submodule is recorded and put back on exit,
    so a model whose parts were in mixed modes (e.g. a frozen BN backbone inside a training
    module) comes back unchanged. Gradients are not touched; combine with ``torch.no_grad()``.
    """
    flags = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield module
    finally:
        for m, flag in flags:
            m.training = flag


def split_batch(batch: Any) -> tuple[Tensor, Tensor]:
    """Return ``(inputs, labels)`` from a loader batch.

    Accepts ``(x, y)`` tuples/lists (extra trailing items, e.g. indices, are ignored) and
    ``{"image": x, "label": y}`` dicts. Labels are converted to an int64 tensor.
    """
    if isinstance(batch, dict):
        x, y = batch["image"], batch["label"]
    elif isinstance(batch, (tuple, list)) and len(batch) >= 2:
        x, y = batch[0], batch[1]
    else:
        raise TypeError(f"expected an (inputs, labels) batch, got {type(batch).__name__}")
    return x, torch.as_tensor(y, dtype=torch.long)


def check_labels(labels: Tensor | Sequence[int], num_classes: int, name: str) -> Tensor:
    """``labels`` as a flat int64 tensor, checked to lie in ``[0, num_classes)``.

    The one label check of the evaluation code (kNN and linear probes): a label outside the range
    is a ``ValueError`` naming ``name`` and the range found, never a silently narrower score matrix
    or an out-of-bounds scatter.
    """
    labels = torch.as_tensor(labels, dtype=torch.long).reshape(-1)
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(
            f"{name} must lie in [0, num_classes={num_classes}), got range [{int(labels.min())}, {int(labels.max())}]"
        )
    return labels


def _autocast(device: torch.device, amp_dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    if amp_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=amp_dtype)


def extract_features(
    backbone: nn.Module,
    loader: Iterable[Any],
    device: str | torch.device = "cpu",
    normalize: bool = False,
    amp_dtype: torch.dtype | None = None,
) -> tuple[Tensor, Tensor]:
    """Run a frozen ``backbone`` over ``loader`` and collect its features.

    Args:
        backbone: the network; its output for a batch ``[B, ...]`` is flattened to ``[B, F]``.
            It is run in eval mode under ``torch.no_grad()``; the train/eval flag of each
            submodule is restored afterwards. The module is not moved: it must already be on
            ``device``.
        loader: iterable of ``(inputs, labels)`` batches (see :func:`split_batch`).
        device: where the inputs are sent before the forward pass.
        normalize: L2-normalise each feature vector (computed in fp32).
        amp_dtype: if given (e.g. ``torch.bfloat16`` / ``torch.float16`` on CUDA), the forward
            runs under ``torch.autocast`` with this dtype; the features are returned in fp32.

    Returns:
        ``(features, labels)``: ``float32 [N, F]`` and ``int64 [N]``, both on the CPU.
    """
    device = torch.device(device)
    feats: list[Tensor] = []
    labels: list[Tensor] = []
    with eval_mode(backbone), torch.no_grad():
        for batch in loader:
            x, y = split_batch(batch)
            x = x.to(device, non_blocking=True)
            with _autocast(device, amp_dtype):
                f = backbone(x)
            f = f.flatten(1).float()
            if normalize:
                f = F.normalize(f, dim=1)
            feats.append(f.cpu())
            labels.append(y.reshape(-1).cpu())
    if not feats:
        raise ValueError("extract_features: the loader yielded no batches")
    return torch.cat(feats), torch.cat(labels)
