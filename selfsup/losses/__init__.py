"""Losses: pure functions on tensors, fp32 inside with autocast off."""

from selfsup.losses.mmcr import mmcr_loss, mmcr_momentum_loss

__all__ = ["mmcr_loss", "mmcr_momentum_loss"]
