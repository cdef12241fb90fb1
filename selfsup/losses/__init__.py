"""Losses: pure functions on tensors, fp32 inside with autocast off."""

from selfsup.losses import spectrum
from selfsup.losses.byol import byol_loss
from selfsup.losses.info_nce import info_nce_loss
from selfsup.losses.mec import mec_lamda_inv, mec_loss, mec_warmup_lamda_inv
from selfsup.losses.mmcr import mmcr_loss, mmcr_momentum_loss
from selfsup.losses.spectrum import effective_rank, rankme, singular_values

__all__ = [
    "byol_loss",
    "effective_rank",
    "info_nce_loss",
    "mec_lamda_inv",
    "mec_loss",
    "mec_warmup_lamda_inv",
    "mmcr_loss",
    "mmcr_momentum_loss",
    "rankme",
    "singular_values",
    "spectrum",
]
