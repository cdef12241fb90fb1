"""Where bf16 is native: the one rule behind ``precision: auto`` and IMLE's ``search_precision: auto``."""

from __future__ import annotations

import torch

__all__ = ["native_bf16"]


def native_bf16(device_type: str = "auto") -> bool:
    """True where the device computes bf16 natively: CUDA with bf16 (``cuda``/``gpu``, or ``auto`` when a CUDA
    device is present), else a CPU with AVX-512-BF16 / AMX (oneDNN's check)."""
    if device_type in ("auto", "gpu", "cuda") and torch.cuda.is_available():
        return bool(torch.cuda.is_bf16_supported())
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False
